"""The text channel: lexical search over on-screen text, rank fusion, and the OCR reader.

Matching and fusion are tested on hand-written item records; the recogniser runs on a few
frames only (PP-OCR takes ~0.5 s a frame on two busy cores).
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.channels import (
    SEMANTIC_FLOOR,
    SemanticIndex,
    TextIndex,
    channel_names,
    fuse,
    highlight,
    index_channels,
    parse_channels,
    parse_weights,
    query_terms,
    text_of,
)
from retrieval.ocr import OcrUnavailable, fold, merge_repeats, sample_count
from retrieval.sentence import pack, unpack


def _item(item_id: int, *lines: tuple[str, float, float]) -> dict:
    return {"id": item_id, "extra": {"text": {"lines": [{"text": t, "start": a, "end": b} for t, a, b in lines]}}}


ITEMS = [
    _item(0, ("BREAKlNGNEWs:FloodinValencia", 1.0, 3.0)),
    _item(1, ("Chapter 3", 0.5, 2.5), ("OPEN 24 HOURS", 4.0, 6.0)),
    _item(2, ("Chapter 7", 0.5, 0.5)),
    {"id": 3, "extra": {}},
]


def test_fold_makes_lost_spaces_and_look_alikes_equal() -> None:
    assert fold("BREAKlNG NEWS") == fold("breaking news") == fold("Breaking-News!")
    assert fold("ＣＨＡＰＴＥＲ　３") == fold("chapter 3")  # full-width forms
    assert fold("Café") == fold("cafe")


def test_query_terms_skip_how_text_is_shown_and_glue_neighbours() -> None:
    terms = query_terms("a blue circle under a title that reads Chapter 3")
    assert "chapter3" in terms and "chapter" in terms
    assert not {"title", "reads", "under"} & set(terms)


def test_glued_recogniser_output_is_found_by_its_words() -> None:
    index = TextIndex(ITEMS)
    assert len(index) == 3
    assert [item for item, _ in index.search("breaking news: flood in Valencia")] == [0]
    assert [item for item, _ in index.search("valencia")] == [0]


def test_numbers_count_through_glued_pairs() -> None:
    index = TextIndex(ITEMS)
    assert [item for item, _ in index.search("the title reads Chapter 3")] == [1], \
        "Chapter 7 shares only a common word: below the confidence floor"
    both = index.search("the title reads Chapter 3", relative_floor=0.0)
    assert [item for item, _ in both] == [1, 2] and both[0][1] > both[1][1]
    assert {item for item, _ in index.search("chapter")} == {1, 2}, "equal evidence: both rank"


def test_no_match_means_the_channel_abstains() -> None:
    index = TextIndex(ITEMS)
    assert index.search("a red square moving left") == []
    assert TextIndex([{"id": 0, "extra": {}}]).search("chapter 3") == []


def test_match_gives_line_time_and_highlight() -> None:
    match = TextIndex(ITEMS).match(1, "open 24 hours")
    assert match is not None
    assert (match.text, match.start, match.end) == ("OPEN 24 HOURS", 4.0, 6.0)
    assert match.snippet == "«OPEN 24 HOURS»"
    glued = TextIndex(ITEMS).match(0, "flood valencia")
    assert glued.snippet == "BREAKlNGNEWs:«Flood»in«Valencia»"
    assert [glued.text[a:b] for a, b in glued.spans] == ["Flood", "Valencia"]


def test_highlight_marks_only_the_terms() -> None:
    spans, snippet = highlight("Sale on now", ["sale"])
    assert spans == ((0, 4),) and snippet == "«Sale» on now"


def test_fusion_without_a_match_keeps_the_visual_order_exactly() -> None:
    visual = [5, 3, 9, 1, 0]
    fused = fuse({"visual": visual, "text": []})
    assert [item for item, _, _ in fused] == visual
    assert all(ranks == {"visual": rank} for rank, (_, _, ranks) in enumerate(fused, start=1))


def test_fusion_lifts_a_text_match_and_weights_scale_channels() -> None:
    visual = list(range(20))
    fused = fuse({"visual": visual, "text": [15]})
    assert fused[0][0] == 15 and fused[0][2] == {"visual": 16, "text": 1}
    # with the text channel weighted down to nothing the visual order comes back
    assert [item for item, _, _ in fuse({"visual": visual, "text": [15]}, {"text": 0.0})] == visual


def test_plain_fusion_over_all_items_lets_an_arbitrary_order_drown_a_match() -> None:
    """What confidence-aware fusion avoids: a lexical list padded with every unmatched item in
    id order pushes items up for their id, not their content."""
    visual = [7, 6, 5, 4, 3, 2, 1, 0]
    padded = [3] + [item for item in sorted(visual) if item != 3]
    plain = [item for item, _, _ in fuse({"visual": visual, "text": padded})]
    aware = [item for item, _, _ in fuse({"visual": visual, "text": [3]})]
    assert aware[0] == 3 and aware[1:] == [7, 6, 5, 4, 2, 1, 0]
    assert plain[1:] != aware[1:], "padding reorders the items the text channel knows nothing about"


def test_channel_options_are_checked() -> None:
    assert channel_names("text, visual") == ("visual", "text")
    with pytest.raises(ValueError, match="unknown channel 'audio'"):
        channel_names("visual,audio")
    with pytest.raises(ValueError, match="names no channel"):
        channel_names(" , ")
    assert parse_weights("visual=1, text=2.5") == {"visual": 1.0, "text": 2.5}
    for bad in ("text=x", "sound=1", "text=-1"):
        with pytest.raises(ValueError, match="--weights"):
            parse_weights(bad)
    assert index_channels({"extra": {}}) == ("visual",)
    assert index_channels({"extra": {"channels": {"visual": {}, "text": {"every_s": 2}}}}) == ("visual", "text")


def test_missing_recogniser_is_named_by_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.channels
    import retrieval.ocr

    monkeypatch.setattr(retrieval.ocr, "ocr_available", lambda: False)
    monkeypatch.setattr(indexer.channels, "ocr_available", lambda: False)
    assert parse_channels(None) == ("visual",), "the default is what is installed"
    with pytest.raises(OcrUnavailable, match=r"vtr\[ocr\]"):
        parse_channels("visual,text")


def test_sampling_reads_one_frame_per_two_seconds_and_at_least_one() -> None:
    assert sample_count(0.4) == 1
    assert sample_count(3.0) == 1, "a 3 s clip: its middle frame"
    assert sample_count(4.0) == 2
    assert sample_count(10.0) == 5
    assert sample_count(10.0, every_s=1.0) == 10
    with pytest.raises(ValueError):
        sample_count(3.0, every_s=0)


def test_a_line_on_screen_over_consecutive_frames_is_merged() -> None:
    box = ((0, 0), (10, 0), (10, 5), (0, 5))
    lines = merge_repeats([
        (0.5, [("Chapter 3", box, 0.9)]),
        (2.5, [("CHAPTER3", box, 0.95), ("Sale", box, 0.8)]),
        (4.5, [("Sale", box, 0.8)]),
        (6.5, [("Chapter 3", box, 0.9)]),   # back after a gap: a new line
    ])
    assert [(line.text, line.start, line.end) for line in lines] == [
        ("Chapter 3", 0.5, 2.5), ("Sale", 2.5, 4.5), ("Chapter 3", 6.5, 6.5)]
    assert lines[0].score == 0.95


def test_fused_scores_are_ordered() -> None:
    fused = fuse({"visual": [1, 2, 3], "text": [3, 2]})
    scores = np.array([score for _, score, _ in fused])
    assert (np.diff(scores) <= 0).all()
    assert fused[0][0] in (2, 3)


def test_a_confident_text_match_beats_the_visual_nearest_neighbour() -> None:
    """An item only the text channel ranks (first) comes before the visual channel's first item
    by default, instead of tying with it."""
    fused = fuse({"visual": [0, 1, 2], "text": [9]})
    assert [item for item, _, _ in fused][:2] == [9, 0]
    assert next(item for item, _, _ in fuse({"visual": [0, 1, 2], "text": [9]}, {"text": 1.0})) == 0


def _unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, np.float32)
    return vector / np.linalg.norm(vector)


def _with_vector(item_id: int, text: str, vector: np.ndarray) -> dict:
    return {"id": item_id, "extra": {"text": {"lines": [{"text": text, "start": 0.0, "end": 1.0}],
                                              "vector": pack(vector)}}}


def test_sentence_vectors_survive_their_json_form() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    packed = pack(vector)
    assert isinstance(packed, str) and len(packed) == 1024  # float16, base64
    assert np.abs(unpack(packed) - vector).max() < 1e-3


def test_semantic_side_ranks_only_near_items_and_abstains_below_its_floor() -> None:
    items = [_with_vector(0, "OPEN 24 HOURS", _unit(1, 0, 0)), _with_vector(1, "Chapter 3", _unit(0, 1, 0)),
             _with_vector(2, "Chapter 7", _unit(0, 1, 0.1)), {"id": 3, "extra": {}}]
    index = SemanticIndex(items)
    assert len(index) == 3, "items without text have no vector"
    assert index.search(_unit(1, 0.2, 0), k=10) == [(0, pytest.approx(float(_unit(1, 0.2, 0)[0]), abs=1e-3))]
    # two items about as near: both rank, nearest first; a far third does not
    near = index.search(_unit(0, 1, 0.05), k=10)
    assert [item for item, _ in near] == [1, 2] or [item for item, _ in near] == [2, 1]
    assert 0 not in [item for item, _ in near]
    # nothing reaches the floor: the side abstains
    assert index.search(_unit(0, 0, 1), k=10) == []
    assert float(_unit(0.1, 0.1, 1) @ _unit(1, 0, 0)) < SEMANTIC_FLOOR
    assert SemanticIndex([{"id": 0, "extra": {"text": {"lines": []}}}]).search(_unit(1, 0, 0), k=5) == []


def test_semantic_scan_ranks_as_faiss_exact_inner_product_search() -> None:
    """The scan against a reference: FAISS's exact inner-product index over the same vectors
    (float16-packed as the item records hold them), for the items the floor and margin keep."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((6, 48)).astype(np.float32)
    rows = centres[rng.integers(0, 6, 500)] + 0.5 * rng.standard_normal((500, 48)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    items = [_with_vector(10 * i + 7, f"text {i}", row) for i, row in enumerate(rows)]
    index = SemanticIndex(items)
    packed = np.stack([unpack(item["extra"]["text"]["vector"]) for item in items]).astype(np.float32)
    reference = faiss.IndexFlatIP(48)
    reference.add(packed)
    queries = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    for query in queries:
        for k, margin in ((5, 1.0), (40, 0.1), (500, 2.0)):
            got = index.search(query, k=k, floor=0.2, margin=margin)
            scores, rows_found = reference.search(query.reshape(1, -1), k)
            best = float(scores[0, 0])
            expected = [(10 * int(row) + 7, float(score)) for score, row in zip(scores[0], rows_found[0], strict=True)
                        if score >= max(0.2, best - margin)]
            assert len(got) == len(expected) and len(got) <= k
            assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-5)
            # same items, up to the order of scores equal to within rounding
            assert {item for item, s in got if s > expected[-1][1] + 1e-5} == \
                {item for item, s in expected if s > expected[-1][1] + 1e-5}
            assert all(a[1] >= b[1] for a, b in zip(got, got[1:]))
    assert index.search(queries[0], k=0) == []


def test_semantic_scan_keeps_item_order_on_ties_and_checks_the_dimension() -> None:
    same = _unit(0, 1, 0)
    index = SemanticIndex([_with_vector(5, "a", same), _with_vector(2, "b", same), _with_vector(9, "c", same)])
    assert [item for item, _ in index.search(same, k=10)] == [5, 2, 9]
    assert [item for item, _ in index.search(same, k=2)] == [5, 2]
    assert index.cosines(same) == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)
    with pytest.raises(ValueError, match="4 values for an index of 3"):
        index.search(np.ones(4, np.float32), k=1)
    assert len(SemanticIndex([])) == 0 and SemanticIndex([]).search(same, k=3) == []


def test_a_channel_weighed_zero_is_left_out_of_the_fusion() -> None:
    fused = fuse({"visual": [1, 2], "semantic": [3]}, {"semantic": 0.0})
    assert [item for item, _, _ in fused] == [1, 2]
    assert parse_weights("semantic=0.5") == {"semantic": 0.5}
    assert text_of({"lines": [{"text": "Chapter 3"}, {"text": "OPEN"}]}) == "Chapter 3 OPEN"
