"""Every rank runs the same run: rank 0's params, resume decision and checkpoint folder, checked at start.

Each rank plans on its own (training/plan.py), from its own params.yaml, `--set` overrides,
data and checkpoint folder. On one node those are the same files; across nodes they need
not be, and nothing would notice: a node with other params trains another model through
the same all-reduce (DDP only fails when a shape differs), and a node that cannot see
rank 0's checkpoints starts at step 0 while rank 0 resumes at step 55, then hangs at the
first mismatched collective. `agree()` turns each of those into one error, before any work:

- the config: a hash of the resolved train params and the inputs that make a run
  (tokenizer, shards, horizon), gathered from every rank; a mismatch gathers the full
  flattened params of the differing ranks and names the host, the rank and the keys;
- the checkpoint folder: rank 0 writes a token file into it, and every rank must read it
  back. Only rank 0 writes checkpoints and every rank resumes from them, so the folder must
  be on a filesystem all nodes share (NFS, Lustre, a cluster's home or scratch);
- the resume decision: rank 0's (the checkpoint it resumes, or fresh) against each rank's.

A collective that waits past train.collective_timeout_s (a frozen or lost node, later in the
run) is runtime.py's: init_runtime sets the timeout and turns the error into one line.

Later, at every checkpoint, `check_replicas()`: DDP never re-synchronises the weights after
its first broadcast, so the replicas stay equal only because every rank applies the same
averaged gradient to the same bits. A rank whose GPU or memory flips a bit, or whose kernels
round differently, drifts silently while only rank 0's copy is saved. Each rank sums the
bit patterns of every parameter and buffer on its device; one gather compares them, and a
difference stops the run (ReplicasDiverged, exit 1) naming the ranks, hosts and the first
tensor that differs, before the checkpoint is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

TOKEN_PREFIX = ".shared-check-"
SHARED_WAIT_S = 5.0  # how long a rank looks for rank 0's token before it calls the folder unshared
SAMPLE = 4096  # elements of each tensor hashed with their position (the bit sum alone misses two swapped values)
# fault injection for tests only: rank N nudges one weight after DDP's first broadcast, as a faulty GPU would
PERTURB_ENV = "NANOFORGE_TEST_PERTURB_RANK"


class Disagreement(ValueError):
    """The ranks of one run would not run the same run."""


class ReplicasDiverged(RuntimeError):
    """The ranks' copies of the model differ at a checkpoint; it was not written."""


def flat_params(plan) -> dict:
    """What must be equal on every rank, by the name the user knows: train.* and the run's inputs."""
    flat = {f"train.{k}": v for k, v in plan.cfg.model_dump(mode="json").items()}
    flat.update({k: v for k, v in plan.compat.items() if not k.startswith("train.")})
    return flat


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def where(rank: int, host: str) -> str:
    return f"rank {rank} on {host}"


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_config(plan, runtime, host: str) -> None:
    """Every rank's hash against rank 0's; the differing keys when one differs."""
    mine = flat_params(plan)
    hashes = _gather(digest(mine))
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if not bad:
        return
    everyone = _gather((host, mine))  # only on a mismatch: every rank took the same branch
    host0, ref = everyone[0]
    parts = []
    for r in bad:
        other_host, other = everyone[r]
        keys = sorted(set(ref) | set(other), key=str)
        diff = [f"{k}: {ref.get(k)!r} -> {other.get(k)!r}" for k in keys if ref.get(k) != other.get(k)]
        parts.append(f"{where(r, other_host)} differs from {where(0, host0)}: {'; '.join(diff)}")
    raise Disagreement(
        "the ranks of this run resolved different params (every node needs the same params.yaml, --set "
        "overrides, tokenizer and data): " + " | ".join(parts)
    )


def check_shared_folder(folder: Path, runtime, host: str) -> None:
    """Rank 0 writes a token into `folder`; every rank must read it back."""
    import torch.distributed as dist

    folder = Path(folder)
    token = secrets.token_hex(16)
    path = folder / f"{TOKEN_PREFIX}{token[:12]}"
    if runtime.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(token)
        os.replace(tmp, path)  # atomic: a reader sees the whole token or nothing
    shared = [str(path), token]
    dist.broadcast_object_list(shared, src=0)
    seen = _sees(Path(shared[0]), shared[1])
    views = _gather((host, seen))
    if runtime.is_main:
        path.unlink(missing_ok=True)
    blind = [where(r, h) for r, (h, ok) in enumerate(views) if not ok]
    if blind:
        raise Disagreement(
            f"{folder} must be on a filesystem all nodes share: {', '.join(blind)} cannot see the file "
            f"{where(0, views[0][0])} wrote there (only rank 0 writes checkpoints, every rank resumes from them). "
            f"Put the project (or {folder}) on a shared filesystem such as NFS, and run from the same path on "
            "every node"
        )


