"""Processes started for a job end with the job's driver, however the driver ends.

A local Ray cluster started by ``vtr index --engine ray`` runs helper processes (the raylet,
its dashboard and runtime-env agents, worker processes). Ray ties some of them to the driver,
not all: after ``kill -9`` of the driver its agents were still running, re-parented to init.
The engine therefore starts a small watcher process (:func:`start_reaper`, this module run as
``python -m indexer.engines.reaper``) that notes every descendant of the driver once a second
while the driver runs, and kills those still alive once the driver is gone. Processes are
named by pid *and* start time, so a reused pid is never hit.

Workers of a remote cluster are not the driver's descendants; on the driver's machine they
watch the driver themselves (:func:`driver_running`, used by :mod:`indexer.engines.ray`), and
elsewhere Ray's own job clean-up applies.

Standard library only: the watcher must start fast and stay small.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

#: Seconds between the watcher's looks at the driver and its descendants.
WATCH_INTERVAL_S = 1.0


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None if it is gone;
    with the pid it names one process even after the pid is reused."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].decode("ascii", "replace").split()
    except (OSError, IndexError):
        return None


def driver_identity(pid: int | None = None) -> dict[str, Any]:
    """What a watcher needs to follow a process (default: this one): host, pid, start time."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "started": process_start(pid)}


def driver_running(driver: dict[str, Any]) -> bool:
    """Whether the process ``driver`` (:func:`driver_identity`) still runs."""
    started = process_start(int(driver["pid"]))
    return started is not None and (driver.get("started") is None or started == driver["started"])


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live descendant of process ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[tuple[int, str]] = set()
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        started = process_start(child)
        if started is not None and (child, started) not in found:
            found.add((child, started))
            stack.extend(children.get(child, []))
    return found


def watch(driver: dict[str, Any], interval: float = WATCH_INTERVAL_S) -> int:
    """Note the driver's descendants while it runs; once it is gone, kill those still alive.
    Returns how many were killed."""
    me = os.getpid()
    seen: set[tuple[int, str]] = set()
    while driver_running(driver):
        seen |= {(pid, started) for pid, started in descendants(int(driver["pid"])) if pid != me}
        time.sleep(interval)
    killed = 0
    for pid, started in sorted(seen):
        if process_start(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def start_reaper() -> subprocess.Popen[bytes] | None:
    """Start the watcher for this process (see the module docstring); None where there is no
    /proc to watch with."""
    if not os.path.isdir("/proc"):
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "indexer.engines.reaper", json.dumps(driver_identity())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def main(argv: list[str]) -> int:
    watch(json.loads(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
