"""sha256 checksums of the files a job and an index are made of.

A published index records the sha256 and size of each of its data files in its manifest
(``"files": {name: {"sha256": ..., "bytes": ...}}``); a job's part manifest records those of
its vector file. Readers verify them before parsing anything, so a bit flip, a truncated copy
or a zeroed file is reported by name, with what to do about it, instead of being searched
(a damaged FAISS file can return wrong hits without any error) or crashing a parser.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

_CHUNK = 1 << 20


class ChecksumMismatch(ValueError):
    """A file's content is not what its manifest recorded."""


def sha256_of_handle(handle: BinaryIO) -> tuple[str, int]:
    """sha256 and size of an open binary file, read from its start; the position is restored
    to the start afterwards."""
    handle.seek(0)
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    handle.seek(0)
    return digest.hexdigest(), size


def describe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of the file at ``path``."""
    with open(path, "rb") as handle:
        sha, size = sha256_of_handle(handle)
    return {"sha256": sha, "bytes": size}


def describe_files(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: describe_file(directory / name) for name in names}


def verify_handle(handle: BinaryIO, recorded: Mapping[str, Any], name: str, where: str, remedy: str) -> None:
    """Raise :class:`ChecksumMismatch` naming ``name`` when ``handle``'s content differs from
    ``recorded``."""
    sha, size = sha256_of_handle(handle)
    expected_size = recorded.get("bytes")
    if expected_size is not None and size != expected_size:
        state = "truncated" if size < expected_size else "longer than written"
        raise ChecksumMismatch(
            f"{name} in {where} is damaged ({state}: {size} bytes, {expected_size} recorded); {remedy}"
        )
    if sha != recorded.get("sha256"):
        raise ChecksumMismatch(f"{name} in {where} is damaged (its sha256 differs from the recorded one); {remedy}")


def verify_file(path: Path, recorded: Mapping[str, Any], where: str, remedy: str) -> None:
    with open(path, "rb") as handle:
        verify_handle(handle, recorded, path.name, where, remedy)
