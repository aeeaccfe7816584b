"""Checkpoints read and written in place: RNG on any map device, refusals in one line, a full disk named as such.

Fast: a depth-1 model, no subprocesses (the train stage end to end is tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from nanoforge.model.gpt import build_model, config_for_depth
from nanoforge.training.checkpoint import (
    CheckpointError, CheckpointWriteError, check_weights, list_checkpoints, load_checkpoint, load_model, save_checkpoint,
    save_model,
)
from nanoforge.training.optim import build_optimizers


def tiny(seed: int = 0, vocab: int = 300):
    torch.manual_seed(seed)
    model = build_model(config_for_depth(1, vocab, 16))
    return model, build_optimizers(model, 0.02, 0.2, 0.004)


def one_step(model, optimizers) -> None:
    loss = model(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8)))
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def saved(root: Path, step: int = 5) -> Path:
    model, opts = tiny()
    one_step(model, opts)
    return save_checkpoint(root, step, model, opts, {"model": model.config.to_dict()}, {"steps": []}, keep=3)


def test_rng_and_optimizer_state_come_back_whatever_the_map_device(tmp_path):
    # issue 12.1: map_location=device put the CPU RNG state on the GPU; set_rng_state takes only a CPU ByteTensor
    model, opts = tiny()
    one_step(model, opts)
    torch.manual_seed(1234)
    want_rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path, 5, model, opts, {"model": model.config.to_dict()}, {"steps": []}, keep=3)
    torch.manual_seed(999)  # the RNG moves on
    fresh, fresh_opts = tiny(seed=7)
    load_checkpoint(path, fresh, fresh_opts, device="meta")  # a device that is not the CPU, on any machine
    assert torch.equal(torch.get_rng_state(), want_rng)
    for a, b in zip(opts, fresh_opts):
        for pa, pb in zip(a.state.values(), b.state.values()):
            for key, value in pa.items():
                if isinstance(value, torch.Tensor):
                    assert pb[key].device.type == "cpu" and torch.equal(value, pb[key]), key


class Payload:
    """What an attacker puts in state.pt: unpickling it would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_state_pt_is_refused_in_one_line_and_never_runs(tmp_path):
    # issue 18.9: refused, but as a raw UnpicklingError quoting the advice to re-run with weights_only=False
    path = saved(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    torch.save({"optimizers": [], "rng": Payload(marker)}, path / "state.pt")
    model, opts = tiny()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model, opts)
    message = str(err.value)
    assert not marker.exists()
    assert "\n" not in message and message.startswith(f"{path / 'state.pt'}: refused")
    assert "weights_only=False" not in message and "weights_only set to False" not in message
    assert f"move {path} out of" in message and "NANOFORGE_RESUME=fresh" in message
    assert type(err.value.__cause__) is not __import__("pickle").UnpicklingError  # not chained: one line in a traceback too


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_are_one_line_naming_the_file_and_the_fix(tmp_path, damage):
    # issue 18.9: a SafetensorError traceback, in a checkpoint, in artifacts/model and via --init-from
    path = saved(tmp_path / "ckpt")
    model_dir = save_model(tiny()[0], {"steps": 5}, tmp_path / "model")
    for folder in (path, model_dir):
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not safetensors" * 8)
    model, opts = tiny()
    with pytest.raises(CheckpointError, match=rf"^{path}/model.safetensors: damaged or not a safetensors file \(Safetensor"
                                              rf"Error: .*\); move {path} out of"):
        load_checkpoint(path, model, opts)
    with pytest.raises(CheckpointError, match=r"model.safetensors: damaged .*dvc repro -f train.*dvc checkout artifacts/model"):
        load_model(model_dir)
    with pytest.raises(CheckpointError, match=r"model.safetensors: damaged .*; pick another"):
        check_weights(model_dir / "model.safetensors", "pick another")
    check_weights(saved(tmp_path / "ok") / "model.safetensors", "unused")  # an intact file passes


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A tmpfs of `size` mounted at `mount` (needs root); skips the test with the reason when it cannot mount."""
    mount.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) on this machine: cannot make a small disk to fill")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"nanoforge-{uuid.uuid4().hex[:6]}", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB disk to fill."""
    with tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(small_disk):
    # issue 18.9: `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos ...`, no word of disk space
    root = small_disk / "checkpoints"
    first = saved(root, step=5)  # a depth-1 model with vocab 300 fits once...
    model, opts = tiny(vocab=30_000)  # ...this one (its embeddings alone are ~2 MiB) does not
    one_step_big = model(torch.randint(0, 30_000, (1, 4)), torch.randint(0, 30_000, (1, 4)))
    one_step_big.backward()
    for opt in opts:
        opt.step()
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(root, 10, model, opts, {"model": model.config.to_dict()}, {"steps": []}, keep=1)
    message = err.value.strerror
    assert "\n" not in message and "inline_container" not in message
    assert message.startswith(f"could not write the checkpoint {root}/step_000010: the disk is full (")
    assert "MiB free on" in message and "train.keep_checkpoints" in message
    assert list_checkpoints(root) == [first]  # the previous checkpoint is intact and still the latest
    assert sorted(p.name for p in root.iterdir()) == [first.name]  # no half-written folder left behind
    load_checkpoint(first, *tiny())
    with pytest.raises(CheckpointWriteError, match=r"could not write the final model .*: the disk is full"):
        save_model(model, {}, small_disk / "model")
