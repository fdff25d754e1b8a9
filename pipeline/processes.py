"""This machine's processes, read from Linux's ``/proc`` (empty elsewhere): what the
memory monitor, the end of a job's own Ray instance and the orphan tests look at."""

from __future__ import annotations

import os


def table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, name, command line) of every process that can be read."""
    found = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            stat = _read(int(entry), "stat")
            cmdline = _read(int(entry), "cmdline").replace("\0", " ").strip()
        except OSError:  # ended meanwhile
            continue
        found[int(entry)] = (int(stat[stat.rindex(")") + 2:].split()[1]), stat[stat.index("(") + 1:stat.rindex(")")],
                             cmdline)
    return found


def marked(entries: set[bytes]) -> list[int]:
    """Processes other than this one whose environment holds one of ``entries``
    (``b"NAME=value"``); only this user's can be read."""
    found = []
    for pid in table():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if entries & set(f.read().split(b"\0")):
                    found.append(pid)
        except OSError:  # gone, or another user's
            continue
    return found


def status(pid: int) -> str:
    """``/proc/<pid>/status``: raises OSError when the process is gone."""
    return _read(pid, "status")


def _read(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read().decode(errors="replace")
