"""ITM re-rank at the official protocol's real size: seconds per caption and MSRVTT-1k projection.

The matching head of the official recipe: BERT-base fusion layers (768 wide, 12 heads, MLP
3072; the top 3 layers of bert-base-uncased with cross-attention) over VideoMamba-M's patch tokens
(1 + 8 x 196 = 1569 tokens of width 576), captions of 20 tokens, fp32 (``--precision bf16``: under
bf16 autocast, as ``vtr eval --precision bf16`` runs), random weights (BERT's initialisation). Text layers below the fusion layers take no part in re-ranking and are not built.

Two paths, timed alternately in one process (warm-up first, median of ``--repeats``):

* ``reference``: :func:`retrieval.eval.rerank.match_scores_reference`, i.e. ``match_score`` on
  batches of 32 pairs, each pass projecting its video's tokens to keys and values again;
* ``shared``: :class:`retrieval.eval.rerank.PairScorer`, what ``vtr eval`` runs: keys and values
  once per video, the caption part once per caption, the pairs of one video in one batch.

The shared path's workload has MSRVTT-1k's sharing: in the t2v re-rank at k = 128 each of the
1,000 videos sits in 128 captions' top 128 on average, so the bench scores ``--captions`` (128)
captions against each of ``--videos`` (8) videos and charges the keys/values of those videos to
those pairs. ``s_per_caption`` = seconds per pair x k; ``projected_t2v_min`` = seconds per pair x
1,000 x 128 / 60 (v2t is as much again; ``vtr eval`` scores a pair both directions share once).
The machine is shared, so wall times swing with other load; the ``*_from_cpu`` figures use the
process's CPU seconds divided by the thread count instead (what the wall time is with the cores
to itself), and the speedup is reported both ways.

Equality: the first ``--ref-pairs`` pairs are scored by both paths; ``max_abs_diff`` is reported.

    python bench/rerank.py [--captions 128 --videos 8 --ref-pairs 64 --repeats 3] [--precision bf16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument
from retrieval.eval.rerank import PairScorer, match_scores_reference
from retrieval.models.device import cpu_has_native_bf16
from retrieval.models.retrieval_model import RetrievalModel
from retrieval.models.text import TextEncoder

VIDEO_TOKENS, VIDEO_WIDTH, TEXT_TOKENS, FUSION_LAYERS = 1 + 8 * 196, 576, 20, 3
MSRVTT_CAPTIONS = 1000


class _VideoWidth(nn.Module):
    """Stands in for VideoMamba-M: the matching head only sees its tokens' width."""

    embed_dim = VIDEO_WIDTH


def build_model() -> RetrievalModel:
    config = BertConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=1 + FUSION_LAYERS,
                        num_attention_heads=12, intermediate_size=3072)
    text = TextEncoder.from_config(config, fusion_layer=1, encoder_width=VIDEO_WIDTH)
    return RetrievalModel(_VideoWidth(), text, embed_dim=256).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=128, help="captions per video (MSRVTT-1k t2v: 128)")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--ref-pairs", type=int, default=64, help="pairs per reference timing (batches of 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: both paths under CPU bf16 autocast (vtr eval --precision bf16)")
    add_output_argument(parser, "rerank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model()
    generator = torch.Generator().manual_seed(1)
    # stored as vtr eval stores them: tokens and caption states (trimmed to length) in the run's
    # precision, float32 for fp32 and float16 under bf16 (both are scored in float32 or autocast)
    store = torch.float16 if args.precision == "bf16" else torch.float32
    tokens = torch.randn(args.videos, VIDEO_TOKENS, VIDEO_WIDTH, generator=generator).to(store)
    hidden = [torch.randn(TEXT_TOKENS, 768, generator=generator).to(store) for _ in range(args.captions)]
    videos = torch.arange(args.videos).repeat_interleave(args.captions).numpy()  # video-major, 128 each
    texts = torch.arange(args.captions).repeat(args.videos).numpy()
    ref_v, ref_t = videos[::max(1, len(videos) // args.ref_pairs)][:args.ref_pairs], None
    ref_t = texts[::max(1, len(texts) // args.ref_pairs)][:args.ref_pairs]

    def reference() -> torch.Tensor:
        return match_scores_reference(model, tokens, hidden, ref_v, ref_t, batch=32)

    def shared() -> torch.Tensor:  # a fresh scorer: caption parts are recomputed and charged too
        return PairScorer(model, tokens, hidden).score(videos, texts)

    times: dict[str, list[float]] = {"reference": [], "shared": []}
    cpu: dict[str, list[float]] = {"reference": [], "shared": []}
    bf16 = args.precision == "bf16"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref_scores = reference()  # warm-up
        all_scores = shared()
        index = {(int(v), int(t)): i for i, (v, t) in enumerate(zip(videos, texts, strict=True))}
        fast_scores = all_scores[[index[(int(v), int(t))] for v, t in zip(ref_v, ref_t, strict=True)]]
        for _ in range(args.repeats):
            for name, fn in (("reference", reference), ("shared", shared)):
                started, cpu_started = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)

    pairs = {"reference": len(ref_v), "shared": len(videos)}
    per_pair = {name: statistics.median(t) / pairs[name] for name, t in times.items()}
    # CPU seconds / threads: what the wall time would be with the cores to itself (the machine is shared)
    per_pair_cpu = {name: statistics.median(t) / pairs[name] / args.threads for name, t in cpu.items()}
    diff = (fast_scores - ref_scores).abs().max().item()
    results = Recorder(args.output, append=args.append)
    for name in ("reference", "shared"):
        results.add({
            "bench": "rerank", "path": name, "threads": args.threads,
            "dtype": "bfloat16 (autocast)" if bf16 else "float32", "cpu_native_bf16": cpu_has_native_bf16(),
            "video_tokens": VIDEO_TOKENS, "video_width": VIDEO_WIDTH, "text_tokens": TEXT_TOKENS,
            "fusion_layers": FUSION_LAYERS, "pairs_timed": pairs[name],
            "captions_per_video": args.captions if name == "shared" else 1,
            "ms_per_pair": round(1e3 * per_pair[name], 3),
            "min_s": round(min(times[name]), 3), "max_s": round(max(times[name]), 3),
            "s_per_caption": round(per_pair[name] * args.k, 3),
            "projected_t2v_min": round(per_pair[name] * MSRVTT_CAPTIONS * args.k / 60, 2),
            "cpu_ms_per_pair_per_thread": round(1e3 * per_pair_cpu[name], 3),
            "projected_t2v_min_from_cpu": round(per_pair_cpu[name] * MSRVTT_CAPTIONS * args.k / 60, 2),
        })
    results.add({"bench": "rerank", "summary": True, "k": args.k, "precision": args.precision,
                      "speedup": round(per_pair["reference"] / per_pair["shared"], 2),
                      "speedup_cpu": round(per_pair_cpu["reference"] / per_pair_cpu["shared"], 2),
                      "max_abs_diff": diff, "score_scale": round(ref_scores.abs().max().item(), 4),
                      "target_t2v_min": 15.0,
                      "meets_target": per_pair["shared"] * MSRVTT_CAPTIONS * args.k / 60 <= 15.0,
                      "meets_target_from_cpu": per_pair_cpu["shared"] * MSRVTT_CAPTIONS * args.k / 60 <= 15.0})


if __name__ == "__main__":
    main()
