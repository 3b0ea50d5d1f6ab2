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

**Transactions.** Both publish as a transaction on the latest version: under the index lock
(:mod:`indexer.locks`) they re-open the index as published now and apply their change to it,
so an add and a remove that overlap both take effect, whichever finishes first (a remove runs
whole under the lock; an add embeds outside it and merges under it, waiting up to
:data:`PUBLISH_WAIT_S` for another update's publish). Removed videos are remembered in the
manifest (``removed``): ``add`` leaves them out unless asked to bring them back
(``include_removed``). Two adds to one index at once: the second is refused (its lock names the
first's process).

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

from indexer import guards
from indexer.channels import channel_options
from indexer.faiss_index import IVF_DATA_FILE, build_index, search_params
from indexer.jobs import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PART_SIZE,
    JobError,
    JobSpec,
    plan_sources,
    printable_name,
    run_index_job,
    work_dir_for,
)
from indexer.locks import exclusive, index_lock, lock_path
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
    same_model,
)
from retrieval.asr import check_recorded
from retrieval.data.corpora import CorpusItem, load_corpus
from retrieval.models.model_dir import model_identity

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 65_536
#: How long an update's publish step waits for another update's publish step to finish.
PUBLISH_WAIT_S = 60.0


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
    withheld: int = 0  # videos removed earlier, left out (add without include_removed)

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
    if not same_model(built, identity):
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
               corpus_roots: list[str], update: dict[str, Any], removed: list[str]) -> Path:
    """Publish a new version of ``reader``'s index with these contents (manifest carried over;
    ``removed``: the videos removed so far, which ``add`` leaves out)."""
    manifest = dict(reader.manifest)
    manifest["removed"] = removed
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
    include_removed: bool = False,
) -> UpdateSummary:
    """Embed the videos under ``videos`` (or listed by ``ann_file``) that ``index`` lacks and
    republish it with them (see the module docstring).

    The windowing and label set are the index's own; ``model_dir`` defaults to the model the
    index records and must be that model. Videos removed from the index earlier stay out unless
    ``include_removed``. Options are checked, and the corpus root judged, before anything is
    read or written.

    Raises:
        IndexModelMismatch: ``model_dir`` is another model than the index's.
        JobError: an option is invalid; an earlier add was interrupted and ``resume`` is false.
        LockBusy: another add to this index is running.
    """
    guards.check_options(window=None, stride=None, part_size=part_size, batch_size=batch_size, workers=workers,
                         index_type=None, max_memory_bytes=None, embed_dim=None)
    guards.check_corpus_root(Path(videos))  # before anything walks it
    staging = staging_dir_for(index)
    with exclusive(lock_path(staging), f"adding to index {index}"):
        reader = open_index(index)
        model_dir = _index_model_dir(reader, model_dir)
        check_model(reader, model_dir)
        check_recorded(((reader.manifest.get("extra") or {}).get("channels") or {}).get("speech") or {})
        if staging.exists() and not resume:
            raise JobError(f"an earlier add to {reader.path} was interrupted ({staging} exists); pass --resume to "
                           "finish it, or delete that directory to start over")
        created = not staging.exists()
        try:
            embedded = _embed_new(reader, staging, Path(videos).resolve(), ann_file, dataset, model_dir, resume,
                                  workers, batch_size, part_size, progress, engine, include_removed)
        except BaseException:
            # an add that stops before committing anything leaves nothing to trip over
            if created and staging.is_dir() and not any(staging.rglob("part-*.json")) \
                    and not os.path.lexists(staging / "delta"):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        added, selection = embedded
        if added is None:  # nothing new: no job, no new version
            return UpdateSummary(reader.path, len(reader), len(reader), skipped=selection.old,
                                 withheld=selection.withheld)
        # The publish step is a transaction on the latest version: whatever another add or
        # remove published while these clips were embedded is kept, and removals stay removed.
        with index_lock(index, wait_s=PUBLISH_WAIT_S):
            latest = open_index(index)
            check_model(latest, model_dir)
            summary = _merge_delta(latest, added, Path(videos).resolve(), include_removed, selection)
        shutil.rmtree(staging)
        return summary


def removed_videos(reader: IndexReader) -> set[str]:
    """The videos removed from the index (its tombstones): ``add`` leaves them out."""
    return set(reader.manifest.get("removed") or [])


def _indexed_videos(reader: IndexReader) -> set[str]:
    return {item["path"] for item in reader.items} | {failure["path"] for failure in reader.failures}


@dataclass
class _Selection:
    """What the add's source selection saw: videos already indexed, and removed ones held back."""

    old: int = 0
    withheld: int = 0


