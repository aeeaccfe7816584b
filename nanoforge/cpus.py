"""How many CPUs this process may use, and how its threads share them.

Notable:
- `os.cpu_count()` is the machine's CPUs, not this process's. Two things allow
  fewer: the affinity mask (taskset, cpusets, Kubernetes' static CPU manager) and
  a cgroup CPU quota (`docker --cpus`, Kubernetes limits): cgroup v2 `cpu.max`
  ("200000 100000" = 2 CPUs, "max" = none), v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`
  (-1 = none), the smallest along the process's cgroup path. A fractional quota
  rounds down: a thread that the quota throttles stalls every other at the next
  OpenMP barrier.
- The CPUs are split among the local ranks (LOCAL_WORLD_SIZE under torchrun):
  8 ranks on 16 CPUs get 2 each, not 16 each.
- The plan: torch's intra-op threads get this process's CPUs; the training
  loader's tokenizer gets one thread on CPU (a step's ~20 KB of text tokenizes
  in a few milliseconds, about 1% of a tiny-preset step, in the loader's
  background thread: a pool of tokenizer threads would only preempt compute
  threads). On a GPU the CPU does little math, so the loader gets up to 4.
- A busy machine (CPU only, and only when this process's ranks may use every CPU
  of the machine, since the load average counts the whole machine): the CPUs that
  other processes keep busy at start are taken off torch's threads, at least 1 left.
  Intra-op threads meet at a barrier after every op, so under time-slicing one
  descheduled thread stalls the others while the rest spin: on 2 shared cores
  (load average 7-14) 2 threads bought 479 tokens per CPU-second and 229 tok/s,
  1 thread 4,180 and 1,802 tok/s; beside 8 more busy processes, 2 threads made
  not one step in a minute (< 68 tok/s), 1 thread 507 tok/s (bench/oversubscribed.py).
  "Busy" is the smaller of the 1-minute load average (which lags: a stage that just
  finished still counts) and the runnable tasks sampled over 0.2 s less our own
  ranks (which catch a spike): a load has to be both current and lasting to cut.
  The plan is taken once, at start.
- OMP_NUM_THREADS, when set, is the torch thread count (capped at this process's
  CPUs), with no load cut: the test suite sets 1, and torchrun sets 1 for every
  rank unless it is already set.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
LOADAVG = Path("/proc/loadavg")
LOADER_THREADS_CPU = 1
LOADER_THREADS_GPU = 4


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all of them where the OS has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(directory: Path) -> float | None:
    """CPUs allowed by cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") in `directory`; None = no limit."""
    parts = (_read(directory / "cpu.max") or "").split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000  # the kernel's default period
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(directory: Path) -> float | None:
    """CPUs allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` in `directory`; None = no limit (-1)."""
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _own_paths(self_cgroup: Path) -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup ("" is v2's unified tree)."""
    paths = {}
    for line in (_read(self_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _along(base: Path, path: str) -> list[Path]:
    """base/path and each parent up to base; just base when path is not under it (a container's view)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    dirs = [base.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [base]


def cgroup_cpu_limit(root: str | Path = CGROUP_ROOT, self_cgroup: str | Path = SELF_CGROUP) -> float | None:
    """CPUs the cgroup quota allows (may be fractional), the smallest along the cgroup path; None = no quota."""
    root, self_cgroup = Path(root), Path(self_cgroup)
    own = _own_paths(self_cgroup)
    limits = []
    if (root / "cgroup.controllers").exists():  # v2: one unified tree
        limits = [_v2_limit(d) for d in _along(root, own.get("", "/"))]
    else:  # v1 (or hybrid: v2 mounted at unified/ without the cpu controller): the cpu controller's own mount
        path = own.get("cpu", own.get("cpuacct", "/"))
        for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
            if (root / mount).is_dir():
                limits = [_v1_limit(d) for d in _along(root / mount, path)]
                break
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def env_count(name: str, env=None) -> int | None:
    """A positive count from an environment variable; None when unset, empty or not a positive whole number
    (as OpenMP itself does, which warns and goes on with its default)."""
    text = ((os.environ if env is None else env).get(name) or "").strip()
    first = text.split(",")[0].strip()  # OMP_NUM_THREADS may list nested levels: "4,2"
    return int(first) if first.isdigit() and int(first) >= 1 else None


def local_world_size(env=None) -> int:
    """Processes on this node: LOCAL_WORLD_SIZE (set by torchrun), else 1."""
    return env_count("LOCAL_WORLD_SIZE", env) or 1


def usable_cpus(ranks: int | None = None, root: str | Path = CGROUP_ROOT,
                self_cgroup: str | Path = SELF_CGROUP) -> int:
    """CPUs for this process: min(affinity mask, cgroup quota) split among the `ranks` local ranks, at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_limit(root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota + 1e-9)))
    ranks = local_world_size() if ranks is None else ranks
    return max(1, cpus // max(1, ranks))


def runnable_tasks(seconds: float = 0.2, samples: int = 20, loadavg: Path = LOADAVG) -> float | None:
    """Mean number of runnable tasks on the machine (this one included) over `seconds`; None if unreadable."""
    counts = []
    for i in range(samples):
        text = _read(loadavg)
        try:
            counts.append(int(text.split()[3].split("/")[0]))  # "0.52 0.58 0.59 3/412 1234": 3 runnable now
        except (AttributeError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(seconds / samples)
    return sum(counts) / len(counts)


def other_load(ranks: int = 1) -> float:
    """CPUs other processes keep busy now and have for a while: min(1-min load average, runnable - our ranks)."""
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    now = runnable_tasks()
    if now is None:
        return max(0.0, load1)
    # all our local ranks are starting at this moment: count them as ours, not as the machine's load
    return max(0.0, min(load1, now - ranks))


def loader_threads(device_type: str = "cpu", cpus: int | None = None) -> int:
    """Tokenizer threads for the training loader: 1 on CPU; on a GPU up to 4, at most half the CPUs."""
    if device_type == "cpu":
        return LOADER_THREADS_CPU
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, min(LOADER_THREADS_GPU, cpus // 2))


@dataclass(frozen=True)
class ThreadPlan:
    cpus: int     # this process's share of the usable CPUs
    compute: int  # torch intra-op threads
    loader: int   # tokenizer threads of the training loader
    busy: float   # of this process's share, the CPUs other processes kept busy at the start
    reason: str   # why compute is what it is

    def describe(self) -> str:
        return (f"threads: {self.compute} torch, {self.loader} loader, on {self.cpus} usable CPUs "
                f"({self.reason}; os.cpu_count {os.cpu_count()})")


def thread_plan(device_type: str = "cpu", cpus: int | None = None, busy: float | None = None,
                ranks: int | None = None, env=None, machine_cpus: int | None = None) -> ThreadPlan:
    """How this process's threads share its CPUs (see the module docstring).

    Unset arguments are measured: `cpus` this process's share of the usable CPUs,
    `busy` the machine's other load in CPUs (shared out over the `ranks` local ranks
    like the CPUs are), `machine_cpus` os.cpu_count(), `env` os.environ.
    """
    env = os.environ if env is None else env
    ranks = local_world_size(env) if ranks is None else max(1, ranks)
    cpus = usable_cpus(ranks) if cpus is None else max(1, cpus)
    requested = env_count("OMP_NUM_THREADS", env)
    loader = loader_threads(device_type, cpus)
    if requested:
        reason = f"OMP_NUM_THREADS={requested}" + (", capped at the usable CPUs" if requested > cpus else "")
        return ThreadPlan(cpus, min(requested, cpus), loader, 0.0, reason)
    if device_type != "cpu":  # CUDA/MPS: the CPU feeds the device
        return ThreadPlan(cpus, max(1, cpus - loader), loader, 0.0, "the loader's threads apart")
    if (machine_cpus or os.cpu_count() or cpus) > cpus * ranks:
        # a mask or a quota on a bigger machine: its load average is mostly not ours to share out
        return ThreadPlan(cpus, cpus, loader, 0.0, "an affinity mask or a cgroup quota")
    if busy is None:
        busy = other_load(ranks)
    share = max(0.0, busy) / ranks
    compute = max(1, min(cpus, math.floor(cpus - share + 0.5)))
    reason = f"{share:.1f} CPUs busy with other processes" if compute < cpus else "the machine is quiet"
    return ThreadPlan(cpus, compute, loader, round(share, 2), reason)


def apply_thread_plan(plan: ThreadPlan) -> ThreadPlan:
    """Set torch's intra-op threads to the plan's; returns the plan."""
    import torch

    if torch.get_num_threads() != plan.compute:
        torch.set_num_threads(plan.compute)
    return plan
