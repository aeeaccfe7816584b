"""Presets cannot drift from the schema, params.yaml cannot drift from the defaults, and the file
is written in the layout DVC writes back (so `dvc exp run -S` changes only the values it sets)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nanoforge.config import ConfigError, Params, load_params, parse_yaml
from nanoforge.presets import DEFAULT, apply, available, build, main, read_preset
from tests.conftest import REPO, run, tool

PRESETS = REPO / "presets"


def test_the_presets_are_there():
    assert {"tiny", "d12", "d20"} <= set(available(PRESETS)) and DEFAULT == "tiny"


@pytest.mark.parametrize("name", available(PRESETS))
def test_a_preset_states_only_known_keys_that_differ_each_with_why(name):
    preset = read_preset(name, PRESETS)
    defaults = Params().model_dump(mode="json")
    for section, values in preset.values.items():
        assert section in defaults, f"presets/{name}.yaml: unknown section {section}"
        for key, value in values.items():
            assert key in defaults[section], f"presets/{name}.yaml: {section}.{key} is not in the schema"
            assert value != defaults[section][key], \
                f"presets/{name}.yaml: {section}.{key}: {value!r} is the default; a preset states only what differs"
            assert preset.notes.get((section, key)), f"presets/{name}.yaml: {section}.{key} needs a comment saying why"
    assert preset.header and preset.header[0].startswith(f"# {name}: "), f"presets/{name}.yaml: a header saying what it is for"
    params = apply(preset)  # validates, cross-field checks included
    for section, values in preset.values.items():
        assert {k: v for k, v in getattr(params, section).model_dump(mode="json").items() if k in values} == values


def test_params_yaml_is_what_the_tiny_preset_writes():
    """The defaults, their comments and params.yaml cannot drift apart: regenerate with
    `python -m nanoforge.presets tiny`."""
    _, text = build("tiny", PRESETS)
    assert (REPO / "params.yaml").read_text() == text, "params.yaml is stale: run `python -m nanoforge.presets tiny`"
    assert load_params(REPO / "params.yaml") == Params()


def test_a_preset_with_a_typo_or_a_bad_value_is_refused(tmp_path):
    (tmp_path / "typo.yaml").write_text("# typo: a test\ntrain:\n  dpeth: 6   # why\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: invalid config\n  train\.dpeth: unknown key \(did you mean 'depth'\?\)"):
        build("typo", tmp_path)
    (tmp_path / "bad.yaml").write_text("train:\n  depth: 5   # why\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid config\n  train\.depth=5 gives width 320 and 3 heads"):
        build("bad", tmp_path)
    (tmp_path / "flat.yaml").write_text("depth: 6\n")
    with pytest.raises(ConfigError, match=r"flat\.yaml: a preset is a mapping of sections"):
        build("flat", tmp_path)
    with pytest.raises(ConfigError, match=r"preset 'd13': no file .*d13\.yaml \(presets in .*: bad, flat, typo\)"):
        build("d13", tmp_path)


def test_the_command_switches_presets_and_back(tmp_path, capsys):
    target = tmp_path / "params.yaml"
    common = ["--params", str(target), "--presets-dir", str(PRESETS)]
    assert main(["d12", *common]) == 0
    params = load_params(target, section="train")
    assert params == apply(read_preset("d12", PRESETS)) and params.train.depth == 12
    raw = parse_yaml(target.read_text())  # complete: DVC reads every stage's params from it
    for section, field in Params.model_fields.items():
        assert set(raw[section]) == set(field.annotation.model_fields), section
    assert "# d12: a 186M-param model" in target.read_text()
    assert main(["d12", "--check", *common]) == 0 and main(["tiny", "--check", *common]) == 1
    assert main([*common]) == 0 and "d12 " in capsys.readouterr().out
    assert main(["tiny", *common]) == 0
    assert target.read_text() == (REPO / "params.yaml").read_text()


def test_nothing_is_written_from_a_bad_preset(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train:\n  matrix_lr: .inf   # why\n")
    target = tmp_path / "params.yaml"
    target.write_text("kept\n")
    assert main(["bad", "--params", str(target), "--presets-dir", str(tmp_path)]) == 2
    assert "train.matrix_lr: input should be a finite number" in capsys.readouterr().err
    assert target.read_text() == "kept\n"


# --- the layout DVC writes back (#15.9), with real DVC

ODD = """\
# odd: values that stress the writer (long words, long sentences, strings that look like other types)
download:
  source_dir: /a/very/long/path/to/a/folder/of/shards/that/goes/well/past/eighty/columns  # why
