"""pipeline.processes: this machine's processes from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from pipeline import processes

SLEEP = [sys.executable, "-c", "import time; time.sleep(30)"]


def _started(child: subprocess.Popen) -> None:
    """Until the child runs its own program (before its exec it is a copy of this one)."""
    deadline = time.monotonic() + 10
    while "time.sleep(30)" not in processes.table().get(child.pid, (0, "", ""))[2]:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)


def test_the_table_names_each_process_its_parent_and_command_line():
    child = subprocess.Popen(SLEEP)
    try:
        _started(child)
        parent, name, cmdline = processes.table()[child.pid]
        assert parent == os.getpid() and name.startswith("python") and cmdline.endswith("time.sleep(30)")
        assert processes.status(child.pid).startswith("Name:")
    finally:
        child.kill()
        child.wait()


def test_marked_finds_the_processes_whose_environment_holds_an_entry():
    name, value = "PROCESSES_TEST", uuid.uuid4().hex
    child = subprocess.Popen(SLEEP, env={**os.environ, name: value})
    other = subprocess.Popen(SLEEP)
    try:
        _started(child)
        _started(other)
        assert processes.marked({f"{name}={value}".encode()}) == [child.pid]
        assert processes.marked({f"{name}=nothing".encode()}) == []
    finally:
        for p in (child, other):
            p.kill()
            p.wait()
