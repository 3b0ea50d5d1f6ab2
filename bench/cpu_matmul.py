"""oneDNN's fp32 inner product against torch's own (MKL) on this CPU, timed in turns in one process.

``retrieval.models.layers.linear`` (the mixer's in_proj / x_proj / out_proj, the joint ViT's and
TimeSformer's linears) runs large fp32 CPU inference products on oneDNN where
``retrieval.models.device.cpu_matmul_backend`` chose it (``VTR_CPU_MATMUL``, default ``auto``:
oneDNN on x86 CPUs with AVX-512 that are not Intel's, where MKL runs its AVX2 code). This measures
what that choice is worth here, ``torch.set_num_threads(2)``:

* ``choice`` line: the CPU vendor and flags and what ``auto`` picks;
* ``product`` lines: the products of VideoMamba-Ti/S/M's mixer (in_proj, x_proj, out_proj) at 8
  frames and of Ti at 64 frames, and of the joint space-time ViT-Ti at 64 frames (qkv, proj, fc1,
  fc2), 224 px: ``F.linear`` and oneDNN alternating, median seconds, GFLOP/s, ``speedup``
  (torch / oneDNN) and the max abs difference of the two outputs relative to the output's scale;
* ``model`` lines: whole forwards under ``cpu_matmul("torch")`` and ``cpu_matmul("onednn")`` in
  turns (``--models NAME:FRAMES ...``, default VideoMamba-Ti at 8 and 64 frames; ``joint_vit_ti:64``
  takes ~10 s per forward), with the max abs difference of the pooled features.

    python bench/cpu_matmul.py [--rounds 7] [--models videomamba_tiny:64 joint_vit_ti:64] [--no-products]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from bench.record import Recorder, add_output_argument
from retrieval.models.device import (
    choose_cpu_matmul,
    cpu_flags,
    cpu_matmul,
    cpu_vendor,
    onednn_linear_available,
)
from retrieval.models.layers import onednn_linear

THREADS = 2
PATCHES = 196   # 224 px, 16 px patches


def mixer_products(d_model: int, frames: int) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of one VideoMamba mixer at ``frames`` x 224 (expand 2, d_state 16)."""
    L, E = 1 + PATCHES * frames, 2 * d_model
    R = -(-d_model // 16)
    return [("in_proj", L, d_model, 2 * E), ("x_proj", L, E, R + 32), ("out_proj", L, E, d_model)]


def vit_products(dim: int, frames: int) -> list[tuple[str, int, int, int]]:
    L = 1 + PATCHES * frames
    return [("qkv", L, dim, 3 * dim), ("proj", L, dim, dim), ("fc1", L, dim, 4 * dim), ("fc2", L, 4 * dim, dim)]


def reserve_heap(nbytes: int) -> None:
    """Grow the heap by ``nbytes`` once and free it again (kept, with keep_freed_memory), so that the
    products' large outputs (38 MB at 64 frames) reuse memory as they do inside a forward pass,
    where earlier frees leave room: above glibc's 32 MiB mmap threshold a fresh output is otherwise
    mapped anew on every call and its ~9,400 page faults are timed with the product."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_MMAP_MAX = -4
    mallopt(M_MMAP_MAX, 0)
    try:
        torch.zeros(nbytes // 4)
    finally:
        mallopt(M_MMAP_MAX, 65536)


def _alternate(fns: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():       # warm-up: first-touch allocations, primitive creation
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def product_rows(rounds: int):
    sets = [("videomamba_tiny", 8, mixer_products(192, 8)), ("videomamba_small", 8, mixer_products(384, 8)),
            ("videomamba_middle", 8, mixer_products(576, 8)), ("videomamba_tiny", 64, mixer_products(192, 64)),
            ("joint_vit_ti", 64, vit_products(192, 64))]
    g = torch.Generator().manual_seed(0)
    for model, frames, products in sets:
        for name, M, K, N in products:
            x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * K ** -0.5
            with torch.inference_mode():
                ref = F.linear(x, w)
                other = onednn_linear(x, w)
                diff = ((ref - other).abs().max() / ref.abs().max()).item()
                times = _alternate({"torch": lambda x=x, w=w: F.linear(x, w),
                                    "onednn": lambda x=x, w=w: onednn_linear(x, w)},
                                   rounds)
            med = {k: statistics.median(v) for k, v in times.items()}
            flop = 2 * M * K * N
            yield {"bench": "cpu_matmul_product", "model": model, "frames": frames, "product": name,
                   "M": M, "K": K, "N": N, "rounds": rounds,
                   "torch_s": float(f"{med['torch']:.4g}"), "onednn_s": float(f"{med['onednn']:.4g}"),
                   "torch_gflops": round(flop / med["torch"] / 1e9, 1),
                   "onednn_gflops": round(flop / med["onednn"] / 1e9, 1),
                   "speedup": round(med["torch"] / med["onednn"], 3), "max_rel_diff": float(f"{diff:.2e}"),
                   "load_avg_1min": round(os.getloadavg()[0], 2)}


def model_rows(configs: list[tuple[str, int]], rounds: int):
    from retrieval.models.registry import create_model

    for name, frames in configs:
        torch.manual_seed(0)
        model = create_model(name, num_frames=frames, img_size=224).eval()
        video = torch.randn(1, 3, frames, 224, 224)
        outputs = {}

        def forward(spec, model=model, video=video, outputs=outputs):
            def run():
                with torch.inference_mode(), cpu_matmul(spec):
                    outputs[spec] = model(video)["pooled"]
            return run

        load_before = os.getloadavg()[0]
        times = _alternate({"torch": forward("torch"), "onednn": forward("onednn")}, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        yield {"bench": "cpu_matmul_model", "model": name, "frames": frames, "img_size": 224, "rounds": rounds,
               "torch_s": round(med["torch"], 4), "onednn_s": round(med["onednn"], 4),
               "speedup": round(med["torch"] / med["onednn"], 3),
               "max_abs_diff_pooled": float(f"{(outputs['torch'] - outputs['onednn']).abs().max().item():.2e}"),
               "load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", nargs="*", metavar="NAME:FRAMES", default=["videomamba_tiny:8", "videomamba_tiny:64"],
                        help="whole forwards to time (none: products only)")
    parser.add_argument("--no-products", action="store_true", help="whole forwards only")
    add_output_argument(parser, "cpu_matmul")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    torch.set_num_threads(THREADS)
    from retrieval.runtime import keep_freed_memory

    keep_freed_memory()
    reserve_heap(256 << 20)
    results = Recorder(args.output, append=args.append)
    if not onednn_linear_available():
        print("this torch build has no oneDNN linear: nothing to compare", file=sys.stderr)
        return 1
    flags = cpu_flags()
    results.add({"bench": "cpu_matmul_choice", "vendor": cpu_vendor(),
                 "avx512": sorted(f for f in flags if f.startswith("avx512")),
                 "auto": choose_cpu_matmul("auto", flags, cpu_vendor(), True)})
    if not args.no_products:
        for row in product_rows(args.rounds):
            results.add(row)
    configs = [(name, int(frames or 8)) for name, _, frames in (m.partition(":") for m in args.models)]
    for row in model_rows(configs, args.rounds):
        results.add(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
