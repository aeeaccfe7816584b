"""Report stage: rendering from contract-shaped outputs, "not run" sections, the MLflow comparison,
a real tiny pipeline run, and the HTML opened in headless Chromium.

The unit tests here write files shaped like the stages' output contracts (helper_brief:
metrics.json keys, steps.csv/val.csv/core.csv columns, samples.json) to test *rendering*;
the end-to-end test builds the report from a real `dvc repro` of the tiny pipeline.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from nanoforge import pipes
from nanoforge.reporting import report
from nanoforge.config import ConfigError, load_params
from nanoforge.reporting.doc import count, duration, nbytes, percent, si, sig, signed, usd
from stages.report import main
from tests.conftest import REPO, run, tool

SECTIONS = ["## Run", "## Data", "## Tokenizer", "## Training", "## Evaluation", "## Comparison with earlier runs"]
TASKS = [("hellaswag_zeroshot", 25.0), ("arc_easy", 25.0), ("lambada_openai", 0.0), ("copa", 50.0)]


# ---------------------------------------------------------------------------
# contract-shaped outputs (rendering tests only; the e2e test uses the real stages)

def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_outputs(root: Path, steps: int = 120, seed: int = 0, loss_offset: float = 0.0,
                  skip: tuple[str, ...] = ()) -> None:
    """Every upstream output the report reads, shaped like the contracts in the helper brief."""
    rng = random.Random(seed)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    if "manifest" not in skip:
        shards = [{"index": i, "file": f"shard_{i:05d}.parquet", "split": "train", "bytes": 95_000_000 + i,
                   "sha256": "ab" * 32, "rows": 53_000 + i, "chars": 250_123_456 + i} for i in range(3)]
        shards.append({"index": 1822, "file": "shard_01822.parquet", "split": "val", "bytes": 94_000_000,
                       "sha256": "cd" * 32, "rows": 52_000, "chars": 249_000_000})
        _json(root / "data/fineweb/MANIFEST.json", {
            "version": 1, "source": "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle",
            "train_shards": [0, 1, 2], "val_shard": 1822, "shards": shards,
            "totals": {"train": {"shards": 3}, "val": {"shards": 1}},
        })
    if "tokenizer" not in skip:
        kinds = {k: {"ours": 4.1 + i / 10, "gpt2": 4.0 + i / 7, "cl100k_base": 4.4 + i / 9}
                 for i, k in enumerate(["val", "prose", "code", "math", "non_english"])}
        kinds["non_english"]["gpt2"] = None  # a reference may be missing per kind
        _json(root / "artifacts/tokenizer/metrics.json", {
            "vocab_size": 4096, "train_chars": 10_000_000, "train_docs": 4321, "train_seconds": 12.3456,
            "val_bytes_per_token": 4.123456, "roundtrip_ok": True, "compression": kinds,
        })
    if "train" not in skip:
        num_params, fpt = 7_340_032, 4.4e7
        rows, ema, tokens = [], 0.0, 0
        for step in range(1, steps + 1):
            loss = 9.0 * math.exp(-step / 40) + 3.2 + loss_offset + rng.uniform(-0.15, 0.15)
            ema = 0.9 * ema + 0.1 * loss
            tokens += 4096
            rows.append([step, loss, ema / (1 - 0.9 ** step), 1.0 if step < 0.8 * steps else (steps - step) / (0.2 * steps),
                         rng.uniform(0.2, 2), 0.5, 8000 + rng.uniform(-500, 500), 0.31, tokens * fpt])
        _write_csv(root / "artifacts/train/steps.csv",
                   ["step", "loss", "loss_ema", "lr_mult", "grad_norm", "dt", "tok_per_sec", "mfu", "flops"], rows)
        val = [[s, s * 4096 * fpt, 2.5 * math.exp(-s / 60) + 1.4 + loss_offset] for s in range(0, steps + 1, 20)]
        _write_csv(root / "artifacts/train/val.csv", ["step", "flops", "val_bpb"], val)
        # metrics.json: the compared numbers; details.json: the rest (training/outputs.py)
        _json(root / "artifacts/train/metrics.json", {
            "num_params": num_params, "tokens_trained": tokens, "final_loss": rows[-1][2], "val_bpb": val[-1][2],
            "min_val_bpb": min(v[2] for v in val), "val_bpb_tokens": 32_768, "tok_per_sec": 8123.456, "mfu": 0.3123,
        })
        _json(root / "artifacts/train/details.json", {
            "num_flops_per_token": fpt, "steps": steps, "world_size": 1, "train_seconds": 3725.0,
            "peak_memory_mb": 1536.0, "device": "cpu", "dtype": "float32", "mlflow_run_id": None,
        })
        _json(root / "artifacts/model/config.json", {
            "model": {"sequence_len": 256, "vocab_size": 4096, "n_layer": 4, "n_head": 2, "n_kv_head": 2, "n_embd": 256},
            "train": {"step": steps, "tokens": tokens, "params": num_params, "depth": 4, "matrix_lr": 0.02},
        })
    if "eval" not in skip:
        tasks = {}
        rows = []
        for label, baseline in TASKS:
            acc = rng.uniform(0.2, 0.6)
            centered = (acc - 0.01 * baseline) / (1 - 0.01 * baseline)
            tasks[label] = {"accuracy": acc, "centered": centered, "items": 100, "seconds": 12.5}
            rows.append([label, acc, centered, 100, baseline, 12.5])
        core = sum(t["centered"] for t in tasks.values()) / len(tasks)
        _write_csv(root / "artifacts/eval/core.csv", ["task", "accuracy", "centered", "items", "random_baseline", "seconds"], rows)
        _json(root / "artifacts/eval/metrics.json", {
            "val_bpb": 1.3456789, "val_bpb_tokens": 65_536, "train_bpb": 1.29, "train_bpb_tokens": 65_536, "core": core,
        })
        _json(root / "artifacts/eval/details.json", {"tasks": tasks, "core_num_tasks": len(tasks), "eval_seconds": 95.0,
                                                      "mlflow_run_id": None})
        _json(root / "artifacts/eval/samples.json", {
            "conditional": [{"prompt": "The capital of France is", "completion": " Paris, the | city of <b>light</b> ```"},
                            {"prompt": "The opposite of hot is", "completion": " cold.\nNew line & more"}],
            "unconditioned": ["Once upon a time <script>alert(1)</script>", "| a | b |"],
        })


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


class _Checker(HTMLParser):
    """Tag balance and the images, from the standard library's parser."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_html(text: str) -> _Checker:
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    return checker


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_report(root: Path, *args: str) -> tuple[str, str]:
    assert main(list(args)) == 0
    return (root / "reports/report.md").read_text(), (root / "reports/report.html").read_text()


