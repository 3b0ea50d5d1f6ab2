"""Writing files whole or not at all, the one way every part of vtr does it.

A file is written under a temporary name beside its destination and renamed over it, so a
reader sees the old file or the new one, never half of one. ``durable=True`` (the default) also
fsyncs the file before the rename and the directory after it, so the new name survives a power
loss: index parts, manifests and model weights need that; caches and scratch output do not.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory (a directory's entry list makes renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike[str]) -> Path:
    """A private temporary name beside ``path`` (hidden, unique per process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed
    (a half-written file only takes space, e.g. on a full disk)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_temp(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a fsynced temporary file beside ``path`` with ``write(handle)`` and return its name
    (for callers that publish it themselves, e.g. with ``os.link``)."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], durable: bool = True) -> None:
    """Write ``path`` whole or not at all with ``write(handle)``."""
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as handle:
        write(handle)


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = True) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), durable)


__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "fsync_path", "temp_name", "write_temp"]