def _embed_new(reader: IndexReader, staging: Path, root: Path, ann_file: str | os.PathLike[str] | None,
               dataset: str, model_dir: Path, resume: bool, workers: int, batch_size: int, part_size: int,
               progress: bool, engine: Any, include_removed: bool) -> tuple[IndexReader | None, _Selection]:
    """Embed the sources ``reader`` lacks into the small exact index ``staging/delta`` (resuming
    it): that index (None when there is nothing new) and what the selection saw."""
    delta = staging / "delta"
    selection = _Selection()
    if os.path.lexists(delta) and not work_dir_for(delta).exists():
        return open_index(delta), selection  # embedded and published before a kill: merge it now
    known = _indexed_videos(reader)
    removed = set() if include_removed else removed_videos(reader)

    def select(sources: list[CorpusItem]) -> list[CorpusItem]:
        fresh = [source for source in sources if str(root / printable_name(source.video)) not in known]
        kept = [source for source in fresh if str(root / printable_name(source.video)) not in removed]
        selection.old, selection.withheld = len(sources) - len(fresh), len(fresh) - len(kept)
        return kept

    extra = reader.manifest.get("extra", {})
    spec = JobSpec(model_dir=model_dir, out=delta, videos=root, ann_file=Path(ann_file) if ann_file else None,
                   dataset=dataset, window=extra.get("window"), stride=extra.get("stride"),
                   part_size=part_size, labels=extra.get("label_set") or "synthetic", index_type="Flat",
                   **channel_options(reader.manifest))
    if not staging.exists() and not select(plan_sources(load_corpus(dataset, spec.ann_file, root))):
        return None, selection
    staging.mkdir(exist_ok=True)
    fsync_path(staging.parent)
    run_index_job(spec, resume=resume, workers=workers, batch_size=batch_size, progress=progress,
                  engine=engine, select=select)
    return open_index(delta), selection


def _merge_delta(latest: IndexReader, added: IndexReader, root: Path, include_removed: bool,
                 selection: _Selection) -> UpdateSummary:
    """Publish ``latest`` with the clips of ``added`` it still lacks (not indexed meanwhile, not
    removed meanwhile unless ``include_removed``); call with the index lock held."""
    known = _indexed_videos(latest)
    removed = removed_videos(latest)
    withheld = set() if include_removed else removed

    def wanted(path: str) -> bool:
        return path not in known and path not in withheld

    rows = [row for row, item in enumerate(added.items) if wanted(item["path"])]
    new_failures = [failure for failure in added.failures if wanted(failure["path"])]
    before = len(latest)
    late = len({item["path"] for item in added.items if item["path"] in removed and not include_removed})
    if not rows and not new_failures:
        # nothing left to add (e.g. killed after the republish, before the clean-up)
        return UpdateSummary(latest.path, before, before, skipped=selection.old or len(added.items),
                             withheld=selection.withheld + late)
    dim = int(latest.manifest["dim"])
    exact = added.index.reconstruct_n(0, added.index.ntotal) if len(added) else np.zeros((0, dim), np.float32)
    fresh = np.ascontiguousarray(exact[rows], dtype=np.float32) if rows else np.zeros((0, dim), np.float32)
    merged: faiss.Index | Callable[[Path], faiss.Index] = latest.index
    if is_ondisk(latest.index):
        # the old lists stay as they are (memory-mapped); the new codes are merged beside them
        base = empty_copy(latest.index, latest.snapshot_dir / INDEX_FILE)
        block = faiss.clone_index(base)
        block.add_with_ids(fresh, np.arange(before, before + len(fresh), dtype=np.int64))
        old_lists = faiss.extract_index_ivf(latest.index).invlists

        def merged(staged: Path) -> faiss.Index:
            return move_lists_ondisk(base, [old_lists, faiss.extract_index_ivf(block).invlists],
                                     staged / IVF_DATA_FILE)
    elif len(fresh):
        latest.index.add(fresh)
    items = [dict(item) for item in latest.items] + [dict(added.items[row]) for row in rows]
    failures = list(latest.failures) + new_failures
    back = {added.items[row]["path"] for row in rows} | {failure["path"] for failure in new_failures}
    roots = list(dict.fromkeys([*latest.manifest.get("corpus_roots", []), str(root)]))
    _republish(latest, merged, items, failures,
               (chunk for part in (_chunks(latest.vectors), _chunks(fresh)) for chunk in part), roots,
               {"op": "add", "videos": str(root), "items": len(rows), "failed": len(new_failures)},
               removed=sorted(removed - back))
    return UpdateSummary(latest.path, before, len(items), added=len(rows), failed=len(new_failures),
                         skipped=selection.old, withheld=selection.withheld + late)


# ---------------------------------------------------------------------------------- remove


def _resolve_videos(reader: IndexReader, paths: Sequence[str | os.PathLike[str]]) -> set[str]:
    """The indexed paths meant by ``paths`` (absolute, or relative to the cwd or a corpus root)."""
    indexed = _indexed_videos(reader)
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
    if not paths:
        raise JobError("name at least one video to remove")
    # The whole remove is one transaction on the latest version, under the index lock: an add
    # publishing meanwhile waits for it and then merges into the version without these videos.
    with index_lock(index, wait_s=PUBLISH_WAIT_S):
        return _remove_locked(open_index(index), paths, model_dir)


def _remove_locked(reader: IndexReader, paths: Sequence[str | os.PathLike[str]],
                   model_dir: str | os.PathLike[str] | None) -> UpdateSummary:
    if model_dir is not None:
        check_model(reader, model_dir)
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
               {"op": "remove", "videos": sorted(gone), "items": len(reader) - len(keep)},
               removed=sorted(removed_videos(reader) | gone))
    return UpdateSummary(reader.path, len(reader), len(items), removed=len(reader) - len(keep))


def describe(summary: UpdateSummary) -> str:
    """One line for the CLI."""
    parts = [f"{summary.before} -> {summary.after} items"]
    if summary.added or summary.failed:
        parts.append(f"added {summary.added}, failed {summary.failed}")
    if summary.skipped:
        parts.append(f"{summary.skipped} videos already indexed")
    if summary.withheld:
        parts.append(f"{summary.withheld} removed earlier and left out (--include-removed adds them back)")
    if summary.removed:
        parts.append(f"removed {summary.removed}")
    return f"{summary.index}: " + "; ".join(parts)

