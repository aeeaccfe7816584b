"""CUDA paths that can be checked without a GPU: processes vs visible GPUs, the peak-FLOPs
table, the allocator and TF32 settings (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_train_refuses_more_processes_than_gpus_before_any_work(tmp_path, monkeypatch):
    # the d20 preset (8 processes) on a 1-GPU box died with "invalid device ordinal" in rank 1
    from nanoforge.config import ConfigError, TrainConfig
    from nanoforge.training.plan import plan_run

    cfg = TrainConfig(depth=2, max_seq_len=32, device_batch_size=1, total_batch_size=256, nproc_per_node=8)
    monkeypatch.chdir(tmp_path)  # no manifest, no tokenizer: the check comes before either is read
    monkeypatch.setenv("NANOFORGE_VISIBLE_GPUS", "1")
    with pytest.raises(ConfigError, match=r"^train\.nproc_per_node=8 but torch sees 1 GPU, .*"
                                          r"set train\.nproc_per_node=1"):
        plan_run(cfg, world_size=1, resume_mode="auto", init_from=None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # under torchrun: what was launched counts
    monkeypatch.setenv("NANOFORGE_VISIBLE_GPUS", "2")
    with pytest.raises(ConfigError, match=r"^torchrun started 4 processes on this node but torch sees 2 GPUs"):
        plan_run(cfg, world_size=4, resume_mode="auto", init_from=None)
    assert not any(tmp_path.iterdir())


def test_the_process_check_applies_only_on_cuda(monkeypatch):
    from nanoforge.gpus import check_processes_fit_gpus

    monkeypatch.setenv("NANOFORGE_VISIBLE_GPUS", "1")
    check_processes_fit_gpus("train", 8, "cpu")  # CPU ranks share the host: no GPU rule
    check_processes_fit_gpus("train", 1, "auto")
    monkeypatch.setenv("NANOFORGE_VISIBLE_GPUS", "0")
    check_processes_fit_gpus("train", 8, "auto")  # auto falls back to the CPU


def test_evaluate_refuses_more_processes_than_gpus_before_reading_anything(tmp_path, monkeypatch):
    import logging

    from nanoforge.config import ConfigError, EvaluateConfig
    from nanoforge.evaluation.evaluate import check_inputs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOFORGE_VISIBLE_GPUS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ConfigError, match=r"^evaluate\.nproc_per_node=8 but torch sees 1 GPU \(CUDA_VISIBLE_DEVICES=3\)"
                                          r".*set evaluate\.nproc_per_node=1"):
        check_inputs(EvaluateConfig(nproc_per_node=8), logging.getLogger("test"))


def test_the_stage_says_it_in_one_line(tmp_path):
    env = {**os.environ, "NANOFORGE_VISIBLE_GPUS": "1", "PYTHONPATH": str(REPO), "NANOFORGE_TRACKING": "off"}
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--set", "nproc_per_node=8", "--set",
                           "total_batch_size=16384"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: train.nproc_per_node=8 but torch sees 1 GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_device_cuda_without_a_gpu_names_the_key_before_any_work(tmp_path):
    # issue 18.8: `device: cuda` on a CPU machine stopped in an uncaught traceback that did not name train.device
    env = {**os.environ, "NANOFORGE_VISIBLE_GPUS": "0", "PYTHONPATH": str(REPO), "NANOFORGE_TRACKING": "off"}
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for stage in ("train", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--set", "device=cuda"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"error: {stage}.device=cuda but torch sees no CUDA device" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA H800", 989), ("NVIDIA H800 PCIe", 756), ("NVIDIA A800-SXM4-80GB", 312), ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA B200", 2250), ("NVIDIA GB200", 2500),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA A10", 125), ("NVIDIA A10G", 70),
    ("NVIDIA GeForce RTX 4090", 165), ("Tesla T4", None),
])
def test_peak_flops_names_match_whole_words(name, tflops):
    from nanoforge.runtime import gpu_peak_flops

    got = gpu_peak_flops(name)
    assert (got is None) if tflops is None else got == pytest.approx(tflops * 1e12)


def test_cuda_allocator_and_tf32_settings():
    # set on import, before CUDA's allocator reads it; a user's own setting is left alone
    code = "import os, nanoforge.runtime; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "expandable_segments:True"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO),
                         "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "max_split_size_mb:512"
    code = ("import torch, nanoforge.runtime as r; r.use_cuda_fast_math(); "
            "print(torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "high True"


# --- the memory budget and the save window (bench/memory.py, training/plan.py)

def test_d20_fits_an_80gb_gpu_with_headroom_and_eager_says_what_fits(monkeypatch, capsys):
    from bench.memory import budget, main

    monkeypatch.chdir(REPO)  # presets/
    row = budget("d20", 80, 0.10)
    assert row["num_params"] == 560_988_160 and row["compiled"] and row["fits"] and row["free_fraction"] >= 0.10
    # the parts: fp32 weights and gradients, Muon + AdamW state, one micro-batch, the chunked eval
    assert row["weights"] == row["gradients"] == 4 * row["num_params"]
    assert row["eval_transient"] < 6 * 2**30 and row["activations"] < 56 * 2**30
    assert not row["eager_fits"] and row["eager_largest_fitting_batch"] == 16  # 16 x 2048 x 8 x 2 = 524,288
    assert main(["--preset", "d20", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "eval transient" in out and "fits, 26% free" in out and "device_batch_size 16 does" in out
    # ZeRO-1 (training/shard.py): each of the 8 ranks keeps 1/8 of the Muon + AdamW state
    assert row["optimizer_shards"] == 8 and row["optimizer_state"] == row["optimizer_state_unsharded"] // 8
    assert row["optimizer"] < 2**30 < 5 * 2**30 < row["optimizer_unsharded"]
    assert "optimizer state    0.3 = 1/8 of    2.7" in out


def test_the_unchunked_head_would_not_fit_d20():
    # why CUDA training chunks the loss: compiled with whole-batch logits d20 at batch 32 needs
    # ~84 GiB, what nanochat's issue #443 saw (72.5 GiB in use when an 8 GiB buffer failed)
    import torch

    from nanoforge.config import TrainConfig
    from nanoforge.model.gpt import GPT, config_for_depth
    from nanoforge.training.plan import estimate_memory

    cfg = TrainConfig(depth=20, max_seq_len=2048, device_batch_size=32, total_batch_size=524_288, nproc_per_node=8)
    model_config = config_for_depth(20, 65_536, 2048)
    with torch.device("meta"):
        n = GPT(model_config).num_params()
    whole = estimate_memory(cfg, model_config, n, compiled=True, cuda=False)["total"]
    chunked = estimate_memory(cfg, model_config, n, compiled=True, cuda=True)["total"]
    # with the optimizer state sharded over the 8 ranks (as nanochat's was in #443) the estimate is 79.0 GiB,
    # a little under the >80.5 GiB that run needed; unsharded it is 83.8
    assert whole > 0.95 * 80 * 2**30 > 0.9 * 80 * 2**30 > chunked
    unsharded = estimate_memory(cfg.model_copy(update={"shard_optimizer": False}), model_config, n, compiled=True,
                                cuda=False)["total"]
    assert unsharded > 80 * 2**30 > whole


def test_eager_out_of_memory_names_the_batch_that_fits(monkeypatch):
    import torch

    from nanoforge.config import ConfigError, TrainConfig
    from nanoforge.model.gpt import GPT, config_for_depth
    from nanoforge.training import plan

    monkeypatch.setenv("NANOFORGE_VISIBLE_GPUS", "1")
    monkeypatch.setattr(plan, "available_memory", lambda _device: (80 * 2**30, "free on cuda:0"))
    cfg = TrainConfig(depth=20, max_seq_len=2048, device_batch_size=32, total_batch_size=524_288, nproc_per_node=8,
                      compile="off")
    model_config = config_for_depth(20, 65_536, 2048)
    with torch.device("meta"):
        n = GPT(model_config).num_params()
    with pytest.raises(ConfigError, match=r"of eager activations .* train\.device_batch_size=16 fits; or "
                                          r"train\.compile=on: compiled it needs about 59\.0 GiB"):  # 8 ranks: sharded state
        plan.check_memory(cfg, model_config, n)
    assert plan.check_memory(cfg.model_copy(update={"compile": "auto"}), model_config, n)["compiled"]


def test_a_save_longer_than_the_grace_window_is_said_at_start(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from nanoforge.model.gpt import config_for_depth
    from nanoforge.training import plan

    assert plan.disk_write_speed(tmp_path / "not" / "yet", nbytes=4 * 2**20) > 0
    assert list(tmp_path.iterdir()) == []  # the probe is gone
    assert plan.save_warning(5 * 10**9, 1e9, 30, tmp_path) is None
    msg = plan.save_warning(5 * 10**9, 1e8, 30, tmp_path)
    assert "about 50 s to write at 100 MB/s" in msg and "torchrun's 30 s before SIGKILL" in msg
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=130 dvc repro" in msg and "--shutdown-timeout" in msg
    d20 = SimpleNamespace(model_config=config_for_depth(20, 65_536, 2048), num_params=560_988_160,
                          dirs=SimpleNamespace(checkpoints=tmp_path / "checkpoints"), save_estimate={})
    assert 5.1e9 < plan.checkpoint_bytes(d20.model_config, d20.num_params) < 5.2e9  # what bench.memory wrote
    monkeypatch.setattr(plan, "PROBE_BYTES", 2**20)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0.001")
    # the log records, not stderr: the logger's handler may hold a stream an earlier test's capture made
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("nanoforge.train")
    logger.addHandler(handler)
    try:
        plan.check_save_time(d20)
        assert d20.save_estimate["grace_seconds"] == 0.001
        lines = [r.getMessage() for r in records]
        assert len(lines) == 1 and lines[0].startswith("a SIGTERM may lose work: a checkpoint is 5.2 GB"), lines
        records.clear()
        monkeypatch.setenv("RANK", "1")  # from rank 0 only
        plan.check_save_time(d20)
        assert not records
    finally:
        logger.removeHandler(handler)
