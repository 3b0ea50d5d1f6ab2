"""bench/kernel_ab.py and the kernel-library helpers it stands on: two builds loaded side by side,
one swapped in for a block and the one in use restored after, rows with both timings."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import kernel_ab
from retrieval.models.ssm import cpu


def test_using_library_swaps_and_restores():
    before = cpu.load_kernel()
    other = cpu.build_library()                     # the same source and flags: the cached build
    assert other._name == before._name
    sentinel = object()
    with cpu.using_library(sentinel):
        assert cpu.load_kernel() is sentinel
    assert cpu.load_kernel() is before
    with pytest.raises(RuntimeError), cpu.using_library(sentinel):
        raise RuntimeError("a failing timed call")
    assert cpu.load_kernel() is before


def test_directions_agree_with_the_kernel_inputs():
    ts = kernel_ab.mixer_inputs(20)
    dirs = kernel_ab.directions(ts)
    assert [d.reverse for d in dirs] == [False, True]
    assert dirs[0].dt.shape == (1, 20, kernel_ab.R) and dirs[0].B.shape == (1, 20, kernel_ab.N)
    with torch.no_grad():
        out, _ = cpu.scan_directions(dirs, ts["xz"][..., kernel_ab.E:])
    assert out.shape == (1, 20, kernel_ab.E) and torch.isfinite(out).all()


def test_rows_time_both_builds(tmp_path, capsys):
    out = tmp_path / "ab.jsonl"
    src = Path(cpu.__file__).with_name("scan_kernel.c")
    assert kernel_ab.main(["--baseline", str(src), "--frames", "1", "--rounds", "1", "--no-model",
                           "--threads", "1", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["part"] for r in rows] == ["conv", "scan"]
    for r in rows:
        assert r["L"] == 197 and r["baseline_s"] > 0 and r["current_s"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_s"] / r["current_s"], rel=1e-2)
        assert len(r["loadavg_before"]) == 3


def test_missing_baseline_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        kernel_ab.main(["--baseline", str(tmp_path / "nope.c")])
    assert exc.value.code == 2
