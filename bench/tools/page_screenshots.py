"""The README's screenshots of the search page, taken from a real index (the demo's by default).

Serves the index on 127.0.0.1, drives Debian's Chromium with Playwright: one text query on the
search tab, one clip on the upload tab; writes ``docs/screenshot.png`` and
``docs/screenshot-upload.png`` and prints one JSON line (the query, the top hits with their
labels, and how long each view took to show).

    python bench/tools/page_screenshots.py --index runs/demo/index --query "a large red circle moving up"
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 120_000
VIDEOS_READY = """sel => { const v = [...document.querySelectorAll(sel + ' video')];
                           return v.length > 0 && v.every(x => x.readyState >= 2); }"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, default=REPO / "runs" / "demo" / "index")
    parser.add_argument("--query", default="a large red circle moving up")
    parser.add_argument("--clip", type=Path, help="clip for the upload tab (default: the index's first test clip)")
    parser.add_argument("-k", type=int, default=6)
    parser.add_argument("--output", type=Path, default=REPO / "docs", help="folder of the screenshots")
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        print(f"Chromium is not installed at {CHROMIUM}: run `make browser`", file=sys.stderr)
        return 2

    from playwright.sync_api import sync_playwright

    from app.web import serve

    demo, url = serve(args.index, port=_free_port(), prevent_thread_lock=True)
    page_state = demo.vtr_page
    hits = page_state.searcher.search(args.query, k=args.k, group=True)
    clip = args.clip or next(Path(h.path) for h in page_state.searcher.search(args.query, k=50)
                             if "/test/" in h.path)
    result = {"bench": "page_screenshots", "index": str(args.index), "query": args.query,
              "top": [{"video": page_state.guard.display_name(h.path), "score": round(h.score, 4),
                       "labels": [label for label, _ in h.labels[:2]], "label_source": h.label_source}
                      for h in hits[:3]]}
    args.output.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_text("clips indexed").wait_for()
            k = page.locator("#vtr-k input[type=number]")
            k.fill(str(args.k))
            k.press("Enter")
            started = time.perf_counter()
            page.locator("#vtr-query textarea").fill(args.query)
            page.locator("#vtr-search").click()
            page.locator("#vtr-results .vtr-card").first.wait_for()
            page.wait_for_function(VIDEOS_READY, arg="#vtr-results", timeout=TIMEOUT_MS)
            result["search_view_s"] = round(time.perf_counter() - started, 2)
            page.wait_for_timeout(3000)   # let the players draw their first frame
            page.screenshot(path=str(args.output / "screenshot.png"), full_page=True)

            page.get_by_role("tab", name="Upload a video").click()
            started = time.perf_counter()
            page.locator("#vtr-video input[type=file]").set_input_files(str(clip))
            page.locator("#vtr-similar .vtr-card").first.wait_for()
            page.wait_for_function(VIDEOS_READY, arg="#vtr-similar", timeout=TIMEOUT_MS)
            result["upload_view_s"] = round(time.perf_counter() - started, 2)
            result["upload_clip"] = page_state.guard.display_name(clip)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(args.output / "screenshot-upload.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
