"""The CPUs a process may use (affinity mask, cgroup v1/v2 quota, local ranks) and the thread plan built on them.

The cgroup trees are folders in tmp_path laid out like /sys/fs/cgroup (data, not a
mock); the affinity and quota tests restrict a real child interpreter (sched_setaffinity,
and a real cgroup where this machine lets us make one) and check what init_runtime and
the training loader then use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nanoforge import cpus
from tests.conftest import REPO

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# --- cgroup quotas, from trees laid out like the kernel's


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    root = tree(tmp_path / "fs", {"cgroup.controllers": "cpuset cpu io memory pids\n",
                                  "kubepods/cpu.max": "250000 100000\n",   # the pod: 2.5 CPUs
                                  "kubepods/ctr/cpu.max": "max 100000\n"})  # the container: no own limit
    own = tree(tmp_path, {"self": "0::/kubepods/ctr\n"}) / "self"
    assert cpus.cgroup_cpu_limit(root, own) == 2.5
    assert cpus.usable_cpus(1, root, own) == min(AFFINITY, 2)  # 2.5 rounds down

    (root / "kubepods/ctr/cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert cpus.cgroup_cpu_limit(root, own) == 0.5
    assert cpus.usable_cpus(1, root, own) == 1


def test_cgroup_v2_without_a_quota_or_seen_from_inside_a_container(tmp_path):
    root = tree(tmp_path / "fs", {"cgroup.controllers": "cpu\n", "cpu.max": "max 100000\n"})
    own = tree(tmp_path, {"self": "0::/\n"}) / "self"
    assert cpus.cgroup_cpu_limit(root, own) is None
    assert cpus.usable_cpus(1, root, own) == AFFINITY
    # a container's namespace shows a host path that its /sys/fs/cgroup does not have: its root is its cgroup
    (root / "cpu.max").write_text("100000 100000\n")
    own.write_text("0::/system.slice/docker-0123abcd.scope\n")
    assert cpus.cgroup_cpu_limit(root, own) == 1.0
    (root / "cpu.max").write_text("garbage\n")
    assert cpus.cgroup_cpu_limit(root, own) is None


def test_cgroup_v1_quota_from_the_cpu_controller(tmp_path):
    root = tree(tmp_path / "fs", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
                                  "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                                  "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                                  "unified/cgroup.controllers": "\n"})  # hybrid: v2 mounted, cpu still on v1
    own = tree(tmp_path, {"self": "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"}) / "self"
    assert cpus.cgroup_cpu_limit(root, own) == 1.5
    assert cpus.usable_cpus(1, root, own) == 1

    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")  # -1: no quota
    assert cpus.cgroup_cpu_limit(root, own) is None


def test_cgroup_v1_separate_cpu_mount(tmp_path):
    root = tree(tmp_path / "fs", {"cpu/job/cpu.cfs_quota_us": "300000\n", "cpu/job/cpu.cfs_period_us": "100000\n",
                                  "cpuacct/job/cpuacct.usage": "0\n"})
    own = tree(tmp_path, {"self": "3:cpuacct:/job\n2:cpu:/job\n"}) / "self"
    assert cpus.cgroup_cpu_limit(root, own) == 3.0
    assert cpus.cgroup_cpu_limit(tmp_path / "nothing-here", own) is None  # no cgroup fs at all


def test_local_ranks_split_the_cpus(tmp_path):
    root = tree(tmp_path / "fs", {"cgroup.controllers": "cpu\n", "cpu.max": "800000 100000\n"})
    own = tree(tmp_path, {"self": "0::/\n"}) / "self"
    allowed = min(AFFINITY, 8)
    assert cpus.usable_cpus(1, root, own) == allowed
    assert cpus.usable_cpus(2, root, own) == max(1, allowed // 2)
    assert cpus.usable_cpus(64, root, own) == 1  # never 0
    assert cpus.local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert cpus.local_world_size({}) == 1
    plan = cpus.thread_plan("cpu", env={"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "64"})
    assert plan.cpus == max(1, cpus.usable_cpus(1) // 2) and plan.compute == plan.cpus  # capped at its share


# --- the plan


def test_a_quiet_machine_gives_torch_every_cpu_and_the_loader_one():
    plan = cpus.thread_plan("cpu", cpus=4, busy=0.3, ranks=1, env={}, machine_cpus=4)
    assert (plan.compute, plan.loader) == (4, 1)
    assert "4 torch, 1 loader, on 4 usable CPUs" in plan.describe()


def test_a_busy_machine_cuts_torch_threads_to_the_cpus_left():
    assert cpus.thread_plan("cpu", cpus=2, busy=8.0, ranks=1, env={}, machine_cpus=2).compute == 1  # at least 1
    assert cpus.thread_plan("cpu", cpus=2, busy=1.0, ranks=1, env={}, machine_cpus=2).compute == 1
    plan = cpus.thread_plan("cpu", cpus=16, busy=4.2, ranks=1, env={}, machine_cpus=16)
    assert plan.compute == 12 and "4.2 CPUs busy" in plan.describe()
    # 8 ranks of 2 CPUs on 16: the other load is shared out over the ranks too
    assert cpus.thread_plan("cpu", cpus=2, busy=8.0, ranks=8, env={}, machine_cpus=16).compute == 1
    assert cpus.thread_plan("cpu", cpus=2, busy=2.0, ranks=8, env={}, machine_cpus=16).compute == 2
    # a quota or a mask on a bigger machine: the machine's load average is not ours to share out
    assert cpus.thread_plan("cpu", cpus=2, busy=50.0, ranks=1, env={}, machine_cpus=64).compute == 2


def test_omp_num_threads_is_the_torch_thread_count_capped_at_the_cpus():
    assert cpus.thread_plan("cpu", cpus=4, busy=0.0, ranks=1, env={"OMP_NUM_THREADS": "1"}).compute == 1
    assert cpus.thread_plan("cpu", cpus=4, busy=9.0, ranks=1, env={"OMP_NUM_THREADS": "3"}).compute == 3  # no cut
    capped = cpus.thread_plan("cpu", cpus=2, busy=0.0, ranks=1, env={"OMP_NUM_THREADS": "16"})
    assert capped.compute == 2 and "capped" in capped.reason
    # not a count: ignored, as OpenMP ignores it
    assert cpus.thread_plan("cpu", cpus=4, busy=0.0, ranks=1, env={"OMP_NUM_THREADS": "lots"},
                            machine_cpus=4).compute == 4


def test_beside_a_gpu_the_loader_takes_up_to_four():
    big = cpus.thread_plan("cuda", cpus=16, busy=20.0, ranks=1, env={})
    assert (big.loader, big.compute) == (4, 12)
    small = cpus.thread_plan("cuda", cpus=2, ranks=1, env={})
    assert (small.loader, small.compute) == (1, 1)


def test_runnable_tasks_from_proc_loadavg(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.10 2.00 1.00 9/412 12345\n")
    assert cpus.runnable_tasks(seconds=0.01, samples=3, loadavg=loadavg) == 9.0
    assert cpus.runnable_tasks(seconds=0.01, samples=3, loadavg=tmp_path / "missing") is None
    assert cpus.other_load(ranks=1) >= 0.0


# --- a real restricted process: what init_runtime and the training loader use

CHILD = r"""
import json, os, sys
from pathlib import Path
restrict = sys.argv[1]
if restrict.startswith("cgroup:"):  # join the cgroup before anything starts a thread
    Path(restrict[7:], "cgroup.procs").write_text(str(os.getpid()))
