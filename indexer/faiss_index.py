"""The vector index: FAISS over float32 clip vectors of norm at most 1, scored by inner product.

Inner product with a unit query is the retrieval score: cosine for a unit clip vector, and the
mean per-frame cosine for a model that keeps one feature per frame, whose clip vector is the
mean of its unit frame vectors (shorter than 1, see ``RetrievalModel.clip_vector``). So every
index here is built with ``METRIC_INNER_PRODUCT`` and never with L2 (L2 distance would mix
in the clip vector's length).

Three index families cover the sizes a vtr corpus reaches, chosen by :func:`choose_index_type`
the way autofaiss does (vector count first, then the memory budget):

* ``Flat``: exact search, for small corpora.
* ``HNSW32,Flat``: a graph over the exact vectors, for moderate corpora that fit in memory.
* ``IVF{nlist},PQ{m}x8``: product-quantised codes in inverted lists, for everything larger.
  Its scores are approximate, so :func:`search_index` fetches a few hundred candidates and
  re-scores them exactly against the float16 vectors the index directory keeps on disk.

GPU FAISS is optional (the ``gpu`` extra); nothing GPU-specific is touched at import time.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)

#: Below this many vectors exact search is fast enough (a few ms per query) and too few
#: vectors exist to train a product quantiser well (256 centroids x 39 points each).
FLAT_MAX_ITEMS = 20_000
#: Up to this many vectors an HNSW graph is built in minutes on a few cores; beyond it the
#: build time and the float32 vectors it keeps (4*dim bytes each) make IVF-PQ the better deal.
HNSW_MAX_ITEMS = 200_000
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128

#: Stored bytes per vector an IVF-PQ index may spend: PQ code plus the 8-byte id FAISS keeps
#: in the inverted lists. 128 keeps a million vectors of any width at about 128 MB.
PQ_MAX_BYTES_PER_VECTOR = 128
IVF_ID_BYTES = 8
#: k-means needs this many training points per centroid for stable centroids (FAISS warns below).
MIN_TRAIN_POINTS_PER_CENTROID = 39
#: IVF-PQ is trained on a sample of at most this many vectors: the k-means cost grows with
#: sample size x nlist, and 100k points already give every list and every PQ centroid plenty.
MAX_TRAIN_POINTS = 100_000
TRAIN_SEED = 0
#: Fraction of the inverted lists visited per query (nprobe = nlist / this), floored below:
#: on the clustered benchmark recall stops improving beyond nprobe 8 at nlist 2048 (the PQ
#: ranking, not the list choice, is then what loses neighbours); 16 leaves a margin for
#: corpora whose neighbourhoods straddle more lists.
IVF_PROBE_DIVISOR = 128
IVF_MIN_NPROBE = 16
RESCORE_MIN_CANDIDATES = 400

#: The inverted lists of an index built on disk (:mod:`indexer.ondisk`), beside its index file.
IVF_DATA_FILE = "index.ivfdata"

NORM_TOLERANCE = 1e-2
#: ATen runs an element-wise op on the calling thread when it has fewer elements than this
#: (at::internal::GRAIN_SIZE).
_TORCH_SERIAL_ELEMENTS = 32_768


def default_candidates(k: int) -> int:
    """How many approximate hits to re-score for a top-``k`` answer.

    Product-quantised scores misorder close neighbours: in a dense neighbourhood (1M clustered
    512-d vectors, PQ64) the exact top 10 sit within the PQ top 400 about 98% of the time but
    within the top 100 only 72%. Re-scoring 400 float16 rows costs ~0.3 ms, so the pool is
    never smaller than that, and grows with ``k``.
    """
    return max(4 * k, RESCORE_MIN_CANDIDATES)


def _power_of_two_at_most(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


def _nearest_power_of_two(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def train_sample_size(n: int) -> int:
    """Number of vectors an index over ``n`` vectors is trained on (a seeded random sample)."""
    return min(n, MAX_TRAIN_POINTS)


def ivf_list_count(n: int) -> int:
    """nlist for an IVF index over ``n`` vectors.

    About ``4 * sqrt(n)`` lists (rounded to a power of two) balances the coarse search against
    the list scan; the count is capped so each list still gets at least 39 training points
    from the training sample.
    """
    wanted = _nearest_power_of_two(4 * math.sqrt(max(n, 1)))
    cap = _power_of_two_at_most(train_sample_size(n) / MIN_TRAIN_POINTS_PER_CENTROID)
    return max(1, min(wanted, cap))


def _hnsw_bytes_per_vector(dim: int) -> float:
    # float32 vector + 2M level-0 links (int32) + ~4 bytes of upper-level links + level/offset.
    return 4 * dim + 8 * HNSW_NEIGHBOURS + 4 + 12


def ivf_pq_index_type(n: int, dim: int, max_memory_bytes: int | None = None) -> str:
    """The IVF-PQ factory string for ``n`` vectors of width ``dim``.

    ``m`` (bytes of PQ code per vector, 8 bits per sub-quantiser) is the largest divisor of
    ``dim`` whose code plus the 8-byte id stays within 128 bytes per vector and, when a budget
    is given, whose whole index (codes, ids, coarse centroids) fits ``max_memory_bytes``.

    Raises:
        ValueError: when even one byte of code per vector does not fit the budget.
    """
    nlist = ivf_list_count(n)
    centroid_bytes = nlist * dim * 4
    for m in sorted((m for m in range(1, dim + 1) if dim % m == 0), reverse=True):
        if m + IVF_ID_BYTES > PQ_MAX_BYTES_PER_VECTOR:
            continue
        if max_memory_bytes is None or n * (m + IVF_ID_BYTES) + centroid_bytes <= max_memory_bytes:
            return f"IVF{nlist},PQ{m}x8"
    raise ValueError(
        f"max_memory_bytes={max_memory_bytes} is too small for {n} vectors of dim {dim}: "
        f"even 1 byte of code per vector needs {n * (1 + IVF_ID_BYTES) + centroid_bytes} bytes"
    )


def choose_index_type(n: int, dim: int, max_memory_bytes: int | None = None) -> str:
    """Pick a FAISS factory string from the corpus size and an optional memory budget.

    Rules, first match wins (as autofaiss does: count first, memory second):

    1. ``n < 20_000`` -> ``"Flat"``. Exact search costs a few ms per query at this size, its
       memory is at most 20k x 4*dim bytes, and there are too few vectors to train a quantiser.
    2. ``n < 200_000`` and the HNSW graph (float32 vectors + 32 neighbours per vector, about
       ``4*dim + 272`` bytes each) fits ``max_memory_bytes`` (or no budget) ->
       ``"HNSW32,Flat"``: near-exact and fast, no training.
    3. Otherwise ``"IVF{nlist},PQ{m}x8"`` (see :func:`ivf_list_count`, :func:`ivf_pq_index_type`):
       nlist ~ 4*sqrt(n) as a power of two with >= 39 training points per list; m the
       largest divisor of dim with code + id <= 128 bytes per vector within the budget.
    """
    if n < 0 or dim <= 0:
        raise ValueError(f"need n >= 0 and dim > 0, got n={n}, dim={dim}")
    if n < FLAT_MAX_ITEMS:
        return "Flat"
    hnsw_bytes = n * _hnsw_bytes_per_vector(dim)
    if n < HNSW_MAX_ITEMS and (max_memory_bytes is None or hnsw_bytes <= max_memory_bytes):
        return f"HNSW{HNSW_NEIGHBOURS},Flat"
    return ivf_pq_index_type(n, dim, max_memory_bytes)


def training_points_needed(index_type: str, dim: int) -> int:
    """The fewest vectors an index of ``index_type`` can be built over: 39 per IVF list
    (FAISS's own minimum for a usable k-means), and one per PQ centroid; 0 for an index
    that needs no training (Flat, HNSW-Flat)."""
    index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return 0
    needed = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needed = max(needed, ivf.nlist * MIN_TRAIN_POINTS_PER_CENTROID)
    concrete = faiss.downcast_index(ivf if ivf is not None else index)
    pq = getattr(concrete, "pq", None)
    if pq is not None:
        needed = max(needed, int(pq.ksub))
    return needed


def fitting_index_type(index_type: str, n: int, dim: int, max_memory_bytes: int | None = None) -> str:
    """``index_type`` when ``n`` vectors can train it, else the automatic choice for ``n``
    (logged): an index type picked for a larger corpus never fails a build at the very end."""
    needed = training_points_needed(index_type, dim)
    if n >= needed:
        return index_type
    chosen = choose_index_type(n, dim, max_memory_bytes)
    logger.warning("%s needs at least %d vectors to train, this index has %d: building %s instead",
                   index_type, needed, n, chosen)
    return chosen


def check_vectors(vectors: np.ndarray, dim: int | None = None, what: str = "vectors") -> None:
    """Reject arrays FAISS would misread; warn when rows are longer than unit length.

    Raises ValueError for a wrong rank, dtype or width and for NaN/inf (FAISS would silently
    return garbage). Rows shorter than 1 are expected (the mean of a clip's unit per-frame
    vectors); rows longer than 1 only warn: the search still works, but no retrieval score is
    an inner product with such a vector, which is almost always a caller bug (features that
    were never normalised).
    """
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        shape = getattr(vectors, "shape", None)
        raise ValueError(f"{what} must be a 2-D numpy array [n, dim], got shape {shape}")
    if vectors.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got {vectors.dtype}; convert with .astype(np.float32)")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{what} have dim {vectors.shape[1]} but the index has dim {dim}")
    chunk = 65_536
    for start in range(0, vectors.shape[0], chunk):
        block = vectors[start : start + chunk]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        if not np.isfinite(norms).all():
            raise ValueError(f"{what} contain NaN or inf (first bad row near {start})")
        if norms.max(initial=0.0) > 1.0 + NORM_TOLERANCE:
            warnings.warn(
                f"{what} are not L2-normalised (norms up to {norms.max():.3f}, above 1): "
                "inner-product scores will not be cosine similarities",
                stacklevel=3,
            )
            return


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as contiguous float32 [q, dim]; float16/64 are converted (they are small)."""
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if not np.issubdtype(queries.dtype, np.floating):
        raise ValueError(f"queries must be floating point, got {queries.dtype}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    check_vectors(queries, dim, what="queries")
    return queries


def _wants_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is False:
        return False
    available = faiss.get_num_gpus()
    if use_gpu and available == 0:
        raise RuntimeError(
            "use_gpu=True but this FAISS build sees no GPU; install the GPU build with "
            "`pip install 'vtr[gpu]'` (faiss-gpu) on a machine with CUDA"
        )
    return available > 0


def to_gpu_if_wanted(index: faiss.Index, index_type: str, use_gpu: bool | None) -> faiss.Index:
    """Move ``index`` to all visible GPUs when asked (True) or when available (None).

    The choice is logged once per call, never made silently. HNSW has no GPU implementation:
    with ``use_gpu=True`` that is an error, with ``None`` the index stays on CPU (logged).
    """
    if not _wants_gpu(use_gpu):
        if use_gpu is None:
            logger.info("FAISS: no GPU visible, %s runs on CPU", index_type)
        return index
    if "HNSW" in index_type:
        if use_gpu:
            raise ValueError(f"{index_type} has no GPU implementation in FAISS; use use_gpu=False")
        logger.info("FAISS: %s has no GPU implementation, keeping it on CPU", index_type)
        return index
    logger.info("FAISS: moving %s to %d GPU(s)", index_type, faiss.get_num_gpus())
    return faiss.index_cpu_to_all_gpus(index)


def read_faiss_index(index_file: Any, ivf_data_file: Any | None = None) -> faiss.Index:
    """Read an index from the open file ``index_file``; with ``ivf_data_file`` (the open
    ``index.ivfdata`` of an on-disk index) its inverted lists are memory-mapped read-only from
    that very file, whatever path it was written under (the path goes through ``/proc/self/fd``,
    so a reader keeps the version it opened even if the directory is renamed or replaced)."""
    reader = faiss.PyCallbackIOReader(index_file.read)
    if ivf_data_file is None:
        return faiss.read_index(reader)
    index = faiss.read_index(reader, faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = faiss.try_extract_index_ivf(index)
    lists = None if ivf is None else faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise ValueError("index file has no on-disk inverted lists but an inverted-list file is present")  # noqa: TRY004
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    lists.filename = f"{fd_dir}/{ivf_data_file.fileno()}"
    lists.read_only = True
    lists.do_mmap()
    return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (what ``faiss.write_index`` needs); CPU indexes pass through."""
    if type(index).__name__.startswith("Gpu") or "IndexReplicas" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def scores_are_exact(index: faiss.Index) -> bool:
    """True when the index scores with the float32 vectors themselves (Flat, HNSW-Flat, IVF-Flat).

    Only indexes that score compressed codes (PQ, SQ, ...) gain from exact re-scoring.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat)) or type(index).__name__ in (
        "GpuIndexFlat",
        "GpuIndexFlatIP",
        "GpuIndexIVFFlat",
    )


def search_params(index: faiss.Index) -> dict[str, int]:
    """The query-time knobs of ``index`` (nprobe, efSearch) as a manifest-friendly dict."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nprobe": int(ivf.nprobe)}
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        return {"efSearch": int(hnsw.hnsw.efSearch)}
    return {}


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set query-time knobs by name (the inverse of :func:`search_params`)."""
    if not params:
        return
    # GPU builds need their own ParameterSpace to reach GPU indexes; it handles CPU ones too.
    space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def default_search_params(index: faiss.Index) -> dict[str, int]:
    """Query-time settings tuned on the clustered benchmark (bench/search.py).

    IVF visits nlist/128 lists (at least 16); HNSW explores 128 nodes (recall@10 ~0.998 at
    100k). Flat has nothing to tune.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nprobe": min(ivf.nlist, max(IVF_MIN_NPROBE, ivf.nlist // IVF_PROBE_DIVISOR))}
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return {"efSearch": HNSW_EF_SEARCH}
    return {}


def build_index(
    vectors: np.ndarray,
    index_type: str | None = None,
    max_memory_bytes: int | None = None,
    use_gpu: bool | None = None,
) -> faiss.Index:
    """Build an inner-product index over ``vectors`` (float32 [n, d], norms at most 1).

    ``index_type`` is a FAISS factory string; None picks one with :func:`choose_index_type`.
    Indexes that need training are trained on a seeded random sample of at most 100k rows, so
    the same vectors always give the same index. Search parameters (nprobe / efSearch) are set
    on the returned index; :func:`search_params` reads them back for the manifest.

    With ``use_gpu`` None the index goes to GPU when FAISS sees one, True demands it (error
    naming the ``gpu`` extra if absent), False keeps it on CPU.
    """
    check_vectors(vectors)
    n, dim = vectors.shape
    if index_type is None:
        index_type = choose_index_type(n, dim, max_memory_bytes)
        logger.info("FAISS: chose %s for %d vectors of dim %d", index_type, n, dim)
    index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    concrete = faiss.downcast_index(index)
    if isinstance(concrete, faiss.IndexHNSW):
        concrete.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if isinstance(concrete, faiss.IndexIVFPQ):
        # Polysemous codes serve Hamming-distance filtering, which we never use; training
        # them costs minutes of simulated annealing.
        concrete.do_polysemous_training = False
    params = default_search_params(index)  # read nlist while the index is still a CPU one
    index = to_gpu_if_wanted(index, index_type, use_gpu)
    if not index.is_trained:
        if n == 0:
            raise ValueError(f"{index_type} needs training vectors but none were given")
        size = train_sample_size(n)
        rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(n, size=size, replace=False))
        index.train(np.ascontiguousarray(vectors[rows]))
    if n:
        index.add(np.ascontiguousarray(vectors))
    apply_search_params(index, params)
    return index


def _float16_to_float32(rows: np.ndarray) -> np.ndarray:
    """Cast float16 rows to float32 fast, on the calling thread.

    numpy's float16 cast is scalar code (~1 ms for the default 400 x 512 re-scoring pool,
    most of a query's budget); torch's vectorised cast does it in ~0.1 ms. Blocks stay below
    ATen's parallel grain size so the cast never wakes torch's thread pool, which on a busy
    machine costs more than the cast itself (measured: 15 ms instead of 0.2 ms).

    torch is used only when the process has already imported it (an app holding a model): a
    process that only serves the index stays free of torch's few hundred MB, and numpy's cast
    then costs ~0.3 ms.
    """
    out = np.empty(rows.shape, dtype=np.float32)
    if rows.size == 0:
        return out
    torch = sys.modules.get("torch")
    if torch is None:
        out[...] = rows
        return out
    source, target = torch.from_numpy(np.ascontiguousarray(rows)), torch.from_numpy(out)
    block = max(1, (_TORCH_SERIAL_ELEMENTS - 1) // rows.shape[1])
    for start in range(0, len(rows), block):
        target[start : start + block].copy_(source[start : start + block])
    return out


def _rescore(
    queries: np.ndarray,
    candidate_ids: np.ndarray,
    vectors: np.ndarray,
    k: int,
    query_chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidates against float16 ``vectors``; keep the top k.

    Per chunk of queries, the union of their candidate rows is read once in ascending row
    order (friendly to a memmap on disk) and scored against every query of the chunk in one
    matrix product; each query then keeps the scores of its own candidates. The product
    wastes some arithmetic on other queries' rows, which is far cheaper than materialising a
    per-query copy of the candidates.
    """
    n_queries, n_candidates = candidate_ids.shape
    top = min(k, n_candidates)
    scores_out = np.full((n_queries, k), -np.inf, dtype=np.float32)
    ids_out = np.full((n_queries, k), -1, dtype=np.int64)
    for start in range(0, n_queries, query_chunk):
        stop = min(start + query_chunk, n_queries)
        ids = candidate_ids[start:stop]
        valid = ids >= 0
        unique_rows, inverse = np.unique(ids[valid], return_inverse=True)
        if unique_rows.size == 0:
            continue
        rows = _float16_to_float32(np.take(vectors, unique_rows, axis=0))
        row_scores = rows @ queries[start:stop].T  # [unique rows, queries in chunk]
        position = np.zeros(ids.shape, dtype=np.int64)
        position[valid] = inverse
        query_of_slot = np.arange(stop - start)[:, None]
        scores = row_scores[position, query_of_slot]
        scores[~valid] = -np.inf
        best = (query_of_slot, np.argsort(-scores, axis=1, kind="stable")[:, :top])
        scores_out[start:stop, :top] = scores[best]
        ids_out[start:stop, :top] = np.where(valid[best], ids[best], -1)
    return scores_out, ids_out


def search_index(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    rescore_vectors: np.ndarray | None = None,
    candidates: int | None = None,
    subset: np.ndarray | None = None,
    held: HeldSubset | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores [q, k] float32, ids [q, k] int64) for ``queries`` [q, d] or [d].

    ``subset`` (sorted int64 ids) restricts the search to those items before the top ``k`` is
    taken; ``held`` (:func:`hold_subset`) is that subset kept in memory: see :func:`search_subset`.

    When the index scores with the exact vectors (Flat, HNSW-Flat, IVF-Flat) or no
    ``rescore_vectors`` are given, this is one FAISS search. Otherwise (PQ codes) FAISS returns
    ``candidates`` hits (default :func:`default_candidates`) whose approximate scores are
    replaced by exact inner products with ``rescore_vectors`` (float16 [n, d], typically the
    index directory's memmap), and the best ``k`` are kept. Slots beyond the number of
    indexed vectors hold id -1 and score -inf.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    queries = _as_queries(queries, index.d)
    if rescore_vectors is not None and rescore_vectors.shape != (index.ntotal, index.d):
        raise ValueError(
            f"rescore_vectors have shape {rescore_vectors.shape}, expected {(index.ntotal, index.d)}"
        )
    if subset is not None:
        return search_subset(index, queries, k, subset, rescore_vectors, candidates, held)
    if rescore_vectors is None or scores_are_exact(index):
        scores, ids = index.search(queries, k)
        scores[ids < 0] = -np.inf
        return scores, ids
    pool = max(k, candidates if candidates is not None else default_candidates(k))
    _, candidate_ids = index.search(queries, pool)
    return _rescore(queries, candidate_ids, rescore_vectors, k)


#: A filtered search scores subsets up to this many items exactly (one matrix product over their
#: vectors: ~10 ms for 100k x 512 on one core), which also makes its top k exact; larger subsets
#: are searched by FAISS itself, restricted by an id selector.
EXACT_SUBSET_MAX = 100_000
#: ... and so are larger subsets holding less than this share of the index: an IVF probe visits
#: a few lists, and among a small share of matching items those lists rarely hold the subset's
#: true neighbours (measured: recall@10 0.6 at 1 %), while a scan costs only the subset's size.
SELECTOR_MIN_SHARE = 0.2


def subset_vectors(index: faiss.Index, rows: np.ndarray, rescore_vectors: np.ndarray | None) -> np.ndarray:
    """float32 vectors of ``rows``: the index's own (Flat, HNSW-Flat) when it keeps them, so that
    scores equal an unfiltered search's; else the float16 copy."""
    concrete = faiss.downcast_index(index)
    keeps_floats = isinstance(concrete, faiss.IndexFlat) or (
        isinstance(concrete, faiss.IndexHNSW) and isinstance(faiss.downcast_index(concrete.storage), faiss.IndexFlat)
    )
    if keeps_floats:
        return index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))
    if rescore_vectors is None:
        raise ValueError(f"a filtered search over {type(concrete).__name__} needs the index's float16 vectors")
    return _float16_to_float32(np.take(rescore_vectors, rows, axis=0))


