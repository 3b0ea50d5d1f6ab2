"""Run every benchmark; each prints JSON lines, saved to bench/results/<name>.jsonl.

Usage: python bench/run_all.py [name ...]   (default: all, quick settings where a script has them)
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> extra arguments (kept short enough for one `make bench` on a 2-core machine)
BENCHES = {
    "scan": [],
    "encoder": [],
    "scaling": ["--alternate", "timesformer_ti", "videomamba_tiny", "videomamba_small", "videomamba_middle"],
    "rerank": ["--repeats", "2"],
    "search": ["--sizes", "10000,100000,1000000"],
    "index": [],
    "eval": ["--size", "128"],
    "direction_gap": [],
    "action_probe": [],
    "train_step": [],
    "engines": ["--clips", "64", "--reps", "2"],
    "index_build": ["--n", "1000000", "--queries", "300"],
}


def main(names: list[str]) -> int:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    failed = []
    for name in names or list(BENCHES):
        script = HERE / f"{name}.py"
        if not script.is_file():
            print(f"[bench] no such benchmark: {name}", file=sys.stderr)
            failed.append(name)
            continue
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        proc = subprocess.run([sys.executable, str(script), *BENCHES.get(name, [])], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        (results / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"[bench] {name}: {len(lines)} lines, exit {proc.returncode}, {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
