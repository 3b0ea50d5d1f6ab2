"""Grouped search: windows of one long video become one hit (best window first, the others as
further moments); ``group=False`` / ``vtr search --no-group`` keep the raw list. Hits say where
their labels come from (the model's action head or zero-shot prompts)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.demo import index_annotation
from indexer.jobs import JobSpec, run_index_job
from indexer.search import Hit, Moment, Searcher, group_hits
from retrieval.data.synthetic import ACTIONS

QUERY = "a big red circle moving up"


def _hit(item_id: int, path: str, score: float, start: float | None = None) -> Hit:
    end = None if start is None else start + 2.0
    return Hit(item_id, path, start, end, score, [("growing", 0.5)], ["a caption"])


def test_group_hits_keeps_the_best_window_first_and_the_rest_as_moments() -> None:
    hits = [_hit(0, "a", 0.9, 4.0), _hit(1, "b", 0.8), _hit(2, "a", 0.7, 0.0), _hit(3, "c", 0.6),
            _hit(4, "a", 0.5, 8.0)]
    grouped = group_hits(hits)
    assert [(h.path, h.item_id, h.score) for h in grouped] == [("a", 0, 0.9), ("b", 1, 0.8), ("c", 3, 0.6)]
    assert grouped[0].moments == (Moment(2, 0.0, 2.0, 0.7), Moment(4, 8.0, 10.0, 0.5))
    assert grouped[1].moments == () and grouped[2].moments == ()
    assert [h.path for h in group_hits(hits, k=2)] == ["a", "b"]
    assert group_hits([]) == []
    as_dict = grouped[0].to_dict()
    assert as_dict["moments"] == [{"item_id": 2, "start": 0.0, "end": 2.0, "score": 0.7},
                                  {"item_id": 4, "start": 8.0, "end": 10.0, "score": 0.5}]
    json.dumps(as_dict)


@pytest.fixture(scope="module")
def corpus(synthetic_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared corpus: the index's annotation is written beside its clips."""
    return shutil.copytree(synthetic_corpus, tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model()
    model.set_action_head(list(ACTIONS))  # untrained, but it is the source of the stored labels
    return model.save(tmp_path_factory.mktemp("model") / "headed")


@pytest.fixture(scope="module")
def index(corpus: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test clips whole, and the long videos as 2 s windows every 1 s (as the demo does)."""
    out = tmp_path_factory.mktemp("index") / "windows"
    spec = JobSpec(model_dir=model_dir, out=out, videos=corpus, ann_file=index_annotation(corpus),
                   window=2.0, stride=1.0)
    run_index_job(spec, workers=0, batch_size=8, progress=False)
    return out


@pytest.fixture(scope="module")
def searcher(index: Path) -> Searcher:
    return Searcher(index)


def test_grouped_search_is_the_raw_list_folded_by_video(searcher: Searcher) -> None:
    total = len(searcher.reader)
    raw = searcher.search(QUERY, k=total)
    assert len(raw) == total and len({h.path for h in raw}) < total  # windows share their video
    grouped = searcher.search(QUERY, k=total, group=True)
    paths = list(dict.fromkeys(h.path for h in raw))
    assert [h.path for h in grouped] == paths                     # ordered by each video's best window
    for hit in grouped:
        members = [h for h in raw if h.path == hit.path]
        assert (hit.item_id, hit.score) == (members[0].item_id, members[0].score)
        assert [(m.item_id, m.start, m.end, m.score) for m in hit.moments] == [
            (h.item_id, h.start, h.end, h.score) for h in members[1:]]
    assert any(len(hit.moments) > 2 for hit in grouped)           # the long videos' windows


def test_grouped_search_returns_k_distinct_videos(searcher: Searcher) -> None:
    videos = len({item["path"] for item in searcher.reader.items})
    for k in (1, 3, videos):
        hits = searcher.search(QUERY, k=k, group=True)
        assert len(hits) == k and len({h.path for h in hits}) == k
    assert len(searcher.search(QUERY, k=videos + 5, group=True)) == videos
    clip = Path(searcher.search(QUERY, k=1)[0].path)
    similar = searcher.search_video(clip, k=3, group=True)
    assert len({h.path for h in similar}) == 3
    reranked = searcher.search(QUERY, k=2, group=True, rerank=True)
    assert len({h.path for h in reranked}) == len(reranked) == 2


def test_hits_name_the_head_as_their_label_source(searcher: Searcher) -> None:
    assert searcher.label_source == "head"
    hits = searcher.search(QUERY, k=3)
    assert all(h.label_source == "head" and {label for label, _ in h.labels} <= set(ACTIONS) for h in hits)


def test_cli_groups_unless_told_not_to(index: Path) -> None:
    runner = CliRunner()
    k = str(json.loads((index / "manifest.json").read_text())["counts"]["items"])
    grouped = runner.invoke(app, ["search", "--index", str(index), QUERY, "-k", k, "--json"])
    assert grouped.exit_code == 0, grouped.output
    rows = [json.loads(line) for line in grouped.stdout.splitlines()]
    assert len({row["path"] for row in rows}) == len(rows)
    assert any(row["moments"] for row in rows) and all(row["label_source"] == "head" for row in rows)
    raw = runner.invoke(app, ["search", "--index", str(index), QUERY, "-k", k, "--json", "--no-group"])
    raw_rows = [json.loads(line) for line in raw.stdout.splitlines()]
    assert len({row["path"] for row in raw_rows}) < len(raw_rows)
    assert all(row["moments"] == [] for row in raw_rows)
    assert sum(1 + len(row["moments"]) for row in rows) == len(raw_rows)
    table = runner.invoke(app, ["search", "--index", str(index), QUERY, "-k", "3"])
    assert table.exit_code == 0 and "top label (head)" in table.stdout.splitlines()[0]
    assert "also at" in table.stdout
