"""Two builds of the fused CPU kernels (scan_kernel.c) timed in turns in one process.

The baseline is another revision of the kernel source, e.g. main's::

    git show main:retrieval/models/ssm/scan_kernel.c > /tmp/scan_kernel_main.c
    python bench/kernel_ab.py --baseline /tmp/scan_kernel_main.c

Both are compiled with the same flags (``--arch-flags``, default the build's own:
``$VTR_KERNEL_ARCH_FLAGS`` or ``-march=native``; ``--baseline-arch-flags`` gives the baseline its
own, e.g. the AVX2 build against the AVX-512 one of the same source on one CPU) and loaded side by side
(``retrieval.models.ssm.cpu.build_library``); every round runs each part with the baseline, then
with the current source (``using_library``), so machine noise hits both alike. Parts, at
VideoMamba-Ti's mixer shapes (batch 1, L = 1 + 196 x frames, d_inner 384, d_state 16, dt rank
12, two directions as the mixer runs them: dt projection fused, SiLU(z) gate):

* ``conv``: the depthwise conv + SiLU of both branches (``conv_silu``), forward;
* ``scan``: the two-direction scan (``scan_directions``), forward;
* ``scan_train``: the scan's forward and backward (autograd; ``--train``);
* ``model``: the whole VideoMamba-Ti forward at ``--frames`` x 224, fp32 (``--no-model`` skips it).

Each row gives the median seconds of each build, ``speedup`` (baseline / current, medians) and
the load average before and after: on a shared machine read the ratio, not the seconds
(``--threads 1`` keeps other jobs' load out of the OpenMP barriers; default 2).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench.record import Recorder, add_output_argument
from retrieval.models.ssm.cpu import ScanDirection, build_library, conv_silu, scan_directions, using_library

THREADS = 2
E, N, R, K = 384, 16, 12, 4


def _sig(seconds: float) -> float:
    """Seconds to 4 significant digits (a sub-millisecond kernel keeps its precision, and the
    recorded speedup agrees with the recorded times)."""
    return float(f"{seconds:.4g}")


def mixer_inputs(L: int, seed: int = 0, grad: bool = False) -> dict:
    """Random tensors shaped as VideoMamba-Ti's mixer hands them to the kernels."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xz = r(1, L, 2 * E)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)           # the mixer's init: A_n = -n
    ts = dict(xz=xz, wf=r(E, 1, K) * 0.5, bf=r(E) * 0.1, wb=r(E, 1, K) * 0.5, bb=r(E) * 0.1,
              u_f=r(1, L, E), u_b=r(1, L, E), dbc_f=r(1, L, R + 2 * N), dbc_b=r(1, L, R + 2 * N),
              A=A, D=torch.ones(E), Wt=r(E, R) * R ** -0.5, bias=r(E) * 0.1 - 4.0)
    if grad:
        for k in ("u_f", "u_b", "dbc_f", "dbc_b", "xz"):
            ts[k].requires_grad_(True)
    return ts


def directions(ts: dict) -> list[ScanDirection]:
    out = []
    for backward, u, dbc in ((False, ts["u_f"], ts["dbc_f"]), (True, ts["u_b"], ts["dbc_b"])):
        out.append(ScanDirection(u, None, dbc[..., R:R + N], dbc[..., R + N:], ts["A"], D=ts["D"], bias=ts["bias"],
                                 reverse=backward, dt=dbc[..., :R], dt_weight=ts["Wt"]))
    return out


def parts(frames: int, train: bool, model: bool) -> dict:
    """name -> (L, a callable running the part once)."""
    L = 1 + 196 * frames
    ts = mixer_inputs(L)
    z = ts["xz"][..., E:]

    def conv():
        with torch.inference_mode():
            conv_silu(ts["xz"][..., :E], ts["wf"], ts["bf"], ts["wb"], ts["bb"])

    def scan():
        with torch.inference_mode():
            scan_directions(directions(ts), z)

    out = {"conv": (L, conv), "scan": (L, scan)}
    if train:
        tg = mixer_inputs(L, grad=True)
        w = torch.randn(1, L, E, generator=torch.Generator().manual_seed(1))

        def scan_train():
            y, _ = scan_directions(directions(tg), tg["xz"][..., E:])
            leaves = [tg[k] for k in ("u_f", "u_b", "dbc_f", "dbc_b", "xz")]
            torch.autograd.grad((y * w).sum(), leaves)

        out["scan_train"] = (L, scan_train)
    if model:
        from retrieval.models.registry import create_model

        torch.manual_seed(0)
        net = create_model("videomamba_tiny", num_frames=frames, img_size=224).eval()
        video = torch.randn(1, 3, frames, 224, 224)

        def forward():
            with torch.inference_mode():
                net(video)

        out["model"] = (L, forward)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other scan_kernel.c")
    parser.add_argument("--arch-flags", default=None, help="compiler arch flags for both builds")
    parser.add_argument("--baseline-arch-flags", default=None,
                        help="the baseline's own arch flags (default --arch-flags), e.g. "
                             "'-march=native -mno-avx512f' to time the AVX2 build against the AVX-512 one")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--train", action="store_true", help="also time the scan's forward + backward")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model forward")
    add_output_argument(parser, "kernel_ab")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds must be at least 1")
    if not args.baseline.is_file():
        parser.error(f"--baseline: no such file: {args.baseline}")
    torch.set_num_threads(args.threads)
    arch = args.arch_flags.split() if args.arch_flags is not None else None
    base_arch = args.baseline_arch_flags.split() if args.baseline_arch_flags is not None else arch
    libs = {"baseline": build_library(args.baseline, base_arch), "current": build_library(None, arch)}
    results = Recorder(args.output, append=args.append)
    for name, (L, fn) in parts(args.frames, args.train, not args.no_model).items():
        load_before = os.getloadavg()
        times = {k: [] for k in libs}
        for lib in libs.values():           # warm-up: first-touch allocations, thread start
            with using_library(lib):
                fn()
        for _ in range(args.rounds):
            for k, lib in libs.items():
                with using_library(lib):
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.add({"bench": "kernel_ab", "part": name, "L": L, "frames": args.frames, "rounds": args.rounds,
                     "baseline": str(args.baseline), "arch_flags": args.arch_flags or "default",
                     "baseline_arch_flags": args.baseline_arch_flags or args.arch_flags or "default",
                     "baseline_s": _sig(med["baseline"]), "current_s": _sig(med["current"]),
                     "speedup": round(med["baseline"] / med["current"], 3),
                     "current_min_max_s": [_sig(min(times["current"])), _sig(max(times["current"]))],
                     "loadavg_before": [round(x, 2) for x in load_before],
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
