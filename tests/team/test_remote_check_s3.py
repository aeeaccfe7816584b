"""The retrain job's S3 preflight (pipelines/remote_check.py) against moto's real S3 server on 127.0.0.1:
a bucket that exists passes; a missing bucket and refused credentials each get one line naming the setting.

Team marker (`make test-team`): it needs moto's server from `make team-setup`.
"""

import os
import socket
import subprocess
import time
import urllib.request

import pytest

from pipelines.remote_check import s3_problem
from team.services import MOTO

pytestmark = pytest.mark.team


def _moto(port: int, auth: bool) -> subprocess.Popen:
    env = dict(os.environ)
    if auth:  # moto checks keys from the first request on: any key it never issued is refused
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None, "moto_server exited"
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("moto_server did not come up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project(root, port: int, bucket: str):
    (root / ".dvc").mkdir(parents=True, exist_ok=True)
    (root / ".dvc/config").write_text("[core]\n    remote = team\n")
    (root / ".dvc/config.local").write_text(  # what `python -m team remote` writes
        f"['remote \"team\"']\n    url = s3://{bucket}/dvc\n    endpointurl = http://127.0.0.1:{port}\n"
        "    access_key_id = testing\n    secret_access_key = testing\n    region = us-east-1\n")
    return root


def test_s3_preflight_names_the_missing_bucket_and_the_refused_credentials(tmp_path):
    if not MOTO.exists():
        pytest.fail(f"moto's S3 server is not installed at {MOTO}: run `make team-setup`")
    import boto3

    open_port, auth_port = _free_port(), _free_port()
    servers = [_moto(open_port, auth=False), _moto(auth_port, auth=True)]
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{open_port}", aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="present")
        assert s3_problem(_project(tmp_path / "ok", open_port, "present")) is None
        missing = s3_problem(_project(tmp_path / "missing", open_port, "absent"))
        assert missing.startswith("DVC remote 'team' (s3://absent/dvc): S3 bucket 'absent' does not exist")
        assert "NANOFORGE_S3_BUCKET" in missing
        refused = s3_problem(_project(tmp_path / "refused", auth_port, "present"))
        assert "S3 refused the credentials" in refused and "access_key_id" in refused, refused
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
