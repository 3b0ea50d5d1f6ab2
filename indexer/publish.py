"""The writer's last step: join a finished job's committed parts into the published index.

:func:`publish_job` (a single worker at the end of its run, or ``vtr index merge`` after
shards) refuses missing parts, then reads every part in part order, so the index is the same
whichever shards wrote them. Item and failure paths become absolute under the job's corpus root.
The manifest's ``extra`` records the model directory (the default model of ``vtr search`` and
``vtr serve``), the label set, the windowing and the channels.

Below :data:`indexer.ondisk.ONDISK_MIN_VECTORS` the vectors are joined in memory and
:func:`indexer.store.write_index` builds the index; above it (automatic or IVF index type) the
IVF lists are built part by part and merged on disk (:mod:`indexer.ondisk`), in bounded memory.
Either way the new version replaces the old one atomically (:func:`indexer.store.publish_version`)
and the work directory is removed. This module does not import torch: a process that only
merges stays small.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from indexer import guards
from indexer.errors import JobError
from indexer.faiss_index import IVF_DATA_FILE
from indexer.locks import index_lock
from indexer.ondisk import Rows, build_ondisk_index, wants_ondisk, write_float16_rows
from indexer.parts import WorkDir
from indexer.store import (
    FAILURES_FILE,
    INDEX_FILE,
    ITEMS_FILE,
    VECTORS_FILE,
    fsync_path,
    index_manifest,
    normalise_failure,
    normalise_item,
    publish_version,
    write_faiss,
    write_index,
    write_jsonl,
)

logger = logging.getLogger(__name__)

#: Job record keys the published manifest keeps in its ``extra``.
EXTRA_KEYS = ("model_dir", "dataset", "ann_file", "window", "stride", "label_set")


def published_extra(job: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``extra`` for an index published from the job record ``job``."""
    extra = {key: job[key] for key in EXTRA_KEYS}
    extra["channels"] = job["channels"]
    return extra


def publish_job(out: str | os.PathLike[str]) -> Path:
    """Join every committed part into the index at ``out`` (``vtr index merge``), then remove
    the work directory.

    Raises:
        JobError: parts are missing (some shard has not finished) or a part is corrupt.
    """
    out = Path(out)
    with index_lock(out):
        work = WorkDir.of(out)
        job = work.read_job()
        missing = work.missing_parts()
        if missing:
            shown = ", ".join(str(part) for part in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise JobError(
                f"{len(missing)} of {job['num_parts']} parts are not done (parts {shown}); with N "
                "shards part p is shard (p mod N)'s: finish those shards (--resume) and merge again"
            )
        manifests = [work.read_manifest(part) for part in range(job["num_parts"])]
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()  # an empty folder given as --out holds nothing to keep
        with guards.disk_full_as(
            f"publishing {out}; every part is kept in {work.root}: free space, then run `vtr index merge {out}`"
        ):
            if wants_ondisk(sum(manifest["num_vectors"] for manifest in manifests), job["index_type"]):
                _publish_ondisk(out, work, job)  # bounded memory: lists built part by part, merged on disk
            else:
                _publish_in_memory(out, work, job, manifests)
        shutil.rmtree(work.root)
        return out


def _absolute(record: dict[str, Any], root: Path) -> dict[str, Any]:
    return {**record, "path": str(root / record["path"])}


def _publish_in_memory(out: Path, work: WorkDir, job: dict[str, Any], manifests: list[dict[str, Any]]) -> None:
    root = Path(job["videos_root"])
    vectors = [work.load_vectors(part, manifest) for part, manifest in enumerate(manifests)]
    write_index(
        out,
        np.concatenate(vectors),
        [_absolute(item, root) for manifest in manifests for item in manifest["items"]],
        model_identity=job["model"],
        corpus_roots=[str(root)],
        failures=[_absolute(failure, root) for manifest in manifests for failure in manifest["failures"]],
        index_type=job["index_type"],
        max_memory_bytes=job["max_memory_bytes"],
        extra=published_extra(job),
        removed=job["removed"],
    )


def _publish_ondisk(out: Path, work: WorkDir, job: dict[str, Any]) -> None:
    """The same result files as :func:`_publish_in_memory`, with the FAISS lists on disk and the
    vectors, items and failures streamed part by part."""
    root = Path(job["videos_root"])
    parts = range(job["num_parts"])
    arrays, counts = [], {"items": 0, "failed": 0}
    for part in parts:
        manifest = work.read_manifest(part)
        rows = len(work.load_vectors(part, manifest, mmap=True))
        if rows:
            arrays.append(functools.partial(np.load, work.vectors_path(part), mmap_mode="r"))
        counts["items"] += rows
        counts["failed"] += len(manifest["failures"])
    rows = Rows(arrays)

    def records(key: str) -> Iterator[dict[str, Any]]:
        for part in parts:
            yield from (_absolute(record, root) for record in work.read_manifest(part)[key])

    def fill(staged: Path) -> dict[str, Any]:
        index, index_type = build_ondisk_index(rows, staged, job["index_type"], job["max_memory_bytes"])
        write_faiss(staged / INDEX_FILE, index)
        write_float16_rows(staged / VECTORS_FILE, counts["items"], rows.dim, rows.chunks())
        write_jsonl(staged / ITEMS_FILE, (normalise_item(row, item) for row, item in enumerate(records("items"))))
        write_jsonl(staged / FAILURES_FILE, (normalise_failure(failure) for failure in records("failures")))
        fsync_path(staged / IVF_DATA_FILE)
        return index_manifest(index, job["model"], rows.dim, index_type, [str(root)], {**counts, "skipped": 0},
                              published_extra(job), job["removed"], storage="ondisk")

    publish_version(out, fill)
