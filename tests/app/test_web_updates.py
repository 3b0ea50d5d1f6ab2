"""The search page follows index updates (a removed clip is neither found nor played once its
removal is published) and never plays a file a hard link brought into the corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.web import CorpusGuard, SearchPage, open_searcher
from indexer.jobs import JobSpec, run_index_job
from indexer.update import add_to_index, remove_from_index
from retrieval.data.synthetic import generate_corpus
from retrieval.models.retrieval_model import build_retrieval_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=24, num_fusion_layers=1)
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def videos(tmp_path: Path) -> Path:
    generate_corpus(tmp_path / "corpus", n_train=1, n_test=4, size=32, long_videos=0, progress=False)
    return (tmp_path / "corpus" / "videos").resolve()


def _index(model_dir: Path, videos: Path, out: Path) -> Path:
    run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos / "test"), workers=0, progress=False)
    return out


def test_the_page_stops_listing_and_serving_a_removed_clip(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    index = _index(model_dir, videos, tmp_path / "index")
    page = SearchPage(open_searcher(index))
    items = page.searcher.reader.items
    last = len(items) - 1
    removed = items[last]["path"]
    assert page.clip_file(last) == Path(removed)

    remove_from_index(index, [removed])

    assert page.clip_file(last) is None, "the removed clip's id is gone"
    assert all(page.clip_file(i) != Path(removed) for i in range(last + 1))
    _, hits, _ = page.search_hits("a red circle", k=10)
    assert len(hits) == last and removed not in {hit.path for hit in hits}
    assert removed not in page.search("a red circle", k=10)[0]


def test_the_page_serves_clips_added_from_a_new_root(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    index = _index(model_dir, videos, tmp_path / "index")
    page = SearchPage(open_searcher(index))
    before = len(page.searcher.reader)
    add_to_index(index, videos / "train", workers=0, progress=False)
    added = page.clip_file(before)
    assert added is not None and added.is_relative_to(videos / "train")


def test_a_hard_link_to_a_file_outside_the_corpus_is_not_served(videos: Path, tmp_path: Path) -> None:
    clip = videos / "test" / "0000.mp4"
    guard = CorpusGuard([videos])
    assert guard.resolve(clip) == clip
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"PRIVATE")
    clip.unlink()
    os.link(outside, clip)  # the indexed name now reaches a file outside the corpus
    assert guard.resolve(clip) is None
    assert guard.url(0, clip) is None