# ---------------------------------------------------------------------------
# formatting

def test_human_formatting():
    assert count(1234567) == "1,234,567" and count(None) == "n/a"
    assert sig(1.3456789) == "1.346" and sig(0.0123456) == "0.01235" and sig(12345.6) == "12,346"
    assert sig(2.5e-7) == "2.500e-07" and sig(float("nan")) == "NaN" and sig(0) == "0"
    assert signed(0.01) == "+0.01000" and signed(-2) == "-2.000"
    assert si(4.4e7, "FLOP") == "44.00 MFLOP" and si(1.234e15, "FLOP") == "1.234 PFLOP" and si(7_340_032) == "7.340 M"
    assert duration(42.14) == "42.1s" and duration(125) == "2m 05s" and duration(3725) == "1h 02m 05s"
    assert duration(90061) == "1d 01h 01m"
    assert nbytes(1536 * 2**20) == "1.500 GiB" and percent(0.3123) == "31.23%"
    assert usd(0.0517) == "$0.0517" and usd(0.05) == "$0.05" and usd(2.49) == "$2.49" and usd(1234.5) == "$1,234.50"
    assert usd(2.85e-5) == "< $0.0001" and usd(0) == "$0"


# ---------------------------------------------------------------------------
# rendering from contract-shaped outputs

