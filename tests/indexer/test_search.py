"""Searcher and ``vtr search`` over a small index built from captioned synthetic clips.

The model is tiny and untrained, so rankings carry no meaning; the tests check what must hold
for any model: k hits sorted by score, hits that point into the corpus with their labels and
captions, re-rank scores that are the matching head's, an example clip finding itself, and
refusal of a model that did not build the index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from app.cli import app
from indexer.search import RERANK_CANDIDATES, Hit, Searcher, group_hits
from indexer.store import IndexModelMismatch, write_index
from retrieval.data.video import load_clip
from retrieval.models.model_dir import model_identity


@pytest.fixture(scope="module")
def searcher(search_index: Path) -> Searcher:
    return Searcher(search_index)  # the model recorded in the manifest


@pytest.fixture(scope="module")
def captions(synthetic_corpus: Path) -> dict[str, list[str]]:
    """Relative video path -> its captions, from the annotation file."""
    entries = json.loads((synthetic_corpus / "test.json").read_text())
    return {e["video"]: [e["caption"]] if isinstance(e["caption"], str) else e["caption"] for e in entries}


def _assert_well_formed(hits: list[Hit], k: int, corpus: Path, captions: dict[str, list[str]]) -> None:
    assert len(hits) == k
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert len({hit.item_id for hit in hits}) == k
    root = (corpus / "videos").resolve()
    for hit in hits:
        path = Path(hit.path)
        assert path.is_absolute() and path.is_file()
        assert hit.captions == captions[path.relative_to(root).as_posix()]
        assert len(hit.labels) == 5 and all(isinstance(label, str) for label, _ in hit.labels)
        assert hit.start is None and hit.end is None


def test_stats_describe_the_index(searcher: Searcher, model_dir: Path) -> None:
    stats = searcher.stats()
    assert stats["items"] == 8 and stats["dim"] == 24 and stats["index_type"] == "Flat"
    assert stats["model"] == model_dir.name and stats["created"]


def test_caption_query_returns_k_sorted_hits_in_the_corpus(
    searcher: Searcher, synthetic_corpus: Path, captions: dict[str, list[str]]
) -> None:
    query = next(iter(captions.values()))[0]
    hits = searcher.search(query, k=5)
    _assert_well_formed(hits, 5, synthetic_corpus, captions)
    assert len(searcher.search(query, k=50)) == 8, "k beyond the index size returns every item"


def test_rerank_orders_top_candidates_by_the_matching_head(
    searcher: Searcher, synthetic_corpus: Path, captions: dict[str, list[str]]
) -> None:
    query = "a small red circle moving to the left"
    cosine = searcher.search(query, k=RERANK_CANDIDATES)
    hits = searcher.search(query, k=3, rerank=True)

    _assert_well_formed(hits, 3, synthetic_corpus, captions)
    assert {hit.item_id for hit in hits} <= {hit.item_id for hit in cosine}
    model = searcher.model
    with torch.inference_mode():
        text = model.encode_texts([query])
        tokens = model.encode_video(load_clip(hits[0].path, searcher.preprocess)[None])["tokens"]
        expected = model.match_score(tokens, text["hidden"], text["mask"])
    assert hits[0].score == pytest.approx(float(expected), abs=1e-4)

    model.matching_trained = False                       # a recipe with loss.vtm = 0 trained no head
    try:
        assert not searcher.can_rerank
        with pytest.raises(ValueError, match="never trained"):
            searcher.search(query, k=3, rerank=True)
        assert len(searcher.search(query, k=3)) == 3
    finally:
        model.matching_trained = True


def test_an_example_clip_finds_itself(searcher: Searcher, synthetic_corpus: Path) -> None:
    path = synthetic_corpus / "videos" / "test" / "0005.mp4"
    hits = searcher.search_video(path, k=8)
    own = next(hit for hit in hits if Path(hit.path) == path.resolve())
    # a clip vector is the mean of unit per-frame features, not renormalised (clip_vector), so a
    # clip scores its own squared length against itself: the mean cosine over its frame pairs,
    # 1 only when every frame looks the same (the stored vector is float16)
    vector = searcher.model.clip_vector(searcher.encode_clip(load_clip(path, searcher.preprocess)))
    assert own.score == pytest.approx(float((vector.float() ** 2).sum()), abs=2e-3)
    assert 0.9 < own.score < 1.0 + 2e-3
    # first, up to float16 ties: an untrained model maps some clips to near-identical vectors
    assert own.score >= hits[0].score - 2e-3


@pytest.mark.parametrize("query", ["", "   ", "\x00\x1b\t", "?!"])
def test_empty_queries_are_refused(searcher: Searcher, query: str) -> None:
    with pytest.raises(ValueError, match="empty query"):
        searcher.search(query)


def test_control_characters_are_stripped_and_long_queries_truncated(searcher: Searcher) -> None:
    plain = searcher.search("a blue square growing", k=4)
    noisy = searcher.search("a\x00 blue\x07square\u200bgrowing\r\n", k=4)
    assert [(hit.item_id, hit.score) for hit in noisy] == [(hit.item_id, hit.score) for hit in plain]
    assert len(searcher.search("a red circle " * 500, k=4)) == 4


def test_another_model_is_refused(search_index: Path, model_dir: Path, tmp_path: Path) -> None:
    other = shutil.copytree(model_dir, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, other / "model.safetensors")
    with pytest.raises(IndexModelMismatch, match="weights_sha256"):
        Searcher(search_index, model=other)


def test_cli_prints_a_table_or_json_lines(search_index: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(app, ["search", "--index", str(search_index), "a green star", "-k", "3"])
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["rank", "score", "span"] and len(rows) == 3
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]

    lines = runner.invoke(app, ["search", "--index", str(search_index), "a green star", "-k", "2", "--json"])
    hits = [json.loads(line) for line in lines.stdout.strip().splitlines()]
    assert [sorted(hit) for hit in hits] == [sorted(Hit.__dataclass_fields__)] * 2

    empty = runner.invoke(app, ["search", "--index", str(search_index), " "])
    assert empty.exit_code == 2 and "empty query" in empty.stderr


def test_a_fused_search_shows_what_fusing_every_item_then_cutting_would(model_dir: Path, tmp_path: Path) -> None:
    """Fused hits are built only for what is shown (the k best items, or the best item of each of
    the k best videos plus the others' places as moments): the result is exactly the whole fused
    ranking cut to k, or grouped and cut to k videos."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((30, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = []
    for i in range(30):
        extra = {}
        if i % 3:
            extra["text"] = {"lines": [{"text": f"Chapter {i % 4}", "start": i + 1.0, "end": i + 2.0, "box": [],
                                        "score": 0.9}], "frames": 1, "notes": []}
        items.append({"path": f"/videos/v{i % 6}.mp4", "start": float(i), "end": i + 4.0, "extra": extra})
    write_index(tmp_path / "index", vectors, items, model_identity(model_dir), "/videos",
                extra={"model_dir": str(model_dir), "channels": {"visual": {}, "text": {"every_s": 2.0}}})
    searcher = Searcher(tmp_path / "index")
    query = "a red circle under a title that reads Chapter 2"
    whole = searcher.search(query, k=len(items))
    assert len(whole) == len(items) and whole[0].text and "text" in whole[0].channels

    def seen(hits: list[Hit]) -> list[tuple]:
        return [(h.item_id, h.path, h.score, h.moments, h.channels, h.text, h.speech) for h in hits]

    for k in (1, 3, 5):
        assert seen(searcher.search(query, k=k)) == seen(whole[:k])
        grouped = searcher.search(query, k=k, group=True)
        assert seen(grouped) == seen(group_hits(whole, k)) and len(grouped) == k
        assert all(hit.moments for hit in grouped)
