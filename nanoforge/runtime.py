"""Where the math runs: device, dtype, and the process group, set up in one place.

Notable:
- Under torchrun there is always a real process group: NCCL on CUDA, gloo on
  CPU. (nanochat made none on CPU, so its ranks silently trained separate models.)
- `device: auto` picks CUDA, then MPS, then CPU; `dtype: auto` is bf16 autocast
  on CUDA (where the GPU has bf16), float32 on MPS, and on a CPU whichever of
  float32 and bf16 autocast a short probe measures faster for the model at hand
  (`probe_dtype`: a few forward+backward passes of one block at the run's width,
  context and device batch, with the real embedding, head and loss; cached on disk
  per CPU model, thread count, torch and shape). Not the CPU flags: on a Xeon with
  AMX a bare bf16 matmul is ~7x fp32, yet whole tiny-model steps ran slower in
  bf16 (the casts around every matmul and the fp32 logits cost more than the
  matmuls save at these sizes). `NANOFORGE_DTYPE_REPROBE=1` (or deleting the
  cache file) measures again.
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
from dataclasses import dataclass, field
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
    dtype_probe: dict | None = field(default=None)  # what `dtype: auto` measured on a CPU (probe_dtype), else None

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


def pick_dtype(name: str, device: torch.device, shape: ProbeShape | None = None) -> torch.dtype:
    """The autocast dtype for `name` (float32 means none); `auto` on a CPU runs `probe_dtype(shape)`."""
    return pick_dtype_probed(name, device, shape)[0]


def pick_dtype_probed(name: str, device: torch.device, shape: ProbeShape | None = None,
                      measure=None) -> tuple[torch.dtype, dict | None]:
    """(dtype, the probe's record or None): `auto` on a CPU is what the probe measured faster."""
    if name == "float32":
        return torch.float32, None
    if name == "bfloat16":
        return torch.bfloat16, None
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32), None
    if device.type == "cpu":
        probe = probe_dtype(shape or ProbeShape(), measure or measure_step_ms)
        return getattr(torch, probe["choice"]), probe
    return torch.float32, None


def pick_dtype_of_ranks(name: str, device: torch.device, shape: ProbeShape | None, rank: int,
                        world_size: int) -> tuple[torch.dtype, dict | None]:
    """`pick_dtype_probed` on rank 0; under a process group the others take rank 0's probed choice.

    Ranks that each probed could disagree (a near-tie, another node's cache), and one probe at
    a time keeps the cores to itself; the others wait in the broadcast (well within the timeout).
    """
    probed = name == "auto" and device.type == "cpu" and world_size > 1 and dist.is_initialized()
    if not probed or rank == 0:
        chosen, probe = pick_dtype_probed(name, device, shape)
        if not probed:
            return chosen, probe
    code = torch.tensor([PROBE_DTYPES.index(probe["choice"]) if rank == 0 else -1])
    dist.broadcast(code, src=0)
    if rank == 0:
        return chosen, probe
    choice = PROBE_DTYPES[int(code)]
    return getattr(torch, choice), {"choice": choice, "from_rank": 0}


def use_cuda_fast_math() -> None:
    """TF32 tensor cores for the fp32 matmuls left outside bf16 autocast (fp32 runs, optimizer
    math), as nanochat: ~8x the fp32 peak for a 10-bit mantissa (cuDNN's TF32 is on by default).

    The legacy call, not `torch.backends.cuda.matmul.fp32_precision`: after the new API, any
    reader of the legacy flags (compilers, libraries) raises on the mix; this sets both.
    """
    torch.set_float32_matmul_precision("high")


