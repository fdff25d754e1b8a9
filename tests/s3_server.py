"""A real S3-compatible HTTP server on loopback (moto's server mode), for tests.

``s3_server`` is a session fixture: tests/conftest.py imports it, and its ``ray_cluster``
depends on it, because Ray's worker processes take their environment from the moment
the cluster starts — ``server.env`` has to be in Ray's job ``runtime_env`` for Ray Data
and Ray Train workers to reach this endpoint with these credentials.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# Fake credentials: moto accepts any; the AWS clients just need some to sign requests.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when pytest dies, even if it is killed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class MotoServer:
    """``moto.server`` on 127.0.0.1 and a free port; stopped for sure by ``stop()``."""

    def __init__(self, start_timeout: float = 30.0):
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        self.endpoint = ""

    @property
    def env(self) -> dict[str, str]:
        """What an AWS client needs to use this server instead of AWS."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def start(self) -> MotoServer:
        for _ in range(3):  # the free port may be taken between the check and the bind
            port = _free_port()
            self.endpoint = f"http://127.0.0.1:{port}"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
                preexec_fn=_die_with_parent,
            )
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        with open(self.log.name) as f:
            raise RuntimeError(f"moto server did not start; its log:\n{f.read()[-3000:]}")

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds: moto ignores SIGTERM for a while."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="session")
def s3_server():
    """One S3 server for the test session (starts in about a second)."""
    with MotoServer() as server:
        yield server
