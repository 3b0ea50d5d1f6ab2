"""The search page in a real browser: Debian's Chromium driven by Playwright (sync API).

Types a query, presses Search, waits for result cards whose videos the browser actually loads
(moments positioned at their start), checks the blank-query message, uploads a clip on the
second tab and waits for its action labels and similar clips, screenshotting both views into
the test's temporary folder (the README's screenshots come from the demo model:
``bench/tools/page_screenshots.py``).

Chromium comes from Debian (``make browser``); a missing browser fails the test rather than
skipping it, so CI cannot pass without running it.
"""
from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow


def _bench_helpers():
    spec = importlib.util.spec_from_file_location("vtr_bench_web_load", REPO / "bench" / "web_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from app.web import build_app, launch, open_searcher

    index = _bench_helpers().build_tiny_index(tmp_path_factory.mktemp("web"))
    demo = build_app(open_searcher(index), concurrency=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = launch(demo, port=port, prevent_thread_lock=True)
    yield url, index.parent
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `make browser` (it apt-installs Debian's "
                    "chromium) and run the tests again", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _wait_for_videos(page, selector: str) -> None:
    """Until every video under ``selector`` has a frame to show (the browser fetched and decoded it)."""
    page.wait_for_function(
        """sel => { const v = [...document.querySelectorAll(sel + ' video')];
                    return v.length > 0 && v.every(x => x.readyState >= 2); }""",
        arg=selector, timeout=TIMEOUT_MS)


def test_search_and_upload_in_chromium(server, browser, tmp_path: Path) -> None:
    url, workdir = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)

    # the statistics line
    page.get_by_text("clips indexed").wait_for()
    assert re.search(r"12\s+clips indexed", page.locator("#vtr-stats").inner_text())

    # the example queries, read from the index as the page opened: one click puts one in the box
    example = page.locator("#vtr-examples button").first
    example.wait_for()
    # the page's load event re-renders the examples from the index: wait until they have text
    page.wait_for_function("""() => { const b = document.querySelector('#vtr-examples button');
                                return b !== null && b.innerText.trim().length > 0; }""")
    chosen = " ".join(example.inner_text().split())
    assert chosen
    example.click()
    page.wait_for_function("t => document.querySelector('#vtr-query textarea').value.trim() === t", arg=chosen)

    # a blank query gets the message, not an error
    query = page.locator("#vtr-query textarea")
    query.fill("   ")
    page.locator("#vtr-search").click()
    page.locator("#vtr-results").get_by_text("Type something to search for.").wait_for()
    assert page.locator("#vtr-results .vtr-card").count() == 0

    # every video, so the long video's moments are among them: its windows make one card (the
    # best window plays, the other windows are links), so cards + links = the 12 indexed items
    k = page.locator("#vtr-k input[type=number]")
    k.fill("12")
    k.press("Enter")
    query.fill("a little green square bouncing")
    page.locator("#vtr-search").click()
    page.locator("#vtr-results .vtr-card").first.wait_for()
    page.wait_for_function("document.querySelector('#vtr-status').innerText.includes('results for')")
    cards = page.locator("#vtr-results .vtr-card").count()
    links = page.locator("#vtr-results .vtr-more a").count()
    assert cards + links == 12 and links == 3
    assert page.locator("#vtr-status").inner_text().startswith(f"{cards} results for")
    scores = [float(s.split()[-1]) for s in page.locator("#vtr-results .vtr-score").all_inner_texts()]
    assert len(scores) == cards and scores == sorted(scores, reverse=True)
    assert page.locator("#vtr-results video").count() == cards
    _wait_for_videos(page, "#vtr-results")
    # a moment starts playing at its start: the media fragment positions the video
    moment = page.locator('#vtr-results video[src*="#t="]')
    assert moment.count() == 1
    start = float(moment.get_attribute("src").split("#t=")[1].split(",")[0])
    assert abs(moment.evaluate("v => v.currentTime") - start) < 0.2

    # the view the README shows: a typical query with its default k
    k.fill("8")
    k.press("Enter")
    query.fill("a video of a little red circle moving up")
    page.locator("#vtr-search").click()
    page.wait_for_function("document.querySelectorAll('#vtr-results .vtr-card').length === 8 && "
                           "document.querySelector('#vtr-status').innerText.includes('little red circle')")
    _wait_for_videos(page, "#vtr-results")
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
    assert (tmp_path / "search.png").stat().st_size > 10_000

    # upload a clip: its action labels and the clips like it
    page.get_by_role("tab", name="Upload a video").click()
    clip = workdir / "corpus" / "videos" / "test" / "0002.mp4"
    page.locator("#vtr-video input[type=file]").set_input_files(str(clip))
    page.locator("#vtr-similar .vtr-card").first.wait_for()
    labels_text = page.locator("#vtr-actions").inner_text()
    synthetic = (workdir / "corpus" / "labels.txt").read_text().split("\n")
    shown = [label for label in synthetic if label and label in labels_text]
    assert len(shown) >= 3, labels_text
    assert re.search(r"\d+(\.\d+)?%", labels_text)
    assert page.locator("#vtr-similar").get_by_text("0002.mp4").count() >= 1
    _wait_for_videos(page, "#vtr-similar")
    page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)
    assert (tmp_path / "upload.png").stat().st_size > 10_000

    assert not errors, errors
    page.close()
