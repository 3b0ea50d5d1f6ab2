"""Frame-count scaling of the video backbones on CPU: seconds per clip and peak memory.

For each model and frame count (224 px, batch 1, ``torch.set_num_threads(2)``), a fresh child
process builds ``create_model(name, num_frames=T)``, runs one warm-up forward and then
``--repeats`` timed forwards under ``torch.inference_mode()``, and reports the median time and
its own RSS high-water mark (``ru_maxrss``). One process per configuration keeps the high-water
marks independent: allocator caches of an earlier, smaller run cannot hide or inflate a later one.

Memory columns: ``peak_rss_mb`` is the whole process (Python, torch, weights, activations);
``rss_after_build_mb`` is the high-water mark once the model and input exist, so
``peak_rss_mb - rss_after_build_mb`` is what the forward itself added.

Attention implementation: joint_vit_ti and UniFormer's global stages go through timm's block,
i.e. ``scaled_dot_product_attention``, whose CPU kernel streams over keys instead of building the
``[heads, L, L]`` score matrix; TimeSformer uses transformers' explicit ``softmax(q kᵀ) v`` but its
divided attention only ever builds per-frame (``N²``) and per-patch (``T²``) matrices. To measure
what the textbook joint attention costs, add the spec ``joint_vit_ti:fused_attn=false``
(``name:key=value,...`` passes build overrides; values are parsed as YAML).

A model whose config does not exist (e.g. VideoMamba while it is being written) gets one
``"status": "skipped"`` line per frame count; a child that exceeds ``--timeout`` gets
``"status": "timeout"`` and that model's larger frame counts are skipped.

Prints one JSON object per configuration and writes the lines to ``bench/results/scaling.jsonl``
(overwritten per run; ``--append`` adds to it), then plots every line of that file to
``bench/results/scaling.png`` (log-log time and memory against frames).

    python bench/scaling.py --models timesformer_ti joint_vit_ti --frames 8 16 --repeats 2

``--alternate timesformer_ti videomamba_tiny`` then also times those models in turns in this one
process at ``--alternate-frames`` (default 8 and 64) and prints the ratios (``mode: alternate``
lines): the figures to compare on a shared machine. There a spec may also set
``mixer_chunk_bytes=N`` (VideoMamba's opt-in sequence tiles, ``BiMambaMixer.chunk_bytes``; ``auto`` = half
the last-level cache). ``--models`` with no names skips the
per-configuration children.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, not only after `pip install -e`
    sys.path.insert(0, str(ROOT))

from bench.record import RESULTS, Recorder, add_output_argument
from retrieval.models.registry import UnknownModelError, model_config

DEFAULT_MODELS = ["videomamba_tiny", "videomambapro_tiny", "timesformer_ti", "joint_vit_ti", "uniformer_s"]
DEFAULT_FRAMES = [8, 16, 32, 64]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"joint_vit_ti:fused_attn=false,pool=cls"`` -> ``("joint_vit_ti", {"fused_attn": False, "pool": "cls"})``."""
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"model spec {spec!r}: override {item!r} is not key=value")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def _native_bf16() -> bool:
    from retrieval.models.device import cpu_has_native_bf16

    return cpu_has_native_bf16()