def _exact_subset(
    index: faiss.Index | None, queries: np.ndarray, k: int, subset: np.ndarray,
    rescore_vectors: np.ndarray | None, vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``subset`` for every query, scanning it in blocks (bounded memory);
    ``vectors``: the subset's float32 rows when the caller holds them already."""
    n_queries = len(queries)
    best_scores = np.full((n_queries, 0), -np.inf, dtype=np.float32)
    best_ids = np.full((n_queries, 0), -1, dtype=np.int64)
    for start in range(0, len(subset), EXACT_SUBSET_MAX):
        rows = subset[start : start + EXACT_SUBSET_MAX]
        block = vectors[start : start + EXACT_SUBSET_MAX] if vectors is not None else None
        if block is None:
            block = subset_vectors(index, rows, rescore_vectors)
        scores = queries @ block.T  # [q, rows]
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(rows, (n_queries, len(rows)))], axis=1)
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
        best_scores, best_ids = scores, ids
    # best first; equal scores keep the lower id first, as FAISS's flat search does
    order = np.lexsort((best_ids, -best_scores), axis=1) if best_ids.size else best_ids
    scores_out = np.full((n_queries, k), -np.inf, dtype=np.float32)
    ids_out = np.full((n_queries, k), -1, dtype=np.int64)
    width = best_ids.shape[1]
    scores_out[:, :width] = np.take_along_axis(best_scores, order, 1)
    ids_out[:, :width] = np.take_along_axis(best_ids, order, 1)
    return scores_out, ids_out


