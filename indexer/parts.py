"""The work directory of an indexing job and its durable parts (numpy only, no torch).

On disk, next to the index (``INDEX.work/``)::

    job.json                    what the job is (model identity, corpus, windows, part size,
                                labels, source fingerprint); written once, checked by every
                                worker, resume and merge
    parts/part-000007.npy       float32 [n, dim] clip vectors of part 7's items, in item order
    parts/part-000007.json      part 7's manifest: items (paths relative to the corpus root,
                                top-5 labels, channel records), failures, vector count and the
                                vectors' sha256; written last, so its presence is the commit record

Each file is written to a temporary name, fsynced and renamed, then the directory is fsynced:
a part exists whole or not at all, even after ``kill -9`` or a power cut. Resume skips
committed parts and redoes the rest from scratch, so no item is ever indexed twice.

:class:`PartCommitter` is the one place where a part's results become those files: both
engines hand it each clip's vector and labels (or its failure) and it commits a part as soon as
its last clip is back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from indexer import guards
from indexer.checksums import ChecksumMismatch, read_sealed_json, seal_record, verify_file
from indexer.errors import JobError, part_corrupt
from indexer.plan import Part, Shard
from retrieval.atomic import atomic_write, fsync_path, write_temp
from retrieval.data.corpora import CorpusItem

logger = logging.getLogger(__name__)

class ChannelRecords(Protocol):
    """What gives committed items their channel records beside the vectors
    (:class:`indexer.mapper.ChannelMapper`)."""

    def __call__(self, item: CorpusItem) -> dict[str, Any]:
        """An item's records, e.g. ``{"text": ..., "speech": ...}``."""

    def finish(self, records: Sequence[dict[str, Any]]) -> None:
        """Complete a part's records in place, all at once (e.g. batched sentence vectors)."""


