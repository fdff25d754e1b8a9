"""A real ``mlflow server`` on loopback for tests: SQLite backend in a folder, a free port,
stopped (its whole process group) and started again on the same port and database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from s3_server import _die_with_parent, _free_port


class MlflowServer:
    def __init__(self, folder: str, start_timeout: float = 120.0):
        self.folder, self.start_timeout = folder, start_timeout
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.log = os.path.join(folder, "server.log")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        """Start (again: same port, same database) and wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            return self  # running
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
                 "--default-artifact-root", f"{self.folder}/artifacts"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.start_timeout  # 20-30 s on two busy cores
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        with open(self.log) as f:
            raise RuntimeError(f"mlflow server did not start; its log:\n{f.read()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL to its process group (uvicorn and MLflow's job runner): the server
        is gone at once, as when its machine fails."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the port free again before a restart
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=1).close()
                time.sleep(0.2)
            except OSError:
                return
