"""The search page follows index updates (a removed clip is neither found, played nor offered as
an example once the new version is ready; the switch happens off the request path; a card
rendered before an update never plays another clip) and never plays a file a hard link brought
into the corpus."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

import indexer.search as search_module
from app.web import CorpusGuard, SearchPage, open_searcher
from indexer.jobs import JobSpec, run_index_job
from indexer.search import clip_key
from indexer.store import published_generation
from indexer.update import add_to_index, remove_from_index

CARD_KEY = re.compile(r'<video src="vtr/clip/([0-9a-f]{16})')


@pytest.fixture()
def videos(synthetic_corpus: Path, tmp_path: Path) -> Path:
    """This test's own corpus (tests remove and add clips): 4 test clips (``test.json`` beside
    ``videos``) and 1 train clip, copied from the session's corpus."""
    root = (tmp_path / "corpus" / "videos").resolve()
    for name in ["test/0000.mp4", "test/0001.mp4", "test/0002.mp4", "test/0003.mp4", "train/0000.mp4"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic_corpus / "videos" / name, root / name)
    entries = json.loads((synthetic_corpus / "test.json").read_text())
    (root.parent / "test.json").write_text(json.dumps([e for e in entries if (root / e["video"]).is_file()]))
    return root


def _index(model_dir: Path, videos: Path, out: Path) -> Path:
    run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos / "test"), workers=0, progress=False)
    return out


def _key(item: dict) -> str:
    return clip_key(item["path"], item["start"], item["end"])


def _switched(page: SearchPage) -> None:
    """Ask the page to follow the index, then wait for the background switch to finish."""
    page.follow_index()
    assert page.searcher.wait_for_refresh(timeout=60)


def test_the_page_stops_listing_and_serving_a_removed_clip(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    index = _index(model_dir, videos, tmp_path / "index")
    page = SearchPage(open_searcher(index))
    items = page.searcher.reader.items
    removed = items[-1]["path"]
    assert page.clip_file(_key(items[-1])) == Path(removed)

    remove_from_index(index, [removed])
    _switched(page)

    assert page.clip_file(_key(items[-1])) is None, "the removed clip's key names nothing now"
    assert all(page.clip_file(_key(item)) == Path(item["path"]) for item in items[:-1])
    _, hits, _ = page.search_hits("a red circle", k=10)
    assert len(hits) == len(items) - 1 and removed not in {hit.path for hit in hits}
    assert removed not in page.search("a red circle", k=10)[0]


def test_a_card_rendered_before_a_removal_plays_its_own_clip_or_nothing(
    model_dir: Path, videos: Path, tmp_path: Path
) -> None:
    index = _index(model_dir, videos, tmp_path / "index")
    page = SearchPage(open_searcher(index))
    items = page.searcher.reader.items
    html, _ = page.search("a red circle", k=10)
    shown = {key: page.clip_file(key) for key in CARD_KEY.findall(html)}
    assert len(shown) == len(items) and None not in shown.values()

    first = items[0]["path"]  # every later clip moves up one row in the new version
    remove_from_index(index, [first])
    _switched(page)
    assert page.searcher.reader.items[0]["path"] == items[1]["path"], "the rows did shift"

    for key, played in shown.items():
        now = page.clip_file(key)
        assert now == (None if played == Path(first) else played), "a card plays what it showed, or nothing"


def test_a_request_during_a_slow_refresh_is_answered_from_the_old_version(
    model_dir: Path, videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = _index(model_dir, videos, tmp_path / "index")
    page = SearchPage(open_searcher(index))
    items = page.searcher.reader.items
    removed = items[0]["path"]
    release = threading.Event()
    opening = threading.Event()
    real_open = search_module.open_index

    def slow_open(*args, **kwargs):
        opening.set()
        assert release.wait(60), "the test never released the refresh"
        return real_open(*args, **kwargs)

    monkeypatch.setattr(search_module, "open_index", slow_open)
    remove_from_index(index, [removed])

    started = time.monotonic()
    _, hits, _ = page.search_hits("a red circle", k=10)   # notices the new version, does not wait for it
    assert opening.wait(10) and time.monotonic() - started < 30
    assert len(hits) == len(items), "answered from the old version while the new one opens"
    assert page.clip_file(_key(items[0])) == Path(removed)
    assert page.searcher.reader.manifest["generation"] < published_generation(index)

    release.set()
    assert page.searcher.wait_for_refresh(timeout=60)
    assert page.searcher.reader.manifest["generation"] == published_generation(index)
    assert page.clip_file(_key(items[0])) is None
    _, hits, _ = page.search_hits("a red circle", k=10)
    assert len(hits) == len(items) - 1 and removed not in {hit.path for hit in hits}


def test_the_example_queries_follow_the_index(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    run_index_job(JobSpec(model_dir=model_dir, out=index, videos=videos, ann_file=videos.parent / "test.json"),
                  workers=0, progress=False)
    page = SearchPage(open_searcher(index))
    items = page.searcher.reader.items
    captions = {item["path"]: item["captions"][0] for item in items}
    shown = page.start_view()[0]
    assert shown and set(shown) <= set(captions.values())

    gone = [path for path, caption in captions.items() if caption == shown[0]]
    remove_from_index(index, gone)
    page.searcher.refresh(wait=True)
    left = {captions[path] for path in captions if path not in gone}
    examples, stats = page.start_view()
    assert shown[0] not in examples and examples and set(examples) <= left, "no caption of a removed clip is offered"
    assert f"**{len(left)}** clips indexed" in stats


def test_the_page_serves_clips_added_from_a_new_root(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    index = _index(model_dir, videos, tmp_path / "index")
    page = SearchPage(open_searcher(index))
    add_to_index(index, videos / "train", workers=0, progress=False)
    _switched(page)
    added = page.searcher.reader.items[-1]
    assert page.clip_file(_key(added)) is not None and Path(added["path"]).is_relative_to(videos / "train")


def test_a_hard_link_to_a_file_outside_the_corpus_is_not_served(videos: Path, tmp_path: Path) -> None:
    clip = videos / "test" / "0000.mp4"
    guard = CorpusGuard([videos])
    assert guard.resolve(clip) == clip
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"PRIVATE")
    clip.unlink()
    os.link(outside, clip)  # the indexed name now reaches a file outside the corpus
    assert guard.resolve(clip) is None
    assert guard.url(clip) is None
