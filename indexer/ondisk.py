"""Index builds bounded in memory: IVF inverted lists built part by part and merged on disk.

``vtr index merge`` (and a single worker's publish) normally joins every part's vectors into
one array and builds the FAISS index from it: fine for a few hundred thousand clips, but a
million 512-d vectors are 2 GB of float32 before FAISS copies any. Above
:data:`ONDISK_MIN_VECTORS` the index is built without ever holding them all:

1. **Train** the coarse quantizer (k-means) on a seeded random sample of rows gathered from the
   memory-mapped part files, then the product quantizer on the residuals of a smaller subset.
2. **Add** the vectors block by block (about :data:`BLOCK_ROWS` rows from consecutive parts):
   each block is encoded by a copy of the trained, empty index and its inverted lists are
   written to a block file.
3. **Merge** the block files' inverted lists (memory-mapped) into one
   :class:`faiss.OnDiskInvertedLists` file, ``index.ivfdata``, beside ``index.faiss`` (FAISS's
   ``merge_ondisk`` pattern), then delete the blocks.
4. **Serve** memory-mapped: :func:`indexer.faiss_index.read_faiss_index` maps ``index.ivfdata``
   read-only, so a reader's memory is what its queries touch. The float16 vectors used for
   exact re-scoring are written part by part and memory-mapped as for any index.

Item metadata and failure records are streamed from the part manifests to their files, one
part at a time.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.checksums import read_sealed_json, verify_file
from indexer.faiss_index import (
    HNSW_MAX_ITEMS,
    IVF_DATA_FILE,
    MIN_TRAIN_POINTS_PER_CENTROID,
    TRAIN_SEED,
    apply_search_params,
    default_search_params,
    ivf_pq_index_type,
    search_params,
)

logger = logging.getLogger(__name__)

#: From this many vectors on (where the automatic choice is IVF-PQ anyway) a published index is
#: built on disk.
ONDISK_MIN_VECTORS = HNSW_MAX_ITEMS
#: Rows encoded per block: 32k x 512 float32 is 64 MB, plus as much again for FAISS's residuals.
BLOCK_ROWS = 32_768
#: k-means points per coarse centroid (FAISS warns below 39).
TRAIN_POINTS_PER_LIST = MIN_TRAIN_POINTS_PER_CENTROID + 1
#: Residuals the product quantizer is trained on: 256 centroids x 256 points, what FAISS's PQ
#: training samples down to anyway.
PQ_TRAIN_POINTS = 65_536


def wants_ondisk(num_vectors: int, index_type: str | None) -> bool:
    """Whether an index of ``num_vectors`` vectors is built on disk (automatic or IVF type)."""
    return num_vectors >= ONDISK_MIN_VECTORS and (index_type is None or index_type.startswith("IVF"))


def is_ondisk(index: faiss.Index) -> bool:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


Source = np.ndarray | Callable[[], np.ndarray]


def _load(source: Source) -> np.ndarray:
    return source() if callable(source) else source


class _Rows:
    """Row access across a sequence of [n_i, d] arrays as one matrix.

    A source may be a function that opens its array (e.g. ``np.load(part, mmap_mode="r")``):
    it is opened only while rows are copied out of it, so the pages of a memory-mapped part
    do not stay mapped (and counted in the process's memory) after use.
    """

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = sources
        shapes = [_load(source).shape for source in sources]
        self.dim = int(shapes[0][1])
        self.offsets = np.cumsum([0, *(shape[0] for shape in shapes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted ascending) as one float32 array."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        owner = np.searchsorted(self.offsets, rows, side="right") - 1
        for number in np.unique(owner):
            mask = owner == number
            out[mask] = _load(self.sources[number])[rows[mask] - self.offsets[number]]
        return out

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) of about ``rows`` rows, whole sources at a time."""
        pending: list[np.ndarray] = []
        size, first = 0, 0
        for source in self.sources:
            pending.append(_load(source))
            size += len(pending[-1])
            if size >= rows:
                block = np.concatenate(pending).astype(np.float32, copy=False)
                pending.clear()  # unmap the parts before the block is encoded
                yield first, block
                first += size
                size = 0
        if pending:
            block = np.concatenate(pending).astype(np.float32, copy=False)
            pending.clear()
            yield first, block

    def chunks(self) -> Iterator[np.ndarray]:
        """Each source's rows in turn (opened one at a time)."""
        for source in self.sources:
            yield _load(source)


def train_ivf(rows: _Rows, index_type: str) -> faiss.Index:
    """An empty IVF index of ``index_type`` trained on seeded samples of ``rows``.

    The coarse quantizer sees ``nlist * 40`` rows; the product quantizer the residuals of
    :data:`PQ_TRAIN_POINTS` of them (the larger sample is released first), so training holds at
    most about ``nlist * 40 * 4 * dim`` bytes of vectors (170 MB for 2048 lists of 512-d).
    """
    n, dim = len(rows), rows.dim
    index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    if isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ):
        faiss.downcast_index(index).do_polysemous_training = False
    rng = np.random.default_rng(TRAIN_SEED)
    size = min(n, ivf.nlist * TRAIN_POINTS_PER_LIST)
    sample = rows.take(np.sort(rng.choice(n, size=size, replace=False)))
    ivf.train_q1(len(sample), faiss.swig_ptr(sample), False, faiss.METRIC_INNER_PRODUCT)
    subset = np.ascontiguousarray(sample[rng.permutation(len(sample))[:PQ_TRAIN_POINTS]])
    del sample
    assign = np.ascontiguousarray(ivf.quantizer.assign(subset, 1).ravel().astype(np.int64))
    index.train_encoder(len(subset), faiss.swig_ptr(subset), faiss.swig_ptr(assign))
    index.is_trained = True
    return index


