"""How every benchmark records its results, so that a figure can be traced to what produced it.

Each result row is printed as one JSON line and kept in ``--output`` (default
``bench/results/<bench>.jsonl``) together with the run's environment: the commit (and whether the
work tree had changes), the CPU model and the flags that pick kernels, torch's version and its
thread count. The file is rewritten whole after every row, so an interrupted run keeps the rows it
finished and a reader never sees half a line.

    parser = argparse.ArgumentParser(...)
    add_output_argument(parser, "scan")
    args = parser.parse_args()
    results = Recorder(args.output, append=args.append)
    results.add({"bench": "scan", "length": 197, "ms": 1.2})
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from retrieval.atomic import atomic_write_text
from retrieval.models.device import cpu_flags, cpuinfo_field

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
# the flags that decide which matmul / exp / bf16 kernels a CPU runs
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    flags = cpu_flags()
    return {
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "cpu": _cpu_model(),
        "cpu_flags": [flag for flag in KERNEL_FLAGS if flag in flags],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def environment() -> dict[str, Any]:
    """The run's environment as recorded beside every row (threads are read at each call: a
    benchmark may set them after start-up)."""
    return {**_static_environment(), "threads": torch.get_num_threads()}


def default_output(bench: str) -> Path:
    return RESULTS / f"{bench}.jsonl"


def add_output_argument(parser: argparse.ArgumentParser, bench: str) -> None:
    """``--output`` (where the rows go) and ``--append`` (keep the rows already there)."""
    parser.add_argument("--output", type=Path, default=default_output(bench),
                        help=f"JSON lines with the environment of the run (default: bench/results/{bench}.jsonl)")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --output")


class Recorder:
    """Collects a benchmark's rows: prints each as a JSON line and rewrites ``output`` whole."""

    def __init__(self, output: Path, append: bool = False):
        self.output = Path(output)
        self.lines: list[str] = []
        if append and self.output.is_file():
            self.lines = [line for line in self.output.read_text().splitlines() if line.strip()]

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "env": environment()}
        line = json.dumps(row)
        print(line, flush=True)
        self.lines.append(line)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output, "\n".join(self.lines) + "\n", durable=False)
        return row


__all__ = ["Recorder", "add_output_argument", "default_output", "environment"]