def _git_commit(root: Path) -> str:
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "params.yaml", "dvc.lock", "data.dvc"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "run"], root)
    return run(["git", "rev-parse", "HEAD"], root).stdout.strip()


def _write_dvc_files(root: Path) -> None:
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 10\n  nfiles: 4\n  path: data\n")
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  tokenizer:\n    cmd: python -m stages.tokenizer\n    outs:\n"
        "    - path: artifacts/tokenizer/tokenizer.json\n      hash: md5\n      md5: feedfacefeedfacefeedfacefeedface\n"
        "  report:\n    cmd: python -m stages.report\n    outs:\n    - path: reports\n      hash: md5\n"
        "      md5: 99999999999999999999999999999999.dir\n")


def test_full_report_from_contract_outputs(workdir, monkeypatch):
    write_outputs(workdir)
    _write_dvc_files(workdir)
    commit = _git_commit(workdir)
    with open(workdir / "dvc.lock", "a") as f:  # dvc repro rewrites dvc.lock: that is output, not dirt
        f.write("# changed\n")
    (workdir / "artifacts/.gitignore").write_text("/model\n")
    sent = []
    monkeypatch.setattr(pipes, "report", lambda metadata: sent.append(metadata) or True)
    md, page = make_report(workdir)
    # what Dagster gets: where the report is, and the headline numbers
    (meta,) = sent
    assert meta["report_html"] == str((workdir / "reports/report.html").resolve()) and meta["figures"] == 4
    assert meta["val_bpb"] == pytest.approx(1.3456789) and meta["mfu"] == pytest.approx(0.3123)
    assert meta["sections_not_run"] == 0 and meta["mlflow_run_id"]
    assert meta["summary"]["type"] == "md"
    assert "| val BPB | 1.3457 (65,536 tokens, evaluate.val_tokens) |" in meta["summary"]["raw_value"]
    for heading in SECTIONS:
        assert heading + "\n" in md, heading
    assert "not run" not in md.lower() and "could not be rendered" not in md
    # numbers for humans
    assert "| **Parameters** | 7,340,032 (7.340 M) |" in md
    assert "| **FLOPs per token** | 44.00 MFLOP |" in md
    assert "| **Training time** | 1h 02m 05s |" in md
    assert "| **MFU** | 31.23% |" in md
    assert "| **Throughput** | 8,123 tok/s |" in md
    # two BPB figures, each naming its token budget; the evaluate stage's is the official one
    assert "| **Val BPB** | 1.3457 (65,536 tokens, evaluate.val_tokens) |" in md
    assert re.search(r"\| \*\*Val BPB in the loop \(final / min\)\*\* \| 1\.\d{4} / 1\.\d{4} "
                     r"\(32,768 tokens, train\.eval_tokens; the evaluation below is the official figure\) \|", md), md
    assert "| **Peak memory** | 1.500 GiB |" in md
    assert "| **Tokens : params** | 0.06696 : 1 |" in md
    # data: totals per split from the manifest
    assert re.search(r"\| train \| 3 \| 0–2 \| 159,003 \| 750,370,371 \|", md), md
    # tokenizer compression table, with a missing reference shown as n/a
    assert re.search(r"\| non_english \| 4\.500 \| n/a \| n/a \| 4\.844 \| -7\.\d+% \|", md)
    # cost: CPU price times 1h 02m 05s
    assert "$0.05 (one CPU machine at $0.05/hour" in md and "| **Training cost** | $0.0517 |" in md
    # the header pins the run: commit, clean, DVC hashes (not the report's own stale entry), one line to reproduce
    assert f"| **Git commit** | `{commit}` (clean) |" in md
    assert f"git checkout {commit} && dvc checkout && dvc repro\n" in md
    assert "| data.dvc | `data` | `0123456789abcdef0123456789abcdef.dir` |" in md
    assert "| dvc.lock: tokenizer | `artifacts/tokenizer/tokenizer.json` | `feedfacefeedfacefeedfacefeedface` |" in md
    assert "9999999999" not in md
    assert "| **Host** |" in md and "| **torch** | " in md and "| **Memory** | " in md
    assert "| **`n_embd`** | 256 |" in md
    # evaluation: per-task table, samples kept verbatim inside fences
    assert "| `hellaswag_zeroshot` |" in md
    assert "The capital of France is⟶ Paris, the | city of <b>light</b> ```" in md
    assert "````text" in md  # the fence outgrows the sample's own backticks
    for png in ("loss.png", "schedule.png", "val_bpb.png", "core.png"):
        assert f"](figures/{png})" in md and (workdir / "reports/figures" / png).stat().st_size > 5000
    # HTML: valid, self-contained (links to MLflow, nothing loaded from the network), escaped
    checker = check_html(page)
    assert len(checker.images) == 4 and all(i["src"].startswith("data:image/png;base64,") for i in checker.images)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r'src="https?:', page)
    links = re.findall(r'<a href="([^"]+)">', page)
    assert links and all(u.startswith("http://127.0.0.1:5000/#/experiments/") for u in links), links
    text = " ".join(checker.text)
    assert "7,340,032" in text and "31.23%" in text
    # the samples caption promises a marker between prompt and continuation: the HTML shows it too
    assert "then ⟶ where the model takes over" in page and "<b>The capital of France is</b>⟶ Paris" in page


