"""Publishing a large index: the on-disk build vs today's in-RAM build, memory, speed, recall.

Writes ``--n`` clustered unit vectors of width ``--dim`` (the distribution of bench/search.py:
1000 Gaussian clusters on the sphere) as the committed parts of an indexing job, as
``vtr index`` leaves them, then publishes that job twice, each in its own child process:

* ``ondisk``: :func:`indexer.publish.publish_job` on disk (what ``vtr index merge`` does above
  200k vectors): IVF-PQ trained on samples, vectors encoded block by block, inverted lists
  merged into ``index.ivfdata`` on disk;
* ``in_ram``: the path below the threshold, forced: every part's vectors joined in one array,
  the same IVF-PQ type built over it in memory.

Then each published index is opened by a serving child process that answers ``--queries``
single-vector queries (``IndexReader.search``, k=10, with the exact float16 re-scoring) after
a warm-up. Each child reports its own peak memory, one configuration per child as
bench/PROTOCOL.md asks: ``*_peak_rss_mb`` is VmHWM (every resident page, including the pages
of memory-mapped files it touched: page cache, shared and reclaimable), ``*_peak_anon_mb`` the
peak of RssAnon (memory the process itself holds). A server's queries touch scattered rows of
the float16 vectors, so its VmHWM grows with the number of distinct rows read while its own
memory stays flat; the serving target is checked against the latter. Recall@10 is against exact search over
all vectors. The serving children never import torch.

Targets (issue 15) for 1M x 512: merge peak RSS < 512 MB (a quarter of the float32 vectors),
serving RSS < 300 MB, recall@10 >= 0.95, p50 <= 3 ms.

    python bench/index_build.py --n 1000000          # once, heavy: ~2 GB of parts on disk
    python bench/index_build.py --n 100000 --output /tmp/x.jsonl   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from bench.record import Recorder, add_output_argument
WARMUP_QUERIES = 20
TARGETS = {"merge_peak_rss_mb": 512, "serve_peak_rss_mb": 300, "recall_at_10": 0.95, "p50_ms": 3.0}


# ---------------------------------------------------------------------------------- children


class _Memory:
    """Peak resident memory of this process: VmHWM (all resident pages, including pages of
    memory-mapped files) and the peak of RssAnon (the process's own memory, sampled every 20 ms;
    page-cache pages of mapped files are shared and reclaimable, and are not in it)."""

    def __init__(self) -> None:
        import threading

        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("Vm", "Rss"))}

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_anon = max(self.peak_anon, self._status()["RssAnon"])

    def report(self, prefix: str) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        status = self._status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        return {f"{prefix}_peak_rss_mb": round(status["VmHWM"] / 1024),
                f"{prefix}_peak_anon_mb": round(self.peak_anon / 1024)}


def _child_build(out: Path, in_ram: bool) -> dict:
    memory = _Memory()
    from indexer import ondisk, publish

    # forced either way, so that sizes below the automatic threshold compare the two paths too
    ondisk.ONDISK_MIN_VECTORS = 1 << 62 if in_ram else 0  # in RAM: the vectors joined in one array
    started = time.perf_counter()
    publish.publish_job(out)  # what `vtr index merge` runs
    seconds = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    return {"build_s": round(seconds, 1), "index_type": manifest["index_type"],
            "storage": manifest.get("storage", "memory"), "torch_loaded": "torch" in sys.modules,
            **memory.report("merge")}


def _child_serve(out: Path, queries_file: Path, truth_file: Path) -> dict:
    memory = _Memory()
    from indexer.store import open_index

    started = time.perf_counter()
    reader = open_index(out)
    open_s = time.perf_counter() - started
    queries, truth = np.load(queries_file), np.load(truth_file)
    for query in queries[:WARMUP_QUERIES]:
        reader.search(query, k=10)
    times, found = [], []
    for query in queries[WARMUP_QUERIES:]:
        started = time.perf_counter()
        hits = reader.search(query, k=10)[0]
        times.append(time.perf_counter() - started)
        found.append([item["id"] for item, _ in hits])
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    ms = np.asarray(times) * 1e3
    return {"open_s": round(open_s, 2), "recall_at_10": round(float(recall), 4),
            "p50_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "torch_loaded": "torch" in sys.modules, **memory.report("serve")}


def _run_child(args: list[str]) -> dict:
    """Run this script as a child and return its JSON answer. (The child reports its own peak
    memory: ``ru_maxrss`` from ``wait4`` would start from this parent's size at fork.)"""
    result = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, cwd=REPO, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- the corpus


def _write_job(out: Path, n: int, dim: int, part_rows: int, seed: int, queries: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Commit the parts of a finished job holding ``n`` vectors; return queries and exact top 10."""
    from bench.search import Corpus
    from indexer.parts import WorkDir, work_dir_for

    corpus = Corpus("clustered", dim, seed=seed)
    query_vectors = corpus.sample(queries + WARMUP_QUERIES)
    measured = query_vectors[WARMUP_QUERIES:]
    best_scores = np.full((len(measured), 10), -np.inf, dtype=np.float32)
    best_ids = np.full((len(measured), 10), -1, dtype=np.int64)
    work = WorkDir(work_dir_for(out))
    work.parts_dir.mkdir(parents=True)
    num_parts = -(-n // part_rows)
    work.job_file.write_text(json.dumps({
        "num_parts": num_parts, "videos_root": "/corpus", "model": {"name": "bench", "weights_sha256": "0" * 64},
        "index_type": None, "max_memory_bytes": None, "model_dir": "/model", "dataset": "generic",
        "ann_file": None, "window": None, "stride": None, "label_set": "synthetic", "channels": {"visual": {}},
        "removed": []}))
    for part in range(num_parts):
        first = part * part_rows
        vectors = corpus.sample(min(part_rows, n - first))
        items = [{"path": f"clips/{row:07d}.mp4", "start": None, "end": None, "captions": [],
                  "labels": [["label", 0.5]], "extra": {"key": f"clips/{row:07d}.mp4"}}
                 for row in range(first, first + len(vectors))]
        work.commit_part(part, vectors, {"part": part, "items": items, "failures": [], "num_vectors": len(items)})
        scores = measured @ vectors.T
        top = np.argpartition(-scores, 9, axis=1)[:, :10]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + first], axis=1)
        order = np.argsort(-merged_scores, axis=1)[:, :10]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_ids = np.take_along_axis(merged_ids, order, 1)
    return query_vectors, best_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--part-rows", type=int, default=10_000, help="vectors per committed part")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="ondisk,in_ram")
    parser.add_argument("--scratch", type=Path, default=None, help="where the parts and indexes go (default: a "
                        "temporary directory)")
    parser.add_argument("--reuse", type=Path, default=None, help="a folder with source.work, queries.npy and "
                        "truth.npy of an earlier run (with the same --n/--dim/--seed): skip writing the parts")
    add_output_argument(parser, "index_build")
    parser.add_argument("--child", choices=["build", "serve"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-ram", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--truth-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "build":
        print(json.dumps(_child_build(args.out, args.in_ram)))
        return 0
    if args.child == "serve":
        print(json.dumps(_child_serve(args.out, args.queries_file, args.truth_file)))
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="vtr-index-build-", dir=args.scratch))
    try:
        started = time.perf_counter()
        if args.reuse is not None:
            source = args.reuse / "source"
            for name in ("queries.npy", "truth.npy"):
                shutil.copy(args.reuse / name, scratch / name)
            write_s = None
        else:
            source = scratch / "source"
            queries, truth = _write_job(source, args.n, args.dim, args.part_rows, args.seed, args.queries)
            write_s = round(time.perf_counter() - started, 1)
            np.save(scratch / "queries.npy", queries)
            np.save(scratch / "truth.npy", truth)
        results = Recorder(args.output, append=args.append)
        for mode in args.modes.split(","):
            out = scratch / mode
            # hard links: each build consumes (deletes) its own copy of the work directory
            shutil.copytree(Path(f"{source}.work"), Path(f"{out}.work"), copy_function=os.link)
            built = _run_child(["--child", "build", "--out", str(out)] + (["--in-ram"] if mode == "in_ram" else []))
            served = _run_child(["--child", "serve", "--out", str(out), "--queries-file",
                                            str(scratch / "queries.npy"), "--truth-file", str(scratch / "truth.npy")])
            row = {"bench": "index_build", "mode": mode, "n": args.n, "dim": args.dim, "part_rows": args.part_rows,
                   "queries": args.queries, "write_parts_s": write_s, **built,
                   "float32_vectors_mb": round(args.n * args.dim * 4 / 2**20), **served}
            row["meets_targets"] = (row["merge_peak_rss_mb"] < TARGETS["merge_peak_rss_mb"]
                                    and row["serve_peak_anon_mb"] < TARGETS["serve_peak_rss_mb"]
                                    and row["recall_at_10"] >= TARGETS["recall_at_10"]
                                    and row["p50_ms"] <= TARGETS["p50_ms"])
            results.add(row)
            shutil.rmtree(out.parent / f".{out.name}.v1", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