def _sees(path: Path, token: str, wait_s: float = SHARED_WAIT_S) -> bool:
    """Whether `path` holds `token`, looking again for a few seconds: an NFS client may serve
    a cached directory a moment after another node wrote into it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


def check_resume(plan, runtime, host: str) -> None:
    """Rank 0's decision (the checkpoint it resumes, or fresh) against every rank's."""
    mine = {"resume_from": str(plan.resume_from) if plan.resume_from else "fresh",
            "restart": bool(plan.restart)}
    decisions = _gather((host, mine))
    host0, ref = decisions[0]
    bad = [f"{where(r, h)}: {d['resume_from']}" for r, (h, d) in enumerate(decisions) if d != ref]
    if bad:
        raise Disagreement(
            f"the ranks decided differently where to start: {where(0, host0)} resumes {ref['resume_from']}, "
            f"but {', '.join(bad)} (a checkpoint was written or moved while the ranks planned; run it again)"
        )


def agree(plan, runtime) -> None:
    """At start, after init_runtime and before any work: one run on every rank, or one `error` line
    on every rank and exit 2 (SystemExit: the stage's `finally` still releases its lock and group)."""
    if not runtime.distributed:
        return
    host = socket.gethostname()
    try:
        check_config(plan, runtime, host)
        check_shared_folder(plan.dirs.checkpoints, runtime, host)
        check_resume(plan, runtime, host)
    except Disagreement as exc:
        print(f"error{'' if runtime.is_main else f' (rank {runtime.rank})'}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# --- the replicas, at every checkpoint

def replica_digests(model) -> list[tuple[str, int, int]]:
    """(name, sum of the bit patterns, position-weighted sum of a strided sample's) per parameter and buffer.

    Integers, not float sums: equal bits give equal numbers on any hardware in any reduction order
    (int64 wraps the same way everywhere), and one ULP in one element changes the first number.
    Computed on the device, copied to the host once: one read of the weights per checkpoint.
    """
    import torch

    model = getattr(model, "_orig_mod", model)
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    names, rows = [], []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        bits = tensor.detach().reshape(-1).view(as_int[tensor.element_size()])
        try:  # summed as 64-bit words: native int64 sums, ~20x faster on CPU than widening each element
            words = bits.view(torch.int64)
        except RuntimeError:  # an odd number of bytes over 8, or a misaligned offset: element by element
            words = bits
        sample = bits[:: max(1, bits.numel() // SAMPLE)].long()
        position = torch.arange(1, sample.numel() + 1, device=sample.device, dtype=torch.int64)
        names.append(name)
        rows.append(torch.stack([words.sum(dtype=torch.int64), (sample * position).sum()]))
    table = torch.stack(rows).cpu().tolist() if rows else []
    return [(name, a, b) for name, (a, b) in zip(names, table)]


def replica_mismatch(gathered: list, step: int) -> str | None:
    """What differs between rank 0's digests and each other rank's, from `_gather((host, digests))`; None if nothing."""
    host0, ref = gathered[0]
    parts = []
    for rank, (host, mine) in enumerate(gathered[1:], start=1):
        if mine == ref:
            continue
        if [d[0] for d in mine] != [d[0] for d in ref]:
            first = f"another set of tensors ({len(mine)} vs {len(ref)})"
        else:
            differ = [a[0] for a, b in zip(ref, mine) if a != b]
            first = f"first at {differ[0]} ({len(differ)} of {len(ref)} tensors differ)"
        parts.append(f"{where(rank, host)} differs from {where(0, host0)}: {first}")
    if not parts:
        return None
    return (f"the ranks' copies of the model differ at step {step}: {'; '.join(parts)}. DDP keeps them equal only "
            "by applying the same gradient to the same bits, so a rank drifted: a faulty GPU or memory on that "
            "host, or ranks whose hardware or software (GPU model, driver, PyTorch) round differently")


def check_replicas(model, runtime, step: int, folder: Path) -> None:
    """Every rank, before rank 0 writes checkpoint `step`: the same weights everywhere, or ReplicasDiverged on every rank
    (they all read the same gathered table, so they all stop together and no collective is left waiting)."""
    if not runtime.distributed:
        return
    problem = replica_mismatch(_gather((socket.gethostname(), replica_digests(model))), step)
    if problem:
        raise ReplicasDiverged(f"{problem}. The checkpoint of step {step} was not written (the earlier ones in {folder} "
                               "are kept): test the hosts named (a GPU or memory check), then run the same command "
                               "to resume from the last one")


def perturb_for_test(model, rank: int) -> None:
    """Fault injection for tests, never set otherwise: NANOFORGE_TEST_PERTURB_RANK=N makes rank N add 0.01 to one
    element of the middle parameter, after DDP's first broadcast (which would undo it), and log which."""
    wanted = os.environ.get(PERTURB_ENV, "").strip()
    if not wanted or int(wanted) != rank:
        return
    import torch

    params = list(model.named_parameters())
    name, param = params[len(params) // 2]
    with torch.no_grad():
        param.view(-1)[0] += 0.01
    # one write with its newline: print() writes the end separately, and the other rank's log line can land between
    sys.stderr.write(f"{PERTURB_ENV}: rank {rank} perturbed {name}\n")
    sys.stderr.flush()
