"""A real one-node Slurm cluster on localhost, in a temp dir: munged, slurmctld and slurmd.

    python -m tests.slurm.cluster /tmp/slurm   # start one, print its SLURM_CONF, stop on Ctrl-C

Notable:
- Debian's slurm-wlm and munge, installed with apt-get when missing (as root); nothing is
  written outside the temp dir: its own munge key and socket, its own ports, state and spool
  dirs, no accounting, no job completion log. Commands find it through SLURM_CONF.
- proctrack/linuxproc and task/none, so it needs no cgroups and no systemd (a container's root works).
- `start` returns once the node is idle, or raises ClusterUnavailable with the daemon's log
  line that says why, which the tests turn into a skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (for a pytest skip)."""


def ensure_installed() -> None:
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS) and shutil.which("sbatch"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable(f"{' and '.join(PACKAGES)} are not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {tail[0]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Cluster:
    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        self.conf.write_text("\n".join([
            "ClusterName=nanoforge-test", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={r / 'munge/munge.socket'}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "ReturnToService=2",
            # MinJobAge: `sbatch --wait` polls the job 2 s, then 8 s after, then every 32 s unless 4x its sleep
            # would exceed MinJobAge/2: 16 keeps it at 8 s, so a job's end is seen within 8 s, not 32 s (half
            # a minute per job in the tests), and scontrol still remembers the job when launch asks why it ended
            "SchedulerType=sched/builtin", "MinJobAge=16", "KillWait=30",
            f"NodeName=localhost CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self, timeout: float = 60) -> "Cluster":
        ensure_installed()
        self.write_conf()
        r = self.root
        key = r / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        env = {**os.environ, **self.env}
        logs = {}
        for name, cmd in (
            ("munged", [_sbin("munged"), "-F", "-f", f"--key-file={key}", f"--socket={r / 'munge/munge.socket'}",
                        f"--pid-file={r / 'munge/munged.pid'}", f"--log-file={r / 'munge/munged.log'}",
                        f"--seed-file={r / 'munge/munged.seed'}"]),
            ("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)]),
            ("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", "localhost"]),
        ):
            logs[name] = open(r / f"{name}.stderr", "w")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=logs[name], stderr=subprocess.STDOUT,
                                               start_new_session=True))
            time.sleep(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise ClusterUnavailable(f"{Path(proc.args[0]).name} exited {proc.returncode}: {self._why()}")
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            if state.returncode == 0 and state.stdout.strip() == "idle":
                return self
            time.sleep(1)
        self.stop()
        raise ClusterUnavailable(f"the node did not become idle within {timeout:.0f}s: {self._why()}")

    def _why(self) -> str:
        """The last error line of the daemons' logs."""
        lines = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stderr")) + [self.root / "munge/munged.log"]:
            if log.exists():
                lines += [f"{log.name}: {l.strip()}" for l in log.read_text(errors="replace").splitlines()
                          if "error" in l.lower() or "fatal" in l.lower()]
        return lines[-1] if lines else "no error in the daemons' logs"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the daemons too (the finally below)
    cluster = Cluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/nanoforge-slurm")).start()
    print(f"SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        cluster.stop()
