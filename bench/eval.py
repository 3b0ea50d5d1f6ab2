"""Evaluation throughput: clips/s of decode + encode (``embed_corpus``) against encode-only.

On a synthetic corpus and a randomly initialised model (weights do not change the cost), each
repetition times, back to back (A B C A B C ...):

* ``decode``: iterating the clip loader alone, in process (decord/PyAV + resize + normalise);
* ``encode``: ``encode_video`` over the same clips, already decoded and held in memory;
* ``embed_workersK``: ``embed_corpus`` as the evaluation runs it, decoding in K processes.

``embed_over_encode_only`` is the share of encode-only throughput the full pipeline keeps;
``overlap`` = embed clips/s over the serial bound 1 / (1/decode + 1/encode): above 1 means the
loader workers hide part of the decoding behind encoding. Prints one JSON object and exits 0.

    python bench/eval.py --model videomamba_demo --clips 32 --workers 0,1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument
from retrieval.data.corpora import load_corpus
from retrieval.data.loader import iter_clip_batches
from retrieval.data.synthetic import generate_corpus
from retrieval.data.video import Preprocess
from retrieval.eval.retrieval import embed_corpus
from retrieval.models.device import evaluating
from retrieval.models.retrieval_model import build_retrieval_model


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _summary(seconds: list[float], clips: int) -> dict[str, float]:
    rates = [clips / s for s in seconds]
    return {"median": round(statistics.median(rates), 2), "min": round(min(rates), 2),
            "max": round(max(rates), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="videomamba_demo", help="registered video architecture")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--size", type=int, default=96, help="frame side of the synthetic videos (px)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,1", help="comma-separated loader worker counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores)")
    add_output_argument(parser, "eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_retrieval_model(args.model, num_fusion_layers=1, with_mlm=False).eval()

    with tempfile.TemporaryDirectory() as tmp:
        generate_corpus(tmp, n_train=1, n_test=args.clips, seed=0, size=args.size, long_videos=0, progress=False)
        corpus = load_corpus("generic", Path(tmp) / "test.json", Path(tmp) / "videos")
        preprocess = Preprocess.for_model(model, corpus)
        batches = [b.clips for b in iter_clip_batches(corpus, preprocess, args.batch_size) if b.clips is not None]

        def encode_only() -> None:
            with evaluating(model):
                for clips in batches:
                    model.encode_video(clips)

        def decode_only() -> None:
            for _ in iter_clip_batches(corpus, preprocess, args.batch_size):
                pass

        def embed(workers: int) -> Callable[[], object]:
            return lambda: embed_corpus(model, corpus, args.batch_size, workers, progress=False)

        worker_counts = [int(w) for w in args.workers.split(",")]
        runs = {"decode": decode_only, "encode": encode_only,
                **{f"embed_workers{w}": embed(w) for w in worker_counts}}
        encode_only()  # warm-up: first-call allocations and kernel selection
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(_time(fn))
        rates = {name: _summary(seconds, args.clips) for name, seconds in times.items()}
        serial = 1.0 / (1.0 / rates["decode"]["median"] + 1.0 / rates["encode"]["median"])
        embed_rates = {f"workers{w}": rates[f"embed_workers{w}"]["median"] for w in worker_counts}
        Recorder(args.output, append=args.append).add({"bench": "eval", "model": args.model, "clips": args.clips, "size": args.size,
                          "frames": preprocess.num_frames, "input_px": preprocess.size,
                          "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
                          "clips_per_s": rates, "serial_bound": round(serial, 2),
                          "embed_over_encode_only": {k: round(v / rates["encode"]["median"], 3)
                                                     for k, v in embed_rates.items()},
                          "overlap": {k: round(v / serial, 3) for k, v in embed_rates.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
