"""Writing files whole or not at all, the one way every part of vtr does it.

A file is written under a temporary name beside its destination and renamed over it, so a
reader sees the old file or the new one, never half of one. ``durable=True`` (the default) also
fsyncs the file before the rename and the directory after it, so the new name survives a power
loss: index parts, manifests and model weights need that; caches and scratch output do not.

A full disk surfaces as ``OSError(ENOSPC)`` naming the destination, whoever did the writing:
safetensors reports it as its own ``SafetensorError`` ("... (os error 28)"), which
:func:`atomic_path` turns into the ``OSError`` every command already reports in one line. The
previous file is untouched either way.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
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


#: errno values that mean "the disk (or the quota) is full", as Rust libraries spell them
_FULL_MESSAGE = re.compile(r"\(os error (%d|%d)\)" % (errno.ENOSPC, errno.EDQUOT))


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk or the quota is full (an ``OSError`` or a library's own error
    that carries the OS error number in its message)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return bool(_FULL_MESSAGE.search(str(exc)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed
    (a half-written file only takes space, e.g. on a full disk). A full disk is raised as
    ``OSError(ENOSPC)`` naming ``path``, whatever library was writing."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except Exception as exc:
        named = isinstance(exc, OSError) and exc.filename not in (None, str(tmp))
        if disk_full(exc) and not named:  # named by its destination, not by the temporary name
            code = exc.errno if isinstance(exc, OSError) else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces the directory ``path`` (which
    is kept whole until then), on error it is removed. The swap is two renames: a process killed
    between them leaves the previous directory as ``<path>.old`` (a reader that finds no
    ``path`` looks there)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary folder inside the directory ``path`` (the same file system) to
    write files that :func:`move_into` then renames into ``path``; removed on exit with whatever is
    left in it. A full disk while filling it is raised as ``OSError(ENOSPC)`` naming ``path``."""
    path = Path(path)
    tmp = temp_name(path / "staged")
    tmp.mkdir()
    try:
        yield tmp
    except Exception as exc:
        inside = isinstance(exc, OSError) and exc.filename is not None and str(exc.filename).startswith(str(tmp))
        named = isinstance(exc, OSError) and exc.filename is not None and not inside
        if disk_full(exc) and not named:
            code = exc.errno if isinstance(exc, OSError) else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into(staged: str | os.PathLike[str], path: str | os.PathLike[str], durable: bool = True) -> list[str]:
    """Rename every file of the folder ``staged`` (from :func:`staging_dir`) into ``path``, over
    files of the same names; returns their names. Renames take no space, so once every file is
    written whole in ``staged`` a full disk can no longer stop them halfway."""
    staged, path = Path(staged), Path(path)
    names = sorted(entry.name for entry in staged.iterdir() if entry.is_file())
    for name in names:
        if durable:
            fsync_path(staged / name)
        os.replace(staged / name, path / name)
    if durable and names:
        fsync_path(path)
    return names


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


__all__ = ["atomic_dir", "atomic_path", "atomic_write", "atomic_write_text", "disk_full", "fsync_path", "move_into",
           "staging_dir", "temp_name", "write_temp"]
