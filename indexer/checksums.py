"""sha256 checksums of the files a job and an index are made of.

A published index records the sha256 and size of each of its data files in its manifest
(``"files": {name: {"sha256": ..., "bytes": ...}}``); a job's part manifest records those of
its vector file. Readers verify them before parsing anything, so a bit flip, a truncated copy
or a zeroed file is reported by name, with what to do about it, instead of being searched
(a damaged FAISS file can return wrong hits without any error) or crashing a parser.

The JSON records that decide what a hit is (a job's ``job.json``, each part's manifest, whose
paths become the hits' paths) carry the sha256 of their own canonical text
(:func:`seal_record`), checked whenever they are read (:func:`read_sealed_json`): one flipped
digit in a part's item path is refused by merge, resume and ``index add`` instead of being
published as another clip's name. A published ``manifest.json`` is checksummed by the pointer
that publishes it (:mod:`indexer.store`).
"""

from __future__ import annotations

import hashlib
import json
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


# ---------------------------------------------------------------------------- sealed JSON records

#: The key under which a JSON record (a job's ``job.json``, a part's manifest) carries the sha256
#: of the rest of itself.
RECORD_SHA_KEY = "record_sha256"


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of ``record`` without its own checksum, over a canonical JSON text (sorted keys),
    so the digest survives a write and a read back."""
    body = {key: value for key, value in record.items() if key != RECORD_SHA_KEY}
    text = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with its checksum under :data:`RECORD_SHA_KEY`."""
    return {**record, RECORD_SHA_KEY: record_digest(record)}


def read_sealed_json(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON object in ``path``, checked against the checksum it carries (records written
    before checksums were recorded carry none and are read as they are).

    Raises:
        ChecksumMismatch: the file is not JSON, not an object, or differs from its checksum;
            the message names the file and ends with ``remedy``.
    """
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ChecksumMismatch(f"{path} is damaged ({error}); {remedy}") from None
    if not isinstance(record, dict):
        raise ChecksumMismatch(f"{path} is damaged (not a JSON object); {remedy}")
    if RECORD_SHA_KEY in record and record[RECORD_SHA_KEY] != record_digest(record):
        raise ChecksumMismatch(f"{path} is damaged (its content differs from its recorded sha256); {remedy}")
    return record