def move_lists_ondisk(index: faiss.Index, sources: Sequence[Any], path: Path) -> faiss.Index:
    """Give the empty trained IVF ``index`` the union of ``sources`` (inverted lists, ids kept)
    as :class:`faiss.OnDiskInvertedLists` stored in ``path``."""
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    pointers = faiss.InvertedListsPtrVector()
    for source in sources:
        pointers.push_back(source)
    total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    index.ntotal = ivf.ntotal = total
    return index


def empty_copy(index: faiss.Index, index_file: Path | None = None) -> faiss.Index:
    """A trained, empty copy of IVF ``index`` (quantizer and codebooks shared by value).

    An on-disk index cannot be cloned with its lists: its file is re-read without them.
    """
    if is_ondisk(index):
        if index_file is None:
            raise ValueError("an on-disk index is copied from its index file")
        with open(index_file, "rb") as f:
            copy = faiss.read_index(faiss.PyCallbackIOReader(f.read), faiss.IO_FLAG_SKIP_IVF_DATA)
        ivf = faiss.extract_index_ivf(copy)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns it now
        copy.ntotal = ivf.ntotal = 0
        return copy
    copy = faiss.clone_index(index)
    copy.reset()
    return copy


def build_ondisk_index(sources: Sequence[Source], staged: Path, index_type: str | None = None,
                       max_memory_bytes: int | None = None) -> tuple[faiss.Index, str]:
    """Build an IVF index over the rows of ``sources`` with its lists in ``staged/index.ivfdata``.

    ``sources`` are [n_i, d] float32 arrays or functions opening them (see :class:`_Rows`).
    Row ``i`` of their concatenation gets id ``i``. Returns the index (to be written as
    ``index.faiss`` next to the list file) and its factory string.
    """
    rows = sources if isinstance(sources, _Rows) else _Rows(sources)
    n, dim = len(rows), rows.dim
    index_type = index_type or ivf_pq_index_type(n, dim, max_memory_bytes)
    if not index_type.startswith("IVF"):
        raise ValueError(f"an on-disk build needs an IVF index type, got {index_type}")
    trained = train_ivf(rows, index_type)
    blocks_dir = staged / ".blocks"
    blocks_dir.mkdir()
    names = []
    for number, (first, block) in enumerate(rows.blocks(BLOCK_ROWS)):
        encoded = faiss.clone_index(trained)
        encoded.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))
        name = blocks_dir / f"block-{number:05d}.index"
        faiss.write_index(encoded, str(name))
        names.append(name)
        del encoded, block
        logger.info("on-disk build: encoded rows %d.. (%d blocks)", first, number + 1)
    blocks = [faiss.read_index(str(name), faiss.IO_FLAG_MMAP) for name in names]
    index = move_lists_ondisk(trained, [faiss.extract_index_ivf(block).invlists for block in blocks],
                              staged / IVF_DATA_FILE)
    del blocks
    shutil.rmtree(blocks_dir)
    apply_search_params(index, default_search_params(index))
    return index, index_type


# ---------------------------------------------------------------------------------- publishing a job


def _work_root(out: Path) -> Path:
    return out.with_name(out.name + ".work")  # indexer.jobs.work_dir_for, without importing torch


def _part_paths(root: Path, part: int) -> tuple[Path, Path]:
    """(manifest, vectors) of a committed part, in the layout of :mod:`indexer.jobs`."""
    return root / "parts" / f"part-{part:06d}.json", root / "parts" / f"part-{part:06d}.npy"


def _read_part_manifest(root: Path, part: int) -> dict[str, Any]:
    """A committed part's manifest; a damaged one is named, with the remedy."""
    path = _part_paths(root, part)[0]
    return read_sealed_json(path, f"delete it and run the job again with --resume to redo part {part}")


