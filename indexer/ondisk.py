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

A finished job is published this way by :func:`indexer.publish.publish_job`, which streams the
item and failure records from the part manifests to their files, one part at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.faiss_index import (
    HNSW_MAX_ITEMS,
    IVF_DATA_FILE,
    MIN_TRAIN_POINTS_PER_CENTROID,
    TRAIN_SEED,
    apply_search_params,
    default_search_params,
    ivf_pq_index_type,
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


class Rows:
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


def train_ivf(rows: Rows, index_type: str) -> faiss.Index:
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

    ``sources`` are [n_i, d] float32 arrays or functions opening them (see :class:`Rows`).
    Row ``i`` of their concatenation gets id ``i``. Returns the index (to be written as
    ``index.faiss`` next to the list file) and its factory string.
    """
    rows = sources if isinstance(sources, Rows) else Rows(sources)
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