evaluate:
  sample_prompts:            # why
    - "yes"
    - "1e-3"
    - "a: b"
    - "# not a comment"
    - "Ünïcødé"
    - "A very long prompt that has many words in it and goes on past the eighty column width of DVC"
    - "   leading spaces"
    - "1_000"
    - "2024-01-01"
    - "null"
  core_tasks: []             # why
train:
  matrix_lr: 0.000001        # why
  target_flops: 1.0e+18      # why
report:
  champion: "x@y"            # why
"""


@pytest.fixture
def dvc_repo(tmp_path):
    """A bare git+DVC repo whose one stage reads the params `dvc exp run -S` sets below."""
    root = tmp_path / "repo"
    root.mkdir()
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "test@nanoforge"], root)
    run(["git", "config", "user.name", "nanoforge tests"], root)
    run([tool("dvc"), "init", "-q"], root)
    (root / "dvc.yaml").write_text(
        "stages:\n  noop:\n    cmd: echo ok\n    params:\n"
        "      - train.depth\n      - download.source_dir\n      - evaluate.core_max_per_task\n")
    return root


def _exp_run_diff(root: Path, params_text: str, sets: list[str]) -> list[str]:
    """Commit params.yaml, run `dvc exp run -S ...` in the workspace, return the changed lines of params.yaml."""
    (root / "params.yaml").write_text(params_text)
    run("git add -A && git commit -q -m params", root)
    run([tool("dvc"), "exp", "run", *[a for s in sets for a in ("-S", s)]], root, timeout=120)
    diff = run(["git", "diff", "--unified=0", "params.yaml"], root).stdout
    return [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_dvc_exp_run_changes_only_the_lines_of_the_values_it_sets(dvc_repo, tmp_path):
    # d12 has every kind of line: long URLs, nulls, lists, a mapping, preset comments
    _, text = build("d12", PRESETS)
    changed = _exp_run_diff(dvc_repo, text, ["train.depth=6", "download.source_dir=/data/shards",
                                             "evaluate.core_max_per_task=5"])
    assert changed == [
        "-  source_dir:                # or a local folder of shard_XXXXX.parquet to copy from (wins over base_url)",
        "+  source_dir: /data/shards   # or a local folder of shard_XXXXX.parquet to copy from (wins over base_url)",
        "-  depth: 12                  # d12: width 768, 6 heads of 128, 12 layers: 186M params",
        "+  depth: 6                   # d12: width 768, 6 heads of 128, 12 layers: 186M params",
        "-  core_max_per_task:         # d12: every item: the full CORE metric",
        "+  core_max_per_task: 5       # d12: every item: the full CORE metric",
    ], "\n".join(changed)
    assert load_params(dvc_repo / "params.yaml").train.depth == 6


def test_dvc_rewrites_odd_values_exactly_as_written(dvc_repo, tmp_path):
    (tmp_path / "odd.yaml").write_text(ODD)
    _, text = build("odd", tmp_path)
    assert load_params_text(text).evaluate.sample_prompts[0] == "yes"
    changed = _exp_run_diff(dvc_repo, text, ["train.depth=6"])
    assert [line.split("#")[0].strip() for line in changed] == ["-  depth: 4", "+  depth: 6"], "\n".join(changed)


def load_params_text(text: str) -> Params:
    return Params.model_validate(parse_yaml(text))


def test_the_module_runs_from_the_repo_root(tmp_path):
    out = subprocess.run([str(Path(tool("python"))), "-m", "nanoforge.presets", "tiny", "--check"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "params.yaml is preset tiny" in out.stdout
