"""Two torchrun agents over c10d on 127.0.0.1, as two nodes would run: real processes, gloo, real signals.

Each agent is its own `torchrun --nnodes=2` (its own process group leader); they meet at a c10d
rendezvous on a free loopback port. Two working copies stand for two nodes without a shared
filesystem; one working copy for two nodes that share it. One test puts each agent in a network
namespace of its own, joined by a veth pair: two hosts on a wire, as far as torch can tell.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from safetensors.torch import load_file

from nanoforge.tokenizer.bpe import train_bpe
from tests.conftest import tool
from tests.datagen import make_documents, make_fineweb
from tests.test_train import clone, env_for, read_csv, run_train, write_params

# several agents and a deliberate collective timeout: minutes, so `make test-slurm` runs these, not `make test`
pytestmark = pytest.mark.cluster

STEPS = 8
SMALL = {"num_iterations": STEPS, "eval_every": 4, "sample_every": 0, "save_every": 4}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Generated shards, a real tokenizer and test_train's tiny params, cut to 8 steps."""
    root = tmp_path_factory.mktemp("multinode-template")
    make_fineweb(root / "data" / "fineweb", train=[0, 1], val=1822, docs_per_shard=200, row_group_size=32)
    train_bpe(make_documents(400, seed=7), 320).save(root / "artifacts" / "tokenizer")
    write_params(root, **SMALL)
    return root


