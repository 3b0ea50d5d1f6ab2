"""The search page served for real on 127.0.0.1 over a tiny index, driven through gradio_client
and raw HTTP.

The model is tiny and untrained, so rankings mean nothing; the tests check what must hold for
any model: k cards sorted by score that play files inside the corpus root (moments from their
start), clear messages instead of errors for bad queries, labels and similar clips for an
uploaded video, and a file route that serves corpus clips and nothing else.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from gradio_client import Client, handle_file
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.web import (
    BLANK_MESSAGE,
    CorpusGuard,
    SearchPage,
    build_app,
    example_queries,
    launch,
    open_searcher,
    render_hits,
    serve,
)
from indexer.jobs import JobSpec, run_index_job
from indexer.query import QUERY_LIMIT
from indexer.search import Hit, Moment, clip_key
from indexer.store import open_index
from retrieval.labels import load_labels

CARD = re.compile(r'<div class="vtr-card" data-rank="(\d+)" data-score="([-0-9.e]+)"')
VIDEO_SRC = re.compile(r'<video src="vtr/clip/([0-9a-f]{16})(#t=[^"]*)?"')
MOMENT_LINK = re.compile(r'<a href="vtr/clip/([0-9a-f]{16})(#t=[^"]*)?"')


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(synthetic_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared corpus (tests here put files beside its clips) with ``ann.json``."""
    root = shutil.copytree(synthetic_corpus, tmp_path_factory.mktemp("corpus") / "corpus")
    # the 8 test clips whole, plus the 4 captioned moments of the first long video
    entries = json.loads((root / "test.json").read_text())
    for video in json.loads((root / "long.json").read_text())[:1]:
        entries += [{"video": video["video"], "caption": s["caption"], "start": s["start"], "end": s["end"]}
                    for s in video["segments"]]
    (root / "ann.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="module")
def videos_root(corpus: Path) -> Path:
    return (corpus / "videos").resolve()


@pytest.fixture(scope="module")
def index(corpus: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    spec = JobSpec(model_dir=model_dir, out=out, videos=corpus / "videos", ann_file=corpus / "ann.json")
    run_index_job(spec, workers=0, batch_size=8, progress=False)
    return out


@pytest.fixture(scope="module")
def demo(index: Path):
    demo = build_app(open_searcher(index), concurrency=2)
    yield demo
    demo.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url(demo) -> str:
    return launch(demo, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True)


@pytest.fixture(scope="module")
def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def _get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET exactly ``raw_path`` (no client-side normalisation of ``..``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _cards(html: str) -> list[tuple[int, float]]:
    return [(int(rank), float(score)) for rank, score in CARD.findall(html)]


# ---------------------------------------------------------------------------------- queries


def _item_path(index: Path, key: str) -> Path:
    """The video of the item a clip URL's key names."""
    (path,) = [item["path"] for item in open_index(index).items
               if clip_key(item["path"], item["start"], item["end"]) == key]
    return Path(path)


def test_search_returns_sorted_playable_clips_inside_the_corpus(client: Client, url: str,
                                                                 videos_root: Path, index: Path) -> None:
    html, status = client.predict("a red circle moving up", 5, False, api_name="/search")
    cards = _cards(html)
    assert [rank for rank, _ in cards] == [1, 2, 3, 4, 5]
    scores = [score for _, score in cards]
    assert scores == sorted(scores, reverse=True)
    assert status.startswith("5 results for")
    sources = VIDEO_SRC.findall(html)
    assert len(sources) == 5
    for item_id, _ in sources:
        path = _item_path(index, item_id)
        assert path.resolve().is_relative_to(videos_root) and path.is_file()
    # what the page links to is served, byte for byte
    code, body = _get(url, "/vtr/clip/" + sources[0][0])
    assert code == 200 and body == _item_path(index, sources[0][0]).read_bytes()
    assert 'class="vtr-score">score ' in html and 'class="vtr-chip"' in html


def test_search_json_and_rerank(client: Client, videos_root: Path) -> None:
    for rerank in (False, True):
        result = client.predict("a big green triangle", 4, rerank, api_name="/search_json")
        hits = result["hits"]
        assert result["query"] == "a big green triangle" and result["message"] is None
        assert len(hits) == 4
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        for hit in hits:
            # relative to the corpus root: the server's own folders are not shown
            assert not Path(hit["video_path"]).is_absolute() and (videos_root / hit["video_path"]).is_file()
            assert hit["url"].startswith("vtr/clip/" + clip_key(str(videos_root / hit["video_path"]), hit["start"],
                                                                hit["end"]))
            assert len(hit["labels"]) == 5 and hit["captions"]


def test_the_filter_box_restricts_results_before_the_top_k(client: Client, demo, videos_root: Path,
                                                           index: Path) -> None:
    html, status = client.predict("a red circle moving up", 5, False, "path=long", api_name="/search")
    sources = VIDEO_SRC.findall(html)
    assert sources and status.startswith("1 results for")       # one video, its moments grouped
    assert all(_item_path(index, item_id).resolve().parent == videos_root / "long" for item_id, _ in sources)
    result = client.predict("a red circle", 3, False, "duration<=4.5 path=long", api_name="/search_json")
    assert result["message"] is None and len(result["hits"]) == 1 and result["hits"][0]["moments"]
    raw = SearchPage(demo.vtr_page.searcher, group=False)
    assert len(_cards(raw.search("shapes", 50, False, "path=test/*")[0])) == 8
    for bad, why in (("lang=en", "unknown filter column"), ("path=test/[ab", "malformed glob")):
        html, status = demo.vtr_page.search("shapes", 5, False, bad)
        assert "Filter not applied" in status and why in html and not _cards(html)
        assert client.predict("shapes", 3, False, bad, api_name="/search_json")["hits"] == []


def test_k_is_honoured_and_clamped(demo) -> None:
    page = demo.vtr_page
    assert len(_cards(page.search("shapes", 1)[0])) == 1
    # all videos (8 clips and the long one): k is capped, not an error
    assert len(_cards(page.search("shapes", 10_000)[0])) == 9
    assert len(_cards(page.search("shapes", 0)[0])) == 1
    raw = SearchPage(page.searcher, group=False)        # one card per item: the long video's 4 moments
    assert len(_cards(raw.search("shapes", 10_000)[0])) == 12


def test_an_untrained_matching_head_is_not_offered(index: Path) -> None:
    searcher = open_searcher(index)
    searcher.model.matching_trained = False              # what a recipe with loss.vtm = 0 saves
    page_app = build_app(searcher, concurrency=1)
    try:
        box = next(b for b in page_app.blocks.values() if getattr(b, "elem_id", None) == "vtr-rerank")
        assert box.interactive is False and "untrained" in box.label
        page = page_app.vtr_page
        plain = [h.item_id for h in page.search_hits("a big green triangle", 4, False)[1]]
        asked = [h.item_id for h in page.search_hits("a big green triangle", 4, True)[1]]
        assert asked == plain                            # re-rank request ignored, not an error page
    finally:
        page_app.close()


def test_moments_play_from_their_start(demo, videos_root: Path) -> None:
    html, _ = demo.vtr_page.search("a large blue triangle shrinking", 12)
    items = demo.vtr_page.searcher.reader.items

    def where(found):
        by_key = {clip_key(item["path"], item["start"], item["end"]): item["path"] for item in items}
        return [(Path(by_key[key]).relative_to(videos_root).as_posix(), t) for key, t in found]

    players, links = where(VIDEO_SRC.findall(html)), where(MOMENT_LINK.findall(html))
    # the long video is one card: its best moment plays, the other three are links to their moments
    assert len([video for video, _ in players if video == "long/0000.mp4"]) == 1
    moments = {t for video, t in players + links if video == "long/0000.mp4"}
    assert moments == {"#t=0.00,4.00", "#t=4.00,8.00", "#t=8.00,12.00", "#t=12.00,16.00"}
    assert len(links) == 3 and 'data-moments="3"' in html and "also at" in html
    assert all(t == "" for video, t in players if video.startswith("test/"))
    assert "0:12.0–0:16.0" in html and "whole clip" in html


def test_cards_and_json_name_the_label_source(demo, client: Client) -> None:
    html, _ = demo.vtr_page.search("a red circle moving up", 3)
    # this untrained model has no action head: its labels are zero-shot, and the page says so
    assert html.count('data-source="zero-shot"') == 3
    result = client.predict("a red circle moving up", 9, False, api_name="/search_json")
    assert result["label_source"] == "zero-shot"
    assert {h["label_source"] for h in result["hits"]} == {"zero-shot"}
    long = [h for h in result["hits"] if h["video_path"].endswith("long/0000.mp4")]
    assert len(long) == 1 and len(long[0]["moments"]) == 3
    assert len({h["video_path"] for h in result["hits"]}) == len(result["hits"])


@pytest.mark.parametrize("query", ["", "   ", " \t\n\r ", "\x00\x01\x1b\x7f", "!!! ... ???"])
def test_blank_queries_get_a_message(client: Client, query: str) -> None:
    html, status = client.predict(query, 5, False, api_name="/search")
    assert BLANK_MESSAGE in html and BLANK_MESSAGE in status
    assert not _cards(html)
    assert client.predict(query, 5, False, api_name="/search_json")["message"] == BLANK_MESSAGE


def test_overlong_query_is_truncated_with_a_note(client: Client) -> None:
    html, status = client.predict("red circle " * 910, 3, False, api_name="/search")  # 10,010 characters
    assert len(_cards(html)) == 3
    assert "10,009 characters long" in status and f"limit is {QUERY_LIMIT}" in status
    result = client.predict("y" * 10_000, 3, False, api_name="/search_json")
    assert result["query"] == "y" * QUERY_LIMIT and len(result["hits"]) == 3


def test_control_characters_are_stripped(client: Client) -> None:
    html, status = client.predict("a red\x00 circle\x1b moving\x07 up", 3, False, api_name="/search")
    assert len(_cards(html)) == 3
    assert "Removed control characters" in status and "a red circle moving up" in status
    assert "\x00" not in html + status and "\x1b" not in html + status


def test_examples_come_from_index_captions(demo, corpus: Path) -> None:
    captions = {e["caption"] for e in json.loads((corpus / "ann.json").read_text())}
    examples = example_queries(demo.vtr_page.searcher)
    assert examples and set(examples) <= captions


# ---------------------------------------------------------------------------------- upload tab


def test_an_uploaded_clip_is_encoded_once_for_labels_and_search(demo, videos_root: Path, monkeypatch) -> None:
    page = demo.vtr_page
    page.classifier()   # the label prompts are encoded once per page, not per upload
    model = page.searcher.model
    calls = []
    real = model.encode_video
    monkeypatch.setattr(model, "encode_video", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    labels, hits = page.describe_video(videos_root / "test" / "0003.mp4", 3)
    assert calls == [1] and labels and hits


def test_upload_gives_labels_and_similar_clips(client: Client, videos_root: Path, index: Path) -> None:
    clip = videos_root / "test" / "0003.mp4"
    labels, html, status = client.predict(handle_file(str(clip)), 4, api_name="/similar")
    confidences = labels["confidences"]
    assert len(confidences) == 5
    probs = [c["confidence"] for c in confidences]
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
    assert labels["label"] == confidences[0]["label"]
    cards = _cards(html)
    # it finds itself at the top, up to near-ties (this untrained model maps some clips to almost the
    # same vector); for a per-frame model its own score is the mean cosine over all pairs of its
    # frames (the evaluation's score), just under 1
    shown = [_item_path(index, i).relative_to(videos_root).as_posix() for i, _ in VIDEO_SRC.findall(html)]
    assert len(cards) == 4 and "test/0003.mp4" in shown
    own = cards[shown.index("test/0003.mp4")][1]
    assert 0.99 < own and own >= cards[0][1] - 2e-3
    assert "similar clips" in status


def test_upload_of_a_non_video_is_a_clear_error(client: Client, tmp_path: Path) -> None:
    bogus = tmp_path / "not_a_video.mp4"
    bogus.write_text("this is text, not a video")
    with pytest.raises(Exception, match="Cannot read this video"):
        client.predict(handle_file(str(bogus)), 4, api_name="/similar")


# ---------------------------------------------------------------------------------- file serving


def test_only_the_indexed_clips_are_served(url: str, videos_root: Path, index: Path, tmp_path: Path) -> None:
    items = open_index(index).items
    clip = Path(items[1]["path"])
    key = clip_key(items[1]["path"], items[1]["start"], items[1]["end"])
    code, body = _get(url, "/vtr/clip/" + key)
    assert code == 200 and body == clip.read_bytes()
    code, _ = _get(url, f"/gradio_api/file={clip}")  # not by its server path either
    assert code != 200

    # files beside the videos, inside the corpus root but not in the index
    notes = videos_root / "notes.txt"
    notes.write_text("PRIVATE-NOTES")
    unindexed = videos_root / "test" / "extra.mp4"
    shutil.copy(clip, unindexed)
    # a link inside the corpus root that leads outside it
    link = videos_root / "escape.mp4"
    secret = tmp_path / "secret.mp4"
    secret.write_text("TOP-SECRET-CONTENT")
    link.symlink_to(secret)
    try:
        refused = [
            f"/gradio_api/file={notes}",
            f"/gradio_api/file={unindexed}",
            "/vtr/clip/1",                            # a row number names nothing
            "/vtr/clip/" + clip_key(str(unindexed), None, None),   # the key an unindexed file would have
            "/vtr/clip/" + key.upper(),
            "/vtr/clip/" + key + "0",
            "/vtr/clip/" + key[:-1],
            "/vtr/clip/-1",
            "/vtr/clip/1.0",
            "/vtr/clip/99999999999999999999999",
            "/vtr/clip/..%2F..%2F..%2Fetc%2Fpasswd",
            "/vtr/clip/1/../../../../etc/passwd",
            "/gradio_api/file=/etc/passwd",
            f"/gradio_api/file={videos_root}/../../../../../../etc/passwd",
            f"/gradio_api/file={videos_root}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            f"/gradio_api/file={videos_root}%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
            "/gradio_api/file=../../../../../../etc/passwd",
            "/gradio_api/file=etc/passwd",
            f"/gradio_api/file={index.resolve()}/manifest.json",  # next to the corpus, not in it
            f"/gradio_api/file={videos_root.parent}/ann.json",
            f"/gradio_api/file={link}",
            f"/gradio_api/file={secret}",
            "/file=/etc/passwd",
        ]
        for path in refused:
            code, body = _get(url, path)
            assert code != 200, path
            assert b"root:" not in body and b"TOP-SECRET-CONTENT" not in body and b"PRIVATE-NOTES" not in body
            assert body != clip.read_bytes(), path
    finally:
        link.unlink()
        notes.unlink()
        unindexed.unlink()


def test_responses_name_videos_relative_to_the_corpus_root(demo, videos_root: Path) -> None:
    page = demo.vtr_page
    html, _ = page.search("a red circle moving up", 12)
    assert str(videos_root) not in html and "test/0003.mp4" in html
    result = page.search_json("a red circle moving up", 12)
    assert str(videos_root) not in json.dumps(result)
    message = page.redact(f"cannot read video {videos_root}/test/0001.mp4: moov atom not found")
    assert message == "cannot read video test/0001.mp4: moov atom not found"


def test_hits_outside_the_corpus_are_not_linked(videos_root: Path, tmp_path: Path) -> None:
    guard = CorpusGuard([videos_root])
    inside = videos_root / "test" / "0000.mp4"
    assert guard.resolve(inside) == inside
    assert guard.resolve(videos_root / "test" / ".." / "test" / "0000.mp4") == inside
    assert guard.resolve("/etc/passwd") is None
    assert guard.resolve(videos_root / ".." / "ann.json") is None
    assert guard.resolve(videos_root / "test" / "missing.mp4") is None
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"x")
    (tmp_path / "link.mp4").symlink_to(inside)
    assert guard.resolve(tmp_path / "link.mp4") == inside  # served as its real, in-corpus path

    hits = [Hit(0, str(outside), None, None, 0.9, [("jumping", 0.5)], ["a clip"]),
            Hit(1, str(inside), 1.0, 2.5, 0.8, [("running", 0.4)], ["<script>alert(1)</script> ${x} {{y}}"])]
    html = render_hits(hits, guard)
    assert html.count("<video") == 1 and "not served" in html
    assert str(outside) not in html  # not even its full path is shown
    assert f'src="vtr/clip/{clip_key(str(inside), 1.0, 2.5)}#t=1.00,2.50"' in html and str(videos_root) not in html
    assert "<script>" not in html and "${x}" not in html and "{{y}}" not in html
    assert "&lt;script&gt;" in html
    # further moments link into the corpus only; the label source is shown beside the labels
    grouped = Hit(1, str(inside), 1.0, 2.5, 0.8, [("growing", 0.9)], ["a clip"], label_source="head",
                  moments=(Moment(5, 3.0, 4.5, 0.7),))
    html = render_hits([grouped], guard)
    assert f'<a href="vtr/clip/{clip_key(str(inside), 3.0, 4.5)}#t=3.00,4.50"' in html and 'data-source="head"' in html
    outside_moment = Hit(0, str(outside), None, None, 0.9, [], [], moments=(Moment(2, 0.0, 1.0, 0.5),))
    html = render_hits([outside_moment], guard)
    assert "<a " not in html and "also at" in html


# ---------------------------------------------------------------------------------- start-up


def test_missing_index_or_model_fails_before_serving(index: Path, other_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serve(tmp_path / "no_such_index", prevent_thread_lock=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a vtr index"):
        serve(tmp_path / "empty", prevent_thread_lock=True)
    with pytest.raises(FileNotFoundError, match="model directory"):
        serve(index, model=tmp_path / "no_such_model", prevent_thread_lock=True)
    with pytest.raises(ValueError):  # other weights: a model is its weights, not its folder's name
        serve(index, model=other_model_dir, prevent_thread_lock=True)


def test_label_set_is_checked_at_start_up(demo, index: Path, tmp_path: Path) -> None:
    searcher = demo.vtr_page.searcher
    with pytest.raises(FileNotFoundError, match="labels"):
        serve(index, labels=str(tmp_path / "no_labels.txt"), prevent_thread_lock=True)
    custom = tmp_path / "labels.txt"
    custom.write_text("jumping\nswimming\n\n")
    assert SearchPage(searcher, labels=custom).label_names == ["jumping", "swimming"]
    assert SearchPage(searcher, labels=["a", "b"]).label_names == ["a", "b"]
    # without labels: the set the index recorded (here the synthetic one)
    assert SearchPage(searcher).label_names == load_labels("synthetic")


def test_recorded_model_missing_fails_clearly(index: Path, model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(index.resolve(), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["extra"]["model_dir"] = str(tmp_path / "gone")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((FileNotFoundError, ValueError)):
        open_searcher(copy)


def test_cli_serve_reports_start_up_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "missing"), "--port", "1"])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    help_text = CliRunner().invoke(cli_app, ["serve", "--help"]).output
    for option in ("--index", "--model", "--host", "--port", "--concurrency"):
        assert option in help_text


def test_binds_loopback_with_a_queue_limit(demo, url: str) -> None:
    assert urlsplit(url).hostname == "127.0.0.1"
    assert demo.server_name == "127.0.0.1"
    assert demo._queue.default_concurrency_limit == 2
    model_events = [fn for fn in demo.fns.values() if fn.concurrency_id == "vtr-model"]
    assert {fn.api_name for fn in model_events} >= {"search", "search_json"}
    assert all(fn.concurrency_limit in ("default", 2) for fn in model_events)  # one shared limit
    upload_events = [fn for fn in demo.fns.values() if fn.concurrency_id == "vtr-upload"]
    assert "similar" in {fn.api_name for fn in upload_events}
    assert all(fn.concurrency_limit == 1 for fn in upload_events)  # uploads decode one at a time
    assert demo.allowed_paths == []  # Gradio's file route serves no corpus folder


@pytest.mark.slow
def test_vtr_serve_command_serves_the_page(index: Path) -> None:
    """``vtr serve`` as a user runs it: a process that binds 127.0.0.1 and answers searches."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--index", str(index), "--port", str(port),
                             "--concurrency", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if _get(url, "/")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vtr serve did not come up in 180 s"
            time.sleep(0.5)
        html, status = Client(url, verbose=False).predict("a red circle", 3, False, api_name="/search")
        assert len(_cards(html)) == 3 and status.startswith("3 results")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert f"http://127.0.0.1:{port}" in proc.stdout.read().decode()


# ---------------------------------------------------------------------------------- upload limits


def _write_video(path: Path, width: int, height: int, frames: int, fps: int = 8) -> Path:
    """A small h264 mp4 of flat frames (a few KB even at 4096x4096)."""
    import av
    import numpy as np

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = np.full((height, width, 3), (index * 40) % 256, np.uint8)
            frame[: height // 2, : width // 2, 0] = 200
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_uploads_beyond_the_caps_are_refused_before_decoding(demo, tmp_path: Path, monkeypatch) -> None:
    import gradio as gr

    from app import uploads

    page = demo.vtr_page
    huge = _write_video(tmp_path / "huge.mp4", 4096, 4096, 2)
    assert huge.stat().st_size < 300_000  # a small file that describes 2 x 16.8 megapixels

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the upload is beyond the caps")

    monkeypatch.setattr(uploads, "_decode_scaled", no_decoding)
    monkeypatch.setattr(uploads, "load_clip", no_decoding)
    monkeypatch.setattr(page, "upload_limits", uploads.UploadLimits(max_pixels=1920 * 1080))
    with pytest.raises(gr.Error, match=r"Video refused: the video is 4096x4096 \(16.8 megapixels.*up to 2.1"):
        page.upload(str(huge), 4)
    long = _write_video(tmp_path / "long.mp4", 64, 64, 40)  # 5 s, 40 frames
    monkeypatch.setattr(page, "upload_limits", uploads.UploadLimits(max_seconds=2))
    with pytest.raises(gr.Error, match="lasts 5 s; this page accepts clips up to 2 s"):
        page.upload(str(long), 4)
    monkeypatch.setattr(page, "upload_limits", uploads.UploadLimits(max_frames=30))
    with pytest.raises(gr.Error, match="40 frames; this page accepts clips of up to 30 frames"):
        page.upload(str(long), 4)


def test_large_uploads_are_scaled_while_decoding_one_at_a_time(demo, tmp_path: Path, monkeypatch) -> None:
    import threading

    import numpy as np

    from app import uploads
    from retrieval.data.video import load_clip

    preprocess = demo.vtr_page.searcher.preprocess
    limits = uploads.UploadLimits()
    huge = _write_video(tmp_path / "huge.mp4", 4096, 4096, 3)
    clip = uploads.decode_upload(huge, preprocess, limits)
    assert tuple(clip.shape) == (3, preprocess.num_frames, preprocess.size, preprocess.size)
    # scaled by the decoder: the same picture as the corpus path gives (small scaler differences)
    wide = _write_video(tmp_path / "wide.mp4", 1600, 912, 6)
    scaled = uploads.decode_upload(wide, preprocess, limits).numpy()
    exact = load_clip(wide, preprocess).numpy()
    assert np.abs(scaled - exact).mean() < 0.05

    # at most `decoders` uploads decode at once, however many requests arrive
    running, peak, guard = [0], [0], threading.Lock()
    real = uploads._decode_scaled

    def counted(*args):
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(*args)
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(uploads, "_decode_scaled", counted)
    threads = [threading.Thread(target=uploads.decode_upload, args=(wide, preprocess, limits)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 1


def _gone(name: str, timeout: float = 10.0) -> bool:
    from gradio.utils import get_upload_folder

    def present() -> bool:
        # os.walk skips a directory that disappears while it is being listed; the janitor
        # deletes upload directories concurrently, which makes Path.rglob raise.
        return any(name in files for _root, _dirs, files in os.walk(get_upload_folder()))

    deadline = time.monotonic() + timeout
    while present():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_uploads_are_deleted_once_answered(demo, client: Client, videos_root: Path, tmp_path: Path,
                                           monkeypatch) -> None:
    monkeypatch.setattr(demo.vtr_page.janitor, "grace_s", 0.2)
    name = f"upload-{os.getpid()}-{time.time_ns()}.mp4"
    clip = tmp_path / name
    shutil.copy(videos_root / "test" / "0002.mp4", clip)
    _, html, _ = client.predict(handle_file(str(clip)), 3, api_name="/similar")
    assert len(_cards(html)) == 3
    assert _gone(name)
    bogus = tmp_path / f"bad-{name}"
    bogus.write_text("not a video")
    with pytest.raises(Exception, match="Cannot read this video"):
        client.predict(handle_file(str(bogus)), 3, api_name="/similar")
    assert _gone(bogus.name)


def test_identical_uploads_queued_together_are_all_answered(demo, videos_root: Path, monkeypatch) -> None:
    """Gradio stores identical uploads under one path: answering the first must not delete the
    file a second request is still waiting to read."""
    from gradio.utils import get_upload_folder

    monkeypatch.setattr(demo.vtr_page.janitor, "grace_s", 1.0)
    folder = Path(get_upload_folder()) / f"vtr-test-{os.getpid()}-{time.time_ns()}"
    folder.mkdir(parents=True)
    upload = folder / "same.mp4"
    shutil.copy(videos_root / "test" / "0004.mp4", upload)
    first = demo.vtr_page.upload(str(upload), 3)
    second = demo.vtr_page.upload(str(upload), 3)  # queued behind the first, same path
    assert len(_cards(first[1])) == len(_cards(second[1])) == 3
    deadline = time.monotonic() + 10
    while upload.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not upload.exists() and not folder.exists()


def _post_upload(url: str, name: str, data: bytes) -> tuple[int, str]:
    import httpx

    response = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": (name, data, "video/mp4")},
                          timeout=30)
    return response.status_code, response.text


def test_uploads_never_searched_are_deleted_and_their_space_is_capped(index: Path, videos_root: Path) -> None:
    from gradio.utils import get_upload_folder

    from app.uploads import UploadLimits

    clip = (videos_root / "test" / "0005.mp4").read_bytes()
    # a page of its own: the shared one's earlier uploads would count against the space
    demo = build_app(open_searcher(index), upload_limits=UploadLimits(space=2 * len(clip) + 2000))
    janitor = demo.vtr_page.janitor
    janitor.lifetime_s = 0.5
    url = launch(demo, host="127.0.0.1", port=_free_port(), prevent_thread_lock=True)
    try:
        name = f"never-searched-{os.getpid()}-{time.time_ns()}.mp4"
        code, body = _post_upload(url, name, clip)
        assert code == 200, body
        (answer,) = json.loads(body)
        # the answer names the file inside the upload folder, not by the server's absolute path
        assert not os.path.isabs(answer) and str(get_upload_folder()) not in body
        stored = Path(get_upload_folder()) / answer
        assert stored.name == name and stored.read_bytes() == clip
        # the page can still preview it by that name; nothing else is reachable by a relative name
        assert _get(url, f"/gradio_api/file={answer}") == (200, clip)
        assert _get(url, f"/gradio_api/file={answer}/../../{answer}")[0] != 200
        assert _gone(name)                      # deleted after its lifetime, never searched
        assert janitor.used() == 0

        # the uploads on disk together may take `space` bytes: one more is refused with a reason
        janitor.lifetime_s = 2.0
        first, second = f"a-{name}", f"b-{name}"
        assert _post_upload(url, first, clip)[0] == 200
        assert _post_upload(url, second, clip + b"\0")[0] == 200
        code, body = _post_upload(url, f"c-{name}", clip + b"\0\0")
        assert code == 507 and "space for uploads" in body and "is full" in body
        assert _gone(f"c-{name}", timeout=0) and not _gone(first, timeout=0)
        # space comes back as uploads expire
        assert _gone(first) and _gone(second)
        assert janitor.used() == 0
        code, body = _post_upload(url, f"d-{name}", clip)
        assert code == 200, body
    finally:
        demo.close()


def test_the_clip_route_answers_404_for_any_non_ascii_key(url: str) -> None:
    for raw in ("/vtr/clip/%C2%B2", "/vtr/clip/%D9%A3", "/vtr/clip/%EF%BC%91", "/vtr/clip/1%C2%B2",
                "/vtr/clip/" + "%D9%A3" * 16, "/vtr/clip/" + "%EF%BD%81" * 16):
        code, body = _get(url, raw)
        assert code == 404, (raw, code, body)


def _write_size_switching_ts(path: Path, first: int, then: int, frames_first: int = 60, frames_then: int = 40) -> Path:
    """MPEG-TS whose header and first frames_first frames are first x first, then then x then
    (two encodes back to back: a TS stream may change its size at any keyframe)."""
    import io

    import av
    import numpy as np

    def part(side: int, count: int, start: int) -> bytes:
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=8, options={"preset": "ultrafast", "threads": "1"})
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            for index in range(count):
                frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), index * 3 % 256, np.uint8),
                                                   format="rgb24")
                frame.pts = start + index
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return buffer.getvalue()

    path.write_bytes(part(first, frames_first, 0) + part(then, frames_then, frames_first))
    return path


@pytest.mark.parametrize("direct", [True, False], ids=["corpus-decoding", "scaled-decoding"])
def test_a_stream_that_grows_after_its_header_is_refused(demo, tmp_path: Path, monkeypatch, direct: bool) -> None:
    import gradio as gr

    from app import uploads

    page = demo.vtr_page
    monkeypatch.setattr(page, "upload_limits", uploads.UploadLimits(max_pixels=128 * 128))
    if not direct:
        monkeypatch.setattr(uploads, "DIRECT_DECODE_PIXELS", 0)
    grows = _write_size_switching_ts(tmp_path / "grows.ts", 64, 160)   # 160x160 is over the 128x128 cap
    assert uploads.probe(grows, page.upload_limits) == uploads.VideoProbe(64, 64, 100, pytest.approx(12.5, abs=1))
    with pytest.raises(gr.Error, match=r"Video refused: the video changes its frame size( to 160x160)? after its "
                                       r"first frames \(the container states 64x64\)"):
        page.upload(str(grows), 4)
    # the same stream within the cap still plays: only a size above the header's is refused
    steady = _write_size_switching_ts(tmp_path / "steady.ts", 64, 64)
    labels, html, _ = page.upload(str(steady), 4)
    assert labels and len(_cards(html)) == 4


def test_decoding_holds_every_frame_to_a_pixel_cap(tmp_path: Path) -> None:
    from retrieval.data.video import FrameTooLarge, read_frames

    steady = _write_size_switching_ts(tmp_path / "steady.ts", 64, 64)
    frames, info = read_frames(steady, num_frames=4, max_pixels=64 * 64)
    assert info["backend"] == "pyav" and tuple(frames.shape) == (4, 64, 64, 3)
    # a little over the cap: the frame is decoded, then refused
    with pytest.raises(FrameTooLarge) as caught:
        read_frames(_write_size_switching_ts(tmp_path / "grows.ts", 64, 160), num_frames=4, max_pixels=64 * 64)
    assert caught.value.size == (160, 160)
    # far over it: FFmpeg refuses the frame before allocating it
    with pytest.raises(FrameTooLarge, match="could not be decoded within 4,096 pixels") as caught:
        read_frames(_write_size_switching_ts(tmp_path / "huge.ts", 64, 512), num_frames=4, max_pixels=64 * 64)
    assert caught.value.size is None
