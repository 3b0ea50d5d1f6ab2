"""Load on the search page: many concurrent clients querying ``/search`` over loopback.

Each client is a thread with its own HTTP connection pool that uses Gradio's HTTP API the way
any program would: ``POST /gradio_api/call/search`` queues the query, ``GET
/gradio_api/call/search/<event_id>`` streams the result (server-sent events). A query counts as
an error unless the stream ends with ``event: complete`` carrying result cards. Latency is
measured per query from the POST to the end of the stream, so it includes time in the queue.

Without ``--url`` the script builds a tiny synthetic corpus, a tiny random model and an index
in a temporary folder, and serves it on 127.0.0.1 (the test ``tests/app/test_load.py`` does the
same through :func:`run_load`).

    python bench/web_load.py                       # tiny index, 50 clients, 200 queries
    python bench/web_load.py --url http://127.0.0.1:7860/ --clients 20 --queries 100

Prints one JSON object and writes it to ``bench/results/web_load.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument, default_output
DEFAULT_QUERIES = (
    "a red circle moving up",
    "a big green triangle sinking",
    "a small blue star spinning",
    "something growing",
    "a purple cross bouncing over a noisy background",
    "shapes moving left",
)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def query_once(client: httpx.Client, base: str, text: str, k: int = 5, api: str = "search") -> str:
    """One query through Gradio's HTTP API; returns the result's first output (the cards HTML).

    Raises:
        RuntimeError: the queue answered with an error or the stream ended without a result.
    """
    # the search event's inputs: query, k, re-rank, filter box
    response = client.post(f"{base}gradio_api/call/{api}", json={"data": [text, k, False, ""]})
    response.raise_for_status()
    event_id = response.json()["event_id"]
    event = None
    with client.stream("GET", f"{base}gradio_api/call/{api}/{event_id}") as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = line.split(":", 1)[1].strip()
                if event == "error":
                    raise RuntimeError(f"server error: {payload[:300]}")
                return json.loads(payload)[0]
    raise RuntimeError(f"stream ended without a result (last event {event!r})")


def run_load(url: str, queries: Sequence[str] = DEFAULT_QUERIES, clients: int = 50, total: int = 200,
             k: int = 5, timeout_s: float = 120.0) -> dict[str, Any]:
    """``total`` queries spread over ``clients`` threads, all started together.

    Returns counts, errors (with the first few messages) and latency statistics in ms.
    """
    if clients < 1 or total < 1:
        raise ValueError("need at least one client and one query")
    base = url if url.endswith("/") else url + "/"
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_line = threading.Barrier(clients)
    counts = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def client_thread(index: int) -> None:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            start_line.wait()
            for j in range(counts[index]):
                text = queries[(index + j * clients) % len(queries)]
                started = time.perf_counter()
                try:
                    cards = query_once(client, base, text, k)
                    if 'class="vtr-card"' not in cards:
                        raise RuntimeError(f"no result cards in the answer: {cards[:200]!r}")
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s * max(counts) + 30)
    wall = time.perf_counter() - wall
    ms = [1000 * value for value in latencies]
    return {
        "clients": clients,
        "queries": total,
        "completed": len(latencies),
        "errors": len(errors) + sum(thread.is_alive() for thread in threads),
        "error_samples": errors[:5],
        "p50_ms": round(percentile(ms, 50), 1),
        "p90_ms": round(percentile(ms, 90), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 1) if ms else None,
        "wall_s": round(wall, 2),
        "throughput_qps": round(len(latencies) / wall, 1) if wall > 0 else None,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_index(workdir: Path) -> Path:
    """Synthetic corpus (8 test clips + the 4 moments of one long video), tiny model, index."""
    from indexer.jobs import JobSpec, run_index_job
    from retrieval.data.synthetic import generate_corpus
    from retrieval.models.retrieval_model import build_retrieval_model

    corpus = workdir / "corpus"
    generate_corpus(corpus, n_train=4, n_test=8, size=32, long_videos=1, progress=False)
    entries = json.loads((corpus / "test.json").read_text())
    for video in json.loads((corpus / "long.json").read_text()):
        entries += [{"video": video["video"], "caption": seg["caption"], "start": seg["start"], "end": seg["end"]}
                    for seg in video["segments"]]
    ann = workdir / "ann.json"
    ann.write_text(json.dumps(entries))
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=24, num_fusion_layers=1).save(workdir / "tiny")
    out = workdir / "index"
    run_index_job(JobSpec(model_dir=model, out=out, videos=corpus / "videos", ann_file=ann), workers=0,
                  batch_size=8, progress=False)
    return out


def write_results(result: dict[str, Any], path: Path = default_output("web_load"), append: bool = False) -> None:
    Recorder(path, append=append).add(result)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running page (default: serve a tiny index here)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4, help="the served page's queue concurrency")
    add_output_argument(parser, "web_load")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = None
    with tempfile.TemporaryDirectory(prefix="vtr-web-load-") as tmp:
        url = args.url
        setup: dict[str, Any] = {"server": url}
        if url is None:
            import torch

            from app.web import build_app, launch, open_searcher

            torch.set_num_threads(2)
            searcher = open_searcher(build_tiny_index(Path(tmp)))
            demo = build_app(searcher, concurrency=args.concurrency)
            url = launch(demo, port=free_port(), prevent_thread_lock=True)
            stats = searcher.stats()
            setup = {"server": "tiny synthetic index on 127.0.0.1", "items": stats["items"],
                     "model": "videomamba_tiny_test (D=24, random)", "index_type": stats["index_type"],
                     "concurrency": args.concurrency}
        try:
            result = {**setup, **run_load(url, clients=args.clients, total=args.queries)}
        finally:
            if demo is not None:
                demo.close()
    write_results(result, args.output, args.append)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
