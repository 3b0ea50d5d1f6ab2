"""Vector search benchmark: exact Flat vs the automatic choice vs IVF-PQ with exact re-scoring.

For each corpus size and distribution, builds every index over the same unit vectors, then
times single-query searches interleaved across the indexes (query i on A, B, C, then query
i+1 ...) so machine noise hits them alike, and scores recall@k against the exact answers.

Prints one JSON object per (distribution, n, index) and writes the same lines to
``bench/results/search.jsonl`` (overwritten per run so the file always holds one consistent
run; ``--append`` adds to it instead, e.g. to run the 1M size separately).

Latency covers ``search_index`` as the Searcher calls it: FAISS plus, for IVF-PQ, the exact
re-scoring of the candidates from a float16 memmap (page cache warm). ``p50_ms``/``p99_ms``
come from the interleaved loop, where each approximate query follows an exact one that
streamed the whole corpus through the caches and let the thread pools idle (how a server
sees a query after encoding it); ``back_to_back_*`` time the same queries in a tight loop. ``bytes_per_vector`` is
the serialised FAISS index over n; the float16 re-scoring vectors (2*dim bytes per vector)
live on disk, memory-mapped, and are reported separately.

The clustered distribution (1000 Gaussian clusters on the sphere) is the one that resembles
clip embeddings and carries the target: p50 <= 2 ms and recall@10 >= 0.95 at 1M in <= 128
bytes/vector on 2 threads. In the uniform one, 512-d nearest neighbours are barely nearer
than anything else (all cosines ~0 +- 0.05), so approximate indexes cannot find them: its
rows show that worst case, not a tuning target.

    python bench/search.py --sizes 10000,100000 --dist clustered,uniform
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument
from indexer.faiss_index import (
    build_index,
    choose_index_type,
    default_candidates,
    ivf_pq_index_type,
    scores_are_exact,
    search_index,
    search_params,
)

THREADS = 2
CLUSTERS = 1000
#: Noise norm relative to the (unit) cluster centre, drawn per cluster: neighbours share a
#: cluster (cosine ~0.5-0.7) while unrelated points sit near cosine 0.
SPREAD_RANGE = (0.6, 1.0)
GENERATION_CHUNK = 100_000
WARMUP_QUERIES = 20


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Corpus:
    """Seeded unit vectors of one distribution; database and queries come from the same one."""

    def __init__(self, dist: str, dim: int, seed: int) -> None:
        self.dist = dist
        self.dim = dim
        self.rng = np.random.default_rng(seed)
        if dist == "clustered":
            self.centres = _normalise(self.rng.standard_normal((CLUSTERS, dim), dtype=np.float32))
            self.spread = self.rng.uniform(*SPREAD_RANGE, size=CLUSTERS).astype(np.float32)
        elif dist != "uniform":
            raise ValueError(f"unknown distribution {dist!r}; use clustered or uniform")

    def sample(self, n: int) -> np.ndarray:
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, GENERATION_CHUNK):
            size = min(GENERATION_CHUNK, n - start)
            block = self.rng.standard_normal((size, self.dim), dtype=np.float32)
            if self.dist == "clustered":
                labels = self.rng.integers(CLUSTERS, size=size)
                block *= (self.spread[labels] / np.sqrt(self.dim))[:, None]
                block += self.centres[labels]
            out[start : start + size] = _normalise(block)
        return out


@dataclass
class Candidate:
    """One index under test and how the benchmark searches it."""

    role: str
    index_type: str
    index: faiss.Index
    build_s: float
    rescore: bool
    candidates: int | None


def _serialised_bytes(index: faiss.Index, scratch: Path) -> int:
    path = scratch / "index.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def _float16_memmap(vectors: np.ndarray, scratch: Path) -> np.ndarray:
    path = scratch / "vectors.f16.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=vectors.shape)
    for start in range(0, len(vectors), GENERATION_CHUNK):
        out[start : start + GENERATION_CHUNK] = vectors[start : start + GENERATION_CHUNK]
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def _build(role: str, index_type: str, vectors: np.ndarray, args: argparse.Namespace) -> Candidate:
    start = time.perf_counter()
    index = build_index(vectors, index_type=index_type, use_gpu=False)
    build_s = time.perf_counter() - start
    if args.nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", args.nprobe)
    return Candidate(role, index_type, index, build_s, not scores_are_exact(index), args.candidates)


def _ms(times: dict[str, list[float]], role: str, percentile: float) -> float | None:
    return round(float(np.percentile(times[role], percentile)) * 1e3, 3) if role in times else None


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth))
    return hits / truth.size


def run_case(dist: str, n: int, args: argparse.Namespace, scratch: Path) -> list[dict]:
    corpus = Corpus(dist, args.dim, seed=args.seed)
    vectors = corpus.sample(n)
    queries = corpus.sample(args.queries + WARMUP_QUERIES)
    warmup, queries = queries[:WARMUP_QUERIES], queries[WARMUP_QUERIES:]
    rescore_vectors = _float16_memmap(vectors, scratch)

    auto_type = choose_index_type(n, args.dim, None)
    pq_type = ivf_pq_index_type(n, args.dim)
    if auto_type == pq_type:  # large corpora: the automatic choice is the IVF-PQ index
        plan = [("exact", "Flat"), ("auto=ivfpq_rescore", pq_type)]
    else:
        plan = [("exact", "Flat"), ("auto", auto_type), ("ivfpq_rescore", pq_type)]
    runs = [_build(role, index_type, vectors, args) for role, index_type in plan]
    del vectors

    def search(run: Candidate, q: np.ndarray) -> np.ndarray:
        vectors16 = rescore_vectors if run.rescore else None
        return search_index(run.index, q, args.k, rescore_vectors=vectors16, candidates=run.candidates)[1]

    for run in runs:
        for q in warmup:
            search(run, q[None])
    times = {run.role: [] for run in runs}
    found = {run.role: [] for run in runs}
    for q in queries:
        for run in runs:
            start = time.perf_counter()
            ids = search(run, q[None])
            times[run.role].append(time.perf_counter() - start)
            found[run.role].append(ids[0])

    # Interleaving with exact search (above) leaves caches and thread pools cold, as a server
    # sees them between queries; back to back (below) is the warm, busy-server case.
    back_to_back = {run.role: [] for run in runs if run.role != "exact"}
    for run in runs:
        if run.role == "exact":
            continue
        for q in queries:
            start = time.perf_counter()
            search(run, q[None])
            back_to_back[run.role].append(time.perf_counter() - start)

    truth = np.stack(found["exact"])
    exact_p50 = float(np.median(times["exact"]))
    rows = []
    for run in runs:
        ms = np.asarray(times[run.role]) * 1e3
        p50 = float(np.median(ms))
        rows.append(
            {
                "bench": "search",
                "dist": dist,
                "n": n,
                "dim": args.dim,
                "role": run.role,
                "index_type": run.index_type,
                "params": search_params(run.index),
                "rescore_candidates": (run.candidates or default_candidates(args.k)) if run.rescore else None,
                "build_s": round(run.build_s, 2),
                "bytes_per_vector": round(_serialised_bytes(run.index, scratch) / n, 1),
                "rescore_bytes_per_vector_on_disk": 2 * args.dim if run.rescore else 0,
                "p50_ms": round(p50, 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3),
                "min_ms": round(float(ms.min()), 3),
                "max_ms": round(float(ms.max()), 3),
                "back_to_back_p50_ms": _ms(back_to_back, run.role, 50),
                "back_to_back_p99_ms": _ms(back_to_back, run.role, 99),
                "speedup_vs_exact_p50": round(exact_p50 * 1e3 / p50, 1),
                f"recall_at_{args.k}": round(_recall(np.stack(found[run.role]), truth), 4),
                "queries": len(queries),
                "threads": THREADS,
            }
        )
    (scratch / "vectors.f16.npy").unlink()  # the memmap stays valid until it is dropped
    return rows


def _int_list(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=_int_list, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dist", default="clustered,uniform", help="comma list of clustered, uniform")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=None, help="override the IVF default")
    parser.add_argument("--candidates", type=int, default=None, help="override the re-scoring pool")
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "search")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    results = Recorder(args.output, append=args.append)
    with tempfile.TemporaryDirectory() as tmp:
        for dist in args.dist.split(","):
            for n in args.sizes:
                for row in run_case(dist, n, args, Path(tmp)):
                    results.add(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
