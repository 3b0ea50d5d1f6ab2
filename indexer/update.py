"""Incremental updates of a published index: ``vtr index add`` and ``vtr index remove``.

**Add** embeds only the videos the index does not hold yet (neither as items nor as failure
records) and publishes a new version with them appended, keeping the index's trained FAISS
structures (coarse quantizer, PQ codebooks, HNSW graph): existing codes are not recomputed and
search parameters stay as they were. The new clips are embedded by an ordinary indexing job
(either engine) whose output is a small exact index next to the main one, ``INDEX.add/delta``;
its work directory ``INDEX.add/delta.work`` holds the committed parts, so an add killed at any
point resumes with ``--resume`` and redoes only unfinished parts. The main index is republished
only at the end, by one atomic swap (:func:`indexer.store.publish_version`): until then readers
see the index exactly as it was.

**Remove** drops every item (and failure record) of the given videos. Item ids are row numbers,
so the rows after a removed one move up: IVF inverted lists are copied with their codes and
renumbered ids (no re-encoding), Flat and HNSW indexes are rebuilt from their exact float32
vectors.

Both refuse a model other than the one the index was built with.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.channels import channel_options
from indexer.faiss_index import IVF_DATA_FILE, build_index, search_params
from indexer.jobs import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PART_SIZE,
    JobError,
    JobSpec,
    plan_sources,
    run_index_job,
    work_dir_for,
)
from indexer.ondisk import empty_copy, is_ondisk, move_lists_ondisk, write_float16_rows
from indexer.store import (
    FAILURES_FILE,
    INDEX_FILE,
    ITEMS_FILE,
    VECTORS_FILE,
    IndexModelMismatch,
    IndexReader,
    _write_faiss,
    _write_jsonl,
    fsync_path,
    open_index,
    publish_version,
)
from retrieval.data.corpora import CorpusItem, load_corpus
from retrieval.models.model_dir import model_identity

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 65_536


@dataclass
class UpdateSummary:
    """What an add or remove changed: items before and after, items added/removed, failures added."""

    index: Path
    before: int
    after: int
    added: int = 0
    removed: int = 0
    failed: int = 0
    skipped: int = 0  # videos already in the index (add)

    @property
    def changed(self) -> bool:
        return self.added > 0 or self.removed > 0 or self.failed > 0


def staging_dir_for(index: str | os.PathLike[str]) -> Path:
    """Where ``vtr index add`` embeds the new videos before they join ``INDEX``: ``INDEX.add``."""
    index = Path(os.path.abspath(index))
    return index.with_name(index.name + ".add")


def check_model(reader: IndexReader, model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The identity of ``model_dir``; raises :class:`IndexModelMismatch` unless it built the index."""
    identity = model_identity(model_dir)
    built = reader.manifest["model"]
    if (identity["name"], identity["weights_sha256"]) != (built.get("name"), built.get("weights_sha256")):
        raise IndexModelMismatch(
            f"index {reader.path} was built with model {built.get('name')!r} (weights_sha256 "
            f"{str(built.get('weights_sha256'))[:12]}...) but {model_dir} is {identity['name']!r} (weights_sha256 "
            f"{identity['weights_sha256'][:12]}...): vectors of two models cannot share an index; use the index's "
            "model or build a new index"
        )
    return identity


