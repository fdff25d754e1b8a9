"""Ray nodes started the way an operator starts them (``ray start``), for tests.

A test cluster gets its own temp dir and its own HOME: ``ray get-auth-token --generate``
writes ``$HOME/.ray/auth_token``, and a test must not replace the user's token. Every
port is a free one: the defaults (6379, 8265, 10001, 52365) may belong to another Ray on
the machine.

``ray stop`` stops every Ray of the user, the test session's own ``ray_cluster``
included, so it is never used here. Each node runs as ``ray start --block`` in a session
of its own instead; ``stop()`` sends it SIGTERM (it then stops its node's processes),
and SIGKILLs whatever is left that carries this cluster's marker in its environment
(job drivers run in sessions of their own). If pytest itself is killed, the kernel kills
``ray start`` (PR_SET_PDEATHSIG), Ray's reaper then kills the node's process group, and
what runs outside it (agents, workers, drivers) exits once its node is gone (measured:
within two minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from s3_server import _die_with_parent, _free_port

from pipeline import processes

MARKER = "IAST_TEST_RAY_CLUSTER"
NODE_MARKER = "IAST_TEST_RAY_NODE"  # each node's own, inherited by its raylet, agents and workers


def _sigkill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended on its own meanwhile
            pass


def _marked_processes(marker: bytes) -> list[int]:
    """Live processes whose environment holds ``marker`` (a ``NAME=value`` entry)."""
    return processes.marked({marker})


class RayNodes:
    """A Ray cluster of ``ray start`` nodes on this machine; use as a context manager."""

    def __init__(self, env: dict[str, str] | None = None):
        # Short: Ray's Unix socket paths live under the temp dir and are limited to 107 bytes.
        self.root = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        home = os.path.join(self.root, "home")
        os.makedirs(home)
        # A clean environment: no RAY_* of the pytest process (its ray_cluster sets some),
        # the venv's bin first on PATH (what `source .venv/bin/activate` does), so jobs'
        # `python` is the venv's.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=home, RAY_TMPDIR=self.root, PYTHONUNBUFFERED="1",
                        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        self.env.update(env or {})
        self.env[MARKER] = self.root
        self.nodes: list[subprocess.Popen] = []
        self.killed: set[int] = set()
        self.gcs_address = ""
        self.dashboard = ""

    # -- the ray CLI, as a user runs it -------------------------------------------------------

    def ray(self, *args: str, cwd: str | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray <args>`` in this cluster's environment, output captured; raises on failure if ``check``."""
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), *args]
        done = subprocess.run(cmd, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                               f"{done.stderr[-4000:]}")
        return done

    @property
    def token(self) -> str | None:
        path = os.path.join(self.env["HOME"], ".ray", "auth_token")
        return open(path).read().strip() if os.path.exists(path) else None

    def api(self, path: str):
        """GET a dashboard endpoint (with the token, when there is one) -> parsed JSON."""
        request = urllib.request.Request(self.dashboard + path)
        if self.token and self.env.get("RAY_AUTH_MODE") == "token":
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        """Ray's own node records (state API): node_id, resources_total, state, ..."""
        nodes = self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    # -- nodes ----------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], ready, timeout: float) -> None:
        log = os.path.join(self.root, f"{name}.log")
        with open(log, "w") as out:
            node = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", "--disable-usage-stats",
                 f"--dashboard-agent-listen-port={_free_port()}", *args],
                env={**self.env, NODE_MARKER: f"{self.root}/{name}"}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and node.poll() is None:
            try:
                if ready():
                    return
            except (OSError, KeyError, ValueError):  # not up yet
                pass
            time.sleep(0.5)
        with open(log) as f:
            raise RuntimeError(f"ray start ({name}) exited or was not up after {timeout:.0f} s; its log:\n"
                               f"{f.read()[-4000:]}")

    def start_head(self, num_cpus: int, resources: dict | None = None, timeout: float = 120) -> None:
        dashboard_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        address_file = os.path.join(self.root, "ray_current_cluster")

        def ready() -> bool:
            self.api("/api/jobs/")  # the job server answers
            self.gcs_address = open(address_file).read().strip()
            return bool(self.gcs_address)

        self._start("head", [
            "--head", f"--port={_free_port()}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={_free_port()}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources or {})}", f"--temp-dir={self.root}",
        ], ready, timeout)

    def add_node(self, num_cpus: int, resources: dict | None = None, timeout: float = 120) -> None:
        """Another node on this machine, joining the head, with its own temp dir."""
        count = len(self.nodes) - len(self.killed) + 1
        temp_dir = os.path.join(self.root, f"node{len(self.nodes)}")
        self._start(f"node{len(self.nodes)}", [
            f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources or {})}", f"--temp-dir={temp_dir}",
        ], lambda: len(self.alive_nodes()) == count, timeout)

    def kill_node(self, index: int, timeout: float = 120) -> None:
        """SIGKILL node ``index`` (0 the head, then in ``add_node``'s order) with every
        process it started, as when its machine dies; returns once Ray counts it dead."""
        alive = len(self.alive_nodes())
        name = "head" if index == 0 else f"node{index}"
        marker = f"{NODE_MARKER}={self.root}/{name}".encode()
        while left := _marked_processes(marker):
            _sigkill(left)
            time.sleep(0.1)
        self.nodes[index].wait()
        self.killed.add(index)
        deadline = time.monotonic() + timeout
        while len(self.alive_nodes()) != alive - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} killed, but Ray still counts it alive after {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self, grace: float = 20.0) -> None:
        """Stop every process of this cluster (and none other), then remove its files."""
        for node in reversed(self.nodes):  # worker nodes first, the head last
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait()
        marker = f"{MARKER}={self.root}".encode()
        deadline = time.monotonic() + grace
        while (left := _marked_processes(marker)) and time.monotonic() < deadline:
            _sigkill(left)
            time.sleep(0.2)
        if left:
            raise RuntimeError(f"processes of the test Ray cluster {self.root} survived SIGKILL: {left}")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayNodes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