@pytest.fixture(scope="module")
def single(template, tmp_path_factory) -> Path:
    """The reference: one process, 2 micro-steps per step (the same global batch as 2 nodes x 1)."""
    root = clone(template, tmp_path_factory.mktemp("single") / "w")
    run_train(root, NANOFORGE_TRACKING="off")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """One node's torchrun agent, in a session of its own (the test can stop or kill it whole);
    threads drain its output so a long run never blocks on a full pipe."""

    def __init__(self, root: Path, port: int, *args: str, launcher: list[str] | None = None,
                 host: str = "127.0.0.1", **env: str):
        cmd = [*(launcher or [tool("torchrun")]), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
               f"--rdzv_endpoint={host}:{port}", "--rdzv_id=multinode-test", "-m", "stages.train", *args]
        self.proc = subprocess.Popen(cmd, cwd=root, env=env_for(root, NANOFORGE_TRACKING="off", **env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [threading.Thread(target=self._drain, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _drain(stream, sink: list) -> None:
        for line in stream:
            sink.append(line)

    def wait(self, timeout: float) -> tuple[int, str]:
        """(exit code, stderr)."""
        self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=10)
        return self.proc.returncode, "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def finish(agents: list[Agent], timeout: float = 180) -> list[tuple[int, str]]:
    try:
        return [a.wait(timeout) for a in agents]
    finally:
        for a in agents:
            a.kill()


def wait_for_step(agents: list[Agent], step: int, timeout: float = 120) -> None:
    """Until some agent's log shows `step`, failing with their errors if one of them exits first."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(f"step {step:05d}/") for a in agents for line in a.out):
        assert time.monotonic() < deadline and all(a.proc.poll() is None for a in agents), \
            "".join(e for a in agents for e in a.err)[-4000:]
        time.sleep(0.1)


def assert_same_weights(root: Path, single: Path) -> None:
    got = load_file(str(root / "artifacts/model/model.safetensors"))
    want = load_file(str(single / "artifacts/model/model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:  # DDP's all-reduce vs accumulation: the same math, summed in another order
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_two_nodes_over_c10d_match_one_process(single, template, tmp_path):
    root = clone(template, tmp_path / "w")  # one working copy: the nodes share its filesystem
    port = free_port()
    results = finish([Agent(root, port), Agent(root, port)])
    for rc, err in results:
        assert rc == 0, err[-4000:]
    assert any("world 2 x device batch 4 x seq 32 x accum 1" in err for _, err in results)
    assert_same_weights(root, single)
    steps = read_csv(root / "artifacts/train/steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, STEPS + 1))
    assert not list((root / "artifacts/checkpoints").glob(".shared-check-*"))  # the token file is cleaned up


@pytest.fixture
def two_hosts(tmp_path):
    """Two network namespaces joined by a veth pair (10.213.N.1 and .2), removed after the test
    whatever happened; a skip with the reason where they cannot be made (not root, no `ip`)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`; "
                    "test_two_nodes_over_c10d_match_one_process is the same run on loopback")
    tag = f"{os.getpid() % 100000}{tmp_path.name[-2:]}".replace("_", "")  # unique per run and test
    subnet = f"10.213.{os.getpid() % 250}"
    hosts = [SimpleNamespace(ns=f"nf{tag}{side}", dev=f"nfv{tag}{side}", addr=f"{subnet}.{i + 1}")
             for i, side in enumerate("ab")]
    made = []
    try:
        for cmd in ([["netns", "add", h.ns] for h in hosts]
                    + [["link", "add", hosts[0].dev, "type", "veth", "peer", "name", hosts[1].dev]]
                    + [c for h in hosts for c in (["link", "set", h.dev, "netns", h.ns],
                                                  ["-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev],
                                                  ["-n", h.ns, "link", "set", "lo", "up"],
                                                  ["-n", h.ns, "link", "set", h.dev, "up"])]):
            proc = subprocess.run(["ip", *cmd], capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                pytest.skip(f"`ip {' '.join(cmd)}` failed ({proc.stderr.strip()}): no network namespaces here; "
                            "test_two_nodes_over_c10d_match_one_process is the same run on loopback")
            if cmd[:2] == ["netns", "add"]:
                made.append(cmd[2])
        yield hosts
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", hosts[0].dev], capture_output=True, timeout=30)  # if never moved


def test_two_hosts_joined_by_a_veth_pair_match_one_process(single, template, two_hosts, tmp_path):
    # issue 17: nodes that reach each other over a network, not over one loopback. In a namespace
    # the machine's hostname resolves to that namespace's own 127.0.0.1, so each agent says its
    # address (--local_addr, what the rendezvous hands the others and the workers' MASTER_ADDR) and
    # gloo its interface (GLOO_SOCKET_IFNAME). Nor does torch see that the endpoint's address is the
    # head's own (it compares it with the hostname's), so is_host says which agent serves the c10d
    # store. Both share the filesystem, like nodes on NFS.
    root = clone(template, tmp_path / "w")
    head = two_hosts[0].addr  # any port: nothing else listens in a fresh namespace
    agents = [Agent(root, 29500, launcher=["ip", "netns", "exec", h.ns, sys.executable, "-m", "nanoforge.torchrun",
                                           f"--local_addr={h.addr}", f"--rdzv_conf=is_host={int(h.addr == head)}"],
                    host=head, GLOO_SOCKET_IFNAME=h.dev)
              for h in two_hosts]
    results = finish(agents)
    for rc, err in results:
        assert rc == 0, err[-4000:]
    assert any("world 2 x device batch 4 x seq 32 x accum 1" in err for _, err in results)
    assert_same_weights(root, single)
    steps = read_csv(root / "artifacts/train/steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, STEPS + 1))


def test_a_frozen_node_is_an_error_within_the_collective_timeout(template, tmp_path):
    # issue 17: a SIGSTOPped node hung the other for gloo's default 30 minutes, silently
    root = clone(template, tmp_path / "w")
    port = free_port()
    overrides = ("--set", "num_iterations=100000", "--set", "collective_timeout_s=15", "--set", "save_every=0",
                 "--set", "eval_every=0")
    survivor, frozen = Agent(root, port, *overrides), Agent(root, port, *overrides)
    try:
        wait_for_step([survivor, frozen], 3)
        workers = psutil.Process(frozen.proc.pid).children(recursive=True)
        assert workers, "the frozen agent has no worker"
        for w in workers:
            w.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rc, err = survivor.wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        survivor.kill()
        frozen.kill()
    assert rc != 0
    lines = [line for line in errors(err) if "collective_timeout_s" in line]
    assert len(lines) == 1, err[-4000:]
    assert "train.collective_timeout_s=15 s" in lines[0] and "frozen" in lines[0]
    assert 10 < waited < 75, waited  # the timeout, plus torchrun tearing down; not 30 minutes


def test_a_params_mismatch_across_nodes_names_the_keys(template, tmp_path):
    # issue 17: a node with other params trained another model through the same all-reduce
    root = clone(template, tmp_path / "w")
    port = free_port()
    results = finish([Agent(root, port), Agent(root, port, "--set", "matrix_lr=0.05", "--set", "eval_tokens=2048")])
    for rc, err in results:
        assert rc != 0 and re.search(r"exitcode\s*:\s*2\b", err), err[-4000:]  # the worker's 2: bad input
        [line] = errors(err)
        assert "the ranks of this run resolved different params" in line and socket.gethostname() in line
        assert "train.matrix_lr" in line and "0.04" in line and "0.05" in line
        assert "train.eval_tokens" in line and "train.depth" not in line  # only the differing keys
    assert not (root / "artifacts/train/steps.csv").exists()  # refused before any work


def test_nodes_that_do_not_share_the_checkpoint_folder_are_refused(single, template, tmp_path):
    # issue 17: without a shared filesystem rank 0 resumed at its checkpoint while rank 1 started at 0
    node_a, node_b = clone(template, tmp_path / "a"), clone(template, tmp_path / "b")
    ckpt = single / "artifacts/checkpoints/step_000004"
    shutil.copytree(ckpt, node_a / "artifacts/checkpoints" / ckpt.name)  # only node a sees it
    port = free_port()
    results = finish([Agent(node_a, port), Agent(node_b, port)])
    for rc, err in results:
        assert rc != 0 and re.search(r"exitcode\s*:\s*2\b", err), err[-4000:]  # the worker's 2: bad input
        [line] = errors(err)
        assert "artifacts/checkpoints must be on a filesystem all nodes share" in line, line
        assert "rank 1 on" in line and "cannot see" in line
    for node in (node_a, node_b):
        assert not (node / "artifacts/train/steps.csv").exists()
        assert not list((node / "artifacts/checkpoints").glob(".shared-check-*"))


def test_a_node_that_dies_ends_the_survivor_and_the_run_resumes_on_one_node(single, template, tmp_path):
    # issue 17: a node lost mid-run (SIGKILL: no checkpoint, no goodbye). The survivor must exit
    # with an error line in bounded time, and the run must resume from the last checkpoint at another
    # world size (one process, 2 micro-steps: the same global batches) and finish. The agents are
    # nanoforge.torchrun, as the README says to run them: the first agent holds the c10d store, and
    # when its node dies plain torchrun ends the other in a RendezvousConnectionError traceback.
    root = clone(template, tmp_path / "w")
    write_params(root, **{**SMALL, "num_iterations": 40, "save_every": 4, "eval_every": 0,
                          "collective_timeout_s": 30})  # params.yaml, not --set: a one-off run saves elsewhere
    port = free_port()
    ours = [sys.executable, "-m", "nanoforge.torchrun"]
    dying = Agent(root, port, launcher=ours)  # first: it holds the store
    time.sleep(1)
    survivor = Agent(root, port, launcher=ours)
    try:
        wait_for_step([survivor, dying], 10)
        dying.kill()  # the whole agent and its worker, at once
        t0 = time.monotonic()
        rc, err = survivor.wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        survivor.kill()
        dying.kill()
    assert rc != 0 and waited < 75, (rc, waited, err[-3000:])  # the timeout at most, plus torchrun's teardown
    assert errors(err), err[-3000:]  # an `error` line says why, not only a traceback
    assert "Traceback" not in err.split("\n")[-2], err[-3000:]
    saved = sorted(int(p.name.split("_")[1]) for p in (root / "artifacts/checkpoints").glob("step_*"))
    assert saved and saved[-1] >= 8, saved
    resumed = run_train(root, NANOFORGE_TRACKING="off")  # world size 1 now
    assert f"resuming from artifacts/checkpoints/step_{saved[-1]:06d}" in resumed.stdout + resumed.stderr, \
        resumed.stdout[-3000:]
    steps = read_csv(root / "artifacts/train/steps.csv")
    assert [int(r["step"]) for r in steps][-1] == 40
    assert (root / "artifacts/model/model.safetensors").exists()


def test_compiled_ddp_with_gradient_accumulation_matches_one_eager_process(single, template, tmp_path):
    # issue 12: torch.compile over DDP with no_sync on all but the last micro-step had never run.
    # 2 ranks x 2 micro-steps (device batch 2) vs the eager reference's 1 process x 2 micro-steps of 4:
    # the same global batches, so the same losses up to compile's and the all-reduce's rounding.
    root = clone(template, tmp_path / "w")
    write_params(root, **{**SMALL, "device_batch_size": 2, "compile": "on"})
    proc = run_train(root, nproc=2, NANOFORGE_TRACKING="off")
    assert "world 2 x device batch 2 x seq 32 x accum 2" in proc.stderr, proc.stderr[-3000:]
    import json

    assert json.loads((root / "artifacts/train/details.json").read_text())["compile"] is True
    want, got = read_csv(single / "artifacts/train/steps.csv"), read_csv(root / "artifacts/train/steps.csv")
    assert len(got) == len(want) == STEPS
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=2e-3, abs=1e-5), (a["step"], key)
