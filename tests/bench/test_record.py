"""bench/record.py: every result row carries the run's environment, and the file is whole after each row."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.record import Recorder, add_output_argument  # noqa: E402


def test_rows_carry_the_environment_and_the_file_is_rewritten_whole(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results" / "x.jsonl"
    results = Recorder(out)
    results.add({"bench": "x", "value": 1})
    assert len(out.read_text().splitlines()) == 1          # written after the first row already
    results.add({"bench": "x", "value": 2})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["value"] for row in rows] == [1, 2]
    env = rows[0]["env"]
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert env["commit"] == (head.stdout.strip() or None)
    assert env["cpu"] and isinstance(env["cpu_flags"], list)
    assert env["torch"] and env["threads"] >= 1
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows
    assert not list(out.parent.glob(".*tmp*"))             # no temporary file left beside it


def test_append_keeps_earlier_rows_and_overwrite_drops_them(tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    Recorder(out).add({"run": 1})
    Recorder(out, append=True).add({"run": 2})
    assert [json.loads(line)["run"] for line in out.read_text().splitlines()] == [1, 2]
    Recorder(out).add({"run": 3})
    assert [json.loads(line)["run"] for line in out.read_text().splitlines()] == [3]


def test_every_benchmark_takes_output_and_run_all_finds_them() -> None:
    spec = importlib.util.spec_from_file_location("vtr_bench_run_all", REPO / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    names = run_all.benchmarks()
    assert "scan" in names and "parity" in names and "record" not in names and "run_all" not in names
    for name in names:   # each script records through add_output_argument, so run_all's --output reaches it
        assert "add_output_argument(" in (REPO / "bench" / f"{name}.py").read_text(), name
    parser = argparse.ArgumentParser()
    add_output_argument(parser, "scan")
    args = parser.parse_args([])
    assert args.output == REPO / "bench" / "results" / "scan.jsonl" and args.append is False
