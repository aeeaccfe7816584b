"""Checkpoints (resume a run) and the final model (hand it to the next stage).

Notable:
- A checkpoint is a folder `step_NNNNNN/`: `model.safetensors` (weights, no pickle),
  `state.pt` (optimizer state and RNG states; loaded with weights_only=True),
  `history.json` (the logged curve so far) and `meta.json` (step, config, loader
  position, loss EMA, elapsed time, tokens). It is written under a temporary
  name and renamed, so a kill mid-save leaves the previous checkpoint intact
  and a folder named `step_*` is always complete. The last K are kept.
- `compat` in the meta holds what must match to resume (model, data, optimizer
  and horizon); `compat_diff` names what changed. Knobs that do not change the
  math (device batch, world size, eval cadence, ...) may change across a resume.
- Starting fresh never deletes: old checkpoints move to `<root>-archive/<timestamp>/`, beside
  the checkpoint folder rather than in it, so DVC (which hashes that folder) never reads them.
- The final model is `artifacts/model/{model.safetensors, config.json}`;
  `load_model(dir, device)` reads it (or any checkpoint folder) back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanoforge.common import MODEL_DIR, atomic_dir, read_json, write_json
from nanoforge.model.gpt import GPT, GPTConfig, build_model

WEIGHTS = "model.safetensors"
STATE = "state.pt"
HISTORY = "history.json"
META = "meta.json"
CONFIG = "config.json"
PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or from a different run config."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit() and (path / META).exists():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_partial(root: str | Path) -> list[Path]:
    """Delete half-written checkpoint folders (`.step_*`) a kill mid-save left behind; complete ones stay."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith(f".{PREFIX}"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(root: str | Path, step: int, model, optimizers, meta: dict, history: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically (rank 0 only), then keep the newest `keep`."""
    root = Path(root)
    target = step_dir(root, step)
    with atomic_dir(target) as tmp:
        save_file(_weights(model), str(tmp / WEIGHTS))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save({"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng}, tmp / STATE)
        (tmp / HISTORY).write_text(json.dumps(history))
        (tmp / META).write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=2) + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        return read_json(path / META)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint meta ({type(exc).__name__}: {exc})") from None


def load_checkpoint(path: str | Path, model, optimizers=None, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """Load weights (and optimizer + RNG state when `optimizers` is given) in place; return (meta, history)."""
    path = Path(path)
    meta = read_meta(path)
    load_weights(path / WEIGHTS, model)
    if optimizers is not None:
        state = torch.load(path / STATE, map_location=device, weights_only=True)
        if len(state["optimizers"]) != len(optimizers):
            raise CheckpointError(f"{path}: holds {len(state['optimizers'])} optimizer states, expected {len(optimizers)}")
        for opt, sd in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    history = json.loads((path / HISTORY).read_text()) if (path / HISTORY).exists() else {}
    return meta, history


def load_weights(file: Path, model) -> None:
    model = getattr(model, "_orig_mod", model)
    try:
        weights = load_file(str(file))
    except Exception as exc:
        raise CheckpointError(f"{file}: unreadable weights ({type(exc).__name__}: {exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    bad = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or extra or bad:
        raise CheckpointError(
            f"{file}: weights do not fit this model (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {bad[:3]}); was it written for another depth or vocabulary?"
        )
    model.load_state_dict(weights)


def compat_diff(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every compatibility key that differs."""
    flat_old, flat_new = _flat(old), _flat(new)
    return [
        f"{key}: {flat_old.get(key, '(absent)')!r} -> {flat_new.get(key, '(absent)')!r}"
        for key in sorted(set(flat_old) | set(flat_new))
        if flat_old.get(key) != flat_new.get(key)
    ]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def archive_dir(root: str | Path) -> Path:
    root = Path(root)
    return root.with_name(f"{root.name}-archive")


def archive_checkpoints(root: str | Path) -> Path | None:
    """Move every checkpoint under `root` to `<root>-archive/<timestamp>/`; never deletes. Returns the folder."""
    found = list_checkpoints(root)
    if not found:
        return None
    dest = archive_dir(root) / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    for path in found:
        os.replace(path, dest / path.name)
    return dest


# --- the final model

def save_model(model, summary: dict, directory: str | Path = MODEL_DIR) -> Path:
    """artifacts/model/{model.safetensors, config.json}, replaced as a whole."""
    raw = getattr(model, "_orig_mod", model)
    with atomic_dir(directory) as tmp:
        save_file(_weights(raw), str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, {"model": raw.config.to_dict(), "train": summary})
    return Path(directory)


def load_model(directory: str | Path = MODEL_DIR, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """(model in eval mode on `device`, meta) from artifacts/model/ or a checkpoint folder."""
    directory = Path(directory)
    if (directory / CONFIG).exists():
        meta = read_json(directory / CONFIG)
    elif (directory / META).exists():
        meta = read_meta(directory)
    else:
        raise CheckpointError(f"{directory}: no {CONFIG} or {META}; train a model first (dvc repro train)")
    if not (directory / WEIGHTS).exists():
        raise CheckpointError(f"{directory}: {WEIGHTS} is missing")
    config = GPTConfig(**meta["model"])
    model = build_model(config, device)
    load_weights(directory / WEIGHTS, model)
    model.eval()
    return model, meta
