"""Presets: each states only what differs from the defaults; one command writes the complete params.yaml.

    python -m nanoforge.presets            # the presets, and which one params.yaml is
    python -m nanoforge.presets d12        # params.yaml := the defaults + presets/d12.yaml, validated
    python -m nanoforge.presets tiny       # back to the defaults (the tiny CPU preset)
    python -m nanoforge.presets d12 --check  # exit 1 when params.yaml is not what d12 writes

Notable:
- The defaults and every knob's comment live once, in the schema (nanoforge/config.py);
  `presets/<name>.yaml` holds only the keys that differ, each with a comment saying why,
  and its header. `tiny` changes nothing: params.yaml at tiny is the schema's defaults.
- params.yaml stays complete (DVC reads it) and is written in the layout DVC itself writes
  back (ruamel's round trip, width 80: null as an empty value, a list's dashes at its key's
  indent, a value too long for its line on the next one, after `key: ` and its trailing space),
  so `dvc exp run -S key=value` changes only that key's line.
- Nothing is written unless the result validates; the write is atomic.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nanoforge.common import write_text
from nanoforge.config import (
    PARAMS_FILE, SECTIONS, ConfigError, Params, _format_errors, _Loader, parse_yaml,
)

PRESETS_DIR = Path("presets")
DEFAULT = "tiny"
WIDTH = 80  # ruamel's line width, which DVC keeps
COMMENT_COLUMN = 29  # where inline comments start (or two spaces after a longer line)

HEADER = """\
# nanoforge: every knob, one section per stage. Written by `python -m nanoforge.presets {name}`:
# the defaults and comments of nanoforge/config.py, with what presets/{name}.yaml changes.
# Switch with `python -m nanoforge.presets d12` (or d20, tiny); that rewrites this whole file.
# One-off runs: `python -m stages.<stage> --set key=value`, or `dvc exp run -S train.depth=6`.
# The layout is the one DVC writes back (an empty value is null), so an experiment's diff is its values."""


@dataclass
class Preset:
    name: str
    path: Path
    header: list[str] = field(default_factory=list)  # the file's leading comment lines
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> key -> value
    notes: dict[tuple[str, str], str] = field(default_factory=dict)  # (section, key) -> its comment


def preset_path(name: str, presets_dir: Path = PRESETS_DIR) -> Path:
    """A preset's name (`d12`) or a path to a preset file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or "/" in name:
        return path
    return presets_dir / f"{name}.yaml"


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def read_preset(name: str, presets_dir: Path = PRESETS_DIR) -> Preset:
    """Parse a preset file: its header, its values, and each key's comment."""
    path = preset_path(name, presets_dir)
    if not path.is_file():
        known = ", ".join(available(presets_dir)) or "none"
        raise ConfigError(f"preset {name!r}: no file {path} (presets in {presets_dir}/: {known})")
    text = path.read_text()
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"{path}: a preset is a mapping of sections, each a mapping of the keys it changes")
    header = []  # the leading comment block, up to the first line that is not a comment
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return Preset(name=path.stem, path=path, header=header, values=raw, notes=_inline_comments(text))


def _inline_comments(text: str) -> dict[tuple[str, str], str]:
    """(section, key) -> the comment at the end of the key's line (after its value)."""
    lines = text.splitlines()
    root = yaml.compose(text, Loader=_Loader)
    notes: dict[tuple[str, str], str] = {}
    if not isinstance(root, yaml.MappingNode):
        return notes
    for section, body in root.value:
        if not isinstance(body, yaml.MappingNode):
            continue
        for key, value in body.value:
            if isinstance(value, yaml.ScalarNode) or value.end_mark.line == key.start_mark.line:
                rest = lines[value.end_mark.line][value.end_mark.column:]
            else:  # a block list or mapping: the comment sits on the key's own line
                rest = lines[key.end_mark.line][key.end_mark.column:].lstrip().removeprefix(":")
            comment = rest.strip()
            if comment.startswith("#"):
                notes[(section.value, key.value)] = comment.lstrip("#").strip()
    return notes


def apply(preset: Preset) -> Params:
    """The defaults with the preset's values, validated; errors name the preset file and the key."""
    raw = Params().model_dump(mode="json")
    for section, values in preset.values.items():
        if section in raw:
            raw[section].update(values)
        else:
            raw[section] = values  # reported as an unknown section, with a did-you-mean
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(preset.path), raw)) from None


# ---------------------------------------------------------------------------
# YAML in the layout ruamel (DVC) writes back

class _Dumper(yaml.SafeDumper):
    """PyYAML's emitter (ruamel's ancestor) with ruamel's plain-scalar wrapping and YAML 1.2 quoting."""

    def write_plain(self, text: str, split: bool = True) -> None:
        # ruamel.yaml's Emitter.write_plain (MIT), which differs from PyYAML's in two places:
        # a word that does not fit goes to a line of its own, and a break comes at the width
        if self.root_context:
            self.open_ended = True
        if not text:
            return
        if not self.whitespace:
            self.column += 1
            self.stream.write(" ")
        self.whitespace = False
        self.indention = False
        spaces = breaks = False
        start = end = 0
        while end <= len(text):
            ch = text[end] if end < len(text) else None
            if spaces:
                if ch != " ":
                    if start + 1 == end and self.column >= self.best_width and split:
                        self.write_indent()
                        self.whitespace = False
                        self.indention = False
                    else:
                        self.column += end - start
                        self.stream.write(text[start:end])
                    start = end
            elif breaks:
                if ch not in "\n\x85\u2028\u2029":
                    if text[start] == "\n":
                        self.write_line_break()
                    for br in text[start:end]:
                        self.write_line_break() if br == "\n" else self.write_line_break(br)
                    self.write_indent()
                    self.whitespace = False
                    self.indention = False
                    start = end
            elif ch is None or ch in " \n\x85\u2028\u2029":
                data = text[start:end]
                if len(data) + self.column > self.best_width and self.indent is not None and self.column > self.indent:
                    self.write_indent()  # words longer than the line get a line of their own
                self.column += len(data)
                self.stream.write(data)
                start = end
            if ch is not None:
                spaces = ch == " "
                breaks = ch in "\n\x85\u2028\u2029"
            end += 1


