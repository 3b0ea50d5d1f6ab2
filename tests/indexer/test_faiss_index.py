"""indexer.faiss_index: index choice rules, build, exact re-scoring, input checks."""

from __future__ import annotations

import math
import re
import warnings

import faiss
import numpy as np
import pytest

from indexer.faiss_index import (
    MAX_TRAIN_POINTS,
    MIN_TRAIN_POINTS_PER_CENTROID,
    apply_search_params,
    build_index,
    choose_index_type,
    ivf_list_count,
    ivf_pq_index_type,
    search_index,
    search_params,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tiny indexes: one OpenMP thread


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors around random unit centres: neighbours are meaningful, like clip vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=n)] + 0.8 / math.sqrt(dim) * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def base_and_queries(n: int, n_queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A corpus and held-out queries drawn from the same clusters."""
    data = clustered(n + n_queries, dim, seed=seed)
    return data[:n], data[n:]


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(set(f) & set(t)) for f, t in zip(found, truth)) / truth.size


# ------------------------------------------------------------------ choice rules


@pytest.mark.parametrize("n", [0, 1, 5_000, 19_999])
def test_small_corpora_get_exact_flat(n):
    assert choose_index_type(n, 512, None) == "Flat"
    assert choose_index_type(n, 512, 1) == "Flat"  # too small to train a quantiser anyway


def test_moderate_corpora_get_hnsw_while_it_fits_the_budget():
    assert choose_index_type(20_000, 512, None) == "HNSW32,Flat"
    assert choose_index_type(150_000, 512, None) == "HNSW32,Flat"
    graph_bytes = 150_000 * (4 * 512 + 8 * 32 + 16)
    assert choose_index_type(150_000, 512, graph_bytes + 1) == "HNSW32,Flat"
    assert choose_index_type(150_000, 512, graph_bytes // 2).startswith("IVF")


@pytest.mark.parametrize("n", [200_000, 1_000_000, 10_000_000])
@pytest.mark.parametrize("dim", [64, 384, 512, 768])
def test_large_corpora_get_ivf_pq_within_the_rules(n, dim):
    index_type = choose_index_type(n, dim, None)
    match = re.fullmatch(r"IVF(\d+),PQ(\d+)x8", index_type)
    assert match, index_type
    nlist, m = int(match.group(1)), int(match.group(2))
    assert dim % m == 0
    assert m + 8 <= 128  # code + 8-byte id per vector
    assert not any(dim % bigger == 0 for bigger in range(m + 1, 121))  # the largest such m
    assert nlist & (nlist - 1) == 0  # a power of two
    assert min(n, MAX_TRAIN_POINTS) / nlist >= MIN_TRAIN_POINTS_PER_CENTROID
    assert nlist <= 2 ** round(math.log2(4 * math.sqrt(n)))


def test_nlist_follows_four_sqrt_n_until_the_training_cap():
    assert ivf_list_count(20_000) == 512  # 4*sqrt(20k) = 566 -> 512
    assert ivf_list_count(60_000) == 1024  # 980 -> 1024, cap 60k/39 = 1538
    assert ivf_list_count(1_000_000) == 2048  # 4000 -> 4096, capped by 100k/39 = 2564


def test_pq_code_shrinks_to_fit_the_memory_budget():
    n, dim = 1_000_000, 512
    assert ivf_pq_index_type(n, dim) == "IVF2048,PQ64x8"
    centroids = 2048 * dim * 4
    assert ivf_pq_index_type(n, dim, n * (32 + 8) + centroids) == "IVF2048,PQ32x8"
    assert choose_index_type(n, dim, n * (16 + 8) + centroids) == "IVF2048,PQ16x8"
    with pytest.raises(ValueError, match="too small"):
        ivf_pq_index_type(n, dim, 1000)


# ------------------------------------------------------------------ build and search


def test_flat_search_is_exact():
    base, queries = base_and_queries(500, 7, 32, seed=1)
    index = build_index(base, use_gpu=False)
    scores, ids = search_index(index, queries, 5)
    np.testing.assert_array_equal(ids, exact_top_k(base, queries, 5))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, ids, axis=1), rtol=1e-5)


def test_ivf_pq_with_exact_rescoring_reaches_high_recall():
    base, queries = base_and_queries(5_000, 100, 64, seed=1)
    index = build_index(base, index_type="IVF32,PQ16x8", use_gpu=False)
    truth = exact_top_k(base, queries, 10)
    vectors16 = base.astype(np.float16)

    _, pq_only = search_index(index, queries, 10)
    scores, rescored = search_index(index, queries, 10, rescore_vectors=vectors16)

    assert recall(rescored, truth) >= 0.9
    assert recall(rescored, truth) > recall(pq_only, truth)
    # the returned scores are the exact float16 inner products, best first
    exact16 = np.einsum("qkd,qd->qk", vectors16[rescored].astype(np.float32), queries)
    np.testing.assert_allclose(scores, exact16, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_rescoring_reads_a_float16_memmap(tmp_path):
    base, queries = base_and_queries(3_000, 20, 32, seed=2)
    np.save(tmp_path / "v.npy", base.astype(np.float16))
    memmap = np.load(tmp_path / "v.npy", mmap_mode="r")
    index = build_index(base, index_type="IVF16,PQ8x8", use_gpu=False)
    _, from_memmap = search_index(index, queries, 10, rescore_vectors=memmap, candidates=200)
    _, from_array = search_index(index, queries, 10, rescore_vectors=np.asarray(memmap), candidates=200)
    np.testing.assert_array_equal(from_memmap, from_array)
    assert recall(from_memmap, exact_top_k(base, queries, 10)) >= 0.95


def test_hnsw_build_sets_ef_search_and_finds_neighbours():
    base, queries = base_and_queries(2_000, 20, 32, seed=3)
    index = build_index(base, index_type="HNSW32,Flat", use_gpu=False)
    assert search_params(index) == {"efSearch": 128}
    _, ids = search_index(index, queries, 10, rescore_vectors=base.astype(np.float16))
    assert recall(ids, exact_top_k(base, queries, 10)) >= 0.95


def test_search_params_survive_serialisation():
    base = clustered(3_000, 32)
    index = build_index(base, index_type="IVF64,PQ8x8", use_gpu=False)
    assert search_params(index) == {"nprobe": 16}
    restored = faiss.deserialize_index(faiss.serialize_index(index))
    apply_search_params(restored, {"nprobe": 3})
    assert search_params(restored) == {"nprobe": 3}


def test_training_is_deterministic():
    base, queries = base_and_queries(2_000, 5, 32, seed=4)
    first = build_index(base, index_type="IVF16,PQ4x8", use_gpu=False)
    second = build_index(base, index_type="IVF16,PQ4x8", use_gpu=False)
    np.testing.assert_array_equal(search_index(first, queries, 5)[1], search_index(second, queries, 5)[1])


def test_k_beyond_the_corpus_pads_with_minus_one():
    base = clustered(3, 16)
    scores, ids = search_index(build_index(base, use_gpu=False), base[:1], 5)
    assert list(ids[0, 3:]) == [-1, -1] and np.all(np.isneginf(scores[0, 3:]))
    assert ids[0, 0] == 0


# ------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    base = clustered(100, 16)
    index = build_index(base, use_gpu=False)
    with pytest.raises(ValueError, match="dim 8 but the index has dim 16"):
        search_index(index, clustered(2, 8), 3)
    with pytest.raises(ValueError, match="float32"):
        build_index(base.astype(np.float64), use_gpu=False)
    with pytest.raises(ValueError, match="floating point"):
        search_index(index, np.ones((1, 16), dtype=np.int64), 3)
    with pytest.raises(ValueError, match="2-D"):
        build_index(base[0], use_gpu=False)
    nan = base.copy()
    nan[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(nan, use_gpu=False)
    with pytest.raises(ValueError, match="rescore_vectors"):
        search_index(index, base[:1], 3, rescore_vectors=base[:50].astype(np.float16))


def test_unnormalised_vectors_warn():
    with pytest.warns(UserWarning, match="not L2-normalised"):
        build_index(clustered(50, 16) * 3, use_gpu=False)


def frame_mean_vectors(n: int, frames: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clip vectors of a per-frame model: the mean of ``frames`` unit vectors (norms below 1).

    Frames of one clip share a cluster but jitter around it by a clip-specific amount, so the
    norms spread (about 0.4 to 1) and differ between neighbours.
    """
    rng = np.random.default_rng(seed)
    centres = clustered(n, dim, seed=seed)
    spread = rng.uniform(0.0, 2.5, size=(n, 1, 1)) / math.sqrt(dim)
    x = centres[:, None, :] + spread * rng.standard_normal((n, frames, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x.mean(1).astype(np.float32)


@pytest.mark.parametrize(
    ("index_type", "n", "min_recall"),
    [("Flat", 500, 1.0), ("HNSW32,Flat", 2_000, 0.95), ("IVF32,PQ16x8", 5_000, 0.9)],
)
def test_every_index_type_ranks_frame_mean_vectors_by_inner_product(index_type, n, min_recall):
    """Non-unit (frame-mean) vectors: no warning, inner-product order, exact float16 re-scoring."""
    base = frame_mean_vectors(n, 4, 64, seed=5)
    norms = np.linalg.norm(base, axis=1)
    assert norms.max() <= 1.0 and norms.min() < 0.6
    queries = clustered(50, 64, seed=6)  # unit text vectors
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shorter than unit is the expected layout
        index = build_index(base, index_type=index_type, use_gpu=False)
        vectors16 = base.astype(np.float16)
        scores, ids = search_index(index, queries, 10, rescore_vectors=vectors16)
    inner = queries @ base.T
    truth = exact_top_k(base, queries, 10)
    assert recall(ids, truth) >= min_recall
    if index_type == "Flat":
        np.testing.assert_array_equal(ids, truth)
        np.testing.assert_allclose(scores, np.take_along_axis(inner, ids, axis=1), rtol=1e-5, atol=1e-6)
    elif index_type.startswith("IVF"):
        # the scores are the exact inner products with the stored float16 rows, best first
        exact16 = np.einsum("qkd,qd->qk", vectors16[ids].astype(np.float32), queries)
        np.testing.assert_allclose(scores, exact16, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(scores, np.take_along_axis(inner, ids, axis=1), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # ranking by cosine instead (renormalised rows) would give another answer: the norms matter
    cosine_truth = exact_top_k(base / norms[:, None], queries, 10)
    assert recall(cosine_truth, truth) < 0.95


def test_queries_in_other_float_types_are_accepted():
    base = clustered(200, 16)
    index = build_index(base, use_gpu=False)
    expected = search_index(index, base[:3], 4)[1]
    np.testing.assert_array_equal(search_index(index, base[:3].astype(np.float64), 4)[1], expected)
    np.testing.assert_array_equal(search_index(index, base[0], 4)[1], expected[:1])


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="a GPU is visible")
def test_demanding_a_gpu_without_one_names_the_extra():
    with pytest.raises(RuntimeError, match=r"vtr\[gpu\]"):
        build_index(clustered(100, 16), use_gpu=True)
