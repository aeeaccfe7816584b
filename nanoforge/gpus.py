"""One process per GPU: refuse more processes per node than GPUs, before any work.

Notable:
- torchrun starts `nproc_per_node` processes and each takes `cuda:LOCAL_RANK`; with
  more processes than GPUs (the d20 preset, 8, copied onto a 1-GPU box) ranks 1..7
  used to die in `torch.cuda.set_device` with a raw "invalid device ordinal".
- Under torchrun the real count is LOCAL_WORLD_SIZE (what was actually launched);
  a plain `python -m stages.x` is checked against the params' `nproc_per_node`, the
  number `dvc repro` will launch.
- `NANOFORGE_VISIBLE_GPUS` stands in for `torch.cuda.device_count()`, so the check
  is testable on a machine without GPUs; nothing sets it in production.
"""

from __future__ import annotations

import os

from nanoforge.config import ConfigError

VISIBLE_GPUS_ENV = "NANOFORGE_VISIBLE_GPUS"


def visible_gpus() -> int:
    """CUDA devices this process can see (CUDA_VISIBLE_DEVICES applies), or the faked count."""
    fake = os.environ.get(VISIBLE_GPUS_ENV, "").strip()
    if fake:
        return int(fake)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device_exists(section: str, device: str) -> None:
    """`<section>.device: cuda` (or mps) on a machine without one: a ConfigError naming the key, before any work."""
    if device == "cuda" and visible_gpus() == 0:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        mask = f" (CUDA_VISIBLE_DEVICES={seen!r})" if seen is not None else ""
        raise ConfigError(f"{section}.device=cuda but torch sees no CUDA device{mask}: set {section}.device: auto "
                          f"(the CPU here) or cpu in params.yaml, or run on a machine with a GPU")
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError(f"{section}.device=mps but this machine has no Apple GPU (MPS): set {section}.device: "
                              "auto or cpu in params.yaml")


def check_processes_fit_gpus(section: str, nproc_per_node: int, device: str) -> None:
    """Raise a one-line ConfigError naming `<section>.nproc_per_node` when the processes outnumber the GPUs.

    Only when the stage would run on CUDA: `device` cuda, or auto with a GPU visible.
    """
    check_device_exists(section, device)
    gpus = visible_gpus()
    if device not in ("auto", "cuda") or gpus == 0:  # no GPU and auto: the stage runs on the CPU
        return
    launched = os.environ.get("LOCAL_WORLD_SIZE")
    procs = int(launched) if launched else nproc_per_node
    if procs <= gpus:
        return
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    mask = f" (CUDA_VISIBLE_DEVICES={seen})" if seen is not None else ""
    where = f"torchrun started {procs} processes on this node" if launched else f"{section}.nproc_per_node={procs}"
    tail = ", the total batch stays: gradient accumulation makes it up" if section == "train" else ""
    raise ConfigError(
        f"{where} but torch sees {gpus} GPU{'s' if gpus != 1 else ''}{mask}, and each process needs its own: "
        f"set {section}.nproc_per_node={gpus} in params.yaml (dvc.yaml's torchrun reads it; "
        f"by hand: torchrun --nproc_per_node={gpus}){tail}"
    )
