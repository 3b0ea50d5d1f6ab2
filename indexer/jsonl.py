"""Item metadata read lazily: a JSON-lines file as a sequence that parses a row when asked.

A million items parsed into dicts take about a gigabyte of Python objects, far more than the
memory-mapped index they describe; a search needs a dozen of them per query. :class:`JsonLines`
scans the file once for line offsets (8 bytes per row, read in chunks, nothing mapped) and reads
one line with ``pread`` on access. Small files are simply parsed into a list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

#: Files up to this size are parsed whole (a list of dicts is faster to use and small enough).
LAZY_MIN_BYTES = 32 * 1024 * 1024
_SCAN_CHUNK = 8 * 1024 * 1024


class JsonLines(Sequence):
    """The non-blank lines of an open JSON-lines file, each parsed on access (read-only)."""

    def __init__(self, f: BinaryIO) -> None:
        self._fd = os.dup(f.fileno())  # ours: stays valid when the caller closes its handle
        newlines, offset = [], 0
        f.seek(0)
        while chunk := f.read(_SCAN_CHUNK):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")) + offset)
            offset += len(chunk)
        ends = np.concatenate([*newlines, np.zeros(0, np.int64)]).astype(np.int64)
        if offset and (len(ends) == 0 or ends[-1] != offset - 1):
            ends = np.append(ends, offset)  # a last line without a newline
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        keep = ends - starts > 0
        self._starts, self._ends = starts[keep], ends[keep]

    def __len__(self) -> int:
        return len(self._starts)

    def _row(self, i: int) -> dict[str, Any]:
        start, end = int(self._starts[i]), int(self._ends[i])
        return json.loads(os.pread(self._fd, end - start, start))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range (0..{len(self) - 1})")
        return self._row(i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self._row(i)

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)


def read_items(f: BinaryIO) -> Sequence[dict[str, Any]]:
    """The rows of an items file: a list when small, a :class:`JsonLines` when large."""
    if os.fstat(f.fileno()).st_size < LAZY_MIN_BYTES:
        return [json.loads(line) for line in f if line.strip()]
    return JsonLines(f)
