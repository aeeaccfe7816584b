"""The tokenizer stage end to end: generated shards + manifest in, artifacts + metrics + an MLflow run out."""

from __future__ import annotations

import json
import sqlite3
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from nanoforge.tokenizer import training as stage
from nanoforge import pipes
from nanoforge.tokenizer.bpe import META_FILE, RANKS_FILE, load_tokenizer
from nanoforge.common import read_json, shard_name
from nanoforge.config import TokenizerConfig
from nanoforge.data.shards import build_manifest, read_manifest, write_manifest
from nanoforge.tracking import EXPERIMENT, tracking_uri
from stages.tokenizer import main
from tests.conftest import REPO, make_project, run, tool
from tests.datagen import make_documents, make_fineweb, write_shard

SAMPLE = REPO.parent / "shared" / "data" / "fineweb_sample"  # beside the checkout, where a machine has it
CONTRACT_KEYS = {"vocab_size", "train_chars", "train_docs", "train_seconds", "val_bytes_per_token", "roundtrip_ok",
                 "compression"}
KINDS = ["val", "prose", "code", "math", "non_english"]


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    # tests never touch the internet: no baseline download attempts, and an empty tiktoken cache
    monkeypatch.setenv("NANOFORGE_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))


def workdir(root: Path, params: str = "tokenizer:\n  vocab_size: 400\n  max_chars: 1000000\n  eval_chars: 20000\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_fineweb(root / "data" / "fineweb", train=(0, 1), val=1822, docs_per_shard=300, row_group_size=64)
    (root / "params.yaml").write_text(params)
    return root


def mlflow_runs():
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client, (client.search_runs([exp.experiment_id], "tags.stage = 'tokenizer'") if exp else [])


def test_stage_end_to_end_is_deterministic_and_tracked(tmp_path):
    outs = []
    for name in ("a", "b"):
        root = workdir(tmp_path / name)
        if name == "b":  # a re-run over an earlier output that DVC keeps a .gitignore in
            (root / "artifacts" / "tokenizer").mkdir(parents=True)
            (root / "artifacts" / "tokenizer" / ".gitignore").write_text("/tokenizer.tiktoken\n")
            (root / "artifacts" / "tokenizer" / RANKS_FILE).write_text("stale")
        # another process (another hash seed); the second one untracked, to save MLflow's start-up
        env = {"NANOFORGE_TRACKING": "off"} if name == "b" else {}
        proc = run([sys.executable, "-m", "stages.tokenizer"], cwd=root, env=env)
        outs.append(root / "artifacts" / "tokenizer")
    a, b = outs
    assert sorted(p.name for p in a.iterdir()) == sorted([RANKS_FILE, META_FILE, "details.json", "metrics.json"])
    assert (b / ".gitignore").read_text() == "/tokenizer.tiktoken\n"
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in a.iterdir()} == {oct(0o666 & ~umask)}  # not private temp files
    assert [p.name for p in (tmp_path / "a" / "artifacts").iterdir()] == ["tokenizer"]  # no staging leftovers
    for f in (RANKS_FILE, META_FILE):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between two identical runs"

    metrics = read_json(a / "metrics.json")
    # issue 15.7: the metrics file holds only numbers people compare (no notes, names, hashes or run ids)
    assert all(isinstance(v, (int, float, dict)) for v in metrics.values()), metrics
    assert not {"baselines", "warnings", "train_shards", "ranks_sha256", "mlflow_run_id"} & set(metrics)
    m = {**read_json(a / "details.json"), **metrics}
    assert CONTRACT_KEYS <= set(m)
    assert m["vocab_size"] == 400 and m["roundtrip_ok"] is True and m["roundtrip_failures"] == 0
    manifest = read_manifest(tmp_path / "a" / "data" / "fineweb" / "MANIFEST.json")
    assert m["train_chars"] == manifest["totals"]["train"]["chars"]  # all of it: max_chars is larger
    assert m["train_docs"] == 600 and m["data_exhausted"] is True
    assert m["train_shards"] == [shard_name(0), shard_name(1)]
    assert m["eval_chars"] == 20000 and 0 < m["eval_docs"] < 300
    assert list(m["compression"]) == KINDS
    for kind in KINDS:
        row = m["compression"][kind]
        assert row["ours"] > 1.0 and row["gpt2"] is None and row["cl100k_base"] is None
    assert m["val_bytes_per_token"] == m["compression"]["val"]["ours"]
    assert all("NANOFORGE_OFFLINE" in note for note in m["baselines"].values())
    assert any("max_chars=1,000,000 but the 2 training shard(s) hold only" in w for w in m["warnings"])
    assert "max_chars=1,000,000 but the 2 training shard(s)" in proc.stderr

    tok = load_tokenizer(a)
    meta = json.loads((a / META_FILE).read_text())
    assert meta["train"]["train_chars"] == m["train_chars"] and "seconds" not in json.dumps(meta)
    assert tok.decode(tok.encode("The cat sees a boat in 東京 🙂.")) == "The cat sees a boat in 東京 🙂."

    client, runs = mlflow_runs()
    (r,) = runs
    assert r.info.status == "FINISHED" and r.info.run_id == m["mlflow_run_id"]
    assert r.data.params["vocab_size"] == "400" and r.data.params["max_chars"] == "1000000"
    assert r.data.metrics["val_bytes_per_token"] == pytest.approx(m["val_bytes_per_token"])
    assert r.data.metrics["train_chars"] == m["train_chars"] and "bpt.code.ours" in r.data.metrics
    assert r.data.tags["tokenizer.ranks_sha256"] == meta["ranks_sha256"]
    logged = {f.path for f in client.list_artifacts(r.info.run_id, "tokenizer")}
    assert logged == {f"tokenizer/{n}" for n in (RANKS_FILE, META_FILE, "details.json", "metrics.json")}


def test_training_reads_training_shards_only_and_stops_at_max_chars(tmp_path):
    fineweb = tmp_path / "fineweb"
    make_fineweb(fineweb, train=(0, 1), val=5, docs_per_shard=100, row_group_size=16)
    val_docs = set(make_documents(100, seed=5))
    cfg = TokenizerConfig(vocab_size=300, max_chars=10**9, doc_cap=40)
    inputs = stage.check_inputs(cfg, fineweb)
    assert [p.name for p in inputs.train_paths] == [shard_name(0), shard_name(1)]
    assert inputs.val_path.name == shard_name(5)

    stats = stage.ReadStats()
    texts = list(stage.training_texts(inputs.train_paths, cfg.max_chars, cfg.doc_cap, stats))
    train_docs = make_documents(100, seed=0) + make_documents(100, seed=1)
    assert texts == [d[:40] for d in train_docs] and not set(texts) & val_docs
    assert stats.docs == 200 and stats.chars == sum(map(len, texts)) and stats.exhausted

    stats = stage.ReadStats()
    texts = list(stage.training_texts(inputs.train_paths, 1000, 10_000, stats))
    assert stats.chars == sum(map(len, texts)) >= 1000 > stats.chars - len(texts[-1])  # stops at the crossing doc
    assert not stats.exhausted and texts == train_docs[: len(texts)]

    val = stage.val_texts(inputs.val_path, 777)
    assert sum(map(len, val)) == 777 and val[:-1] == make_documents(100, seed=5)[: len(val) - 1]


def test_a_vocab_the_text_cannot_fill_and_doc_cap_shortfalls_are_warnings(tmp_path, monkeypatch, capsys):
    root = workdir(tmp_path / "w")
    total = read_manifest(root / "data" / "fineweb" / "MANIFEST.json")["totals"]["train"]["chars"]
    monkeypatch.chdir(root)
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")  # MLflow is covered end to end above; spare its start-up
    reported = []
    monkeypatch.setattr(pipes, "report", reported.append)  # what Dagster would receive under Pipes
    # the manifest holds enough characters, but doc_cap leaves less; and 5000 tokens is more than it can fill
    code = main(["--set", "vocab_size=5000", "--set", f"max_chars={total - 1}", "--set", "doc_cap=100"])
    assert code == 0
    m = {**read_json(root / "artifacts" / "tokenizer" / "details.json"),
         **read_json(root / "artifacts" / "tokenizer" / "metrics.json")}
    (meta,) = reported
    assert meta["vocab_size"] == m["vocab_size"] and meta["val_bytes_per_token"] == m["val_bytes_per_token"]
    assert meta["warnings"] == 2 and "mlflow_run_id" in meta
    assert meta["compression"]["type"] == "md" and "| non_english |" in meta["compression"]["raw_value"]
    assert 265 < m["vocab_size"] < 5000 and m["vocab_size_requested"] == 5000
    assert m["train_chars"] < total and m["data_exhausted"]
    assert any("ran out of pairs to merge" in w and "not the 5,000 asked for" in w for w in m["warnings"])
    assert any("ran out after" in w and "tokenizer.doc_cap=100" in w for w in m["warnings"])
    assert m["roundtrip_ok"] is True


def _no_manifest(fw: Path) -> None:
    (fw / "MANIFEST.json").unlink()


def _no_train_shards(fw: Path) -> None:
    m = json.loads((fw / "MANIFEST.json").read_text())
    m["train_shards"] = []
    (fw / "MANIFEST.json").write_text(json.dumps(m))


def _missing_shard(fw: Path) -> None:
    (fw / shard_name(1)).unlink()


def _missing_val(fw: Path) -> None:
    (fw / shard_name(1822)).unlink()


def _not_parquet(fw: Path) -> None:
    (fw / shard_name(0)).write_text("this is not parquet")


def _no_text_column(fw: Path) -> None:
    pq.write_table(pa.table({"content": ["a", "b"]}), fw / shard_name(0))


def _empty_text(fw: Path) -> None:
    for i in (0, 1):
        write_shard(fw / shard_name(i), [""] * 10)
    write_manifest(build_manifest(fw, [0, 1], 1822, source="test"), fw / "MANIFEST.json")


BAD_INPUTS = [
    (_no_manifest, [], r"MANIFEST\.json: no shard manifest; run the download stage first"),
    (_no_train_shards, [], "the manifest lists no training shards"),
    (_missing_shard, [], r"training shards listed in the manifest are missing: .*shard_00001\.parquet"),
    (_missing_val, [], r"validation shard .*shard_01822\.parquet is missing"),
    (_not_parquet, [], r"shard_00000\.parquet: not a readable parquet file"),
    (_no_text_column, [], r"shard_00000\.parquet: has no 'text' column \(columns: content\)"),
    (_empty_text, [], r"the training shards \(shard_00000\.parquet, shard_00001\.parquet\) hold no text"),
    (None, ["--set", "vocab_size=100"], r"tokenizer\.vocab_size: input should be greater than or equal to 265"),
    (None, ["--set", "vocab=5"], r"tokenizer\.vocab: unknown key \(did you mean 'vocab_size'\?\)"),
    (None, ["--set", "max_chars=lots"], r"tokenizer\.max_chars: input should be a valid integer"),
]


@pytest.mark.parametrize("breakage,argv,message", BAD_INPUTS, ids=[
    "no-manifest", "no-train-shards", "missing-shard", "missing-val", "not-parquet", "no-text-column",
    "empty-text", "vocab-too-small", "unknown-key", "bad-type",
])
def test_bad_input_fails_before_any_work(tmp_path, monkeypatch, capsys, breakage, argv, message):
    root = workdir(tmp_path / "w")
    if breakage:
        breakage(root / "data" / "fineweb")
    monkeypatch.chdir(root)
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert err.startswith("error: ") and __import__("re").search(message, err), err
    assert not (root / "artifacts").exists()  # nothing written, not even an empty directory
    with sqlite3.connect(tracking_uri().removeprefix("sqlite:///")) as db:  # no MLflow run was opened
        assert db.execute("select count(*) from runs").fetchone() == (0,)


def test_baselines_offline_are_a_note_not_a_wait():
    t0 = time.perf_counter()
    for name in stage.BASELINE_URLS:
        enc, note = stage.load_baseline(name)
        assert enc is None and "not in tiktoken's cache" in note and "NANOFORGE_OFFLINE" in note
    assert time.perf_counter() - t0 < 1


def test_compression_table_is_markdown():
    table = stage.compression_table({"val": {"ours": 3.21, "gpt2": None, "cl100k_base": 4.5}}, ["gpt2", "cl100k_base"])
    assert table.splitlines() == [
        "| text | ours | gpt2 | cl100k_base |", "|---|---:|---:|---:|", "| val | 3.210 | — | 4.500 |",
    ]


@pytest.mark.skipif(not SAMPLE.exists(), reason="no ../shared/data/fineweb_sample beside this checkout")
def test_tiny_preset_on_real_fineweb_sample(tmp_path, monkeypatch):
    fw = tmp_path / "data" / "fineweb"
    fw.mkdir(parents=True)
    for f in sorted(SAMPLE.glob("shard_*.parquet")):
        shutil.copyfile(f, fw / f.name)
    write_manifest(build_manifest(fw, [0, 1], 2, source="fineweb_sample"), fw / "MANIFEST.json")
    shutil.copyfile(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    assert main([]) == 0
    m = read_json(tmp_path / "artifacts" / "tokenizer" / "metrics.json")
    assert m["vocab_size"] == TokenizerConfig().vocab_size and m["roundtrip_ok"] is True
    # the pipeline's tokenizer asset check wants >= 3.0 bytes/token on the validation text
    assert m["val_bytes_per_token"] > 3.0
    assert m["compression"]["prose"]["ours"] > m["compression"]["non_english"]["ours"]
    assert read_json(tmp_path / "artifacts" / "tokenizer" / "details.json")["train_seconds"] < 30


def test_dvc_repro_runs_the_stage_and_then_skips_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    root = make_project(tmp_path / "project", {"tokenizer.vocab_size": 400, "tokenizer.eval_chars": 20000})
    make_fineweb(root / "data" / "fineweb", train=(0, 1), val=1822, docs_per_shard=300, row_group_size=64)
    first = run([tool("dvc"), "repro", "tokenizer"], root)
    assert "Running stage 'tokenizer'" in first.stdout
    assert (root / "artifacts" / "tokenizer" / RANKS_FILE).exists()
    lock = (root / "dvc.lock").read_text()
    assert "artifacts/tokenizer/tokenizer.tiktoken" in lock and "vocab_size: 400" in lock
    assert "artifacts/tokenizer/metrics.json" in lock  # the metric DVC compares across runs
    again = run([tool("dvc"), "repro", "tokenizer"], root)
    assert "didn't change, skipping" in again.stdout
