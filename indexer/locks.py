"""Exclusive locks for index jobs and published indexes.

Two processes working on one index at once break each other: two resumed runs of one job
delete each other's half-written part files, and two publishers can leave the index pointing at
a version the other one just removed. Every job run, merge and publish therefore holds an
exclusive ``flock(2)`` on a small lock file beside the index (``.INDEX.lock``; shard workers of
one job each lock their own shard, ``.INDEX.shard-i-of-N.lock``, so they still run side by side).

The lock is released by the kernel when the process ends, however it ends (``kill -9``
included), so a crash never leaves a stale lock behind. The lock file holds the owner's process
id, which the refusal names. Lock files are never deleted: removing one while another process
waits on it would let a third process lock a different file of the same name.

Locks are re-entrant within a process (a single-worker job that publishes at its end takes the
index lock once for the whole run).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class LockBusy(ValueError):
    """Another process holds the lock (a user-fixable condition: wait, or stop that process)."""


_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth)
_guard = threading.Lock()
_POLL_S = 0.05


def lock_path(index_path: str | os.PathLike[str], shard: tuple[int, int] | None = None) -> Path:
    """The lock file of the index at ``index_path`` (of one shard of its job, when given)."""
    index_path = Path(os.path.abspath(index_path))
    suffix = "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"
    return index_path.with_name(f".{index_path.name}{suffix}.lock")


def _owner(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "?"
    return text or "?"


def _lock(fd: int, wait_s: float) -> bool:
    """Take the flock on ``fd``, polling up to ``wait_s`` seconds; False if it stayed busy."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str], what: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block, waiting up
    to ``wait_s`` seconds for another holder to let go.

    Raises:
        LockBusy: another process holds it ("WHAT is in use by process N ...").
    """
    path = Path(path)
    key = str(path)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _guard:
                fd, depth = _held[key]
                _held[key] = (fd, depth - 1)
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _lock(fd, wait_s):
            raise LockBusy(
                f"{what} is in use by process {_owner(fd)}; wait for it to finish or stop it "
                f"(the lock is {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        with _guard:
            _held[key] = (fd, 1)
        try:
            yield path
        finally:
            with _guard:
                del _held[key]
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def index_lock(index_path: str | os.PathLike[str], wait_s: float = 0.0) -> contextlib.AbstractContextManager[Path]:
    """The lock of the published index at ``index_path`` and of its single-worker job (waiting
    up to ``wait_s`` seconds for it)."""
    return exclusive(lock_path(index_path), f"index {index_path}", wait_s)


def shard_lock(index_path: str | os.PathLike[str], index: int, count: int) -> contextlib.AbstractContextManager[Path]:
    """The lock of shard ``index``/``count`` of the job building ``index_path``."""
    return exclusive(lock_path(index_path, (index, count)), f"shard {index}/{count} of the job for {index_path}")
