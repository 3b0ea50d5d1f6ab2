"""Memory of the search page under hostile uploads: 4 concurrent 4096x4096 clips while searching.

A few kilobytes of mp4 can describe many 4096x4096 frames. This bench serves a tiny index in a
child process (one process per configuration, so one run never inherits another's memory),
waits until it idles, then sends ``--uploads`` such clips at once to ``/similar`` while a
client keeps searching. It samples the server's resident memory (``VmRSS``) every 10 ms and
reports the peak over the idle level, how long the uploads took, and how the searches fared
meanwhile.

Two configurations, run one after the other:

* ``bounded``: the page as shipped (``app.uploads``): container probed against the caps, one
  upload decoded at a time, scaled while decoding.
* ``unbounded``: the corpus decoding path for every upload, all at once (what the page did
  before: full-size RGB frames, then a float resize), for comparison.

    python bench/web_abuse.py                              # bounded, 4 uploads of 4096x4096
    python bench/web_abuse.py --modes unbounded --uploads 1  # ~1 GB per upload: keep it to one

Prints one JSON object per configuration and appends them to ``bench/results/web_abuse.jsonl``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from bench.record import Recorder, add_output_argument
from bench.web_load import build_tiny_index, free_port, percentile, query_once

#: The child process that serves the page; argv: index, port, mode.
SERVER = """
import sys, torch
torch.set_num_threads(2)
import app.uploads as uploads
from app.web import build_app, launch, open_searcher
index, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
limits = uploads.UploadLimits()
if mode == "unbounded":
    uploads.DIRECT_DECODE_PIXELS = 1 << 62   # every upload takes the corpus decoding path
    limits = uploads.UploadLimits(decoders=64)
demo = build_app(open_searcher(index), concurrency=4, upload_limits=limits)
print("ready", flush=True)
launch(demo, port=port, prevent_thread_lock=False)
"""


def write_clip(path: Path, size: int, frames: int) -> Path:
    """A flat-coloured h264 clip: tiny on disk, ``size x size`` per frame when decoded."""
    import av
    import numpy as np

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"preset": "ultrafast", "threads": "2"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = np.full((size, size, 3), (index * 30) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Sampler(threading.Thread):
    """Samples a process's resident memory every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(rss_mb(self.pid))
            time.sleep(self.interval)


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def run_mode(mode: str, index: Path, clip: Path, uploads: int) -> dict[str, Any]:
    import httpx
    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(index), str(port), mode], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, proc)
        with httpx.Client(timeout=120) as http:  # warm up: the model path and the classifier
            for _ in range(3):
                query_once(http, url, "a red circle moving up")
        Client(url, verbose=False).predict(handle_file(str(index.parent / "corpus/videos/test/0000.mp4")), 3,
                                           api_name="/similar")
        time.sleep(2.0)
        quiet = []
        for _ in range(50):
            quiet.append(rss_mb(proc.pid))
            time.sleep(0.02)
        idle = statistics.median(quiet)

        sampler = Sampler(proc.pid)
        sampler.start()
        outcomes: list[str] = []
        latencies: list[float] = []
        search_errors = [0]
        stop = threading.Event()

        def upload() -> None:
            try:
                Client(url, verbose=False).predict(handle_file(str(clip)), 4, api_name="/similar")
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001  (a refusal is an answer too; record what it said)
                outcomes.append(f"error: {str(exc)[:120]}")

        def search() -> None:
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        query_once(http, url, "a big green triangle sinking")
                        latencies.append(time.perf_counter() - started)
                    except Exception:  # noqa: BLE001  (any failure counts as a search error)
                        search_errors[0] += 1
                    time.sleep(0.1)

        searcher = threading.Thread(target=search)
        searcher.start()
        started = time.perf_counter()
        workers = [threading.Thread(target=upload) for _ in range(uploads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        upload_s = time.perf_counter() - started
        time.sleep(0.5)
        stop.set()
        searcher.join()
        sampler.done.set()
        sampler.join()
        peak = max(sampler.samples)
        ms = [1000 * s for s in latencies]
        return {
            "bench": "web_abuse", "mode": mode, "uploads": uploads, "upload_frame": f"{clip.stem}",
            "clip_bytes": clip.stat().st_size, "idle_rss_mb": round(idle, 1), "peak_rss_mb": round(peak, 1),
            "peak_over_idle_mb": round(peak - idle, 1), "uploads_answered": outcomes.count("ok"),
            "upload_errors": [o for o in outcomes if o != "ok"], "uploads_wall_s": round(upload_s, 2),
            "searches_during": len(latencies), "search_errors": search_errors[0],
            "search_p50_ms": round(percentile(ms, 50), 1) if ms else None,
            "search_max_ms": round(max(ms), 1) if ms else None, "torch_threads": 2,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["bounded"], choices=["bounded", "unbounded"])
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--size", type=int, default=4096, help="frame width and height of the uploaded clip")
    parser.add_argument("--frames", type=int, default=16)
    add_output_argument(parser, "web_abuse")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vtr-web-abuse-") as tmp:
        tmp = Path(tmp)
        index = build_tiny_index(tmp)
        clip = write_clip(tmp / f"{args.size}x{args.size}.mp4", args.size, args.frames)
        results = Recorder(args.output, append=args.append)
        for mode in args.modes:
            result = run_mode(mode, index, clip, args.uploads)
            results.add(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