else:
    os.sched_setaffinity(0, {int(restrict)})
data = Path(sys.argv[2])
from tests.datagen import make_documents, make_fineweb
from nanoforge.cpus import usable_cpus
from nanoforge.data.shards import train_shard_paths
from nanoforge.runtime import init_runtime
from nanoforge.tokenizer.bpe import train_bpe
from nanoforge.training.loader import TrainLoader
import torch
runtime = init_runtime("cpu", "float32")
make_fineweb(data, train=[0], val=1822, docs_per_shard=20, row_group_size=10)
loader = TrainLoader(train_shard_paths(directory=data), train_bpe(make_documents(50, seed=1), 300), 32, 2, 64)
next(loader)
loader.close()
plan = getattr(runtime, "threads", None)
print(json.dumps({"usable": usable_cpus(), "torch": torch.get_num_threads(), "loader": loader.stream.threads,
                  "plan": plan.describe() if plan else None}))
"""


def run_restricted(tmp_path: Path, restrict: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "MKL_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", CHILD, restrict, str(tmp_path / "data")], cwd=REPO,
                          env={**base, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(AFFINITY < 2 or not hasattr(os, "sched_setaffinity"), reason="needs 2 CPUs and affinity masks")
def test_an_affinity_mask_of_one_cpu_gives_one_torch_and_one_loader_thread(tmp_path):
    out = run_restricted(tmp_path, str(min(os.sched_getaffinity(0))))
    # the old code: os.cpu_count()-based loader threads (4 by default, min(8, cpu_count) in the loop)
    assert out["usable"] == 1 and out["torch"] == 1 and out["loader"] == 1, out
    assert out["plan"].startswith("threads: 1 torch, 1 loader, on 1 usable CPUs"), out


def make_cgroup_with_one_cpu() -> Path | None:
    """A real child cgroup limited to 1 CPU (v1 cpu controller or v2 cpu.max); None where we may not make one."""
    name = f"nanoforge-test-{uuid.uuid4().hex[:8]}"
    for parent, files in ((Path("/sys/fs/cgroup/cpu"), {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}),
                          (Path("/sys/fs/cgroup"), {"cpu.max": "100000 100000"})):
        if parent == Path("/sys/fs/cgroup") and not (parent / "cgroup.controllers").exists():
            continue
        path = parent / name
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            for file, text in files.items():
                (path / file).write_text(text)
            return path
        except OSError:
            path.rmdir()
    return None


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to tell a quota of 1 from the machine")
def test_a_real_cgroup_quota_of_one_cpu_gives_one_torch_thread(tmp_path):
    group = make_cgroup_with_one_cpu()
    if group is None:
        pytest.skip("cannot create a cgroup here (not root, or a read-only cgroup fs)")
    try:
        out = run_restricted(tmp_path, f"cgroup:{group}")
    finally:
        group.rmdir()
    # the old code: torch's default (the affinity mask, which the quota leaves alone): 2 threads on 1 CPU of quota
    assert out["usable"] == 1 and out["torch"] == 1 and out["loader"] == 1, out
    assert out["plan"].startswith("threads: 1 torch, 1 loader, on 1 usable CPUs"), out


def test_loader_threads_by_device():
    assert cpus.loader_threads("cpu", 64) == 1
    assert cpus.loader_threads("cuda", 64) == 4 and cpus.loader_threads("cuda", 4) == 2
    assert cpus.loader_threads("mps", 1) == 1