def merge_job(out: str | os.PathLike[str]) -> Path:
    """``vtr index merge``: publish a finished job, on disk above :data:`ONDISK_MIN_VECTORS`.

    A large job is published by this module alone, which does not import torch (a process that
    only merges stays small); anything else, including the errors for missing parts, goes
    through :func:`indexer.jobs.publish_job`.
    """
    out = Path(out)
    job_file = _work_root(out) / "job.json"
    if job_file.is_file():
        job = read_sealed_json(job_file, f"delete {job_file.parent} and run the job again")
        manifests = [_part_paths(_work_root(out), part)[0] for part in range(job["num_parts"])]
        if all(manifest.is_file() for manifest in manifests):
            total = sum(_read_part_manifest(_work_root(out), part)["num_vectors"] for part in range(job["num_parts"]))
            if wants_ondisk(total, job["index_type"]):
                return publish_job_ondisk(out)
    from indexer.jobs import publish_job

    return publish_job(out)


def publish_job_ondisk(out: str | os.PathLike[str]) -> Path:
    """:func:`indexer.jobs.publish_job` for a job too large to hold in memory (same result files,
    the FAISS lists on disk); every part must be committed."""
    from indexer.store import (
        FAILURES_FILE,
        FORMAT,
        FORMAT_VERSION,
        INDEX_FILE,
        ITEMS_FILE,
        VECTORS_FILE,
        _code_version,
        _normalise_failure,
        _normalise_item,
        _write_faiss,
        fsync_path,
        publish_version,
    )

    out = Path(out)
    root_dir = _work_root(out)
    job = read_sealed_json(root_dir / "job.json", f"delete {root_dir} and run the job again")
    root = Path(job["videos_root"])

    def read_manifest(part: int) -> dict[str, Any]:
        return _read_part_manifest(root_dir, part)

    arrays, counts = [], {"items": 0, "failed": 0}
    for part in range(job["num_parts"]):
        manifest = read_manifest(part)
        manifest_path, path = _part_paths(root_dir, part)
        if "vectors_file" in manifest:  # streamed: the check holds one read buffer, not the part
            verify_file(path, manifest["vectors_file"], str(path.parent),
                        f"delete {manifest_path} and resume to redo it")
        vectors = np.load(path, mmap_mode="r")
        if len(vectors) != manifest["num_vectors"] or len(manifest["items"]) != manifest["num_vectors"]:
            raise ValueError(f"part {part} is corrupt ({len(vectors)} vectors, {len(manifest['items'])} items, "
                             f"manifest says {manifest['num_vectors']}); delete {manifest_path} and resume to "
                             "redo it")
        if len(vectors):
            arrays.append(functools.partial(np.load, path, mmap_mode="r"))
        counts["items"] += len(vectors)
        del vectors
        counts["failed"] += len(manifest["failures"])
    rows = _Rows(arrays)
    dim = rows.dim

    def fill(staged: Path) -> dict[str, Any]:
        index, index_type = build_ondisk_index(rows, staged, job["index_type"], job["max_memory_bytes"])
        _write_faiss(staged / INDEX_FILE, index)
        write_float16_rows(staged / VECTORS_FILE, counts["items"], dim, rows.chunks())
        with open(staged / ITEMS_FILE, "w", encoding="utf-8") as items, \
                open(staged / FAILURES_FILE, "w", encoding="utf-8") as failures:
            row = 0
            for part in range(job["num_parts"]):
                manifest = read_manifest(part)
                for item in manifest["items"]:
                    record = _normalise_item(row, {**item, "path": str(root / item["path"])})
                    items.write(_json_line(record))
                    row += 1
                failures.writelines(_json_line(_normalise_failure({**failure, "path": str(root / failure["path"])})) for failure in manifest["failures"])
            for handle in (items, failures):
                handle.flush()
                os.fsync(handle.fileno())
        fsync_path(staged / IVF_DATA_FILE)
        extra = {key: job[key] for key in ("model_dir", "dataset", "ann_file", "window", "stride", "label_set")}
        extra["channels"] = job.get("channels") or {"visual": {}}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"preprocess": {}, **dict(job["model"])},
            "dim": dim,
            "metric": "ip",
            "index_type": index_type,
            "faiss_params": search_params(index),
            "storage": "ondisk",
            "counts": {"items": counts["items"], "failed": counts["failed"], "skipped": 0},
            "corpus_roots": [str(root)],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "code_version": _code_version(),
            "extra": extra,
            "removed": job.get("removed") or [],
        }

    publish_version(out, fill)
    shutil.rmtree(root_dir)
    return out


def _json_line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_float16_rows(path: Path, rows: int, dim: int, chunks: Iterable[np.ndarray]) -> None:
    """Write a float16 [rows, dim] .npy from row chunks without holding them all."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (rows, dim)}
    written = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.writelines(np.ascontiguousarray(chunk[start : start + BLOCK_ROWS], dtype=np.float16).tobytes() for start in range(0, len(chunk), BLOCK_ROWS))
            written += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    if written != rows:
        raise RuntimeError(f"wrote {written} vector rows to {path}, expected {rows}")