def _selector_params(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters that restrict ``index`` to ``selector`` and keep its nprobe / efSearch."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
    concrete = faiss.downcast_index(index)
    if isinstance(concrete, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(concrete.hnsw.efSearch))
    return faiss.SearchParameters(sel=selector)


def search_subset(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    subset: np.ndarray,
    rescore_vectors: np.ndarray | None = None,
    candidates: int | None = None,
    held: HeldSubset | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of the items in ``subset`` only (the filter applies before the top k).

    Subsets of at most :data:`EXACT_SUBSET_MAX` items or under :data:`SELECTOR_MIN_SHARE` of the
    index (and any subset of a GPU index, which takes no selector) are scored exactly, in blocks.
    Larger ones go through FAISS with an
    ``IDSelectorBatch``: the same approximate search as an unfiltered query, over matching items
    only, re-scored exactly like :func:`search_index`. Should that return fewer than ``min(k,
    len(subset))`` hits (an IVF probe that found too few matches), the subset is scanned
    exactly: a filtered search never comes back short. ``held``: the same subset kept in memory
    by a caller that searches it many times (:func:`hold_subset`, :func:`search_held`).
    """
    queries = _as_queries(queries, index.d)
    if held is not None:
        return search_held(queries, k, held, candidates)
    subset = np.unique(np.asarray(subset, dtype=np.int64))
    if subset.size and (subset[0] < 0 or subset[-1] >= index.ntotal):
        raise ValueError(f"subset ids must lie in 0..{index.ntotal - 1}")
    on_gpu = type(index).__name__.startswith("Gpu")
    if len(subset) <= EXACT_SUBSET_MAX or len(subset) < SELECTOR_MIN_SHARE * index.ntotal or on_gpu:
        return _exact_subset(index, queries, k, subset, rescore_vectors)
    params = _selector_params(index, faiss.IDSelectorBatch(subset))
    if rescore_vectors is None or scores_are_exact(index):
        scores, ids = index.search(queries, k, params=params)
        scores[ids < 0] = -np.inf
    else:
        pool = max(k, candidates if candidates is not None else default_candidates(k))
        _, candidate_ids = index.search(queries, pool, params=params)
        scores, ids = _rescore(queries, candidate_ids, rescore_vectors, k)
    if (ids[:, : min(k, len(subset))] < 0).any():
        return _exact_subset(index, queries, k, subset, rescore_vectors)
    return scores, ids


#: A held subset of at least this many items also keeps product-quantised codes of its vectors
#: (:data:`HELD_PQ_BYTES` per vector, trained on the subset) that a query scans first, re-scoring
#: the best :func:`default_candidates` exactly, as an unfiltered IVF-PQ query does. Scanning the
#: float32 rows instead is memory bound: 10k x 512 is 20 MB per query, which on a busy machine
#: took 11.6 ms against 1.7 ms unfiltered at 1M (an 8-bit copy, 5 MB, still took 21.8 ms).
HELD_COARSE_MIN = 2_048
#: Bytes of product-quantiser code per held vector (8 dimensions per byte at 512-d, as vtr's
#: IVF-PQ indexes use).
HELD_PQ_BYTES = 64
#: Its quantiser is trained once per filter on at most this many of the subset's vectors with
#: this many k-means iterations: a few seconds, where a full training took 35 s on a busy machine;
#: the exact re-scoring absorbs the coarser codes.
HELD_PQ_TRAIN = 4_096
HELD_PQ_ITERATIONS = 10


@dataclass(frozen=True, eq=False)
class HeldSubset:
    """A filtered subset kept in memory between queries: its sorted item ``ids``, their float32
    ``vectors`` (exact scores) and, from :data:`HELD_COARSE_MIN` items, a ``coarse`` PQ index of
    them."""

    ids: np.ndarray
    vectors: np.ndarray
    coarse: faiss.Index | None = None


def hold_subset(index: faiss.Index, ids: np.ndarray, rescore_vectors: np.ndarray | None) -> HeldSubset:
    """Keep the subset ``ids`` (sorted, distinct) of ``index`` in memory for :func:`search_held`."""
    ids = np.asarray(ids, dtype=np.int64)
    vectors = subset_vectors(index, ids, rescore_vectors)
    coarse = None
    dim = vectors.shape[1]
    if len(ids) >= HELD_COARSE_MIN:
        code_bytes = math.gcd(dim, HELD_PQ_BYTES)  # sub-quantisers must divide the width
        coarse = faiss.IndexPQ(dim, code_bytes, 8, faiss.METRIC_INNER_PRODUCT)
        coarse.do_polysemous_training = False
        coarse.pq.cp.min_points_per_centroid = 1  # a small subset trains 256 centroids all the same
        coarse.pq.cp.niter = HELD_PQ_ITERATIONS
        sample = np.random.default_rng(TRAIN_SEED).choice(len(ids), min(len(ids), HELD_PQ_TRAIN), replace=False)
        coarse.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        coarse.add(vectors)
    return HeldSubset(ids, vectors, coarse)


def search_held(queries: np.ndarray, k: int, held: HeldSubset, candidates: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of a held subset: exact below :data:`HELD_COARSE_MIN` items; above, its PQ codes
    pick ``candidates`` rows (default :func:`default_candidates`) whose exact scores decide."""
    if held.coarse is None:
        return _exact_subset(None, queries, k, held.ids, None, held.vectors)
    pool = min(len(held.ids), max(k, candidates if candidates is not None else default_candidates(k)))
    _, rows = held.coarse.search(queries, pool)
    scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids_out = np.full((len(queries), k), -1, dtype=np.int64)
    for number, query in enumerate(queries):
        found = rows[number][rows[number] >= 0]
        scores = held.vectors[found] @ query
        order = np.lexsort((held.ids[found], -scores))[:k]  # best first, ties by lower id
        scores_out[number, : len(order)] = scores[order]
        ids_out[number, : len(order)] = held.ids[found[order]]
    return scores_out, ids_out
