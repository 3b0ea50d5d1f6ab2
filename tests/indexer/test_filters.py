"""Filtered search: a filter applies before the top k, so a filtered search returns exactly the
top k of the matching subset (checked against brute force over that subset), for every index
family and both the exact-scan and the FAISS-selector paths; filters read folders, globs,
durations and annotation fields, and malformed ones are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index
from indexer.faiss_index import build_index, hold_subset, search_index
from indexer.filters import ItemFilter, check_glob, parse_where
from indexer.search import Searcher
from retrieval import embed_texts

#: The smallest share of an index that a filtered search sends through the FAISS selector.
SELECTOR_SHARE = faiss_index.SELECTOR_MIN_SHARE


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(vectors: np.ndarray, queries: np.ndarray, subset: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors[subset].T
    return subset[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32,Flat", "IVF32,PQ8x8"])
@pytest.mark.parametrize("share", [0.0, 0.001, 0.01, 0.3, 0.9])
@pytest.mark.parametrize("path", ["exact", "selector", "held"])
def test_filtered_search_is_the_top_k_of_the_subset(index_type: str, share: float, path: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 8000, 16)
    stored = vectors.astype(np.float16)  # what an index directory keeps for re-scoring
    queries = _unit(rng, 6, 16)
    subset = np.sort(rng.choice(len(vectors), size=int(share * len(vectors)), replace=False))
    if path == "selector":  # a large subset: FAISS restricted by an id selector
        monkeypatch.setattr(faiss_index, "EXACT_SUBSET_MAX", 10)
        monkeypatch.setattr(faiss_index, "SELECTOR_MIN_SHARE", 0.0)  # even for small shares: never short
    index = build_index(vectors, index_type)
    held = hold_subset(index, subset, stored) if path == "held" else None  # as a Searcher keeps a filter
    scores, ids = search_index(index, queries, 10, rescore_vectors=stored, subset=subset, held=held)

    assert np.isin(ids[ids >= 0], subset).all(), "a filtered search returned an item outside the filter"
    assert ((ids >= 0).sum(axis=1) == min(10, len(subset))).all(), "a filtered search came back short"
    if not len(subset):
        return
    reference = stored.astype(np.float32) if index_type.endswith("PQ8x8") else vectors
    truth = _brute_force(reference, queries, subset, 10)
    recall = np.mean([len(set(found) & set(want)) / len(want) for found, want in zip(ids, truth, strict=True)])
    if path == "exact" or (held is not None and held.coarse is None):
        assert recall == 1.0
        found = ids[:, : truth.shape[1]]
        assert np.array_equal(found, truth)
        assert np.allclose(scores[:, : truth.shape[1]], np.take_along_axis(queries @ reference.T, found, 1),
                           atol=1e-5)
    elif path == "held":  # an 8-bit first pass, its best 400 re-scored exactly
        assert held.coarse is not None and recall >= 0.99
    elif share >= SELECTOR_SHARE:  # the share the selector serves in earnest:
        assert recall >= 0.9                        # the same approximation as an unfiltered search


def test_glob_and_where_parsing() -> None:
    assert parse_where("source=news") == ("source", "=", "news")
    assert parse_where(" lang != en ") == ("lang", "!=", "en")
    for bad in ("source", "=news", "a b=c", ""):
        with pytest.raises(ValueError, match="COLUMN=VALUE"):
            parse_where(bad)
    assert check_glob("news/*.mp4") == "news/*.mp4"
    for bad in ("news/[ab.mp4", "[", "  "):
        with pytest.raises(ValueError, match="glob|path filter"):
            check_glob(bad)
    with pytest.raises(ValueError, match="exceeds"):
        ItemFilter.build(min_seconds=5, max_seconds=1)
    parsed = ItemFilter.parse("source=news, path=test/* duration>=0.5 duration<=2")
    assert parsed == ItemFilter(("test/*",), 0.5, 2.0, (("source", "=", "news"),))
    assert ItemFilter.parse("  ").empty


def test_item_filter_matches_paths_durations_and_fields() -> None:
    roots = ["/data/corpus"]
    items = [
        {"id": 0, "path": "/data/corpus/news/a.mp4", "start": None, "end": None, "labels": [["run", 0.9]],
         "extra": {"duration": 12.0, "meta": {"source": "tv", "year": 2024}}},
        {"id": 1, "path": "/data/corpus/news/sub/b.mp4", "start": 2.0, "end": 4.0, "labels": [],
         "extra": {"meta": {"source": "web", "year": 2023}}},
        {"id": 2, "path": "/data/corpus/sport/c.mp4", "start": None, "end": None, "labels": [], "extra": {}},
    ]
    select = lambda f: ItemFilter.parse(f).select(items, roots).tolist()
    assert select("path=news") == [0, 1]                 # a folder keeps what lies below it
    assert select("path=news/*.mp4") == [0, 1]           # '*' crosses '/'
    assert select("path=*/c.mp4") == [2]
    assert select("path=news/a.mp4 path=sport") == [0, 2]
    assert select("duration>=3") == [0]                  # item 2's duration is unknown: no bound passes it
    assert select("duration<=2") == [1]
    assert select("source=tv") == [0]
    assert select("source!=tv") == [1, 2]
    assert select("year=2024.0") == [0]                  # numbers compare as numbers
    assert select("label=run") == [0]
    assert select("source=web path=news") == [1]         # every condition must hold
    with pytest.raises(ValueError, match="unknown filter column 'lang'.*source"):
        select("lang=en")


def test_searcher_filters_before_the_top_k(annotated_index: Path) -> None:
    searcher = Searcher(annotated_index)
    query = "a small red circle moving to the left"
    vector = embed_texts(searcher.model, [query])[0]
    everything = searcher.search(query, k=50)
    assert len(everything) == 14
    roots = searcher.reader.manifest["corpus_roots"]
    for text in ("source=news", "path=train", "path=test/000[0-3].mp4", "duration<=1.5", "source!=archive"):
        where = ItemFilter.parse(text)
        keep = [hit for hit in everything if where.matches(searcher.reader.items[hit.item_id], roots)]
        assert keep, text
        for k in (1, 3, 50):
            hits = searcher.search(query, k=k, where=text)
            # the filtered ranking is the unfiltered one restricted to the matching items
            assert [(h.item_id, round(h.score, 5)) for h in hits] == [
                (h.item_id, round(h.score, 5)) for h in keep[:k]], (text, k)
            assert [h.item_id for h in searcher.search_vector(vector, k=k, where=where)] == [
                h.item_id for h in hits]
    assert len(searcher.search(query, k=3, where="duration<=1.5")) == 2  # the two 1 s moments
    assert searcher.search(query, where="source=nothing-like-this") == []
    grouped = searcher.search(query, k=10, group=True, where="path=test")
    assert len(grouped) == 8 and all("/test/" in hit.path for hit in grouped)
    with pytest.raises(ValueError, match="unknown filter column 'lang'"):
        searcher.search(query, where="lang=en")
