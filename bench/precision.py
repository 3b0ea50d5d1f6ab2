"""bf16 against fp32 on this CPU: feature fidelity and forward speed against the matmul floor.

One process, ``torch.set_num_threads(2)``:

* ``matmul`` line: 2048^3 products in fp32 and bf16, alternating (A B A B), median GFLOP/s, with
  the CPU's bf16 flags (``avx512_bf16``/``amx_bf16``: without them oneDNN emulates bf16 through
  fp32 and the bf16 product is the slower one).
* one line per model (VideoMamba-Ti 8x224 by default): forward seconds per clip in fp32 and under
  bf16 autocast, alternating; the forward's matmul FLOPs (``torch.utils.flop_counter``) divided by
  the matmul rate of the same dtype gives the floor, and ``*_vs_floor`` says how far above it the
  whole forward runs (the target: bf16 within 2x of its floor on CPUs with native bf16).
  ``bf16_in_region_*``: the same bf16 forward inside one long autocast region, as ``vtr eval`` and
  ``vtr index`` run their batches (each weight is cast to bf16 once per region, not per forward),
  alternating with fp32 forwards in that region. ``bf16_share``: where a bf16 forward's time goes
  (the scan and conv kernels, matrix products, dtype conversions, the rest; torch.profiler).
* ``floor`` lines (``--floor``, default VideoMamba-Ti/S/M at 8 frames, Ti at 64 and the joint
  space-time ViT-Ti at 64, 224 px): every configuration timed in turns in this one process, each
  against its own floor (``bench/floor.py``: the model's products timed at their own shapes with
  ``torch.mm`` plus one ``torch.exp`` per scan state update or attention score, at the measured
  ``torch.exp`` rate), in fp32 and, on a CPU with native bf16, under bf16 autocast (the bf16
  floor keeps the exps in fp32, as the scan does). A ``floor_summary`` line gives VideoMamba-Ti's
  per-frame time at 64 over 8 frames and the ViT-Ti / Ti time ratio at 64 frames.
* ``fidelity`` lines: cosine of bf16 against fp32 features (pooled clip features for the video
  encoders at full size, 8x224, random weights; the text tower's hidden states, MiniLM weights) on
  a photo pan and synthetic-corpus clips (retrieval/eval/precision.py).

    python bench/precision.py                          # speed (Ti) + fidelity (Ti, S, M, TimeSformer-B, text)
    python bench/precision.py --speed-models videomamba_tiny videomamba_small --no-fidelity
    python bench/precision.py --speed-models --no-fidelity --floor          # the floor report alone
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench.floor import exp_rate, floor, model_costs, product_seconds
from bench.profiling import self_time_shares
from bench.record import Recorder, add_output_argument
from retrieval.models.device import cpu_flags, cpu_has_native_bf16

THREADS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_rates(n=2048, repeats=5) -> dict:
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    a32 @ b32, a16 @ b16                                 # warm-up
    t = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for name, (x, y) in (("fp32", (a32, b32)), ("bf16", (a16, b16))):
            t0 = time.perf_counter()
            x @ y
            t[name].append(time.perf_counter() - t0)
    flops = 2 * n ** 3
    return {k: flops / statistics.median(v) / 1e9 for k, v in t.items()}


def _flags() -> dict:
    flags = cpu_flags()
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512f": "avx512f" in flags, "native_bf16": cpu_has_native_bf16()}


def speed(name: str, frames: int, size: int, repeats: int, rates: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from retrieval.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, num_frames=frames, img_size=size).eval()
    video = torch.randn(1, 3, frames, size, size)

    def fp32():
        with torch.inference_mode():
            model(video)

    def bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(video)

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(video)
    mm_flops = sum(v for k, v in counter.get_flop_counts()["Global"].items()
                   if str(k).split(".")[-1] in ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution"))
    fp32(), bf16()                                       # warm-up (kernels, oneDNN primitives)
    t = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for k, fn in (("fp32", fp32), ("bf16", bf16)):
            t0 = time.perf_counter()
            fn()
            t[k].append(time.perf_counter() - t0)
    # vtr eval / index enter autocast once around all their batches: autocast then casts each
    # weight to bf16 once (its cache lives as long as the outermost region), so only the first
    # forward pays for it. Timed alternating with fp32 forwards inside the same region (autocast
    # switched off for those; an inner region does not clear the outer one's cache).
    region = {"fp32": [], "bf16": []}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(video)                                     # the region's first forward casts the weights
        for _ in range(repeats):
            for k in ("fp32", "bf16"):
                t0 = time.perf_counter()
                with torch.autocast("cpu", enabled=k == "bf16", dtype=torch.bfloat16):
                    model(video)
                region[k].append(time.perf_counter() - t0)
    row = {"bench": "precision_speed", "model": name, "frames": frames, "img_size": size, "batch": 1,
           "threads": torch.get_num_threads(), "repeats": repeats, "matmul_gflop": round(mm_flops / 1e9, 2)}
    for k in ("fp32", "bf16"):
        med = statistics.median(t[k])
        floor = mm_flops / (rates[k] * 1e9)
        row.update({f"{k}_s": round(med, 4), f"{k}_min_s": round(min(t[k]), 4), f"{k}_max_s": round(max(t[k]), 4),
                    f"{k}_floor_s": round(floor, 4), f"{k}_vs_floor": round(med / floor, 2)})
    row["bf16_speedup"] = round(row["fp32_s"] / row["bf16_s"], 3)
    in_region = statistics.median(region["bf16"])
    row.update({"bf16_in_region_s": round(in_region, 4),
                "bf16_in_region_vs_floor": round(in_region / (mm_flops / (rates["bf16"] * 1e9)), 2),
                "bf16_in_region_speedup": round(statistics.median(region["fp32"]) / in_region, 3)})
    row["bf16_share"] = self_time_shares(bf16, {
        "scan_kernel": ("_ScanFn",), "conv_kernel": ("_ConvFn",),
        "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution"),
        "conversions": ("aten::copy_",)})
    row["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return row


FLOOR_CONFIGS = ["videomamba_tiny:8", "videomamba_small:8", "videomamba_middle:8", "videomamba_tiny:64",
                 "joint_vit_ti:64"]


def floor_report(configs: list[str], size: int, repeats: int, bf16: bool) -> Iterator[dict]:
    """``name:frames`` configurations timed in turns against their floors (module docstring)."""
    from retrieval.models.registry import create_model
    from retrieval.runtime import keep_freed_memory

    keep_freed_memory()
    dtypes = ["fp32", "bf16"] if bf16 else ["fp32"]
    models, videos, costs = {}, {}, {}
    for config in configs:
        name, _, frames = config.partition(":")
        frames = int(frames or 8)
        torch.manual_seed(0)
        models[config] = create_model(name, num_frames=frames, img_size=size).eval()
        videos[config] = torch.randn(1, 3, frames, size, size)
        costs[config] = model_costs(models[config], frames, size)
    load_before = os.getloadavg()[0]
    # each round measures the rates, then runs every forward once (round 0 is the warm-up), so the
    # floors see the same machine as the forwards; medians over rounds
    rate_rounds: list[float] = []
    second_rounds: dict[str, list[dict]] = {k: [] for k in dtypes}
    times = {(c, k): [] for c in configs for k in dtypes}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            if round_:
                rate_rounds.append(exp_rate())
                for k in dtypes:
                    measured = {}
                    for config in configs:
                        measured.update(product_seconds(costs[config].products, DTYPES[k], repeats=1))
                    second_rounds[k].append(measured)
            for config in configs:
                for k in dtypes:
                    t0 = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=k == "bf16"):
                        models[config](videos[config])
                    if round_:
                        times[(config, k)].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    med = {key: statistics.median(v) for key, v in times.items()}
    exps_per_s = statistics.median(rate_rounds)
    seconds = {k: {shape: statistics.median(r[shape] for r in rounds) for shape in rounds[0]}
               for k, rounds in second_rounds.items()}
    for config in configs:
        c = costs[config]
        row = {"bench": "precision_floor", "model": config.partition(":")[0], "frames": int(config.partition(":")[2] or 8),
               "img_size": size, "batch": 1, "tokens": c.tokens, "threads": torch.get_num_threads(), "repeats": repeats,
               "product_gflop": round(c.product_flops / 1e9, 3), "exps_g": round(c.exps / 1e9, 4),
               "exp_rate_g_per_s": round(exps_per_s / 1e9, 3)}
        for k in dtypes:
            f = floor(c, seconds[k], exps_per_s)
            row.update({f"{k}_s": round(med[(config, k)], 4), f"{k}_all_s": [round(t, 4) for t in times[(config, k)]],
                        f"{k}_floor_s": round(f["floor_s"], 4), f"{k}_products_s": round(f["products_s"], 4),
                        f"{k}_exp_s": round(f["exp_s"], 4), f"{k}_products_gflops": round(f["products_gflops"], 1),
                        f"{k}_vs_floor": round(med[(config, k)] / f["floor_s"], 3)})
        if not bf16:
            row["bf16"] = "not run: this CPU has no native bf16 (avx512_bf16/amx_bf16), its bf16 products are emulated"
        row.update({"load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(load_after, 2)})
        yield row
    summary = {"bench": "precision_floor_summary", "repeats": repeats,
               "load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(load_after, 2)}
    frames_of = {config: int(config.partition(":")[2] or 8) for config in configs}
    for name in dict.fromkeys(config.partition(":")[0] for config in configs):
        mine = sorted((frames_of[c], c) for c in configs if c.partition(":")[0] == name)
        if len(mine) > 1:
            (small, cs), (large, cl) = mine[0], mine[-1]
            summary[f"{name}_per_frame_{large}_over_{small}"] = round(med[(cl, "fp32")] / large / (med[(cs, "fp32")] / small), 3)
    for config in configs:
        if config.startswith("joint_vit") and f"videomamba_tiny:{frames_of[config]}" in configs:
            other = f"videomamba_tiny:{frames_of[config]}"
            summary[f"{config.partition(':')[0]}_over_videomamba_tiny_at_{frames_of[config]}"] = round(
                med[(config, "fp32")] / med[(other, "fp32")], 3)
    yield summary


def fidelity(names: list[str], frames: int, size: int) -> Iterator[dict]:
    from retrieval.eval.precision import feature_cosine, realistic_clips, text_features, video_features
    from retrieval.models.registry import create_model
    from retrieval.models.retrieval_model import build_retrieval_model

    for name in names:
        torch.manual_seed(0)
        net = create_model(name, num_frames=frames, img_size=size).eval()
        clips = realistic_clips(net.preprocess, n=3)
        res = feature_cosine(video_features(net, clips), "bf16")
        yield ({"bench": "precision_fidelity", "model": name, "frames": frames, "img_size": size,
                     "weights": "random (seed 0)", "inputs": "photo pan + 2 synthetic clips, normalised",
                     **{k: round(v, 6) for k, v in res.items()}})
        del net
    torch.manual_seed(0)
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=256, num_fusion_layers=2).eval()
    captions = ["a red circle moves to the left across a striped background", "two squares grow while a star spins",
                "someone slices a tomato on a wooden board", "a dog catches a frisbee in the park",
                "a man plays the guitar on a stage under blue lights", "waves break on a rocky shore at sunset"]
    res = feature_cosine(text_features(model, captions), "bf16")
    yield ({"bench": "precision_fidelity", "model": "text tower (all-MiniLM-L6-v2 + 2 fusion layers)",
                 "weights": "MiniLM pretrained", "inputs": f"{len(captions)} captions",
                 **{k: round(v, 6) for k, v in res.items()}})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed-models", nargs="*", default=["videomamba_tiny"])
    parser.add_argument("--fidelity-models", nargs="*",
                        default=["videomamba_tiny", "videomamba_small", "videomamba_middle", "timesformer_base"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--floor", nargs="*", metavar="NAME:FRAMES", default=None,
                        help=f"the floor report (no names: {' '.join(FLOOR_CONFIGS)})")
    parser.add_argument("--floor-bf16", choices=("auto", "on", "off"), default="auto",
                        help="time bf16 in the floor report: auto = only on a CPU with native bf16")
    add_output_argument(parser, "precision")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    results = Recorder(args.output, append=args.append)
    if args.speed_models:   # the speed lines' floor (the floor report measures its own rates)
        rates = matmul_rates()
        results.add({"bench": "precision_matmul", "n": 2048, "threads": torch.get_num_threads(),
                     "fp32_gflops": round(rates["fp32"], 1), "bf16_gflops": round(rates["bf16"], 1),
                     "bf16_vs_fp32": round(rates["bf16"] / rates["fp32"], 3), "cpu": _flags()})
    for name in args.speed_models:
        results.add(speed(name, args.frames, args.img_size, args.repeats, rates))
    if args.floor is not None:
        bf16 = args.floor_bf16 == "on" or (args.floor_bf16 == "auto" and cpu_has_native_bf16())
        for row in floor_report(args.floor or FLOOR_CONFIGS, args.img_size, args.repeats, bf16):
            results.add(row)
    if not args.no_fidelity:
        for row in fidelity(args.fidelity_models, args.frames, args.img_size):
            results.add(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
