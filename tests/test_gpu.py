"""The CUDA paths, where CUDA is (`gpu` marker; skipped with the reason elsewhere). `python -m bench.gpu` runs them.

- A few bf16 steps of a depth-2 model under torch.compile, with the loss in checkpointed
  chunks (what CUDA training runs), against the eager plain loss.
- The train stage on CUDA (bf16, compile on): SIGTERM, then resume on the same loss curve.
- BPB and CORE on CUDA equal to the CPU's within tolerance.
- torchrun with 2 ranks over NCCL against 1 process with accumulation, when two GPUs are visible.

NANOFORGE_GPU_TESTS_ON_CPU=1 runs the same bodies on the CPU (a smoke test of the code).
Tolerances: CUDA kernels (atomics in the embedding's backward, TF32, bf16) are not bit-exact
run to run, so curves are compared to 1%, not bit for bit as the CPU tests do.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess

import pytest
import torch

from tests.conftest import GPU_ON_CPU_ENV
from tests.test_train import clone, env_for, read_csv, run_train, template, train_cmd, write_params  # noqa: F401

pytestmark = pytest.mark.gpu
DEVICE = "cpu" if os.environ.get(GPU_ON_CPU_ENV) == "1" else "cuda"
STEPS = 12
CUDA_PARAMS = dict(device=DEVICE, dtype="bfloat16", compile="on", num_iterations=STEPS, eval_every=4,
                   sample_every=0, save_every=0)


def _random_head(model):
    with torch.no_grad():  # nanochat's zero-init head makes every prediction uniform
        model.lm_head.weight.normal_(0, 0.3)
    return model


def test_a_few_bf16_compiled_steps_learn_and_match_eager(monkeypatch):
    import nanoforge.model.gpt as gpt
    from bench.train import RandomBatches
    from nanoforge.model.gpt import build_model, config_for_depth
    from nanoforge.runtime import Runtime
    from nanoforge.training.loop import train_step
    from nanoforge.training.optim import build_optimizers

    vocab, seq, batch = 512, 128, 4
    device = torch.device(DEVICE)
    runtime = Runtime(device, torch.bfloat16)
    torch.manual_seed(0)
    model = _random_head(build_model(config_for_depth(2, vocab, seq), device))
    loader = RandomBatches(batch, seq, vocab, device)
    x, y, _ = next(loader)
    with runtime.autocast():
        plain = model(x, y).item()  # one chunk covers the batch: the plain loss
    monkeypatch.setattr(gpt, "LOSS_CHUNK_BYTES", 4 * vocab * 128)  # 128 positions a chunk: 4 chunks
    compiled = torch.compile(model, dynamic=False)
    with runtime.autocast():
        chunked = compiled(x, y, loss_chunk_rows=128)
    assert chunked.item() == pytest.approx(plain, rel=2e-2)
    optimizers = build_optimizers(model, 0.02, 0.2, 0.004)
    losses = []
    for _ in range(6):
        loss_sum, grad_norm, (x, y, _) = train_step(model, compiled, None, optimizers, loader, x, y, 2, 1.0, 1.0,
                                                     0.85, runtime)
        losses.append(loss_sum.item() / 2)
        assert torch.isfinite(grad_norm)
    assert all(l == l for l in losses) and losses[-1] < losses[0], losses  # the 4 batches repeat: it learns them


@pytest.fixture(scope="module")
def cuda_clean(template, tmp_path_factory):
    """One uninterrupted CUDA run of the train stage (1 process, 2 micro-steps a step)."""
    root = clone(template, tmp_path_factory.mktemp("cuda-clean") / "w")
    write_params(root, **CUDA_PARAMS)
    proc = run_train(root, NANOFORGE_TRACKING="off")
    assert f"{DEVICE}" in proc.stderr and "bfloat16" in proc.stderr
    return root


def _same_curve(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] and len(got) == STEPS
    for a, b in zip(got, want):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-2), a["step"]


def test_sigterm_then_resume_on_cuda_keeps_the_loss_curve(cuda_clean, template, tmp_path):
    root = clone(template, tmp_path / "w")
    write_params(root, **CUDA_PARAMS)
    proc = subprocess.Popen(train_cmd(), cwd=root, env=env_for(root, NANOFORGE_TRACKING="off"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 00004/"):
            proc.send_signal(signal.SIGTERM)
            break
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped: stopped by signal" in err and "Traceback" not in err
    resumed = run_train(root, NANOFORGE_TRACKING="off")
    assert "resuming from artifacts/checkpoints/step_" in resumed.stderr
    _same_curve(read_csv(root / "artifacts/train/steps.csv"), read_csv(cuda_clean / "artifacts/train/steps.csv"))
    for a, b in zip(read_csv(root / "artifacts/train/val.csv"), read_csv(cuda_clean / "artifacts/train/val.csv")):
        assert float(a["val_bpb"]) == pytest.approx(float(b["val_bpb"]), rel=1e-2)


def test_bpb_and_core_on_cuda_equal_the_cpu(tmp_path):
    from nanoforge.evaluation.bpb import evaluate_bpb, load_rows, rank_batches
    from nanoforge.evaluation.core import evaluate_core, load_bundle
    from nanoforge.model.gpt import GPT, GPTConfig
    from nanoforge.runtime import Runtime
    from nanoforge.tokenizer.bpe import train_bpe
    from tests.datagen import make_documents, make_eval_bundle

    tok = train_bpe(make_documents(300, seed=11), vocab_size=300)
    torch.manual_seed(0)
    cpu_model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    cpu_model.init_weights()
    _random_head(cpu_model).eval()
    gpu_model = copy.deepcopy(cpu_model).to(DEVICE)
    cpu = Runtime(torch.device("cpu"), torch.float32)
    rows = load_rows(make_documents(60, seed=3), tok, seq_len=64, num_tokens=4096)
    want = evaluate_bpb(cpu_model, rank_batches(rows, 8, cpu), tok.token_bytes, cpu)
    for dtype, rel in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):  # fp32 may run as TF32 on CUDA
        gpu = Runtime(torch.device(DEVICE), dtype)
        got = evaluate_bpb(gpu_model, rank_batches(rows, 8, gpu), tok.token_bytes, gpu)
        assert got == pytest.approx(want, rel=rel), dtype
    tasks, _ = load_bundle(make_eval_bundle(tmp_path / "bundle", items_per_task=16))
    core_cpu, results_cpu = evaluate_core(cpu_model, tok, tasks, cpu, max_len=64, batch_tokens=8 * 64)
    core_gpu, results_gpu = evaluate_core(gpu_model, tok, tasks, Runtime(torch.device(DEVICE), torch.float32),
                                          max_len=64, batch_tokens=8 * 64)
    for a, b in zip(results_gpu, results_cpu):  # a near-tie may flip under TF32: one item at most
        assert a.label == b.label and a.items == b.items and abs(a.correct - b.correct) <= 1, a.label
    assert core_gpu == pytest.approx(core_cpu, abs=0.15)


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="needs two visible GPUs")
def test_two_ranks_over_nccl_match_one_process_with_accumulation(cuda_clean, template, tmp_path):
    root = clone(template, tmp_path / "w")
    write_params(root, **CUDA_PARAMS)
    proc = run_train(root, nproc=2, NANOFORGE_TRACKING="off")
    assert "world 2 x device batch 4 x seq 32 x accum 1" in proc.stderr
    _same_curve(read_csv(root / "artifacts/train/steps.csv"), read_csv(cuda_clean / "artifacts/train/steps.csv"))
