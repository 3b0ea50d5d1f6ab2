"""Run every benchmark in bench/ (``make bench``); each writes bench/results/<name>.jsonl itself.

Usage: python bench/run_all.py [name ...]   (default: every script in bench/, quick settings where
a script has them). Tools that need other hardware or a built demo (bench/tools/) are not run.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# modules of bench/ that are not benchmarks
HELPERS = {"run_all", "record", "profiling", "floor"}
# name -> extra arguments (kept short enough for one `make bench` on a 2-core machine)
QUICK = {
    "scaling": ["--alternate", "timesformer_ti", "videomamba_tiny", "videomamba_small", "videomamba_middle"],
    "rerank": ["--repeats", "2"],
    "search": ["--sizes", "10000,100000,1000000"],
    "eval": ["--size", "128"],
    "engines": ["--clips", "64", "--reps", "2"],
    "index_build": ["--n", "1000000", "--queries", "300"],
    "channels": ["--parts", "ocr,fusion,scale"],
}


def benchmarks() -> list[str]:
    return sorted(path.stem for path in HERE.glob("*.py") if path.stem not in HELPERS)


def main(names: list[str]) -> int:
    known = benchmarks()
    failed = []
    for name in names or known:
        if name not in known:
            print(f"[bench] no such benchmark: {name} (known: {', '.join(known)})", file=sys.stderr)
            failed.append(name)
            continue
        output = HERE / "results" / f"{name}.jsonl"
        started = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *QUICK.get(name, []), "--output", str(output)])
        print(f"[bench] {name}: exit {proc.returncode}, {time.perf_counter() - started:.0f} s -> {output}", flush=True)
        if proc.returncode:
            failed.append(name)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
