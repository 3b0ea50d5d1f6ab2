"""Filtered search benchmark: a filter keeping 1 % of a 1M-vector index, against the unfiltered
search over the same index.

Builds the index ``vtr index`` would choose for the size (IVF-PQ at 1M, with exact float16
re-scoring) over clustered unit vectors (bench/search.py's distribution), picks a random 1 % of
the items (scattered ids: no locality to help), and times single queries, interleaved:

* ``unfiltered``: what ``Searcher.search`` runs without a filter;
* ``filtered``: what it runs with one, the subset held in memory after the first query
  (``Searcher`` holds subsets up to ``FILTER_VECTORS_MAX`` items: float32 rows and PQ codes
  trained on the subset, scanned first, their best candidates re-scored exactly; ``hold_s`` is
  that one-off cost);
* ``filtered_cold``: the same subset gathered from the float16 memmap at every query.

Recall@10 is against the exact top 10 of the subset under float32 vectors. ``resolve_ms`` is
the one-off cost of resolving a ``source=...`` filter over the items' metadata (parsed JSON
rows). Targets: filtered p50 <= 3x unfiltered p50, recall@10 >= 0.95.

    python bench/filtered_search.py --n 1000000 --share 0.01
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.record import Recorder, add_output_argument
from bench.search import Corpus, _float16_memmap
from indexer.faiss_index import build_index, choose_index_type, hold_subset, search_index
from indexer.filters import ItemFilter

THREADS = 2
WARMUP = 10


class SyntheticItems(Sequence):
    """Item rows made on access (a million parsed dicts would take a gigabyte)."""

    def __init__(self, n: int, sources: int) -> None:
        self.n, self.sources = n, sources

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(self.n))]
        if not 0 <= row < self.n:
            raise IndexError(row)
        return {"id": row, "path": f"/data/folder{row % 100:02d}/video{row:07d}.mp4", "start": None, "end": None,
                "captions": [], "labels": [], "extra": {"meta": {"source": f"source{row % self.sources}"}}}


def _p50(times: list[float]) -> float:
    return round(float(np.percentile(times, 50)) * 1000, 3)


def _p99(times: list[float]) -> float:
    return round(float(np.percentile(times, 99)) * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--share", type=float, default=0.01, help="fraction of the items the filter keeps")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--index-type", default=None, help="FAISS factory string (default: vtr's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="e.g. 'machine shared with other jobs'")
    add_output_argument(parser, "filtered_search")
    args = parser.parse_args(argv)
    results = Recorder(args.output, append=args.append)
    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)

    corpus = Corpus("clustered", args.dim, args.seed)
    vectors = corpus.sample(args.n)
    queries = corpus.sample(args.queries + WARMUP)
    index_type = args.index_type or choose_index_type(args.n, args.dim)
    started = time.perf_counter()
    index = build_index(vectors, index_type=index_type, use_gpu=False)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(args.seed + 1)
    subset = np.sort(rng.choice(args.n, size=max(1, int(args.share * args.n)), replace=False))

    sources = round(1 / args.share)
    items = SyntheticItems(args.n, sources)
    started = time.perf_counter()
    resolved = ItemFilter.parse("source=source0").select(items, ["/data"])
    resolve_ms = (time.perf_counter() - started) * 1000
    assert len(resolved) == len(range(0, args.n, sources))

    with tempfile.TemporaryDirectory() as scratch:
        stored = _float16_memmap(vectors, Path(scratch))
        exact = vectors[subset]
        started = time.perf_counter()
        held = hold_subset(index, subset, stored)
        hold_s = time.perf_counter() - started
        runs = {
            "unfiltered": lambda q: search_index(index, q, args.k, rescore_vectors=stored),
            "filtered": lambda q: search_index(index, q, args.k, rescore_vectors=stored, subset=subset,
                                               held=held),
            "filtered_cold": lambda q: search_index(index, q, args.k, rescore_vectors=stored, subset=subset),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        hits: dict[str, float] = {name: 0.0 for name in runs if name != "unfiltered"}
        for i, query in enumerate(queries):
            q = query[None]
            truth = set(subset[np.argsort(-(exact @ query), kind="stable")[: args.k]].tolist())
            for name, run in runs.items():
                t0 = time.perf_counter()
                _, ids = run(q)
                elapsed = time.perf_counter() - t0
                if i < WARMUP:
                    continue
                times[name].append(elapsed)
                if name in hits:
                    hits[name] += len(truth & set(ids[0].tolist())) / args.k
        measured = len(queries) - WARMUP
        base = _p50(times["unfiltered"])
        for name in runs:
            row = {"bench": "filtered_search", "run": name, "n": args.n, "dim": args.dim, "share": args.share,
                   "subset": len(subset), "index_type": index_type, "build_s": round(build_s, 1),
                   "p50_ms": _p50(times[name]), "p99_ms": _p99(times[name]),
                   "p50_vs_unfiltered": round(_p50(times[name]) / base, 2) if base else None,
                   "queries": measured, "threads": THREADS, "note": args.note}
            if name in hits:
                row["recall_at_k"] = round(hits[name] / measured, 4)
            if name == "filtered":
                row["resolve_ms"] = round(resolve_ms, 1)
                row["hold_s"] = round(hold_s, 2)
            results.add(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