def init_runtime(device: str = "auto", dtype: str = "auto", timeout_s: float | None = None,
                 timeout_key: str = "collective_timeout_s", shape: ProbeShape | None = None,
                 log=None) -> Runtime:
    """Pick the device and dtype; join the process group when launched by torchrun.

    `timeout_s` bounds every collective (the stage's `timeout_key` param): a frozen or lost
    peer then raises within it instead of hanging (gloo's default is 30 minutes, NCCL's 10),
    and that error ends the process as one line naming the param (`collective_failure`).
    `shape` is what `dtype: auto` probes on a CPU (the run's model and device batch); rank 0
    probes, with this rank's threads, and the others take its choice, so every rank runs the
    same math. `log` gets the probe's line (rank 0).
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
    chosen, probe = pick_dtype_of_ranks(dtype, dev, shape, rank, world_size)
    if probe is not None and log is not None and rank == 0:
        log.info("%s", describe_probe(probe))
    return Runtime(device=dev, dtype=chosen, rank=rank, local_rank=local_rank, world_size=world_size,
                   threads=threads, dtype_probe=probe)


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


def _cache_file(name: str = "peak_flops.json") -> Path:
    base = os.environ.get("NANOFORGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoforge"
    )
    return Path(base) / name


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the probe next time


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


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
    cache = _read_cache(path)
    load = _load()
    busy = (os.cpu_count() or 1) / 2
    entry = cache.get(key)
    if isinstance(entry, dict) and (entry.get("load", 0.0) <= busy or load >= entry.get("load", 0.0)):
        return float(entry["flops"])
    peak = measure_matmul_flops(dtype)
    if isinstance(entry, dict) and entry["flops"] > peak:
        peak, load = entry["flops"], min(load, entry.get("load", load))
    cache[key] = {"flops": peak, "load": load}
    _write_cache(path, cache)
    return peak


def peak_flops(runtime: Runtime) -> float | None:
    """Peak FLOP/s of one device of this runtime in its compute dtype; None when unknown."""
    if runtime.device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(runtime.device))
    if runtime.device.type == "cpu":
        return cpu_peak_flops(runtime.dtype)
    return None


# --- dtype: auto on a CPU, measured

DTYPE_CACHE = "dtype_probe.json"
REPROBE_ENV = "NANOFORGE_DTYPE_REPROBE"  # 1: measure again (and replace the cached entry)
PROBE_SECONDS = 0.3  # timed passes after the warm-ups, both dtypes together (plus a warm-up pass each)
PROBE_MAX_TOKENS = 4096  # rows x context of one pass; beyond it fewer rows, so a big model's probe stays short
BF16_MARGIN = 0.95  # bf16 must be >5% faster: it costs precision, and a near-tie is noise on a shared CPU
PROBE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ProbeShape:
    """The part of the model's shape that decides fp32 vs bf16 speed: width and heads (from depth),
    context, device batch, vocabulary (the head and the fp32 logits), and training or evaluation.
    The depth is not in it: the probe runs one block, and every block costs the same.
    The defaults are the tiny preset's (depth 4, seq 256, batch 8, vocab 4096)."""

    n_embd: int = 256
    n_head: int = 2
    n_kv_head: int = 2
    sequence_len: int = 256
    vocab_size: int = 4096
    batch: int = 8
    train: bool = True  # forward+backward (the train stage); False: forward without gradients (evaluate)

    @classmethod
    def of(cls, config, batch: int, train: bool = True) -> ProbeShape:
        """From a `GPTConfig` (nanoforge/model/shape.py) or its dict (a model's config.json) and the device batch."""
        c = config if isinstance(config, dict) else vars(config)
        return cls(c["n_embd"], c["n_head"], c["n_kv_head"], c["sequence_len"], c["vocab_size"], batch, train)

    def key(self) -> str:
        return (f"width={self.n_embd}|heads={self.n_head}/{self.n_kv_head}|seq={self.sequence_len}|"
                f"batch={self.batch}|vocab={self.vocab_size}|{'train' if self.train else 'eval'}")