def test_report_opens_on_a_summary_and_links_mlflow_runs(workdir, monkeypatch):
    write_outputs(workdir)
    md, page = make_report(workdir)
    # the first section is the summary, before hashes and hardware
    assert md.index("## Summary") < md.index("## Run") < md.index("## Data")
    summary = md[md.index("## Summary"):md.index("## Run")]
    for row in ("| **Val BPB** | 1.3457 (65,536 tokens, evaluate.val_tokens) |", "| **CORE** | 0.",
                "| **Throughput** | 8,123 tok/s |", "| **MFU** | 31.23% |", "| **Training cost** | $0.0517 |",
                "| **Time** | 1h 02m 05s training, 1m 35s evaluation |"):
        assert row in summary, (row, summary)
    # MLflow runs are links, not bare ids
    (link,) = re.findall(r"\| \*\*MLflow report run\*\* \| \[report run (\w{8})\]\((http://[^)]+)\) \|", md)
    assert link[1].endswith(f"/runs/{link[1].rsplit('/', 1)[-1]}") and link[1].rsplit("/", 1)[-1].startswith(link[0])
    # the headline numbers as a DVC metrics file: what Dagster shows when the report is up to date
    summary_json = json.loads((workdir / "reports/summary.json").read_text())
    assert summary_json["val_bpb"] == pytest.approx(1.3456789) and summary_json["val_bpb_tokens"] == 65_536
    assert summary_json["cost_usd"] == pytest.approx(0.05 * 3725 / 3600) and summary_json["mfu"] == pytest.approx(0.3123)


def test_sections_say_not_run_when_outputs_are_missing(workdir):
    (workdir / "params.yaml").write_text((REPO / "params.yaml").read_text())
    md, page = make_report(workdir)
    for heading in SECTIONS:
        assert heading in md
    assert md.count("Not run:") >= 4, md
    assert "`data/fineweb/MANIFEST.json` is missing (it comes from `dvc repro download`)" in md
    assert "`artifacts/train/metrics.json` is missing (it comes from `dvc repro train`)" in md
    assert "`artifacts/eval/metrics.json` is missing (it comes from `dvc repro evaluate`)" in md
    assert check_html(page).images == []


def test_dirty_tree_is_flagged(workdir):
    write_outputs(workdir, skip=("train", "eval", "tokenizer"))
    _write_dvc_files(workdir)
    _git_commit(workdir)
    (workdir / "params.yaml").write_text((workdir / "params.yaml").read_text() + "\n# edited\n")
    md, _ = make_report(workdir)
    assert "(dirty: uncommitted changes)" in md and "reproduces the last commit, not exactly this run" in md