def _represent_none(dumper: yaml.SafeDumper, _data: None) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:null", "")  # `key:`, as ruamel writes null


def _represent_float(dumper: yaml.SafeDumper, data: float) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:float", repr(data))  # 1e-06, not PyYAML's 1.0e-06


_Dumper.add_representer(type(None), _represent_none)
_Dumper.add_representer(float, _represent_float)
# A string is written plain only when both readers take it back as a string: ours (nanoforge.config)
# and ruamel's YAML 1.2 (these rules are ruamel's own: underscores in numbers, 0o/0b/0x ints).
_Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in _Loader.yaml_implicit_resolvers.items()}
for _tag, _rx, _first in [
    ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)"
     r"(?:[eE][-+]?[0-9]+)|[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     "-+0123456789."),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+)$", "-+0123456789"),
]:
    _Dumper.add_implicit_resolver(_tag, re.compile(_rx), list(_first))


def dump_yaml(tree: Any) -> str:
    """YAML that our reader and DVC's (1.2) take back as written: yaml.safe_dump (1.1) writes '3e12' plain,
    which both read as a float (sweep.budgets refuses that). For scripts and tests that rewrite params.yaml."""
    return yaml.dump(tree, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _value_lines(section: str, key: str, value: Any) -> list[str]:
    """`key: value` as ruamel writes it inside `section:` (one line, or more for long values and collections)."""
    text = yaml.dump({section: {key: value}}, Dumper=_Dumper, default_flow_style=False, sort_keys=False,
                     width=WIDTH, allow_unicode=True)
    return text.splitlines()[1:]


def _with_comment(line: str, comment: str) -> str:
    if not comment:
        return line
    return (line.ljust(COMMENT_COLUMN) if len(line) < COMMENT_COLUMN - 1 else line + "  ") + "# " + comment


def render(params: Params, preset: Preset) -> str:
    """The complete params.yaml for `params`: every key with its comment, the preset's own where it sets one."""
    out = HEADER.format(name=preset.name).splitlines() + ([""] + preset.header if preset.header else []) + [""]
    for section in SECTIONS:
        model = getattr(params, section)
        values = model.model_dump(mode="json")
        out.append(_with_comment(f"{section}:", type(model).NOTE))
        for key, info in type(model).model_fields.items():
            ours = preset.notes.get((section, key))
            note = f"{preset.name}: {ours}" if ours else (info.description or "")
            lines = _value_lines(section, key, values[key])
            wrapped = len(lines) > 1 and not isinstance(values[key], (list, dict))
            parts = note.split("\n")
            above, inline = (parts, "") if wrapped else (parts[:-1], parts[-1])  # a wrapped value's note goes above it
            out += [f"  # {a.strip()}" for a in above if a.strip()]
            out += [_with_comment(lines[0], inline.strip())] + lines[1:]
        out.append("")
    return "\n".join(out[:-1]) + "\n"


def build(name: str, presets_dir: Path = PRESETS_DIR) -> tuple[Params, str]:
    """The validated params and the params.yaml text a preset gives (checked to read back the same)."""
    preset = read_preset(name, presets_dir)
    params = apply(preset)
    text = render(params, preset)
    back = Params.model_validate(parse_yaml(text))
    if back != params:  # the writer itself is wrong: never write such a file
        raise RuntimeError(f"preset {name}: params.yaml would not read back as written")
    return params, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoforge.presets", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", help=f"a preset name ({', '.join(available()) or 'none found'}) "
                                                  "or a preset file; none: list them")
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the file to write (default: params.yaml)")
    parser.add_argument("--presets-dir", default=str(PRESETS_DIR), help="where presets live (default: presets)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file differs")
    args = parser.parse_args(argv)
    presets_dir, target = Path(args.presets_dir), Path(args.params)
    current = target.read_text() if target.exists() else None
    try:
        if args.preset is None:
            for name in available(presets_dir):
                text = build(name, presets_dir)[1]
                first = (read_preset(name, presets_dir).header or ["#"])[0].lstrip("# ").removeprefix(f"{name}: ")
                mark = f"  <- {target}" if text == current else ""
                print(f"{name:6s} {first}{mark}")
            return 0
        params, text = build(args.preset, presets_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if text == current:
            print(f"{target} is preset {args.preset}")
            return 0
        print(f"{target} differs from what `python -m nanoforge.presets {args.preset}` writes", file=sys.stderr)
        return 1
    write_text(target, text)
    t = params.train
    print(f"wrote {target}: preset {args.preset} (depth {t.depth}, seq {t.max_seq_len}, "
          f"{t.total_batch_size:,} tokens per step, {t.nproc_per_node} process(es) per node)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
