"""Video-tower training step of the demo model: forward + backward time per batch, by variant.

The video tower runs on a batch of clips of 8 x 64 px (default 40; the demo recipe's step is 32
plus 12 time-reversed copies, ``--batch 44``); this times its forward and the backward of a
random projection of the pooled features. Variants, timed alternately in one process so machine noise hits all alike:

* ``demo``: ``configs/models/videomamba_demo.yaml`` as it is.
* ``tubelet2``: the demo model with ``tubelet_size: 2`` (half the tokens).

    python bench/train_step.py [--batch 40] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import Recorder, add_output_argument

from retrieval.models.registry import create_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    add_output_argument(parser, "train_step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    demo = create_model("videomamba_demo").train()
    tub = create_model("videomamba_demo", tubelet_size=2).train()
    models = {"demo": demo, "tubelet2": tub}
    x = torch.randn(args.batch, 3, demo.num_frames, demo.img_size, demo.img_size)
    weights = {k: torch.randn(m(x[:1])["pooled"].shape[1:]) for k, m in models.items()}

    def step(name: str) -> float:
        m = models[name]
        t0 = time.perf_counter()
        (m(x)["pooled"] * weights[name]).sum().backward()
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:                                   # warm-up
        step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name in models:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    results = Recorder(args.output, append=args.append)
    for name, ts in times.items():
        results.add({"bench": "train_step", "variant": name, "batch": args.batch, "threads": args.threads,
                          "repeats": args.repeats, "median_s": round(med[name], 4),
                          "min_max_s": [round(min(ts), 4), round(max(ts), 4)],
                          "clips_per_s": round(args.batch / med[name], 1),
                     "speedup_vs_demo": round(med["demo"] / med[name], 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