def test_partial_outputs_and_unreadable_files(workdir):
    write_outputs(workdir, skip=("eval",))
    (workdir / "artifacts/tokenizer/metrics.json").write_text("{not json")
    (workdir / "artifacts/train/val.csv").unlink()
    md, page = make_report(workdir)
    assert "`artifacts/tokenizer/metrics.json` could not be read (JSONDecodeError" in md
    assert "`artifacts/train/val.csv` is missing" in md
    assert "`artifacts/eval/metrics.json` is missing" in md
    assert "loss.png" in md and "val_bpb.png" not in md
    assert "| **Parameters** | 7,340,032" in md  # the rest still renders
    check_html(page)


def test_gpu_cost_uses_the_price_table(workdir):
    write_outputs(workdir)
    metrics = json.loads((workdir / "artifacts/train/metrics.json").read_text())
    metrics.update(device="cuda", world_size=8, gpu_name="NVIDIA H100 80GB HBM3", train_seconds=1800.0)
    _json(workdir / "artifacts/train/metrics.json", metrics)
    md, _ = make_report(workdir, "--set", "gpu_hourly_usd={H100: 2.0, H200: 3.0}")
    assert "$16.00 (8 × H100 at $2.00/GPU-hour)" in md and "| **Training cost** | $8.00 |" in md
    metrics.update(gpu_name="NVIDIA B200")
    _json(workdir / "artifacts/train/metrics.json", metrics)
    md, _ = make_report(workdir)
    assert "no price for `NVIDIA B200` in `report.gpu_hourly_usd`" in md


def test_bad_params_fail_before_work(workdir, capsys):
    write_outputs(workdir)
    assert main(["--set", "champion=nanoforge-base"]) == 2
    assert "report.champion='nanoforge-base': expected 'model_name@alias'" in capsys.readouterr().err
    assert main(["--set", "compare_runs=-1"]) == 2
    assert not (workdir / "reports").exists()


def test_champion_name_matches_the_registry():
    params = load_params(REPO / "params.yaml")
    assert params.report.champion.split("@")[0] == params.pipeline.registered_model


def test_dvc_yaml_report_deps_list_every_input():
    import yaml

    block = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    deps = set(block["deps"])
    for path, _, _ in report.INPUTS.values():
        assert str(path) in deps or str(path.parent) in deps, f"{path} is read by the report but not a dep"
    for module in ("stages/report.py", "nanoforge/reporting/report.py", "nanoforge/reporting/doc.py",
                   "nanoforge/reporting/plots.py", "nanoforge/reporting/history.py", "nanoforge/sysinfo.py"):
        assert module in deps


# ---------------------------------------------------------------------------
# the comparison against a real MLflow SQLite store

def _past_train_run(client, exp_id: str, loss_offset: float, val_bpb: float, core: float | None,
                    start_ms: int, parent: str | None = None, link: str = "tag") -> str:
    """A finished train run logged the way stages/train.py logs (per-step metrics, final throughput,
    derived params), and, with `core`, the evaluate run of its model (linked by tag or by parent)."""
    from mlflow.entities import Metric, Param

    tags = {"stage": "train"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name="train", tags=tags, start_time=start_ms)
    rid = run.info.run_id
    fpt, ema, metrics = 4.4e7, 0.0, []
    for s in range(1, 121):
        loss = 9.0 * math.exp(-s / 40) + 3.2 + loss_offset
        ema = 0.9 * ema + 0.1 * loss
        metrics += [Metric("loss", loss, start_ms, s), Metric("loss_ema", ema / (1 - 0.9 ** s), start_ms, s),
                    Metric("flops", s * 4096 * fpt, start_ms, s), Metric("tok_per_sec", 6000.0, start_ms, s)]
    metrics += [Metric("val_bpb", val_bpb + 0.05, start_ms, 120)]
    metrics += [Metric(k, v, start_ms + 1, 120) for k, v in {
        "tok_per_sec": 7000.0, "mfu": 0.25, "train_seconds": 3000.0, "peak_memory_mb": 900.0}.items()]
    client.log_batch(rid, metrics=metrics, params=[Param("depth", "4"), Param("derived.num_params", "7340032"),
                                                   Param("derived.flops_per_token", str(fpt))])
    client.set_terminated(rid, "FINISHED", end_time=start_ms + 1000)
    if core is not None:
        ev_tags = {"stage": "evaluate"}
        ev_tags.update({"model.train_run_id": rid} if link == "tag" else {"mlflow.parentRunId": parent})
        ev = client.create_run(exp_id, run_name="evaluate", tags=ev_tags, start_time=start_ms + 2000)
        client.log_batch(ev.info.run_id, metrics=[Metric("core", core, start_ms, 0), Metric("val_bpb", val_bpb, start_ms, 0)])
        client.set_terminated(ev.info.run_id, "FINISHED")
    return rid


