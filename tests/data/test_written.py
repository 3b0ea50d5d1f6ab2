"""The synthetic corpus's written layer: text drawn into some test clips, mentioned by their captions."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.data.synthetic import plan_corpus, render_job
from retrieval.data.written import KINDS, available_fonts

ARGS = {"n_train": 20, "n_test": 16, "seed": 3, "long_videos": 0}


def test_a_share_of_test_clips_show_text_their_captions_mention() -> None:
    plan = plan_corpus(**ARGS, written_share=0.5)
    written = [entry for entry in plan.test if "written" in entry["attributes"]]
    assert len(written) == 8
    texts = [entry["attributes"]["written"]["text"] for entry in written]
    assert len(set(texts)) == len(texts), "no two clips show the same text"
    for entry in written:
        info = entry["attributes"]["written"]
        assert entry["caption"].endswith(KINDS[info["kind"]].format(text=info["text"]))
    assert {entry["attributes"]["written"]["kind"] for entry in written} <= set(KINDS)


def test_the_layer_changes_nothing_else() -> None:
    plain, written = plan_corpus(**ARGS), plan_corpus(**ARGS, written_share=0.5)
    assert plain.train == written.train
    for before, after in zip(plain.test, written.test, strict=True):
        assert after["caption"].startswith(before["caption"])
        assert after["video"] == before["video"] and after["label"] == before["label"]
    assert plan_corpus(**ARGS, written_share=0.0).test == plain.test
    with pytest.raises(ValueError, match="written_share"):
        plan_corpus(**ARGS, written_share=1.5)


def test_written_clips_draw_their_text_and_others_are_unchanged() -> None:
    plain, written = plan_corpus(**ARGS), plan_corpus(**ARGS, written_share=0.5)
    for before, after in zip(plain.test, written.test, strict=True):
        a, b = render_job(plain.job(before["video"]), 64), render_job(written.job(after["video"]), 64)
        assert np.array_equal(a, b) == ("written" not in after["attributes"])


def test_fonts_available_offline() -> None:
    fonts = available_fonts()
    assert fonts[0] == "pillow-default"
