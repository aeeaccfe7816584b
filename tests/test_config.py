"""params.yaml validation: every kind of bad config fails early, naming the key and the reason."""

from pathlib import Path

import pytest

from nanoforge.config import (
    DTYPES, ConfigError, Params, TrainConfig, load_params, parse_override, parse_yaml, resolve, stage_parser,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_validate():
    # the presets state only their differences now: tests/test_presets.py validates each one applied
    load_params(REPO / "params.yaml")


def test_repo_params_name_every_knob():
    # every knob lives in params.yaml, not only as a code default
    raw = parse_yaml((REPO / "params.yaml").read_text())
    for section, model in Params.model_fields.items():
        missing = set(model.annotation.model_fields) - set(raw[section])
        assert not missing, f"params.yaml [{section}] does not list {sorted(missing)}"


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "train:\n  dpeth: 6\n")
    with pytest.raises(ConfigError, match=r"train\.dpeth: unknown key \(did you mean 'depth'\?\)"):
        load_params(path)


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trian:\n  depth: 6\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_params(path)


def test_wrong_type_is_not_coerced(tmp_path):
    path = write(tmp_path, "train:\n  depth: '6'\n")
    with pytest.raises(ConfigError, match=r"train\.depth: input should be a valid integer \(got '6'\)"):
        load_params(path)


def test_out_of_range(tmp_path):
    path = write(tmp_path, "tokenizer:\n  vocab_size: 100\n")
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size: input should be greater than or equal to 265"):
        load_params(path)


def test_inconsistent_values_name_both_keys(tmp_path):
    path = write(tmp_path, "download:\n  num_train_shards: 10\n  val_shard: 3\n")
    with pytest.raises(ConfigError, match=r"download\.val_shard=3 is also a training shard.*num_train_shards=10"):
        load_params(path)
    with pytest.raises(ConfigError, match=r"warmup_ratio.*warmdown_ratio"):
        load_params(write(tmp_path, "train:\n  warmup_ratio: 0.5\n  warmdown_ratio: 0.6\n"))


def test_all_errors_reported_at_once(tmp_path):
    path = write(tmp_path, "train:\n  depth: 0\n  max_seq_len: x\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "train.depth" in str(err.value) and "train.max_seq_len" in str(err.value)


def test_yaml_12_floats_and_big_ints(tmp_path):
    path = write(tmp_path, "tokenizer:\n  max_chars: 2e9\ntrain:\n  matrix_lr: 1e-3\n")
    params = load_params(path)
    assert params.tokenizer.max_chars == 2_000_000_000 and isinstance(params.tokenizer.max_chars, int)
    assert params.train.matrix_lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="max_chars"):
        load_params(write(tmp_path, "tokenizer:\n  max_chars: 2.5\n"))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_are_validated_the_same_way(tmp_path):
    path = write(tmp_path, "train:\n  depth: 4\n")
    assert load_params(path, ["depth=6"], section="train").train.depth == 6
    assert load_params(path, ["train.n_kv_head=null"], section="train").train.n_kv_head is None
    with pytest.raises(ConfigError, match=r"--set depth=0.*\n  train\.depth: input should be greater"):
        load_params(path, ["depth=0"], section="train")
    with pytest.raises(ConfigError, match="cannot override 'download'"):
        load_params(path, ["download.val_shard=3"], section="train")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("depth", "train")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_params(path, ["depth.x=1"], section="train")


def test_override_values_parse_as_yaml_scalars():
    assert parse_override("lr=1e-3", "train") == ("train.lr", 0.001)
    assert parse_override("flag=true", "x") == ("x.flag", True)
    assert parse_override("name=hello world", "x") == ("x.name", "hello world")
    assert parse_override("items=[a, b]", "x") == ("x.items", ["a", "b"])


def test_cli_prints_resolved_config(tmp_path, capsys):
    path = write(tmp_path, "train:\n  depth: 4\n")
    args = stage_parser("train").parse_args(["--params", str(path), "--set", "depth=6"])
    params = resolve("train", args)
    assert params.train.depth == 6
    out = capsys.readouterr().out
    assert "[train] resolved config:" in out and "depth: 6" in out


# --- bad configs that used to get through (#18.8): each a named error before any work

@pytest.mark.parametrize("text", ["", "\n", "# every line a comment\n"])
def test_an_empty_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    for section in (None, "train"):
        with pytest.raises(ConfigError, match=r"params\.yaml: empty.*python -m nanoforge\.presets tiny"):
            load_params(path, section=section)


def test_a_missing_section_is_named(tmp_path):
    complete = (REPO / "params.yaml").read_text()
    without_train = write(tmp_path, complete.replace("\ntrain:", "\nunused_train:").split("\nunused_train:")[0] + "\n")
    assert "train" not in parse_yaml(without_train.read_text())
    with pytest.raises(ConfigError, match=r"no 'train:' section, which this stage reads"):
        load_params(without_train, section="train")
    # an override cannot stand in for the section
    with pytest.raises(ConfigError, match=r"no 'train:' section"):
        load_params(without_train, ["depth=6"], section="train")
    args = stage_parser("train").parse_args(["--params", str(without_train)])
    with pytest.raises(ConfigError, match=r"no 'train:' section"):
        resolve("train", args, quiet=True)
    with pytest.raises(ConfigError, match=r"the 'train:' section is empty"):
        load_params(write(tmp_path, "train:\n"), section="train")
    # overrides still work on a complete file
    path = write(tmp_path, complete)
    assert load_params(path, ["depth=6", "n_kv_head=1"], section="train").train.depth == 6


