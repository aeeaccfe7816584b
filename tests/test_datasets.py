"""download.dataset: fineweb-edu | climbmix, through the real download path against a server on 127.0.0.1.

The climbmix mirror holds generated shards in the Hub's layout for karpathy/climbmix-400b-shuffle
(datasets/<repo>/resolve/main/shard_XXXXX.parquet, val = shard_06542), so HF_ENDPOINT pointed at it
checks the URL the dataset's table builds, and injected faults check it goes through the retrying fetch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import nanoforge.data.fetch as fetch
from nanoforge.common import shard_name
from nanoforge.config import DATASETS, ConfigError, DownloadConfig, load_params
from nanoforge.data import download
from nanoforge.data.shards import read_manifest
from stages.download import main
from tests.datagen import make_documents, make_eval_bundle, make_fineweb, write_shard
# test_download's fixtures: `server` serves this module's own `mirror`
from tests.test_download import server, workdir, zip_folder  # noqa: F401

CLIMBMIX = DATASETS["climbmix"]
HUB_PATH = f"datasets/{CLIMBMIX.repo}/resolve/main"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """fineweb-edu shards 0, 1, 1822 flat (NANOFORGE_MIRROR layout), climbmix 0, 1, 6542 only in the Hub layout."""
    root = tmp_path_factory.mktemp("mirror")
    make_fineweb(root, train=(0, 1), val=1822, docs_per_shard=100, row_group_size=32, manifest=False)
    for index in (0, 1, CLIMBMIX.val_shard):  # other documents than fineweb's: seeds 1000+
        write_shard(root / HUB_PATH / shard_name(index), make_documents(100, seed=1000 + index), row_group_size=32)
    zip_folder(make_eval_bundle(tmp_path_factory.mktemp("bundle") / "eval_bundle"), root / "eval_bundle.zip")
    return root


def use_climbmix(work: Path) -> None:
    params = work / "params.yaml"
    text = params.read_text()
    assert "\n  dataset: fineweb-edu " in text
    params.write_text(text.replace("\n  dataset: fineweb-edu ", "\n  dataset: climbmix ", 1))  # the key, not a comment


# ---------------------------------------------------------------------------
# the table and the config

def test_the_table_matches_nanochat():
    # nanochat 10231df: fineweb-edu-100b-shuffle, MAX_SHARD = 1822; HEAD 92d63d4: climbmix-400b-shuffle, 6542
    fw = DATASETS["fineweb-edu"]
    assert (fw.repo, fw.shards, fw.val_shard) == ("karpathy/fineweb-edu-100b-shuffle", 1823, 1822)
    assert (CLIMBMIX.repo, CLIMBMIX.shards, CLIMBMIX.val_shard) == ("karpathy/climbmix-400b-shuffle", 6543, 6542)
    assert CLIMBMIX.base_url == "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    # the default is today's behaviour: the same URL and val shard as before datasets were options
    cfg = DownloadConfig()
    assert (cfg.dataset, cfg.val_index) == ("fineweb-edu", 1822)
    assert cfg.shards_url == "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    # null val_shard / base_url follow the dataset; given ones win
    cm = DownloadConfig(dataset="climbmix")
    assert (cm.val_index, cm.shards_url) == (6542, CLIMBMIX.base_url)
    assert DownloadConfig(dataset="climbmix", val_shard=5000, base_url="http://m/x").shards_url == "http://m/x"
    assert download.configured_indices(DownloadConfig(dataset="climbmix", num_train_shards=3)) == [0, 1, 2, 6542]


@pytest.mark.parametrize("overrides,message", [
    (["download.dataset=climbmix", "download.val_shard=6543"],
     r"download\.val_shard=6543 is outside climbmix's shards 0\.\.6542 \(download\.dataset=climbmix\)"),
    (["download.dataset=climbmix", "download.num_train_shards=6543"],
     r"download\.num_train_shards=6543 is more than climbmix has: 6543 shards"),
    (["download.val_shard=6542"], r"download\.val_shard=6542 is outside fineweb-edu's shards 0\.\.1822"),
    (["download.num_train_shards=2000"], r"download\.num_train_shards=2000 is more than fineweb-edu has"),
    (["download.dataset=climbmix", "download.num_train_shards=6542", "download.val_shard=100"],
     r"download\.val_shard=100 is also a training shard"),
    (["download.dataset=fineweb"], r"download\.dataset: input should be 'fineweb-edu' or 'climbmix'"),
])
def test_bad_shard_numbers_name_the_key_and_the_dataset(workdir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_params("params.yaml", overrides)


def test_climbmix_allows_what_fineweb_refuses():
    cfg = DownloadConfig(dataset="climbmix", num_train_shards=2000)
    assert cfg.val_index == 6542 and len(download.configured_indices(cfg)) == 2001
    assert download.parse_indices("0-1,6542", cfg.spec.last) == [0, 1, 6542]
    with pytest.raises(ConfigError, match=r"outside the dataset's shards 0\.\.1822"):
        download.parse_indices("6542")


def test_bad_climbmix_config_fails_before_any_work(workdir, capsys):
    use_climbmix(workdir)
    assert main(["--set", "val_shard=7000"]) == 2
    assert "download.val_shard=7000 is outside climbmix's shards 0..6542" in capsys.readouterr().err
    assert main(["--only-shards", "6543"]) == 2
    assert "outside the dataset's shards 0..6542" in capsys.readouterr().err
    assert not Path("data").exists()


# ---------------------------------------------------------------------------
# downloads through the fault-tolerant path

def test_climbmix_downloads_from_its_hub_layout_through_faults(workdir, server, mirror, monkeypatch):
    use_climbmix(workdir)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.inject("shard_00000.parquet", "drop")
    server.inject("shard_06542.parquet", "500", "truncate")
    assert main(["--set", f"eval_bundle_url={mirror / 'eval_bundle.zip'}"]) == 0
    fetched = {g["path"] for g in server.gets() if g["status"] in (200, 206)}
    assert fetched == {f"/{HUB_PATH}/{shard_name(i)}" for i in (0, 1, 6542)}  # the dataset's own URLs
    assert [g["fault"] for g in server.gets("shard_00000.parquet")] == ["drop", None]  # resumed
    assert [g["fault"] for g in server.gets("shard_06542.parquet")] == ["500", "truncate", None]  # retried
    manifest = read_manifest("data/fineweb/MANIFEST.json")
    assert manifest["dataset"] == "climbmix"
    assert (manifest["train_shards"], manifest["val_shard"]) == ([0, 1], 6542)
    assert manifest["source"] == f"{server.url}/{HUB_PATH}"
    for entry in manifest["shards"]:
        assert (Path("data/fineweb") / entry["file"]).read_bytes() == (mirror / HUB_PATH / entry["file"]).read_bytes()
    # a re-run fetches nothing and leaves the manifest byte for byte
    before = Path("data/fineweb/MANIFEST.json").read_bytes()
    server.log.clear()
    assert main(["--set", f"eval_bundle_url={mirror / 'eval_bundle.zip'}"]) == 0
    assert not [g for g in server.gets() if g["method"] == "GET"]
    assert Path("data/fineweb/MANIFEST.json").read_bytes() == before


def test_fineweb_manifest_is_as_before_datasets(workdir, server, monkeypatch):
    # no `dataset` key for fineweb-edu: the manifest (and so data.dvc's hash) is what it was before
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert main([]) == 0
    manifest = json.loads(Path("data/fineweb/MANIFEST.json").read_text())
    assert sorted(manifest) == ["shards", "source", "totals", "train_shards", "val_shard", "version"]
    assert manifest["val_shard"] == 1822


# ---------------------------------------------------------------------------
# a switch re-downloads instead of mixing

def test_a_switch_refuses_to_mix_datasets_in_one_folder(workdir, server, mirror, monkeypatch, capsys):
    monkeypatch.setenv("NANOFORGE_MIRROR", server.url)
    assert main([]) == 0  # fineweb-edu
    before = {p.name: p.read_bytes() for p in Path("data/fineweb").iterdir()}
    use_climbmix(workdir)
    monkeypatch.delenv("NANOFORGE_MIRROR")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.log.clear()
    args = ["--set", f"eval_bundle_url={mirror / 'eval_bundle.zip'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data/fineweb holds fineweb-edu shards" in err and "download.dataset is climbmix" in err
    assert "move or delete data/fineweb" in err
    assert main(["--only-shards", "0"]) == 2  # the orchestrator's partitions too
    assert not server.gets()  # refused before any request
    assert {p.name: p.read_bytes() for p in Path("data/fineweb").iterdir()} == before
    # what the message says to do: the folder goes, the download brings climbmix
    import shutil

    shutil.rmtree("data/fineweb")
    assert main(args) == 0
    assert read_manifest("data/fineweb/MANIFEST.json")["dataset"] == "climbmix"
    assert (Path("data/fineweb/shard_00000.parquet").read_bytes()
            == (mirror / HUB_PATH / "shard_00000.parquet").read_bytes())


def test_tokenizer_train_and_evaluate_refuse_another_datasets_shards(workdir, capsys):
    from stages.evaluate import main as evaluate
    from stages.tokenizer import main as tokenizer
    from stages.train import main as train

    make_fineweb(Path("data/fineweb"), train=(0, 1), val=1822, docs_per_shard=50)  # a fineweb-edu manifest
    use_climbmix(workdir)
    for stage in (tokenizer, train, evaluate):
        assert stage([]) == 2
        err = capsys.readouterr().err
        assert "lists fineweb-edu shards but download.dataset is climbmix" in err, err
        assert "python -m stages.download" in err
    assert not Path("artifacts").exists()


def test_every_stage_that_checks_the_dataset_lists_it_as_a_param():
    # without the param, switching download.dataset leaves dvc repro saying "up to date": the guard never runs
    import yaml

    from tests.conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("tokenizer", "train", "evaluate"):
        assert "download.dataset" in stages[name]["params"], name
