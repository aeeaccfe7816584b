"""Where the math runs: device, dtype, and the process group, set up in one place.

Notable:
- Under torchrun there is always a real process group: NCCL on CUDA, gloo on
  CPU. (nanochat made none on CPU, so its ranks silently trained separate models.)
- `device: auto` picks CUDA, then MPS, then CPU; `dtype: auto` is bf16 autocast
  on CUDA, and on a CPU with native bf16 dot products (avx512_bf16 or AMX),
  where bf16 autocast measured about 2x faster than float32 for our models;
  float32 elsewhere.
- A plain `python -m stages.x` is rank 0 of 1 and needs no process group.
- torch's threads follow `nanoforge.cpus.thread_plan`: the affinity mask and the
  cgroup quota, split among the local ranks, less what other processes keep busy.
- On CUDA: TF32 for fp32 matmuls, and the allocator's expandable segments (set on
  import, before CUDA allocates, unless PYTORCH_CUDA_ALLOC_CONF is already set).
- `peak_flops()` for MFU: a table of known GPUs (dense bf16), and on a CPU a short
  matmul probe (~0.3 s), cached per CPU model, thread count, torch and dtype (and
  taken again when the cached one was measured on a busy machine).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# The CUDA caching allocator reads its settings once, when CUDA first allocates, and this
# module is imported before anything touches CUDA (planning reads free memory through it).
# Expandable segments grow one mapping instead of caching blocks of every size, so the
# eval and logits transients do not fragment memory into an OOM. A user's setting wins.
ALLOC_CONF = "expandable_segments:True"
if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    threads: object = None  # nanoforge.cpus.ThreadPlan that init_runtime applied: torch and loader threads

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device (set device: auto or cpu)")
    return torch.device(name)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls run natively (without them oneDNN emulates, slower than fp32)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def use_cuda_fast_math() -> None:
    """TF32 tensor cores for the fp32 matmuls left outside bf16 autocast (fp32 runs, optimizer
    math), as nanochat: ~8x the fp32 peak for a 10-bit mantissa (cuDNN's TF32 is on by default).

    The legacy call, not `torch.backends.cuda.matmul.fp32_precision`: after the new API, any
    reader of the legacy flags (compilers, libraries) raises on the mix; this sets both.
    """
    torch.set_float32_matmul_precision("high")


def init_runtime(device: str = "auto", dtype: str = "auto", timeout_s: float | None = None,
                 timeout_key: str = "collective_timeout_s") -> Runtime:
    """Pick the device and dtype; join the process group when launched by torchrun.

    `timeout_s` bounds every collective (the stage's `timeout_key` param): a frozen or lost
    peer then raises within it instead of hanging (gloo's default is 30 minutes, NCCL's 10),
    and that error ends the process as one line naming the param (`collective_failure`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        use_cuda_fast_math()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        if dev.type == "cuda":
            dist.init_process_group(backend=backend, device_id=dev, **timeout)
        else:
            dist.init_process_group(backend=backend, **timeout)
        install_failure_hook(timeout_key, timeout_s or dist.default_pg_timeout.total_seconds(), rank)
    from nanoforge.cpus import apply_thread_plan, thread_plan

    threads = apply_thread_plan(thread_plan(dev.type))  # from the CPUs this process may use, not os.cpu_count()
    return Runtime(device=dev, dtype=pick_dtype(dtype, dev), rank=rank, local_rank=local_rank, world_size=world_size,
                   threads=threads)


# --- a collective that timed out or lost its peer: one line, not a traceback from deep inside torch

TIMEOUT_SIGNS = ("timed out", "timeout", "deadline")
PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


def collective_failure(exc: BaseException, key: str, seconds: float) -> str | None:
    """One line for a collective that timed out or lost its peer; None for any other error."""
    if not isinstance(exc, RuntimeError):  # DistBackendError and gloo's errors are RuntimeErrors
        return None
    text = str(exc).strip()
    lower = text.lower()
    if not (isinstance(exc, getattr(dist, "DistError", ())) or any(n in lower for n in ("gloo", "nccl", "c10d"))):
        return None  # somebody else's timeout (a download, a subprocess): not the process group's
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if any(sign in lower for sign in TIMEOUT_SIGNS):
        return (f"a collective waited longer than {key}={seconds:g} s: another rank is frozen, gone or much slower "
                f"(a stopped process, a lost node, a stuck disk). Look at the other nodes' logs; raise {key} if a "
                f"step or a checkpoint save legitimately takes longer ({first})")
    if any(sign in lower for sign in PEER_SIGNS):
        return f"another rank went away mid-run (its node died or it was killed): look at its log ({first})"
    return None


def install_failure_hook(key: str, seconds: float, rank: int) -> None:
    """Under a process group, an uncaught collective failure prints one `error` line and exits 1.

    A hook, not an `except` in each stage: the error surfaces wherever a collective waits (DDP's
    backward, a barrier, an all-reduce in eval), and the stage's `finally` (shutdown, lock
    release) has run by the time the hook sees it. Every rank prints: the survivor of a frozen
    rank 0 is another rank, and its log is the one people read.
    """
    import sys

    previous = sys.excepthook

    def hook(kind, exc, tb):
        line = collective_failure(exc, key, seconds)
        if line is None:
            return previous(kind, exc, tb)
        print(f"error{'' if rank == 0 else f' (rank {rank})'}: {line}", file=sys.stderr, flush=True)

    sys.excepthook = hook


# --- peak FLOP/s, for MFU

# Dense bf16 tensor-core peaks per GPU, TFLOP/s. Datasheets quote "with sparsity": half of
# that is the dense figure. Sources (NVIDIA datasheets):
#   H100 / H800 SXM 1,979 sparse -> 989; H100 / H800 PCIe 1,513 -> 756; H100 NVL 1,671 -> 835
#     (nvidia.com/en-us/data-center/h100/, the H800 is the H100 with NVLink cut)
#   H200 SXM 1,979 -> 989; H200 NVL 1,671 -> 835.5 (nvidia.com/en-us/data-center/h200/)
#   GH200 1,979 -> 989 (nvidia.com/en-us/data-center/grace-hopper-superchip/)
#   B200 (HGX B200, 8 GPUs: 36 PFLOPS bf16 sparse) -> 2,250; GB200 NVL72 (360 sparse / 72 GPUs) -> 2,500
#   A100 / A800 312 dense (the A800 is the A100 with NVLink cut); A10 250 sparse -> 125;
#   A10G (AWS) 70; L40S 733 sparse -> 362; L40 362 sparse -> 181; L4 242 sparse -> 121
#   RTX 4090 165 and RTX 3090 71 (fp32 accumulate, Ada / Ampere whitepapers)
# Matched as whole words in torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3"), so L4 is
# not L40 and H200 not GH200; multi-word names come before their family.
GPU_PEAK_TFLOPS = {
    "H200 NVL": 835.5,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H800 PCIe": 756.0,
    "GH200": 989.0,
    "H200": 989.0,  # SXM
    "H100": 989.0,  # SXM
    "H800": 989.0,  # SXM
    "GB200": 2500.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU called `name`, None when it is not in the table."""
    for key, tflops in GPU_PEAK_TFLOPS.items():  # ordered: specific names before their family
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


def _cache_file() -> Path:
    base = os.environ.get("NANOFORGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoforge"
    )
    return Path(base) / "peak_flops.json"


def measure_matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.25) -> float:
    """Best FLOP/s of an n x n matmul on this CPU over ~`seconds` (the practical peak)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def cpu_peak_flops(dtype: torch.dtype) -> float:
    """Measured once per CPU model, thread count, torch version and dtype, then cached on disk.

    A peak is a maximum, so the cache only ever goes up; a probe taken while other
    processes loaded the CPU is taken again once the machine is quieter.
    """
    from nanoforge.sysinfo import cpu_model

    key = f"{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = (os.cpu_count() or 1) / 2
    entry = cache.get(key)
    if isinstance(entry, dict) and (entry.get("load", 0.0) <= busy or load >= entry.get("load", 0.0)):
        return float(entry["flops"])
    peak = measure_matmul_flops(dtype)
    if isinstance(entry, dict) and entry["flops"] > peak:
        peak, load = entry["flops"], min(load, entry.get("load", load))
    cache[key] = {"flops": peak, "load": load}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the probe next time
    return peak


def peak_flops(runtime: Runtime) -> float | None:
    """Peak FLOP/s of one device of this runtime in its compute dtype; None when unknown."""
    if runtime.device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(runtime.device))
    if runtime.device.type == "cpu":
        return cpu_peak_flops(runtime.dtype)
    return None


def shutdown(runtime: Runtime | None = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