def test_comparison_with_earlier_runs_and_champion(workdir):
    from mlflow.tracking import MlflowClient

    from nanoforge.tracking import _experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    exp_id = _experiment_id(client)  # as the stages create it: artifacts beside the store, not in cwd
    base = int(time.time() * 1000) - 10_000_000
    parents = [client.create_run(exp_id, run_name="pipeline", tags={"stage": "pipeline"}).info.run_id for _ in range(3)]
    old = _past_train_run(client, exp_id, 0.3, 1.50, 0.05, base, parents[0])
    champ = _past_train_run(client, exp_id, 0.1, 1.40, 0.08, base + 1000, parents[1], link="parent")
    newest = _past_train_run(client, exp_id, 0.2, 1.45, None, base + 2000, parents[2])
    failed = client.create_run(exp_id, run_name="train", tags={"stage": "train"}, start_time=base + 3000)
    client.set_terminated(failed.info.run_id, "FAILED")
    # the champion: a model version registered from the champion's evaluate-stage sibling
    client.create_registered_model("nanoforge-base")
    version = client.create_model_version("nanoforge-base", f"runs:/{champ}/model", run_id=champ)
    client.set_registered_model_alias("nanoforge-base", "champion", version.version)
    write_outputs(workdir)

    md, page = make_report(workdir, "--set", "compare_runs=2")
    section = md.split("## Comparison with earlier runs")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | val BPB ↓ | CORE ↑ |")
    assert rows[1].startswith("| **this run** | 1.3457 |")
    assert rows[2].startswith(f"| champion v{version.version} · ") and champ[:8] in rows[2]
    # the champion's val BPB and CORE come from its evaluate run; deltas are this minus that
    assert "| 1.4000 (Δ -0.05432) |" in rows[2] and "0.0800 (Δ " in rows[2]
    assert newest[:8] in rows[3] and champ[:8] in rows[4]   # newest first, the failed run skipped
    assert old[:8] not in section and failed.info.run_id[:8] not in section  # compare_runs=2
    # no evaluate run: no val BPB to compare (the train loop's 1.50 is over other tokens), and no CORE
    assert rows[3].split(" | ")[1:3] == ["n/a", "n/a"] and "1.5000" not in rows[3]
    assert "7,000 (Δ +1.123 k)" in rows[3] and "25.00% (Δ +6.230 pp)" in rows[3]
    assert "(Δ +12m 05s)" in rows[3]
    # what training logs under other names: params from derived.num_params, tokens from flops / FLOPs per token
    assert rows[3].endswith("| 7.340 M (Δ 0) | 491.5 k (Δ 0) |")
    assert "](figures/compare_loss.png)" in md and (workdir / "reports/figures/compare_loss.png").stat().st_size > 5000
    check_html(page)

    # the report is itself a run: it records the headline numbers and the train run it describes
    runs = client.search_runs([exp_id], "tags.stage = 'report'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["val_bpb"] == pytest.approx(1.3456789)
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/figures", "report/summary.json"} <= artifacts


def test_comparison_without_earlier_runs(workdir):
    write_outputs(workdir)
    md, _ = make_report(workdir)
    section = md.split("## Comparison with earlier runs")[1]
    assert "No registered champion (`nanoforge-base@champion`) yet." in section
    assert "First run, nothing to compare" in section or "no `nanoforge` experiment" in section


def test_first_run_that_is_the_champion_is_not_compared_with_itself(workdir):
    from mlflow.tracking import MlflowClient

    from nanoforge.tracking import _experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    exp_id = _experiment_id(client)
    this = _past_train_run(client, exp_id, 0.0, 1.3456789, 0.07, int(time.time() * 1000) - 100_000)
    client.create_registered_model("nanoforge-base")
    version = client.create_model_version("nanoforge-base", f"runs:/{this}/model", run_id=this)
    client.set_registered_model_alias("nanoforge-base", "champion", version.version)
    write_outputs(workdir)
    details = json.loads((workdir / "artifacts/train/details.json").read_text())
    _json(workdir / "artifacts/train/details.json", {**details, "mlflow_run_id": this})  # this report's train run
    md, _ = make_report(workdir)
    section = md.split("## Comparison with earlier runs")[1]
    assert "First run, nothing to compare" in section and "the champion is this run" in section
    assert "Δ" not in section and "(this run)" not in section


def test_comparison_when_mlflow_is_unreachable(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    write_outputs(workdir)
    md, page = make_report(workdir)
    assert "Not run: MLflow at `http://127.0.0.1:9` is unreachable." in md
    check_html(page)


# ---------------------------------------------------------------------------
# the page in a real browser: headless Chromium (Debian's `chromium`)

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# appended to a copy of the page: records each image's decoded size once the page has loaded
_PROBE = ('<script>window.addEventListener("load",()=>{document.body.setAttribute("data-images",'
          '[...document.images].map(i=>i.complete?i.naturalWidth+"x"+i.naturalHeight:"pending").join(","));});</script>')


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing (as root), else the test skips saying why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("headless Chromium is not installed and there is no apt-get to install it: install `chromium`")
    if os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and installing it needs root: `sudo apt-get install chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"could not install chromium with apt-get (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return found


def render_in_chromium(chromium: str, page: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A 1200x3000 screenshot of the page, and each <img>'s decoded size as the browser saw it."""
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}"]
    shot = tmp / "screenshot.png"
    run([*base, f"--screenshot={shot}", "--window-size=1200,3000", page.resolve().as_uri()], tmp, timeout=120)
    probe = tmp / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    dom = run([*base, "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()], tmp, timeout=120).stdout
    found = re.search(r'data-images="([^"]*)"', dom)
    assert found, "the probe script did not run: " + dom[-500:]
    return shot, [s for s in found.group(1).split(",") if s]


def assert_rendered(chromium: str, page: Path, tmp: Path) -> None:
    from PIL import Image

    expected = len(check_html(page.read_text()).images)
    shot, sizes = render_in_chromium(chromium, page, tmp)
    # every embedded image decoded to real pixels (a broken data URI gives 0x0)
    assert len(sizes) == expected and expected > 0, sizes
    assert all(int(s.split("x")[0]) > 100 and int(s.split("x")[1]) > 100 for s in sizes), sizes
    # and the page is not blank: text, tables and charts give many colours and plenty of ink
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    colours = image.getcolors(maxcolors=1 << 24)
    assert len(colours) > 500, f"only {len(colours)} colours: a blank or broken page"
    ink = sum(n for n, rgb in colours if sum(rgb) < 600) / (1200 * 3000)
    assert ink > 0.02, f"only {ink:.1%} of the page is non-white"


def test_html_renders_in_chromium_with_its_images(workdir, chromium):
    write_outputs(workdir)
    make_report(workdir)
    assert_rendered(chromium, workdir / "reports/report.html", workdir)
    # the check can fail: one corrupted image is seen as 0x0
    broken = workdir / "broken.html"
    page = (workdir / "reports/report.html").read_text()
    broken.write_text(page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    _, sizes = render_in_chromium(chromium, broken, workdir)
    assert "0x0" in sizes


# ---------------------------------------------------------------------------
# end to end: the report of a real tiny pipeline run (generated data, real stages, `dvc repro`)

@pytest.mark.slow
def test_report_of_a_real_tiny_pipeline_run(tiny_pipeline, chromium, monkeypatch, tmp_path):
    project, env = tiny_pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    md = (project / "reports/report.md").read_text()
    page = project / "reports/report.html"
    for heading in SECTIONS + ["### CORE tasks", "### Samples", "### Model", "### Resolved training config"]:
        assert heading + "\n" in md, heading
    assert "Not run" not in md and "could not be rendered" not in md, md
    # the numbers are the stages' own, formatted
    train = json.loads((project / "artifacts/train/metrics.json").read_text())
    train.update(json.loads((project / "artifacts/train/details.json").read_text()))
    ev = json.loads((project / "artifacts/eval/metrics.json").read_text())
    ev.update(json.loads((project / "artifacts/eval/details.json").read_text()))
    assert f"| **Parameters** | {count(train['num_params'])} (" in md
    assert f"| **Tokens trained** | {count(train['tokens_trained'])} (" in md
    assert f"| **Val BPB** | {ev['val_bpb']:.4f} ({count(ev['val_bpb_tokens'])} tokens, evaluate.val_tokens) |" in md
    assert f"| **CORE** | {ev['core']:.4f} |" in md
    assert re.search(r"\| `matrix_lr` \| 0\.02 \|", md)  # the resolved config as it ran (MLflow params of the train run)
    for task in ev["tasks"]:
        assert f"| `{task}` |" in md
    # the header pins the run
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert f"| **Git commit** | `{head}` (clean) |" in md
    assert f"git checkout {head} && dvc checkout && dvc repro" in md
    data_md5 = re.search(r"md5: (\S+)", (project / "data.dvc").read_text()).group(1)
    assert f"| data.dvc | `data` | `{data_md5}` |" in md
    assert "| dvc.lock: train | `artifacts/model` |" in md
    # valid, self-contained HTML with every chart, rendered by a real browser
    checker = check_html(page.read_text())
    assert len(checker.images) == 4 and all(i["src"].startswith("data:image/png;base64,") for i in checker.images)
    assert_rendered(chromium, page, tmp_path)
    # DVC: the stage is up to date after the run (its deps are right), and `dvc plots show` works
    status = run([tool("dvc"), "status", "report"], project, env=env).stdout
    assert "changed" not in status, status
    plots = json.loads(run([tool("dvc"), "plots", "show", "--json"], project, env=env).stdout)["data"]
    for plot_id in ("artifacts/train/steps.csv", "Validation BPB vs FLOPs", "CORE per task (centered)"):
        assert plots[plot_id][0]["type"] == "vega", plot_id
    # MLflow: the report run records what it describes; the real train/evaluate runs are findable
    from mlflow.tracking import MlflowClient

    from nanoforge.reporting.history import load_history
    from nanoforge.tracking import EXPERIMENT

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    reports = client.search_runs([exp.experiment_id], "tags.stage = 'report'")
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    assert reports[0].data.tags["train_run_id"] == train["mlflow_run_id"]
    assert reports[0].data.metrics["core"] == pytest.approx(ev["core"])
    artifacts = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/figures", "report/summary.json"} <= artifacts
    # what a later report will see of this run: the real stages' metrics, linked up
    past = load_history(None, 5, "nanoforge-base@champion").previous
    assert [p.run_id for p in past] == [train["mlflow_run_id"]]
    metrics = past[0].metrics
    assert metrics["val_bpb"] == pytest.approx(ev["val_bpb"]) and metrics["core"] == pytest.approx(ev["core"])
    assert metrics["num_params"] == train["num_params"] and metrics["tokens_trained"] == pytest.approx(train["tokens_trained"])
    assert len(past[0].loss) == train["steps"]
