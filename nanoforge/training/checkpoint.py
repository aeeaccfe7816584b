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
  the checkpoint folder rather than in it. Neither folder is a DVC output (dvc.yaml): DVC
  neither hashes gigabytes of checkpoints after every run nor removes them before one.
- The final model is `artifacts/model/{model.safetensors, config.json}`;
  `load_model(dir, device)` reads it (or any checkpoint folder) back.
- state.pt is read onto the CPU whatever the device: the RNG states must be CPU
  ByteTensors, and each optimizer moves its state to its parameters' device itself.
- Refusals are one line naming the file and what to do: a pickle payload in state.pt
  (refused by weights_only=True, never run; PyTorch's advice to lift that is not
  repeated), damaged safetensors, and a full disk while saving (CheckpointWriteError,
  with the free space; the previous checkpoint is intact).
"""

from __future__ import annotations

import errno
import contextlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


class CheckpointWriteError(OSError):
    """A checkpoint or the final model could not be written (a full disk, most often)."""

    def __str__(self) -> str:  # the sentence, without OSError's "[Errno 28]"
        return self.strerror or super().__str__()


def resume_hint(folder: Path) -> str:
    """What to do about a checkpoint that cannot be read."""
    return (f"move {folder} out of {folder.parent} to resume from the checkpoint before it, "
            "or start over with NANOFORGE_RESUME=fresh")


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


_DISK_FULL = ("unexpected pos", "No space left", "file write failed", "Disk quota")


@contextlib.contextmanager
def _writing(target: Path, what: str, then: str):
    """Turn a failed write into one CheckpointWriteError line naming the folder, the disk's free space and `then`.

    A full disk shows up as OSError(ENOSPC) from plain writes, but as
    `RuntimeError: [enforce fail at inline_container.cc] unexpected pos` from torch.save
    and as a SafetensorError from save_file: neither says "disk".
    """
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        parent = next((p for p in (target, *target.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(parent).free
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(t in str(exc) for t in _DISK_FULL)
        reason = "the disk is full" if full else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise CheckpointWriteError(
            errno.ENOSPC if full else errno.EIO,
            f"could not write the {what} {target}: {reason} ({free / 2**20:,.0f} MiB free on {parent}); {then}",
        ) from None


def check_weights(file: str | Path, hint: str) -> None:
    """Read a safetensors header (not the tensors): a truncated or damaged file is refused naming `hint`."""
    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            list(f.keys())
    except Exception as exc:
        raise CheckpointError(f"{file}: {_damaged(exc)}; {hint}") from None


def check_start(resume_from: Path | None, init_from: Path | None) -> None:
    """The weights a run starts from have a readable header: a truncated or damaged file is refused before any work."""
    if resume_from is not None:
        check_weights(resume_from / WEIGHTS, resume_hint(resume_from))
    elif init_from is not None:
        check_weights(init_from / WEIGHTS, "point --init-from (NANOFORGE_INIT_FROM) at another checkpoint or model folder")


def _damaged(exc: BaseException, kind: str = "a safetensors file") -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"damaged or not {kind} ({type(exc).__name__}: {text})"


def save_checkpoint(root: str | Path, step: int, model, optimizers, meta: dict, history: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically (rank 0 only), then keep the newest `keep`.

    `optimizers`: the optimizers, or their state dicts (ShardedOptimizers.state_dicts() gathers
    them to rank 0 in one process's format).
    """
    root = Path(root)
    target = step_dir(root, step)
    with _writing(target, "checkpoint", "the previous checkpoint is intact; lower train.keep_checkpoints or free space, "
                  "then run the same command to resume"), atomic_dir(target) as tmp:
        save_file(_weights(model), str(tmp / WEIGHTS))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        states = [opt if isinstance(opt, dict) else opt.state_dict() for opt in optimizers]
        torch.save({"optimizers": states, "rng": rng}, tmp / STATE)
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
    """Load weights (and optimizer + RNG state when `optimizers` is given) in place; return (meta, history).

    `device` is where the model lives; nothing is mapped there on load (see read_state).
    """
    path = Path(path)
    meta = read_meta(path)
    load_weights(path / WEIGHTS, model, resume_hint(path))
    if optimizers is not None:
        # onto the CPU, not `device`: set_rng_state takes only a CPU ByteTensor (issue 12.1), and
        # Optimizer.load_state_dict moves each state tensor to its parameter's device anyway
        state = read_state(path / STATE)
        if len(state["optimizers"]) != len(optimizers):
            raise CheckpointError(f"{path}: holds {len(state['optimizers'])} optimizer states, expected {len(optimizers)}")
        if hasattr(optimizers, "load_state_dicts"):  # sharded (shard.py): each rank keeps its own pieces
            optimizers.load_state_dicts(state["optimizers"])
        else:
            for opt, sd in zip(optimizers, state["optimizers"]):
                opt.load_state_dict(sd)
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    history = json.loads((path / HISTORY).read_text()) if (path / HISTORY).exists() else {}
    return meta, history


def read_state(file: Path) -> dict:
    """state.pt on the CPU, tensors and plain containers only (weights_only=True): a pickle payload never runs."""
    hint = resume_hint(file.parent)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message advises weights_only=False, which would run the payload: not repeated here
        raise CheckpointError(
            f"{file}: refused, it holds Python objects a weights-only load does not allow (a pickle that could run "
            f"code; nothing in it was run). Do not load it another way; {hint}"
        ) from None
    except Exception as exc:  # missing, truncated, not a torch file
        raise CheckpointError(f"{file}: {_damaged(exc, 'a torch file')}; {hint}") from None
    if not isinstance(state, dict) or not {"optimizers", "rng"} <= set(state):
        raise CheckpointError(f"{file}: not a checkpoint state (no optimizers/rng entries); {hint}")
    return state


def load_weights(file: Path, model, hint: str = "write it again (re-run the stage that made it)") -> None:
    model = getattr(model, "_orig_mod", model)
    try:
        weights = load_file(str(file))
    except Exception as exc:
        raise CheckpointError(f"{file}: {_damaged(exc)}; {hint}") from None
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
    with _writing(Path(directory), "final model", "free space, then run the same command: training resumes from its last "
                  "checkpoint"), atomic_dir(directory) as tmp:
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
    hint = (resume_hint(directory) if (directory / META).exists() else
            "train it again (dvc repro -f train) or restore it from the DVC cache (dvc checkout artifacts/model)")
    load_weights(directory / WEIGHTS, model, hint)
    model.eval()
    return model, meta
