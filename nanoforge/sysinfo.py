"""What machine is this: CPU, cores, memory, GPUs, CUDA, Python and torch, for the report.

Notable:
- Every probe is best effort: a field that cannot be read is None, never an error
  (the report says "unknown"). Works on Linux, macOS and machines without CUDA.
- GPUs come from torch (names and memory as the driver reports them), so the
  report names what training could use, not what `lspci` lists.
- `python -m stages.sysinfo` prints the dict as JSON, handy on a new machine.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip() or None
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return platform.processor() or None


def _psutil():
    try:
        import psutil

        return psutil
    except ImportError:  # psutil is a dependency; a stripped environment still gets a report
        return None


def memory_bytes() -> int | None:
    ps = _psutil()
    if ps is not None:
        return int(ps.virtual_memory().total)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> tuple[list[dict[str, Any]], str | None]:
    """([{name, memory_bytes}], CUDA version) from torch; ([], None) without CUDA."""
    try:
        import torch
    except ImportError:
        return [], None
    found = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                found.append({"name": props.name, "memory_bytes": int(props.total_memory)})
    except Exception:  # a broken driver must not take the report down
        found = []
    return found, torch.version.cuda


def system_info() -> dict[str, Any]:
    ps = _psutil()
    gpu_list, cuda = gpus()
    try:
        import torch

        torch_version = torch.__version__
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except ImportError:
        torch_version, mps = None, False
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": ps.cpu_count(logical=False) if ps is not None else None,
        "memory_bytes": memory_bytes(),
        "gpus": gpu_list,
        "cuda": cuda,
        "mps": mps,
        "python": platform.python_version(),
        "torch": torch_version,
    }


if __name__ == "__main__":
    print(json.dumps(system_info(), indent=2))
