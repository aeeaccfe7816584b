"""A real `mlflow server` on 127.0.0.1 that is down when a stage starts and killed in the middle of
the next: both runs are kept in mlruns-offline/, and the replay CLI sends every metric once it is back.

Team marker (`make test-team`): two server boots take a minute or more on a busy machine. The
main suite's tests/test_tracking.py checks the same paths quickly against the SQLite store.
"""

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from nanoforge import tracking
from nanoforge.tracking import stage_run

pytestmark = pytest.mark.team


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(store: str, artifacts, port: int):
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("mlflow server did not come up")


def _stop_server(proc) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGKILL)  # as a crash would: no goodbye to the clients
    proc.wait()


def test_real_server_down_at_start_and_killed_mid_run_loses_nothing(tmp_path, monkeypatch):
    # a real `mlflow server` on 127.0.0.1: down while one stage runs, killed in the middle of the next;
    # the replay CLI then sends everything, and the server has every metric of both
    import sys

    monkeypatch.chdir(tmp_path)
    store = os.environ["MLFLOW_TRACKING_URI"]  # pre-migrated SQLite: the server boots fast on it
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with stage_run("tokenizer", {"vocab_size": 512}) as run:  # the server is not up yet
        assert not run.enabled
        for step in range(5):
            run.log_metrics({"loss": float(step)}, step=step)
    server = _start_server(store, tmp_path / "art", port)
    try:
        with stage_run("train", {"lr": 0.1}) as run:
            assert run.enabled
            for step in range(10):
                run.log_metrics({"loss": float(step)}, step=step)
            run.flush()
            _stop_server(server)
            for step in range(10, 20):
                run.log_metrics({"loss": float(step)}, step=step)
            train_id = run.run_id
        assert run.offline_file is not None and not run.enabled
        assert len(list((tmp_path / tracking.OFFLINE_DIR).glob("*.jsonl"))) == 2
        server = _start_server(store, tmp_path / "art", port)
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        out = subprocess.run([sys.executable, "-m", "nanoforge.tracking", "replay"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "sent 2 run(s)" in out.stdout
        server_client = MlflowClient(url)
        assert [m.step for m in server_client.get_metric_history(train_id, "loss")] == list(range(20))
        assert server_client.get_run(train_id).info.status == "FINISHED"
        exp = server_client.get_experiment_by_name(tracking.EXPERIMENT)
        [tok] = server_client.search_runs([exp.experiment_id], "tags.stage = 'tokenizer'")
        assert tok.data.params == {"vocab_size": "512"} and tok.info.status == "FINISHED"
        assert [m.step for m in server_client.get_metric_history(tok.info.run_id, "loss")] == list(range(5))
    finally:
        if server.poll() is None:
            _stop_server(server)
