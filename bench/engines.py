"""Indexing throughput of the local engine vs the Ray engine on this machine, same corpus.

Both engines run the whole embed loop of :func:`indexer.jobs.run_index_job` (decode, encode,
label, commit parts) over the same clips with the same model; clips/s is
``JobSummary.clips_per_second`` (the embed loop only: model loading, planning and publishing
are excluded for both). Runs alternate (local, ray, local, ray, ...) and medians are compared,
as bench/PROTOCOL.md asks. One local Ray cluster (``--ray-cpus`` CPUs) is started once before
the runs; its start-up time is reported separately (``ray_start_s``), since a long job pays it
once. On one machine the ratio is the Ray overhead: scheduling, object-store copies of the
decoded clips, and one encoder actor instead of the main process.

    python bench/engines.py --clips 64 --reps 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument
from indexer.engines import make_engine
from indexer.jobs import JobSpec, run_index_job
from retrieval.data.synthetic import generate_corpus
from retrieval.models.retrieval_model import build_retrieval_model

THREADS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--size", type=int, default=128, help="frame size of the synthetic clips")
    parser.add_argument("--video-model", default="videomamba_demo")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="local engine: DataLoader decoding processes")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--ray-cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=2)
    add_output_argument(parser, "engines")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    import ray

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate_corpus(tmp / "corpus", n_train=1, n_test=args.clips, size=args.size, long_videos=0, progress=False)
        videos = tmp / "corpus" / "videos" / "test"
        model_dir = build_retrieval_model(args.video_model, embed_dim=256, num_fusion_layers=2).save(tmp / "model")
        started = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        ray_start_s = time.perf_counter() - started
        rates: dict[str, list[float]] = {"local": [], "ray": []}
        options = {"ray": {"cpus_per_actor": args.ray_cpus_per_actor}, "local": {}}
        for rep in range(args.reps):
            for name in ("local", "ray"):
                spec = JobSpec(model_dir=model_dir, out=tmp / f"{name}{rep}", videos=videos)
                with make_engine(name, **options[name]) as engine:
                    summary = run_index_job(spec, workers=args.workers, batch_size=args.batch_size, progress=False,
                                            engine=engine)
                rates[name].append(summary.clips_per_second)
        ray.shutdown()

    local, on_ray = statistics.median(rates["local"]), statistics.median(rates["ray"])
    Recorder(args.output, append=args.append).add({
        "bench": "engines", "video_model": args.video_model, "clips": args.clips, "frame_size": args.size,
        "batch_size": args.batch_size, "threads": THREADS, "local_workers": args.workers, "ray_cpus": args.ray_cpus,
        "ray_cpus_per_actor": args.ray_cpus_per_actor, "reps": args.reps,
        "local_clips_per_s": round(local, 2), "local_min_max": [round(min(rates["local"]), 2),
                                                               round(max(rates["local"]), 2)],
        "ray_clips_per_s": round(on_ray, 2), "ray_min_max": [round(min(rates["ray"]), 2), round(max(rates["ray"]), 2)],
        "ray_over_local": round(on_ray / local, 3), "ray_start_s": round(ray_start_s, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
