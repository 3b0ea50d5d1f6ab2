"""Selective-scan benchmark: the fused CPU kernel vs the sequential reference (mamba-ssm semantics).

Shapes are VideoMamba-Ti's: batch 1, d_inner 384, d_state 16, L in {197, 1569, 3137, 12545}
(1 + 196 * frames at 224px: an image, 8, 16 and 64 frames). Two scan variants, as the mixer
runs them:

* ``fwd``: the forward branch: plain scan with z gate, D skip, delta bias + softplus.
* ``bwd_masked``: VideoMambaPro's backward branch: the reversed sequence, ``mask_diag`` and
  the elemental initial state (h0 = the direction's first input). The reference flips the
  inputs; ours runs the sequence backwards in place (``ScanDirection(reverse=True)``).

Two passes: ``forward`` (no grad) at every L, and ``forward+backward`` (autograd, gradient of a
random projection of the output w.r.t. every input) at L=197 by default: the reference's
autograd through its Python loop takes about four minutes per call at L=1569.

``ours_s`` is the public API ``selective_scan(..., backend="cpu")`` in mamba-ssm's [B, D, L]
layout, so it includes the transposes to and from the kernel's [B, L, D] layout;
``ours_kernel_s`` calls the kernel in its own layout (``scan_directions``), which is what the
mixer does. Calls alternate (ref, ours, kernel, ref, ...) so machine noise hits all alike; the
median, min and max over the repeats are printed. ``max_abs_err`` compares ours with the
reference (outputs, or all gradients for the backward pass).

    python bench/scan.py                 # all lengths
    python bench/scan.py --lengths 1569  # one

``--mixers`` benchmarks the whole bidirectional mixer of each variant instead (VideoMamba-Ti's
width, d_model 192), fused CPU kernels vs the torch composition with the reference scan, all
variants alternating in one process: VideoMamba (v2 layout, convolved scan input), the official
VideoMambaPro computations (v2: raw input + elemental start; v1: shared parameters, raw input,
elemental start, masked backward scan) and the paper's reading (convolved input, mask, elemental)
on both layouts. ``vs_videomamba`` is the variant's fused time over VideoMamba's.

    python bench/scan.py --mixers --lengths 197,1569 --output bench/results/scan_variants.jsonl
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import Recorder, add_output_argument

from retrieval.models.ssm import selective_scan, selective_scan_ref  # noqa: E402
from retrieval.models.ssm.cpu import ScanDirection, kernel_available, scan_directions  # noqa: E402

THREADS = 2
D_INNER, D_STATE = 384, 16


def make_inputs(L: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(1, D_INNER, L), delta=r(1, D_INNER, L) * 0.5 - 1.0,
                A=-torch.exp(torch.log(torch.arange(1, D_STATE + 1.0)).repeat(D_INNER, 1) + 0.3 * r(D_INNER, D_STATE)),
                B=r(1, D_STATE, L), C=r(1, D_STATE, L), D=r(D_INNER), z=r(1, D_INNER, L), delta_bias=r(D_INNER) * 0.1)


def run_ref(ts, variant):
    if variant == "fwd":
        return selective_scan_ref(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], ts["D"], ts["z"], ts["delta_bias"],
                                  delta_softplus=True)
    f = lambda t: t.flip(-1)  # noqa: E731
    u = f(ts["u"])
    h0 = u[..., 0].unsqueeze(-1).expand(-1, -1, D_STATE)
    out = selective_scan_ref(u, f(ts["delta"]), ts["A"], f(ts["B"]), f(ts["C"]), ts["D"], f(ts["z"]), ts["delta_bias"],
                             delta_softplus=True, initial_state=h0, mask_diag=True)
    return out.flip(-1)


def run_ours(ts, variant):
    if variant == "fwd":
        return selective_scan(ts["u"], ts["delta"], ts["A"], ts["B"], ts["C"], ts["D"], ts["z"], ts["delta_bias"],
                              delta_softplus=True, backend="cpu")
    # the public API has no "reverse": flip like the reference does, then the fused kernel
    f = lambda t: t.flip(-1)  # noqa: E731
    u = f(ts["u"])
    h0 = u[..., 0].unsqueeze(-1).expand(-1, -1, D_STATE)
    out = selective_scan(u, f(ts["delta"]), ts["A"], f(ts["B"]), f(ts["C"]), ts["D"], f(ts["z"]), ts["delta_bias"],
                         delta_softplus=True, initial_state=h0, mask_diag=True, backend="cpu")
    return out.flip(-1)


def kernel_layout(ts):
    """The inputs once in the kernel's [B, L, D] layout (what the mixer has anyway)."""
    t = lambda x: x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)  # noqa: E731
    return {k: (t(v) if v.dim() == 3 else v) for k, v in ts.items()}


