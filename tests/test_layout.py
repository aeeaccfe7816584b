"""The layout's rules, checked from the code itself so they cannot drift:

- every `dvc.yaml` stage lists as deps the project modules its command imports, transitively
  (a module missing there means DVC reports stale results as up to date), and no dep is a
  file that no longer exists;
- `stages/` are thin entry points and nothing outside `pipelines/` imports Dagster.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("nanoforge", "stages")  # the project's own importable code


def module_file(root: Path, name: str) -> Path | None:
    """`a.b.c` -> a/b/c.py or a/b/c/__init__.py under root, when it is project code."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(root: Path, path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth of its code (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from nanoforge.training import loop` imports the module nanoforge.training.loop
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(root: Path, entry: Path) -> set[Path]:
    """The project files `entry` needs: itself, what it imports, and their parent packages."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(root, path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
                found = module_file(root, ".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    # an empty __init__.py cannot change any output
    return {p for p in seen if not (p.name == "__init__.py" and not p.read_text().strip())}


def stage_entries(root: Path, cmd: str) -> list[Path]:
    """The project modules a command runs: its `-m` module (a launcher such as nanoforge.launch)
    and the stage module it is given (`python -m nanoforge.launch stages.train`)."""
    names = re.findall(r"-m\s+((?:stages|nanoforge)\.[A-Za-z_.]+)", cmd) + re.findall(r"(?<![\w.])(stages\.[A-Za-z_]+)", cmd)
    return sorted({f for f in (module_file(root, n) for n in names) if f is not None})


def missing_deps(root: Path) -> dict[str, list[str]]:
    """stage -> project modules its command imports that its deps do not cover (and stale deps)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    problems: dict[str, list[str]] = {}
    for name, stage in spec["stages"].items():
        deps = [str(d) for d in stage.get("deps") or []]
        entries = stage_entries(root, stage["cmd"])
        assert any(e.parent.name == "stages" for e in entries), \
            f"stage {name}: its cmd does not run a `stages.<name>` module: {stage['cmd']}"
        needed = sorted({str(p.relative_to(root)) for e in entries for p in import_closure(root, e)})
        covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
        issues = [f"missing dep {f}" for f in needed if not covered(f)]
        issues += [f"dep {d} does not exist" for d in deps
                   if d.split("/")[0] in PACKAGES and not (root / d).exists()]
        if issues:
            problems[name] = issues
    return problems


def test_every_stage_lists_the_modules_it_imports():
    problems = missing_deps(REPO)
    assert not problems, "dvc.yaml deps out of date:\n" + "\n".join(
        f"  {stage}: {issue}" for stage, issues in problems.items() for issue in issues)


def test_the_deps_check_catches_a_missing_module(tmp_path):
    """The check itself can fail: drop one transitive import from a copy and it is named."""
    for name in ("nanoforge", "stages"):
        (tmp_path / name).symlink_to(REPO / name)
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec["stages"]["evaluate"]["deps"].remove("nanoforge/runtime.py")
    spec["stages"]["train"]["deps"].append("nanoforge/gone.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    problems = missing_deps(tmp_path)
    assert problems == {"evaluate": ["missing dep nanoforge/runtime.py"],
                        "train": ["dep nanoforge/gone.py does not exist"]}


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for d in ("nanoforge", "stages")
                                        for p in (REPO / d).rglob("*.py")), ids=str)
def test_no_dagster_below_pipelines(path):
    names = imported_modules(REPO, REPO / path)
    assert not any(n == "dagster" or n.startswith(("dagster.", "dagster_")) for n in names if n.split(".")[0] != "dagster_pipes"), \
        f"{path} imports Dagster; only pipelines/ may (stages talk to it through dagster_pipes)"


def test_stages_hold_only_entry_points():
    """stages/ is what you run; the library is nanoforge/. Each entry point stays short."""
    for path in sorted((REPO / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        lines = len(path.read_text().splitlines())
        assert lines <= 120, f"{path.relative_to(REPO)} has {lines} lines: move the logic into nanoforge/"
        assert "__main__" in path.read_text(), f"{path.relative_to(REPO)} is not an entry point"


# The training loop stays one function in nanochat's order (eval, sample, save, micro-steps,
# clip, schedule, step, log), read top to bottom; everything else is split below ~100 lines.
LONG_ON_PURPOSE = {("nanoforge/training/loop.py", "train")}


def test_no_function_over_100_lines():
    long = []
    for d in ("nanoforge", "stages", "pipelines"):
        for path in sorted((REPO / d).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 100 and (rel, node.name) not in LONG_ON_PURPOSE:
                        long.append(f"{rel}:{node.lineno} {node.name}() has {lines} lines")
    assert not long, "split these:\n" + "\n".join(long)


def test_no_machine_paths_in_the_project():
    """Issue 18.7: a path that exists on one machine only (/work/..., /home/...) is no use in a clone."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for rel in files:
        if rel.endswith(".html") or rel == "tests/test_layout.py":  # .dvc/plots.html: vega inline
            continue
        try:
            text = (REPO / rel).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"(?<![\w.])/(work|home|Users)/\w", line):
                found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, "machine paths (use a path relative to the repo, or a variable):\n" + "\n".join(found)
