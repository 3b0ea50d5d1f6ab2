"""Indexing throughput: the whole job loop vs the model alone on the same clips.

``end_to_end`` is :func:`indexer.jobs.run_index_job`'s decode + encode + label + part-writing
loop (``JobSummary.embed_seconds``: DataLoader workers decode while the main process encodes).
``encode_only`` runs the same model calls (encode, clip vector, top-5 labels) on the same
clips, decoded beforehand into memory, in the same batches. Their ratio says how much of the
decoding and writing the pipeline hides behind encoding; the target is >= 0.9. Runs alternate
(end-to-end, encode-only, ...) and the medians are compared, as bench/PROTOCOL.md asks.

Two models, random weights (they encode exactly as fast as trained ones): the demo's
(``videomamba_demo``: 8 frames of 64x64, ~40 ms per clip, so decoding a clip costs about as much
as encoding it and two cores cannot hide it) and VideoMamba-Ti at 224 px (~0.3 s per clip, the
size a real index uses); the clips are the synthetic
corpus's test split (128x128 h264, 3 s; decord reads 128 px but fails on 96 px and falls back to PyAV).

    python bench/index.py --clips 64 --workers 2 --batch-size 16 --video-models videomamba_demo
"""
from __future__ import annotations

import argparse
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
from indexer.jobs import JobSpec, run_index_job
from retrieval.data.synthetic import generate_corpus
from retrieval.data.video import Preprocess, load_clip
from retrieval.labels import load_labels
from retrieval.models.actions import ActionClassifier
from retrieval.models.model_dir import load_model
from retrieval.models.retrieval_model import build_retrieval_model

THREADS = 2
TARGET_RATIO = 0.9


def _encode_only(model: torch.nn.Module, classifier: ActionClassifier, clips: list[torch.Tensor],
                 batch_size: int) -> float:
    """Seconds to encode and label pre-decoded ``clips`` exactly as the job does."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(clips), batch_size):
            feat = model.encode_video(torch.stack(clips[start:start + batch_size]))["feat"]
            model.clip_vector(feat).float().numpy()
            classifier.predict(feat, top=5)
    return time.perf_counter() - started


def _measure(video_model: str, args: argparse.Namespace) -> dict:
    """End-to-end and encode-only clips/s of one model, alternating, medians compared."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate_corpus(tmp / "corpus", n_train=1, n_test=args.clips, size=args.size, long_videos=0, progress=False)
        videos = tmp / "corpus" / "videos" / "test"
        model_dir = build_retrieval_model(video_model, embed_dim=256, num_fusion_layers=2).save(tmp / "model")
        model = load_model(model_dir)
        classifier = ActionClassifier(model, load_labels("synthetic"))
        preprocess = Preprocess.for_model(model)
        clips = [load_clip(path, preprocess) for path in sorted(videos.glob("*.mp4"))]
        _encode_only(model, classifier, clips[: args.batch_size], args.batch_size)  # warm-up

        end_to_end, encode_only = [], []
        for rep in range(args.reps):
            spec = JobSpec(model_dir=model_dir, out=tmp / f"index{rep}", videos=videos)
            summary = run_index_job(spec, workers=args.workers, batch_size=args.batch_size, progress=False)
            end_to_end.append(summary.indexed / summary.embed_seconds)
            encode_only.append(len(clips) / _encode_only(model, classifier, clips, args.batch_size))

    ratio = statistics.median(end_to_end) / statistics.median(encode_only)
    result = {
        "bench": "index", "video_model": video_model, "clips": len(clips), "frame_size": args.size,
        "batch_size": args.batch_size, "workers": args.workers, "threads": THREADS, "reps": args.reps,
        "end_to_end_clips_per_s": round(statistics.median(end_to_end), 2),
        "end_to_end_min_max": [round(min(end_to_end), 2), round(max(end_to_end), 2)],
        "encode_only_clips_per_s": round(statistics.median(encode_only), 2),
        "encode_only_min_max": [round(min(encode_only), 2), round(max(encode_only), 2)],
        "ratio": round(ratio, 3), "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64, help="clips in the corpus")
    parser.add_argument("--size", type=int, default=128, help="frame size of the synthetic clips")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of each measurement")
    parser.add_argument("--video-models", default="videomamba_demo,videomamba_tiny",
                        help="comma-separated registered video architectures, one result line each")
    add_output_argument(parser, "index")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    results = Recorder(args.output, append=args.append)
    for name in args.video_models.split(","):
        results.add(_measure(name, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