def test_register_needs_the_pipeline_section(tmp_path):
    with pytest.raises(ConfigError, match=r"no 'pipeline:' section"):
        load_params(write(tmp_path, "train:\n  depth: 4\n"), section="pipeline")


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  depth: 4\n  max_seq_len: 256\n  depth: 6\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.depth is given twice \(lines 2 and 4\)"):
        load_params(path, section="train")
    path = write(tmp_path, "train:\n  depth: 4\nreport:\n  compare_runs: 1\ntrain:\n  depth: 6\n")
    with pytest.raises(ConfigError, match=r"train is given twice \(lines 1 and 5\)"):
        load_params(path)
    with pytest.raises(ConfigError, match=r"report\.gpu_hourly_usd\.H100 is given twice \(lines 3 and 4\)"):
        parse_yaml("report:\n  gpu_hourly_usd:\n    H100: 1.0\n    H100: 2.0\n")


@pytest.mark.parametrize("key,value", [
    ("train.matrix_lr", ".inf"), ("train.matrix_lr", ".nan"), ("download.timeout_s", ".inf"),
    ("train.target_flops", ".inf"), ("evaluate.temperature", "-.inf"), ("train.grad_clip", ".NaN"),
])
def test_non_finite_floats_are_refused_naming_the_key(tmp_path, key, value):
    section, name = key.split(".")
    path = write(tmp_path, f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{key}: input should be a finite number"):
        load_params(path, section=section)
    with pytest.raises(ConfigError, match=rf"--set {name}={value}.*\n  {key}: input should be a finite number"):
        load_params(write(tmp_path, f"{section}:\n  seed: 1\n" if section != "download" else "download:\n  workers: 1\n"),
                    [f"{name}={value}"], section=section)


def test_non_finite_prices_are_refused(tmp_path):
    path = write(tmp_path, "report:\n  gpu_hourly_usd:\n    H100: .nan\n")
    with pytest.raises(ConfigError, match=r"report\.gpu_hourly_usd\.H100: input should be a finite number"):
        load_params(path, section="report")


def test_yaml_12_booleans_as_dvc_reads_them(tmp_path):
    # DVC (ruamel, YAML 1.2) reads `on` / `yes` as strings: so do we, so both see the same params
    assert parse_yaml("a: on\nb: yes\nc: true\nd: False\n") == {"a": "on", "b": "yes", "c": True, "d": False}
    params = load_params(write(tmp_path, "evaluate:\n  sample_prompts: [yes, no]\n  skip_bad_tasks: true\n"))
    assert params.evaluate.sample_prompts == ["yes", "no"] and params.evaluate.skip_bad_tasks is True
    with pytest.raises(ConfigError, match=r"evaluate\.skip_bad_tasks: input should be a valid boolean \(got 'yes'\)"):
        load_params(write(tmp_path, "evaluate:\n  skip_bad_tasks: yes\n"))


# --- one place for each rule (#11)

def test_the_depth_rule_is_the_models():
    # the copy config.py had accepted depth 127 (head_dim 127, odd), which the model refuses
    from nanoforge.model.shape import config_for_depth

    for depth in range(1, 129):
        try:
            shape = config_for_depth(depth, vocab_size=512, sequence_len=256)
        except ValueError:
            shape = None
        try:
            TrainConfig(depth=depth, n_kv_head=None)
            valid = True
        except Exception:
            valid = False
        assert valid == (shape is not None), f"depth {depth}: config and model disagree"
        if shape is not None and shape.n_head > 1:  # a GQA that does not divide the model's heads
            bad = next((k for k in range(2, shape.n_head) if shape.n_head % k), shape.n_head + 1)
            with pytest.raises(Exception, match=rf"n_kv_head={bad} must divide the {shape.n_head} query heads"):
                TrainConfig(depth=depth, n_kv_head=bad)


def test_the_suggested_depths_are_valid():
    # they were checked by a copy of the rule that ignored the head_dim parity and the range:
    # depth 125 suggested 127 (head_dim 127) and 129 (above the maximum, 128)
    import re

    for depth in (5, 125, 127):
        with pytest.raises(Exception, match="nearby depths that work") as err:
            TrainConfig(depth=depth)
        ok = [int(d) for d in re.search(r"nearby depths that work: \[([0-9, ]*)\]", str(err.value)).group(1).split(",")]
        assert ok and depth not in ok
        for d in ok:
            TrainConfig(depth=d, total_batch_size=4096)


def test_config_does_not_load_torch():
    # every stage and Dagster import the config: validating params must not cost a torch import
    import subprocess
    import sys

    code = "import sys, nanoforge.config as c; c.load_params('params.yaml'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dtype_names_are_defined_once_and_are_torch_dtypes():
    import torch

    for model in (TrainConfig, Params.model_fields["evaluate"].annotation):
        assert model.model_fields["dtype"].annotation.__args__ == DTYPES
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in DTYPES if name != "auto")


# --- a stage's --help (#15.14)

def _module_doc(path):
    import ast

    return ast.get_docstring(ast.parse(path.read_text()), clean=False)


def test_stage_help_keeps_the_docstrings_lines():
    doc = _module_doc(REPO / "stages" / "train.py")
    bullets = [line for line in doc.splitlines() if line.startswith("- ")]
    assert len(bullets) >= 3
    text = stage_parser("train", doc).format_help()
    for line in bullets:
        assert "\n" + line + "\n" in text, f"bullet reflowed in --help: {line!r}"


def test_stage_help_grammar():
    assert "override an evaluate param for this run" in stage_parser("evaluate").format_help()
    assert "override a train param for this run" in stage_parser("train").format_help()
    # register reads the pipeline section (its --set goes there)
    assert "override a pipeline param for this run" in stage_parser("register").format_help()