def run_kernel(kl, variant):
    rev = variant != "fwd"
    d = ScanDirection(kl["u"], kl["delta"], kl["B"], kl["C"], kl["A"], kl["D"], kl["delta_bias"],
                      reverse=rev, mask_diag=rev, elemental=rev)
    return scan_directions([d], kl["z"])[0]


def grad_pass(fn, ts, w):
    leaves = [v for v in ts.values()]
    out = fn()
    return torch.autograd.grad((out * w).sum(), leaves)


def stats(xs):
    return statistics.median(xs), min(xs), max(xs)


def bench_one(L: int, variant: str, pass_: str, repeats: int) -> dict:
    ts = make_inputs(L)
    if pass_ == "forward+backward":
        ts = {k: v.requires_grad_(True) for k, v in ts.items()}
    kl = kernel_layout(ts)
    w = torch.randn(1, D_INNER, L, generator=torch.Generator().manual_seed(1))
    wl = w.transpose(1, 2).contiguous()
    if pass_ == "forward":
        calls = {"ref": lambda: run_ref(ts, variant), "ours": lambda: run_ours(ts, variant),
                 "kernel": lambda: run_kernel(kl, variant)}
        ctx = torch.no_grad
    else:
        calls = {"ref": lambda: grad_pass(lambda: run_ref(ts, variant), ts, w),
                 "ours": lambda: grad_pass(lambda: run_ours(ts, variant), ts, w),
                 "kernel": lambda: grad_pass(lambda: run_kernel(kl, variant), kl, wl)}
        ctx = torch.enable_grad
    times = {k: [] for k in calls}
    with ctx():
        results = {k: fn() for k, fn in calls.items()}          # warm-up (and the values compared)
        if pass_ == "forward":
            err = (results["ours"] - results["ref"]).abs().max().item()
            err_k = (results["kernel"].transpose(1, 2) - results["ref"]).abs().max().item()
        else:
            err = max((a - b).abs().max().item() for a, b in zip(results["ours"], results["ref"]))
            err_k = max(((a.transpose(1, 2) if a.dim() == 3 else a) - b).abs().max().item()
                        for a, b in zip(results["kernel"], results["ref"]))
        del results
        ref_repeats = max(1, repeats // 4) if L > 4000 else repeats
        for i in range(repeats):
            for k, fn in calls.items():
                if k == "ref" and i >= ref_repeats:
                    continue
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    (ours, ours_min, ours_max), (ref, ref_min, ref_max) = stats(times["ours"]), stats(times["ref"])
    kern, kern_min, kern_max = stats(times["kernel"])
    return {"bench": "scan", "variant": variant, "pass": pass_, "batch": 1, "d_inner": D_INNER, "d_state": D_STATE,
            "L": L, "threads": torch.get_num_threads(),
            "ours_s": round(ours, 6), "ours_min_s": round(ours_min, 6), "ours_max_s": round(ours_max, 6),
            "ours_kernel_s": round(kern, 6), "ours_kernel_min_s": round(kern_min, 6),
            "ours_kernel_max_s": round(kern_max, 6),
            "ref_s": round(ref, 6), "ref_min_s": round(ref_min, 6), "ref_max_s": round(ref_max, 6),
            "speedup": round(ref / ours, 1), "speedup_kernel": round(ref / kern, 1),
            "max_abs_err": float(f"{err:.3g}"), "max_abs_err_kernel": float(f"{err_k:.3g}"),
            "repeats": {"ours": len(times["ours"]), "ref": len(times["ref"])},
            "load_avg_1min": round(os.getloadavg()[0], 2)}


MIXER_VARIANTS = {
    "videomamba": dict(layout="v2", scan_input="conv"),
    "pro_v2_official": dict(layout="v2", scan_input="raw", elemental_residual=True),
    "pro_v1_official": dict(layout="v1", scan_input="raw", elemental_residual=True, mask_backward=True),
    "pro_v2_paper": dict(layout="v2", scan_input="conv", elemental_residual=True, mask_backward=True),
    "pro_v1_paper": dict(layout="v1", scan_input="conv", elemental_residual=True, mask_backward=True),
}


def bench_mixers(L: int, pass_: str, repeats: int, d_model: int = 192) -> list[dict]:
    """One row per variant: the mixer's fused path vs its reference composition, calls alternating
    over every (variant, path) pair."""
    from retrieval.models.videomamba import BiMambaMixer  # noqa: PLC0415

    x = torch.randn(1, L, d_model, generator=torch.Generator().manual_seed(0))
    mixers, calls = {}, {}
    for name, kw in MIXER_VARIANTS.items():
        torch.manual_seed(0)
        m = BiMambaMixer(d_model, **kw)
        mixers[name] = m
        for path in ("fused", "ref"):
            def call(m=m, path=path):
                m.scan_backend = "cpu" if path == "fused" else "ref"
                if pass_ == "forward":
                    with torch.no_grad():
                        return m(x)
                xi = x.clone().requires_grad_(True)
                y = m(xi)
                return torch.autograd.grad(y.square().sum(), [xi, *m.parameters()])
            calls[(name, path)] = call
    first = {k: fn() for k, fn in calls.items()}                      # warm-up and the values compared
    errs = {}
    for name in mixers:
        a, b = first[(name, "fused")], first[(name, "ref")]
        pairs = [(a, b)] if pass_ == "forward" else list(zip(a, b))
        errs[name] = max((p - q).abs().max().item() for p, q in pairs)
    del first
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[("videomamba", "fused")])
    rows = []
    for name, kw in MIXER_VARIANTS.items():
        fused, ref = statistics.median(times[(name, "fused")]), statistics.median(times[(name, "ref")])
        rows.append({"bench": "scan_mixer", "variant": name, **{k: v for k, v in kw.items()}, "pass": pass_,
                     "batch": 1, "d_model": d_model, "d_state": 16, "L": L, "threads": torch.get_num_threads(),
                     "fused_s": round(fused, 6), "fused_min_s": round(min(times[(name, "fused")]), 6),
                     "fused_max_s": round(max(times[(name, "fused")]), 6), "ref_s": round(ref, 6),
                     "speedup": round(ref / fused, 1), "vs_videomamba": round(fused / base, 3),
                     "max_abs_err": float(f"{errs[name]:.3g}"), "repeats": repeats,
                     "load_avg_1min": round(os.getloadavg()[0], 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="197,1569,3137,12545")
    parser.add_argument("--grad-lengths", default="197", help="lengths that also run forward+backward")
    parser.add_argument("--repeats", type=int, default=8)
    add_output_argument(parser, "scan")
    parser.add_argument("--mixers", action="store_true",
                        help="benchmark the bidirectional mixer of each VideoMamba / VideoMambaPro variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    if not kernel_available():
        Recorder(args.output, append=args.append).add(
            {"bench": "scan", "skipped": "the fused CPU kernel could not be built (no C compiler?)"})
        return 0
    lengths = [int(x) for x in args.lengths.split(",") if x]
    grad_lengths = {int(x) for x in args.grad_lengths.split(",") if x}
    results = Recorder(args.output, append=args.append)
    for L in lengths:
        for pass_ in ("forward", "forward+backward"):
            if pass_ == "forward+backward" and L not in grad_lengths:
                continue
            reps = args.repeats if pass_ == "forward" else max(2, args.repeats // 2)
            if args.mixers:
                rows = bench_mixers(L, pass_, reps)
            else:
                rows = [bench_one(L, variant, pass_, reps) for variant in ("fwd", "bwd_masked")]
            for row in rows:
                results.add(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
