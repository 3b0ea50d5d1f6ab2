"""Export benchmark: ``vtr index export`` of a large index in bounded memory.

Writes a synthetic index straight into the on-disk format (unit vectors as float16, an items
file with a path, captions, five labels, a probed duration and two annotation fields per item,
and a tiny ``PQ8x8`` FAISS index so that opening it costs no memory worth counting), then exports
it in each format in a fresh process and reports that process's peak RSS and the rows per
second. Target: 1M x 512 with peak RSS < 512 MB.

    python bench/export.py --n 1000000 --dim 512
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.record import Recorder, add_output_argument
from indexer.store import FAILURES_FILE, INDEX_FILE, ITEMS_FILE, VECTORS_FILE, publish_version

CHUNK = 50_000
LABELS = ("moving up", "moving down", "moving left", "moving right", "rotating", "growing", "shrinking")


def write_synthetic_index(out: Path, n: int, dim: int, seed: int = 0) -> Path:
    """A published index of ``n`` random unit vectors with realistic item metadata."""
    rng = np.random.default_rng(seed)

    def fill(staged: Path) -> dict:
        index = faiss.index_factory(dim, "PQ8x8", faiss.METRIC_INNER_PRODUCT)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                  "shape": (n, dim)}
        with open(staged / VECTORS_FILE, "wb") as vf, open(staged / ITEMS_FILE, "w", encoding="utf-8") as jf:
            np.lib.format.write_array_header_1_0(vf, header)
            for start in range(0, n, CHUNK):
                size = min(CHUNK, n - start)
                block = rng.standard_normal((size, dim), dtype=np.float32)
                block /= np.linalg.norm(block, axis=1, keepdims=True)
                if not index.is_trained:  # a rough quantizer: the export never searches it
                    index.pq.cp.niter = 4
                    index.train(block[: min(size, 2_560)])
                index.add(block)
                vf.write(block.astype(np.float16).tobytes())
                for row in range(start, start + size):
                    labels = [[LABELS[(row + j) % len(LABELS)], round(0.5 / (j + 1), 6)] for j in range(5)]
                    jf.write(json.dumps({
                        "id": row, "path": f"/data/corpus/folder{row % 100:02d}/video{row:07d}.mp4",
                        "start": None, "end": None, "captions": [f"a caption of clip {row}"], "labels": labels,
                        "extra": {"key": f"folder{row % 100:02d}/video{row:07d}.mp4", "duration": 10.0 + row % 50,
                                  "meta": {"source": f"source{row % 100}", "rating": row % 5}},
                    }) + "\n")
        faiss.write_index(index, str(staged / INDEX_FILE))
        (staged / FAILURES_FILE).write_text("")
        return {"format": "vtr-index", "format_version": 1, "model": {"name": "synthetic", "weights_sha256": "0"},
                "dim": dim, "metric": "ip", "index_type": "PQ8x8", "faiss_params": {},
                "counts": {"items": n, "failed": 0, "skipped": 0}, "corpus_roots": ["/data/corpus"],
                "created": "", "code_version": "bench", "extra": {}}

    return publish_version(out, fill)


def export_in_child(index: Path, out: Path, fmt: str) -> dict:
    """Run the export in a fresh process; its wall time and its own peak RSS (VmHWM, which exec
    resets; ru_maxrss would carry over the parent's)."""
    code = ("import sys; from indexer.export import export_index; "
            "export_index(sys.argv[1], sys.argv[2], sys.argv[3]); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(index), str(out), fmt], check=True, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak_kb = int(done.stdout.split()[-1])
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1), "bytes_written": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--formats", default="parquet,npy")
    parser.add_argument("--scratch", type=Path, default=None, help="where the index and exports go (temporary)")
    parser.add_argument("--index", type=Path, default=None, help="export this index (e.g. one an earlier run "
                        "wrote, kept with cp -al) instead of writing a synthetic one")
    parser.add_argument("--note", default="", help="e.g. 'machine shared with other jobs'")
    add_output_argument(parser, "export")
    args = parser.parse_args(argv)
    results = Recorder(args.output, append=args.append)
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        index = args.index or write_synthetic_index(scratch / "index", args.n, args.dim)
        write_s = time.perf_counter() - started
        for fmt in args.formats.split(","):
            measured = export_in_child(index, scratch / f"export-{fmt}", fmt)
            results.add({"bench": "export", "format": fmt, "n": args.n, "dim": args.dim,
                         "rows_per_s": round(args.n / measured["seconds"]), **measured,
                         "index_write_s": round(write_s, 1), "note": args.note})
    return 0


if __name__ == "__main__":
    sys.exit(main())