def measure_step_ms(shape: ProbeShape, seconds: float = PROBE_SECONDS) -> dict:
    """Best ms per pass of one block of `shape` (embedding, block, head, loss) per dtype, and the rows.

    The stage's own model class with n_layer=1, run as the stage runs it (autocast around the
    forward, backward outside it). First the block's MLP matmul alone (below), then one row per pass: when the slower dtype is already
    more than `rows`x slower there, it cannot catch up with the full batch (more rows never
    take it less time, and they take the faster one at most `rows`x as long), so a CPU that
    emulates bf16 (10x+ slower) is decided in a fraction of a second. Otherwise the device
    batch (up to PROBE_MAX_TOKENS tokens), where the casts around each matmul weigh what they
    weigh in the run. The dtypes alternate, so load from other processes hits both alike.
    """
    from nanoforge.model.shape import GPTConfig

    config = GPTConfig(sequence_len=shape.sequence_len, vocab_size=shape.vocab_size, n_layer=1,
                       n_head=shape.n_head, n_kv_head=shape.n_kv_head, n_embd=shape.n_embd)
    gen = torch.Generator().manual_seed(0)
    full = max(1, min(shape.batch, PROBE_MAX_TOKENS // shape.sequence_len))

    def one(name: str, idx: torch.Tensor, targets: torch.Tensor) -> float:
        cast = Runtime(torch.device("cpu"), getattr(torch, name)).autocast()
        t0 = time.perf_counter()
        if shape.train:
            with cast:
                loss = model(idx, targets)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), cast:
                model(idx, targets, loss_reduction="none")
        return (time.perf_counter() - t0) * 1e3

    def timed(rows: int, budget: float) -> dict:
        idx, targets = (torch.randint(0, shape.vocab_size, (rows, shape.sequence_len), generator=gen) for _ in "xy")
        # warm-up: oneDNN builds its kernels for these shapes. A dtype whose warm-up alone took
        # the whole budget is not run again (its warm-up is its figure, the kernel build small
        # beside it): an emulated bf16 pass can take seconds, and the probe must stay short.
        best = {name: one(name, idx, targets) for name in PROBE_DTYPES}
        again = [name for name in PROBE_DTYPES if best[name] < budget * 1e3]
        best.update({name: float("inf") for name in again})
        end, passes = time.perf_counter() + budget, 0
        while again and (passes < 1 or time.perf_counter() < end):
            for name in again if passes % 2 == 0 else reversed(again):
                best[name] = min(best[name], one(name, idx, targets))
            passes += 1
        return {**best, "rows": rows}

    # The block's MLP matmul alone first: where bf16 runs it more than twice as slow as fp32
    # (a CPU that emulates bf16: 10-20x), a bf16 step cannot win (its other ops are the same or
    # extra casts), and the answer takes milliseconds instead of a slow bf16 model pass.
    mm = {name: _matmul_ms(getattr(torch, name), shape.sequence_len, shape.n_embd, 4 * shape.n_embd)
          for name in PROBE_DTYPES}
    if mm["bfloat16"] > 2 * mm["float32"]:
        return {**mm, "rows": 1, "workload": "matmul"}
    from nanoforge.model.gpt import build_model  # imports torch._dynamo: seconds, which the stage pays anyway

    model = build_model(config, "cpu")
    model.train(shape.train)
    if full > 1:
        small = timed(1, seconds / 4)
        fast, slow = sorted(PROBE_DTYPES, key=small.get)
        if small[slow] > full * small[fast]:
            return {**small, "workload": "block"}
    return {**timed(full, seconds), "workload": "block"}


def _matmul_ms(dtype: torch.dtype, m: int, k: int, n: int) -> float:
    """Best ms of an (m x k) @ (k x n) matmul: a warm-up, then three more (one when it is slow)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    times = []
    for _ in range(3 if _timed_matmul(a, b, times) < 20 else 1):
        _timed_matmul(a, b, times)
    return min(times)


def _timed_matmul(a: torch.Tensor, b: torch.Tensor, times: list) -> float:
    t0 = time.perf_counter()
    a @ b
    times.append((time.perf_counter() - t0) * 1e3)
    return times[-1]


def probe_dtype(shape: ProbeShape, measure=measure_step_ms) -> dict:
    """float32 or bfloat16, whichever `measure(shape)` (ms per pass, per dtype name) finds faster.

    Measured once per CPU model, thread count, torch version and shape, then cached on disk
    beside the peak FLOPs (`NANOFORGE_DTYPE_REPROBE=1` or deleting the file measures again).
    Returns the record: choice, ms per dtype, load average when measured, cache path, cached.
    """
    from nanoforge.sysinfo import cpu_model

    key = f"{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{shape.key()}"
    path = _cache_file(DTYPE_CACHE)
    cache = _read_cache(path)
    entry = cache.get(key)
    fresh = os.environ.get(REPROBE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if not fresh and isinstance(entry, dict) and entry.get("choice") in PROBE_DTYPES:
        return {**entry, "cached": True, "cache": str(path)}
    t0 = time.perf_counter()
    measured = measure(shape)
    ms = {name: float(measured[name]) for name in PROBE_DTYPES}
    choice = "bfloat16" if ms["bfloat16"] < BF16_MARGIN * ms["float32"] else "float32"
    entry = {"choice": choice, "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
             "workload": measured.get("workload", "block"), "rows": measured.get("rows", shape.batch), "shape": shape.key(), "threads": torch.get_num_threads(),
             "load": round(_load(), 2), "probe_seconds": round(time.perf_counter() - t0, 3)}
    cache[key] = entry
    _write_cache(path, cache)
    return {**entry, "cached": False, "cache": str(path)}


def probe_details(probe: dict | None) -> dict | None:
    """What a stage's details.json keeps of `dtype: auto`'s probe (no cache path: no machine paths in outputs)."""
    if not probe:
        return None
    return {k: probe[k] for k in ("choice", "ms_per_step", "workload", "rows", "shape", "threads", "load", "cached",
                                  "from_rank") if k in probe}


def describe_probe(probe: dict) -> str:
    """The start line: `dtype auto: bfloat16 (probe: 41.2 vs 52.0 ms/step, cached in ...)`."""
    ms = probe["ms_per_step"]
    how = "cached in" if probe.get("cached") else "measured now, cached in"
    what = ("ms per MLP matmul (bf16 emulated: no model pass needed)" if probe.get("workload") == "matmul"
            else f"ms/step of one block at {probe.get('rows')} rows")
    return (f"dtype auto: {probe['choice']} (probe: bf16 {ms['bfloat16']:.1f} vs fp32 {ms['float32']:.1f} {what}, "
            f"{probe['shape']}, {how} {probe['cache']}; {REPROBE_ENV}=1 measures again)")


def shutdown(runtime: Runtime | None = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
