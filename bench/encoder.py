"""VideoMamba-Ti encoder benchmark: forward seconds per clip and peak memory vs frames.

For each frame count (224x224, batch 1, no grad, 2 threads) three child processes run, so
no configuration inherits another's memory high-water mark or warm caches:

* ``time`` child: warm-up, then ``fused_s``: forward passes of the model as
  ``create_model("videomamba_tiny")`` runs it on CPU (the fused mixer path), median/min/max;
  then forward passes alternating (A B A B) between the fused path and the torch composition
  around the same scan kernel (per-branch transposes, flips, separate conv/softplus/gate ops:
  the layout the mixer had before the fused path) and the fused path under bf16 autocast:
  ``ab_*``, ``speedup_vs_composed`` and ``bf16_vs_fp32`` (fp32 time / bf16 time; above 1 only
  on CPUs with native bf16, ``cpu_native_bf16``). One
  more fused forward runs under torch.profiler to attribute time: the scan kernel
  (``_ScanFn``, which includes the fused dt projection), the conv kernel (``_ConvFn``),
  matmuls (``aten::mm``), everything else. ``load_avg_1min`` records how busy the machine was.
* ``time-tuned`` child: the fused timing again after ``retrieval.models.ssm.cpu.
  keep_freed_memory()`` (glibc keeps freed memory instead of trimming it; each fresh 4 KiB page
  otherwise costs a page fault, ``page_faults_per_forward``, about 2 us on this VM). A
  process-wide deployment choice (the process stays at its peak RSS), off by default.
* ``memory`` child: only fused forwards; reports its own ``ru_maxrss`` (peak resident memory,
  model and input included) and, for reference, the RSS before the first forward.

The sequence length is 1 + 196 * frames, so with linear-time mixers the time per frame should
stay flat: ``linearity`` gives the 64-vs-8 per-frame time ratio and a least-squares fit
seconds = a + b * frames.

    python bench/encoder.py                    # 8, 16, 32, 64 frames
    python bench/encoder.py --frames 8 --repeats 10
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument

THREADS = 2


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(frames: int, mode: str, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from retrieval.models.registry import create_model
    from retrieval.models.videomamba import BiMambaMixer

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if mode == "time-tuned":
        from retrieval.models.ssm.cpu import keep_freed_memory

        keep_freed_memory()
    model = create_model("videomamba_tiny", num_frames=frames).eval()
    video = torch.randn(1, 3, frames, 224, 224)
    mixers = [m for m in model.modules() if isinstance(m, BiMambaMixer)]
    row = {"frames": frames, "tokens": 1 + 196 * frames, "threads": torch.get_num_threads()}

    def fused_forward():
        with torch.no_grad():
            return model(video)

    if mode == "memory":
        row["rss_before_mb"] = round(_rss_mb(), 1)
        fused_forward()
        fused_forward()
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return row

    def composed_forward():
        with torch.no_grad():
            for m in mixers:
                m.forward = m._forward_composed           # instance override: the torch composition
            try:
                return model(video)
            finally:
                for m in mixers:
                    del m.forward

    fused_forward()                                       # warm-up (builds/loads the kernels)
    fused_forward()
    alone = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):                              # the headline: what a caller of the model gets
        t0 = time.perf_counter()
        fused_forward()
        alone.append(time.perf_counter() - t0)
    row["page_faults_per_forward"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) // repeats
    if mode == "time-tuned":
        row.update(fused_tuned_s=round(statistics.median(alone), 4), fused_tuned_min_s=round(min(alone), 4))
        return row
    def bf16_forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(video)

    composed_forward()
    bf16_forward()
    times = {"fused": [], "composed": [], "bf16": []}
    for _ in range(max(2, repeats // 2)):                 # the comparison: alternating A B C A B C
        for name, fn in (("fused", fused_forward), ("composed", composed_forward), ("bf16", bf16_forward)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    from bench.profiling import self_time_shares

    share = self_time_shares(fused_forward, {"scan_kernel": ("_ScanFn",), "conv_kernel": ("_ConvFn",),
                                             "matmul": ("aten::mm",)})
    row["fused_s"] = round(statistics.median(alone), 4)
    row["fused_min_s"] = round(min(alone), 4)
    row["fused_max_s"] = round(max(alone), 4)
    for name in ("fused", "composed", "bf16"):
        ts = times[name]
        row[f"ab_{name}_s"] = round(statistics.median(ts), 4)
        row[f"ab_{name}_min_s"] = round(min(ts), 4)
        row[f"ab_{name}_max_s"] = round(max(ts), 4)
    row["speedup_vs_composed"] = round(row["ab_composed_s"] / row["ab_fused_s"], 2)
    # bf16 autocast (fused kernels read bf16 in place) beside fp32, same process, alternating
    row["bf16_vs_fp32"] = round(row["ab_fused_s"] / row["ab_bf16_s"], 3)
    from retrieval.models.device import cpu_has_native_bf16

    row["cpu_native_bf16"] = cpu_has_native_bf16()
    row["seconds_per_frame"] = round(row["fused_s"] / frames, 4)
    row["load_avg_1min"] = round(os.getloadavg()[0], 2)
    row["share"] = share
    row["repeats"] = repeats
    return row


def run_child(frames: int, mode: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(frames), "--mode", mode, "--repeats", str(repeats)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"frames": frames, "mode": mode, "error": proc.stderr.strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="8,16,32,64")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per path (fewer at 32+ frames)")
    add_output_argument(parser, "encoder")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.repeats)))
        return 0

    frames_list = [int(f) for f in args.frames.split(",") if f]
    rows = []
    results = Recorder(args.output, append=args.append)
    for frames in frames_list:
        reps = args.repeats if frames <= 16 else max(2, args.repeats // 2)
        timing = run_child(frames, "time", reps)
        tuned = run_child(frames, "time-tuned", reps)
        memory = run_child(frames, "memory", 1)
        row = {"bench": "encoder", "model": "videomamba_tiny", "size": 224, "batch": 1, "dtype": "float32",
               **timing, **{k: v for k, v in memory.items() if k not in timing or k == "error"},
               "malloc_tuned": {k: tuned.get(k) for k in ("fused_tuned_s", "fused_tuned_min_s",
                                                          "page_faults_per_forward", "error") if k in tuned}}
        rows.append(row)
        results.add(row)
    ok = [r for r in rows if "fused_s" in r]
    if len(ok) >= 2:
        xs = [r["frames"] for r in ok]
        ys = [r["fused_s"] for r in ok]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        ss_tot = sum((y - my) ** 2 for y in ys) or 1e-12
        r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss_tot
        lo, hi = min(ok, key=lambda r: r["frames"]), max(ok, key=lambda r: r["frames"])
        ratio = hi["seconds_per_frame"] / lo["seconds_per_frame"]
        summary = {"bench": "encoder", "linearity": {
            "fit": f"seconds = {a:.4f} + {b:.4f} * frames", "intercept_s": round(a, 4),
            "seconds_per_frame_slope": round(b, 4), "r2": round(r2, 4),
            f"per_frame_ratio_{hi['frames']}_vs_{lo['frames']}": round(ratio, 3),
            "statement": (f"time per frame at {hi['frames']} frames is {ratio:.2f}x that at {lo['frames']} "
                          f"frames ({'linear within 15%' if 0.85 <= ratio <= 1.15 else 'not linear within 15%'})"),
        }, "threads": THREADS}
        results.add(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