def _index_model_dir(reader: IndexReader, model_dir: str | os.PathLike[str] | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    recorded = reader.manifest.get("extra", {}).get("model_dir")
    if not recorded:
        raise JobError(f"index {reader.path} does not record its model directory; pass --model")
    return Path(recorded)


# ---------------------------------------------------------------------------------- writing


def _chunks(vectors: np.ndarray, rows: Sequence[int] | np.ndarray | None = None) -> Iterator[np.ndarray]:
    if rows is None:
        for start in range(0, len(vectors), _CHUNK_ROWS):
            yield np.asarray(vectors[start : start + _CHUNK_ROWS])
        return
    rows = np.asarray(rows)
    for start in range(0, len(rows), _CHUNK_ROWS):
        yield np.asarray(vectors[rows[start : start + _CHUNK_ROWS]])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _republish(reader: IndexReader, index: faiss.Index | Callable[[Path], faiss.Index], items: list[dict[str, Any]],
               failures: list[dict[str, Any]], vector_chunks: Iterable[np.ndarray],
               corpus_roots: list[str], update: dict[str, Any]) -> Path:
    """Publish a new version of ``reader``'s index with these contents (manifest carried over)."""
    manifest = dict(reader.manifest)
    dim = int(manifest["dim"])
    for row, item in enumerate(items):
        item["id"] = row
    manifest["counts"] = {**manifest["counts"], "items": len(items), "failed": len(failures)}
    manifest["corpus_roots"] = corpus_roots
    manifest["updated"] = _now()
    extra = dict(manifest.get("extra", {}))
    extra["updates"] = [*extra.get("updates", []), {**update, "at": manifest["updated"]}]
    manifest["extra"] = extra

    def fill(staged: Path) -> dict[str, Any]:
        built = index(staged) if callable(index) else index
        manifest["faiss_params"] = search_params(built) or manifest.get("faiss_params", {})
        _write_faiss(staged / INDEX_FILE, built)
        write_float16_rows(staged / VECTORS_FILE, len(items), dim, vector_chunks)
        _write_jsonl(staged / ITEMS_FILE, items)
        _write_jsonl(staged / FAILURES_FILE, failures)
        return manifest

    return publish_version(reader.path, fill)


# ---------------------------------------------------------------------------------- add


def add_to_index(
    index: str | os.PathLike[str],
    videos: str | os.PathLike[str],
    ann_file: str | os.PathLike[str] | None = None,
    dataset: str = "generic",
    model_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    workers: int = 2,
    batch_size: int = DEFAULT_BATCH_SIZE,
    part_size: int = DEFAULT_PART_SIZE,
    progress: bool = True,
    engine: Any = None,
) -> UpdateSummary:
    """Embed the videos under ``videos`` (or listed by ``ann_file``) that ``index`` lacks and
    republish it with them (see the module docstring).

    The windowing and label set are the index's own; ``model_dir`` defaults to the model the
    index records and must be that model.

    Raises:
        IndexModelMismatch: ``model_dir`` is another model than the index's.
        JobError: an earlier add was interrupted and ``resume`` is false (or the reverse).
    """
    reader = open_index(index)
    model_dir = _index_model_dir(reader, model_dir)
    check_model(reader, model_dir)
    staging = staging_dir_for(index)
    delta = staging / "delta"
    if staging.exists() and not resume:
        raise JobError(f"an earlier add to {reader.path} was interrupted ({staging} exists); pass --resume to "
                       "finish it, or delete that directory to start over")
    root = Path(videos).resolve()
    known = {item["path"] for item in reader.items} | {failure["path"] for failure in reader.failures}
    before = len(reader)

    delta_published = os.path.lexists(delta) and not work_dir_for(delta).exists()
    if delta_published:
        added = open_index(delta)
        if all(item["path"] in known for item in added.items) and all(
            failure["path"] in known for failure in added.failures
        ):
            # killed after the republish, before the clean-up: the new version already has them
            shutil.rmtree(staging)
            return UpdateSummary(reader.path, before, before, skipped=len(added.items))
        skipped = 0
    else:
        counted = {"old": 0}

        def select(sources: list[CorpusItem]) -> list[CorpusItem]:
            fresh = [source for source in sources if str(root / source.video) not in known]
            counted["old"] = len(sources) - len(fresh)
            return fresh

        extra = reader.manifest.get("extra", {})
        spec = JobSpec(model_dir=model_dir, out=delta, videos=root, ann_file=Path(ann_file) if ann_file else None,
                       dataset=dataset, window=extra.get("window"), stride=extra.get("stride"),
                       part_size=part_size, labels=extra.get("label_set") or "synthetic", index_type="Flat",
                       **channel_options(reader.manifest))
        if not staging.exists() and not select(plan_sources(load_corpus(dataset, spec.ann_file, root))):
            return UpdateSummary(reader.path, before, before, skipped=counted["old"])  # nothing new: no job
        staging.mkdir(exist_ok=True)
        fsync_path(staging.parent)
        run_index_job(spec, resume=resume, workers=workers, batch_size=batch_size, progress=progress,
                      engine=engine, select=select)
        skipped = counted["old"]
        added = open_index(delta)

    # the exact float32 vectors of the new clips (the delta is a Flat index)
    fresh = added.index.reconstruct_n(0, added.index.ntotal) if len(added) else np.zeros((0, reader.manifest["dim"]),
                                                                                      np.float32)
    merged: faiss.Index | Callable[[Path], faiss.Index] = reader.index
    if is_ondisk(reader.index):
        # the old lists stay as they are (memory-mapped); the new codes are merged beside them
        base = empty_copy(reader.index, reader.snapshot_dir / INDEX_FILE)
        block = faiss.clone_index(base)
        block.add_with_ids(np.ascontiguousarray(fresh, dtype=np.float32),
                           np.arange(before, before + len(fresh), dtype=np.int64))
        old_lists = faiss.extract_index_ivf(reader.index).invlists

        def merged(staged: Path) -> faiss.Index:
            return move_lists_ondisk(base, [old_lists, faiss.extract_index_ivf(block).invlists],
                                     staged / IVF_DATA_FILE)
    elif len(fresh):
        reader.index.add(np.ascontiguousarray(fresh, dtype=np.float32))
    items = [dict(item) for item in reader.items] + [dict(item) for item in added.items]
    failures = list(reader.failures) + list(added.failures)
    roots = list(dict.fromkeys([*reader.manifest.get("corpus_roots", []), str(root)]))
    _republish(reader, merged, items, failures,
               (chunk for part in (_chunks(reader.vectors), _chunks(fresh)) for chunk in part), roots,
               {"op": "add", "videos": str(root), "items": len(added), "failed": len(added.failures)})
    shutil.rmtree(staging)
    return UpdateSummary(reader.path, before, len(items), added=len(added), failed=len(added.failures),
                         skipped=skipped)


# ---------------------------------------------------------------------------------- remove


def _resolve_videos(reader: IndexReader, paths: Sequence[str | os.PathLike[str]]) -> set[str]:
    """The indexed paths meant by ``paths`` (absolute, or relative to the cwd or a corpus root)."""
    indexed = {item["path"] for item in reader.items} | {failure["path"] for failure in reader.failures}
    roots = [Path(root) for root in reader.manifest.get("corpus_roots", [])]
    found, unknown = set(), []
    for path in paths:
        candidates = [str(Path(path).resolve())] + [str(root / path) for root in roots]
        match = next((candidate for candidate in candidates if candidate in indexed), None)
        if match is None:
            unknown.append(os.fspath(path))
        else:
            found.add(match)
    if unknown:
        raise JobError(f"not in index {reader.path}: {', '.join(unknown[:5])}"
                       f"{', ...' if len(unknown) > 5 else ''} (give paths as indexed, or relative to "
                       f"{', '.join(map(str, roots)) or 'the corpus root'})")
    return found


def _without_rows(index: faiss.Index, keep: np.ndarray, index_type: str,
                  index_file: Path | None = None) -> faiss.Index:
    """``index`` holding only rows ``keep`` (sorted), renumbered 0..len(keep)-1, trained parts kept
    (``index_file``: where an on-disk ``index`` was read from). IVF lists come back in memory."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        smaller = empty_copy(index, index_file)
        target = faiss.extract_index_ivf(smaller)
        renumber = np.full(index.ntotal, -1, dtype=np.int64)
        renumber[keep] = np.arange(len(keep), dtype=np.int64)
        lists, code_size = ivf.invlists, ivf.invlists.code_size
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if size == 0:
                continue
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * code_size).copy().reshape(size, code_size)
            kept = renumber[ids] >= 0
            if kept.any():
                new_ids = np.ascontiguousarray(renumber[ids[kept]])
                new_codes = np.ascontiguousarray(codes[kept])
                target.invlists.add_entries(number, int(kept.sum()), faiss.swig_ptr(new_ids),
                                            faiss.swig_ptr(new_codes))
        target.ntotal = len(keep)
        smaller.ntotal = len(keep)
        return smaller
    exact = index.reconstruct_n(0, index.ntotal)[keep] if index.ntotal else np.zeros((0, index.d), np.float32)
    return build_index(np.ascontiguousarray(exact), index_type=index_type, use_gpu=False)


def remove_from_index(index: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]],
                      model_dir: str | os.PathLike[str] | None = None) -> UpdateSummary:
    """Drop every item and failure record of the videos ``paths`` and republish ``index``.

    Raises:
        JobError: a path is not in the index (nothing is changed).
        IndexModelMismatch: ``model_dir`` is given and is not the index's model.
    """
    reader = open_index(index)
    if model_dir is not None:
        check_model(reader, model_dir)
    if not paths:
        raise JobError("name at least one video to remove")
    gone = _resolve_videos(reader, paths)
    keep = np.array([row for row, item in enumerate(reader.items) if item["path"] not in gone], dtype=np.int64)
    items = [dict(reader.items[row]) for row in keep]
    failures = [failure for failure in reader.failures if failure["path"] not in gone]
    smaller: faiss.Index | Callable[[Path], faiss.Index] = _without_rows(
        reader.index, keep, reader.manifest["index_type"], reader.snapshot_dir / INDEX_FILE)
    if is_ondisk(reader.index):
        in_memory = smaller

        def smaller(staged: Path) -> faiss.Index:
            return move_lists_ondisk(empty_copy(in_memory), [faiss.extract_index_ivf(in_memory).invlists],
                                     staged / IVF_DATA_FILE)
    _republish(reader, smaller, items, failures, _chunks(reader.vectors, keep),
               list(reader.manifest.get("corpus_roots", [])),
               {"op": "remove", "videos": sorted(gone), "items": len(reader) - len(keep)})
    return UpdateSummary(reader.path, len(reader), len(items), removed=len(reader) - len(keep))


def describe(summary: UpdateSummary) -> str:
    """One line for the CLI."""
    parts = [f"{summary.before} -> {summary.after} items"]
    if summary.added or summary.failed:
        parts.append(f"added {summary.added}, failed {summary.failed}")
    if summary.skipped:
        parts.append(f"{summary.skipped} videos already indexed")
    if summary.removed:
        parts.append(f"removed {summary.removed}")
    return f"{summary.index}: " + "; ".join(parts)