def _max_rss_mb() -> float:
    """This process's RSS high-water mark (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(spec: str, frames: int, img_size: int, repeats: int, threads: int, bf16: bool = True) -> dict[str, Any]:
    """Child side: build, warm up, time ``repeats`` forwards of one clip; report time and memory.

    With ``bf16`` the same process also times forwards under bf16 autocast, alternating with the
    fp32 ones (A B A B): ``bf16_sec_per_clip`` and ``bf16_vs_fp32`` (fp32 time / bf16 time)."""
    import torch

    from retrieval.models.registry import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    name, overrides = parse_spec(spec)
    model = create_model(name, num_frames=frames, img_size=img_size, **overrides).eval()
    video = torch.randn(1, 3, frames, img_size, img_size)
    rss_after_build = _max_rss_mb()
    times, times_bf16 = [], []
    with torch.inference_mode():
        out = model(video)  # warm-up: first-call allocations, kernel selection
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(video)
        for _ in range(repeats):
            start = time.perf_counter()
            model(video)
            times.append(time.perf_counter() - start)
            if bf16:
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(video)
                times_bf16.append(time.perf_counter() - start)
    extra: dict[str, Any] = {}
    if bf16:
        extra = {"bf16_sec_per_clip": round(statistics.median(times_bf16), 4),
                 "bf16_vs_fp32": round(statistics.median(times) / statistics.median(times_bf16), 3),
                 "cpu_native_bf16": _native_bf16()}
    return {
        **extra,
        "sec_per_clip": round(statistics.median(times), 4),
        "sec_all": [round(t, 4) for t in times],
        "peak_rss_mb": round(_max_rss_mb(), 1),
        "rss_after_build_mb": round(rss_after_build, 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "tokens": out["tokens"].shape[1],
        "torch": torch.__version__,
    }


def alternate(specs: list[str], frames_list: list[int], img_size: int, repeats: int, threads: int
              ) -> list[dict[str, Any]]:
    """Every (model, frame count) in this one process, timed in turns: ratios, not absolute times.

    The machine is shared, so times measured minutes apart are not comparable; here each round
    runs every configuration once (warm-up round first) and each line reports the median over
    rounds of the wall time and of the process CPU time (user + system, all threads). Freed
    memory is kept (as the ``vtr`` command does), so no configuration pays page faults another
    does not. The summary lines give, per frame count, each model's speed relative to the first
    model, and per model its time per frame at the largest frame count over the smallest.
    """
    import torch

    from retrieval.models.registry import create_model
    from retrieval.runtime import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models, videos = {}, {}
    for frames in frames_list:
        videos[frames] = torch.randn(1, 3, frames, img_size, img_size)
        for spec in specs:
            name, overrides = parse_spec(spec)
            chunk_bytes = overrides.pop("mixer_chunk_bytes", None)
            model = create_model(name, num_frames=frames, img_size=img_size, **overrides).eval()
            if chunk_bytes is not None:  # a runtime setting of VideoMamba's mixers, not a build option
                for module in model.modules():
                    if hasattr(module, "chunk_bytes"):
                        module.chunk_bytes = chunk_bytes if chunk_bytes == "auto" else int(chunk_bytes)
            models[(spec, frames)] = model
    wall: dict[tuple[str, int], list[float]] = {key: [] for key in models}
    cpu: dict[tuple[str, int], list[float]] = {key: [] for key in models}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for (spec, frames), model in models.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                model(videos[frames])
                if round_:  # round 0 is the warm-up
                    wall[(spec, frames)].append(time.perf_counter() - start)
                    cpu[(spec, frames)].append(time.process_time() - cpu_start)
    lines = []
    med = {key: statistics.median(v) for key, v in wall.items()}
    med_cpu = {key: statistics.median(v) for key, v in cpu.items()}
    for (spec, frames) in models:
        lines.append({"mode": "alternate", "model": spec, "frames": frames, "img_size": img_size, "batch": 1,
                      "threads": threads, "repeats": repeats, "status": "ok",
                      "sec_per_clip": round(med[(spec, frames)], 4),
                      "cpu_sec_per_clip": round(med_cpu[(spec, frames)], 4),
                      "sec_all": [round(t, 4) for t in wall[(spec, frames)]],
                      "ms_per_frame": round(1e3 * med[(spec, frames)] / frames, 2)})
    first, small, large = specs[0], min(frames_list), max(frames_list)
    for frames in frames_list:
        lines.append({"mode": "alternate", "summary": "speedup_vs_" + first, "frames": frames,
                      **{spec: round(med[(first, frames)] / med[(spec, frames)], 3) for spec in specs[1:]},
                      **{spec + "_cpu": round(med_cpu[(first, frames)] / med_cpu[(spec, frames)], 3)
                         for spec in specs[1:]}})
    if large != small:
        lines.append({"mode": "alternate", "summary": f"per_frame_{large}_over_{small}",
                      **{spec: round(med[(spec, large)] / large / (med[(spec, small)] / small), 3) for spec in specs},
                      **{spec + "_cpu": round(med_cpu[(spec, large)] / large / (med_cpu[(spec, small)] / small), 3)
                         for spec in specs}})
    return lines


def run_child(spec: str, frames: int, args: argparse.Namespace) -> dict[str, Any]:
    """Parent side: one configuration in a fresh interpreter, bounded by ``--timeout``."""
    command = [
        sys.executable,
        __file__,
        "--child",
        spec,
        "--frames",
        str(frames),
        "--img-size",
        str(args.img_size),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        *(["--no-bf16"] if args.no_bf16 else []),
    ]
    try:
        proc = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"no result within {args.timeout} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        return {"status": "error", "note": f"exit {proc.returncode}{killed}: {last}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def plot(lines: list[dict[str, Any]], path: Path) -> None:
    """Time and peak RSS against frame count, one line per model, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in dict.fromkeys(line["model"] for line in lines):
        ok = sorted(
            (line for line in lines if line["model"] == model and line["status"] == "ok"),
            key=lambda line: line["frames"],
        )
        if not ok:
            continue
        frames = [line["frames"] for line in ok]
        ax_time.plot(frames, [line["sec_per_clip"] for line in ok], marker="o", label=model)
        ax_mem.plot(frames, [line["peak_rss_mb"] for line in ok], marker="o", label=model)
    all_frames = sorted({line["frames"] for line in lines})
    for ax, ylabel in ((ax_time, "seconds per clip (median)"), (ax_mem, "peak RSS (MB, whole process)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_frames, [str(f) for f in all_frames])
        ax.set_yscale("log")
        ax.set_xlabel("frames (224 px, batch 1)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    threads = next((line["threads"] for line in lines), "?")
    fig.suptitle(f"CPU inference scaling, {threads} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="*", default=DEFAULT_MODELS, help="model names or name:key=value specs"
    )
    parser.add_argument("--frames", nargs="+", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per configuration (child process)"
    )
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    add_output_argument(parser, "scaling")
    parser.add_argument("--plot", type=Path, default=RESULTS / "scaling.png")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 only (default: bf16 autocast timed "
                        "beside fp32 in the same process, alternating)")
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--alternate", nargs="+", metavar="SPEC",
                        help="also time these models in turns in one process (first = baseline of the ratios)")
    parser.add_argument("--alternate-frames", nargs="+", type=int, default=[8, 64])
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args.child, args.frames[0], args.img_size, args.repeats, args.threads,
                                 bf16=not args.no_bf16)))
        return

    results = Recorder(args.output, append=args.append)
    for spec in args.models:
        try:
            model_config(parse_spec(spec)[0])
            missing = None
        except UnknownModelError as err:
            missing = f"model not available yet: {err}"
        too_big = None
        for frames in sorted(args.frames):
            line = {
                "model": spec,
                "frames": frames,
                "img_size": args.img_size,
                "batch": 1,
                "threads": args.threads,
                "repeats": args.repeats,
            }
            if missing or too_big:
                line.update(status="skipped", note=missing or too_big)
            else:
                line.update(run_child(spec, frames, args))
                if line["status"] == "timeout":
                    too_big = f"{frames} frames already exceeded --timeout"
            results.add(line)

    if args.alternate:
        for line in alternate(args.alternate, args.alternate_frames, args.img_size, args.repeats,
                              args.threads):
            results.add(line)

    rows = [json.loads(line) for line in results.lines]
    plot([row for row in rows if "mode" not in row], args.plot)


if __name__ == "__main__":
    main()