def json_bytes(data: Any) -> bytes:
    """``data`` as the work directory's JSON files hold it."""
    return (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def create_once(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Create ``path`` holding ``data`` unless it exists; return what the file holds.

    ``os.link`` fails when the target exists, so when several shard workers start at once
    exactly one of them writes the file and the others read the winner's.
    """
    tmp = write_temp(path, lambda handle: handle.write(json_bytes(data)))
    try:
        os.link(tmp, path)
        fsync_path(path.parent)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return json.loads(path.read_text(encoding="utf-8"))


def work_dir_for(index_path: str | os.PathLike[str]) -> Path:
    """Where the job building the index at ``index_path`` keeps its parts: ``INDEX.work``."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".work")


@dataclass(frozen=True)
class WorkDir:
    """A job's directory of committed parts (layout in the module docstring)."""

    root: Path

    @classmethod
    def of(cls, index_path: str | os.PathLike[str]) -> WorkDir:
        """The work directory of the job building the index at ``index_path``."""
        return cls(work_dir_for(index_path))

    @property
    def job_file(self) -> Path:
        return self.root / "job.json"

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    def manifest_path(self, part: int) -> Path:
        return self.parts_dir / f"part-{part:06d}.json"

    def vectors_path(self, part: int) -> Path:
        return self.parts_dir / f"part-{part:06d}.npy"

    def is_done(self, part: int) -> bool:
        return self.manifest_path(part).is_file()

    def missing_parts(self) -> list[int]:
        """Parts of the job that no worker has committed yet."""
        return [part for part in range(self.read_job()["num_parts"]) if not self.is_done(part)]

    def read_job(self) -> dict[str, Any]:
        if not self.job_file.is_file():
            raise JobError(
                f"no index job at {self.root} (missing {self.job_file.name}); start one with `vtr index`"
            )
        try:
            return read_sealed_json(self.job_file, f"delete {self.root} and run the job again")
        except ChecksumMismatch as error:
            raise JobError(str(error)) from None

    def read_manifest(self, part: int) -> dict[str, Any]:
        """A committed part's manifest, checked against its own checksum (a damaged one is named)."""
        try:
            return read_sealed_json(self.manifest_path(part), self.redo(part))
        except ChecksumMismatch as error:
            raise JobError(str(error)) from None

    def redo(self, part: int) -> str:
        """What to do about a damaged part."""
        return f"delete {self.manifest_path(part)} and run the job again with --resume to redo part {part}"

    def commit_part(self, part: int, vectors: np.ndarray, manifest: dict[str, Any]) -> None:
        """Write a part's vectors, then its manifest (with the vectors' checksum): the manifest
        is the commit record."""
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        data = buffer.getvalue()
        manifest = seal_record(
            {**manifest, "vectors_file": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}})
        with guards.disk_full_as(
            f"writing part {part} in {self.root}; the parts committed so far are kept: free space, "
            "then run the same command with --resume"
        ):
            atomic_write(self.vectors_path(part), lambda handle: handle.write(data))
            atomic_write(self.manifest_path(part), lambda handle: handle.write(json_bytes(manifest)))

    def verify_vectors(self, part: int, manifest: dict[str, Any]) -> None:
        """Check a committed part's vector file against the checksum its manifest records
        (streamed: one read buffer, not the part, is held)."""
        if "vectors_file" not in manifest:
            return
        try:
            verify_file(self.vectors_path(part), manifest["vectors_file"], str(self.parts_dir), self.redo(part))
        except ChecksumMismatch as error:
            raise JobError(str(error)) from None

    def load_vectors(self, part: int, manifest: dict[str, Any], mmap: bool = False) -> np.ndarray:
        """A committed part's vectors, checked against the checksum its manifest records and
        against the manifest's counts; ``mmap`` maps the file instead of reading it (and skips
        the scan for all-zero rows, which needs every row)."""
        path = self.vectors_path(part)
        self.verify_vectors(part, manifest)
        try:
            vectors = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as error:
            raise JobError(f"{path} is unreadable ({error}); {self.redo(part)}") from None
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise JobError(f"{path} holds {vectors.dtype} {vectors.shape}, not float32 vectors; {self.redo(part)}")
        if len(vectors) != manifest["num_vectors"] or len(manifest["items"]) != manifest["num_vectors"]:
            raise part_corrupt(part, len(vectors), len(manifest["items"]), manifest["num_vectors"],
                               self.manifest_path(part))
        if not mmap:
            zero = int((np.abs(vectors).max(axis=1) == 0).sum()) if len(vectors) else 0
            if zero:
                raise JobError(f"{path} holds {zero} all-zero vectors (damaged); {self.redo(part)}")
        return vectors

    def remove_temporaries(self, shard: Shard) -> None:
        """Delete half-written part files a killed worker of ``shard`` left (their part is redone).

        Only the shard that owns a part ever writes it, so the other shards' files, which may
        be in flight right now, are left alone.
        """
        for leftover in self.parts_dir.glob(".part-*.tmp-*"):
            if shard.owns(int(leftover.name[len(".part-") :].split(".", 1)[0])):
                leftover.unlink(missing_ok=True)


class PartCommitter:
    """Collects the clips' results of running parts and commits each part when it is complete.

    Both engines feed it: :meth:`add` a clip's vector and labels, :meth:`fail` a clip that could
    not be decoded, in any order; a part is written (:meth:`WorkDir.commit_part`) as soon as its
    last clip is back. ``channels`` gives each committed item its channel records (on-screen
    text, speech), read when the part is committed.
    """

    def __init__(self, work: WorkDir, parts: Sequence[Part], dim: int,
                 channels: ChannelRecords | None = None) -> None:
        self.work = work
        self.dim = dim
        self.channels = channels
        self.parts = {part.number: part for part in parts}
        self.pending = {part.number: len(part.items) for part in parts}
        self.results: dict[int, dict[int, tuple[np.ndarray, list[tuple[str, float]]]]] = {
            part.number: {} for part in parts}
        self.decode_failures: dict[int, dict[int, dict[str, Any]]] = {part.number: {} for part in parts}
        self.indexed = 0
        self.failed = 0

    @property
    def clips(self) -> list[tuple[Part, int]]:
        """(part, item position) of every clip still to embed, in index order."""
        return [(part, position) for part in self.parts.values() for position in range(len(part.items))]

    def commit_empty(self) -> None:
        """Commit the parts with nothing to embed (every source failed probing)."""
        for number, part in self.parts.items():
            if not part.items and self.pending[number] == 0:
                self.pending[number] = -1
                self.commit(part)

    def add(self, part: int, position: int, vector: np.ndarray, labels: Sequence[tuple[str, float]]) -> None:
        self.results[part][position] = (vector, list(labels))
        self._done(part)

    def fail(self, part: int, position: int, reason: str) -> None:
        self.decode_failures[part][position] = self.parts[part].failure(position, reason)
        self._done(part)

    def _done(self, part: int) -> None:
        self.pending[part] -= 1
        if self.pending[part] == 0:
            self.commit(self.parts[part])

    def records(self, part: Part) -> tuple[dict[str, Any], np.ndarray]:
        """The manifest (items, failures, count) and the vectors of a complete part."""
        results = self.results.pop(part.number)
        rows, records = [], []
        for position, item in enumerate(part.items):
            if position not in results:
                continue
            vector, labels = results[position]
            rows.append(vector)
            record = {
                "path": item.video,
                "start": item.start,
                "end": item.end,
                "captions": item.captions,
                "labels": [[label, round(float(prob), 6)] for label, prob in labels],
                "extra": part.item_extra(position),
            }
            if self.channels is not None:
                record["extra"].update(self.channels(item))
            records.append(record)
        if self.channels is not None:
            self.channels.finish([record["extra"] for record in records])
        # decode failures in item order, after the probing ones
        failures = [*part.failures, *(record for _, record in sorted(self.decode_failures.pop(part.number).items()))]
        vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        return {"part": part.number, "items": records, "failures": failures, "num_vectors": len(rows)}, vectors

    def commit(self, part: Part) -> None:
        manifest, vectors = self.records(part)
        self.work.commit_part(part.number, vectors, manifest)
        self.indexed += manifest["num_vectors"]
        self.failed += len(manifest["failures"])
        for failure in manifest["failures"]:
            logger.warning("cannot index %s: %s", failure["item"], failure["reason"])
