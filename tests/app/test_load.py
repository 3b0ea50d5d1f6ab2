"""Bounded load on the served page: 50 concurrent clients, 200 queries in total, loopback only.

Every query must come back with result cards (no errors, no dropped requests) through Gradio's
queue with its concurrency limit. The p50/p99 latencies (queueing included) are printed and
written as ``bench/web_load.py`` writes them (into the test's temporary folder; the bench itself
records ``bench/results/web_load.jsonl``).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 50
QUERIES = 200
CONCURRENCY = 4

pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("vtr_bench_web_load", REPO / "bench" / "web_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fifty_clients_two_hundred_queries_no_errors(tmp_path: Path) -> None:
    from app.web import build_app, launch, open_searcher

    bench = _bench()
    searcher = open_searcher(bench.build_tiny_index(tmp_path))
    demo = build_app(searcher, concurrency=CONCURRENCY)
    url = launch(demo, port=bench.free_port(), prevent_thread_lock=True)
    try:
        assert url.startswith("http://127.0.0.1:")
        result = bench.run_load(url, clients=CLIENTS, total=QUERIES, timeout_s=120)
    finally:
        demo.close()
    result = {"server": "tiny synthetic index on 127.0.0.1", "items": searcher.stats()["items"],
              "model": "videomamba_tiny_test (D=24, random)", "concurrency": CONCURRENCY, **result}
    print("\nweb load:", json.dumps(result))
    written_to = tmp_path / "web_load.jsonl"
    bench.write_results(result, written_to)

    assert result["errors"] == 0, result["error_samples"]
    assert result["completed"] == QUERIES
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    written = json.loads(written_to.read_text())
    assert written["p50_ms"] == result["p50_ms"] and written["p99_ms"] == result["p99_ms"]


def test_percentile() -> None:
    bench = _bench()
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert bench.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
