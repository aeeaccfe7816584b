"""params.yaml validation: every kind of bad config fails early, naming the key and the reason."""

from pathlib import Path

import pytest

from nanoforge.config import (
    ConfigError, Params, load_params, parse_override, parse_yaml, resolve, stage_parser,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_and_presets_validate():
    for path in [REPO / "params.yaml", *sorted((REPO / "presets").glob("*.yaml"))]:
        load_params(path)


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
