"""The official checkpoints' caption cleaning, held to what the authors' own code produces.

``fixtures/umt_captions.json`` holds captions with the characters benchmark captions contain
(ampersand, percent, em dash, curly quotes, accents, ``<person>``, ``--``, ``/``, whitespace runs,
newline, tab, CJK, emoji, a caption past the token limit), each with the text and the token ids
the authors' ``pre_text`` and BERT tokenizer gave for it (the file says which code and vocabulary).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from indexer.query import EmptyQuery, Query
from retrieval.data.corpora import clean_caption, clean_caption_umt, is_blank_caption
from retrieval.models.convert_bert import default_text_model_path
from retrieval.models.text import tokenize

TABLE = json.loads((Path(__file__).parent / "fixtures" / "umt_captions.json").read_text(encoding="utf-8"))
ROWS = TABLE["rows"]


@pytest.fixture(scope="module")
def bert_uncased():
    """bert-base-uncased's vocabulary, loaded the way a model directory's tokenizer is."""
    return AutoTokenizer.from_pretrained(str(default_text_model_path()), local_files_only=True)


@pytest.mark.parametrize("row", ROWS, ids=[f"caption{i}" for i in range(len(ROWS))])
def test_cleaned_text_is_the_authors(row: dict) -> None:
    assert clean_caption_umt(row["caption"]) == row["cleaned"]
    assert clean_caption(row["caption"], "umt") == row["cleaned"]


@pytest.mark.parametrize("row", ROWS, ids=[f"caption{i}" for i in range(len(ROWS))])
def test_token_ids_are_the_authors(row: dict, bert_uncased) -> None:
    ids, mask = tokenize(bert_uncased, [row["caption"]], TABLE["max_len"], cleaning="umt")
    assert mask.all()
    assert ids[0].tolist() == row["ids"]


def test_batch_padding_keeps_each_captions_ids(bert_uncased) -> None:
    ids, mask = tokenize(bert_uncased, [row["caption"] for row in ROWS], TABLE["max_len"])
    for row, row_ids, row_mask in zip(ROWS, ids.tolist(), mask.tolist(), strict=True):
        assert row_ids[:sum(row_mask)] == row["ids"]


def test_the_table_covers_what_the_old_rule_got_wrong() -> None:
    """Every caption here with a kept character cleans differently under vtr's earlier rule."""
    kept = [row for row in ROWS if any(ch in row["cleaned"] for ch in "&%\u2014\u2019\u201c\n\t\u2026")]
    assert len(kept) >= 5
    assert all(clean_caption(row["caption"], "strip_punctuation") != row["cleaned"] for row in kept)


def test_blank_captions() -> None:
    assert is_blank_caption(" ?!. ") and is_blank_caption("\n") and is_blank_caption(" \t ")
    assert not is_blank_caption("&") and is_blank_caption("&", "strip_punctuation")
    with pytest.raises(ValueError, match="text 0 .*empty after cleaning"):
        tokenize(AutoTokenizer.from_pretrained(str(default_text_model_path()), local_files_only=True),
                 ["\t"], 8)


def test_queries_are_judged_blank_by_the_models_rule() -> None:
    assert Query.parse("&").text == "&" and Query.parse("&").caption == "&"
    for text, cleaning in (("&", "strip_punctuation"), (" ?! ", "umt"), (" ?! ", "strip_punctuation")):
        with pytest.raises(EmptyQuery):
            Query.parse(text, cleaning=cleaning)


def test_a_cleaned_query_reaches_the_tokenizer_as_it_is(bert_uncased) -> None:
    """A query is cleaned once, like a training caption: a second pass of UMT's rule would turn
    the ``<person>`` left of ``<<person>>`` into ``person``."""
    raw = "A <<person>> & the Red-Circle!"
    query = Query.parse(raw)
    once, _ = tokenize(bert_uncased, [raw], 32)
    assert tokenize(bert_uncased, [query.caption], 32, cleaned=True)[0].tolist() == once.tolist()
    assert tokenize(bert_uncased, [query.caption], 32)[0].tolist() != once.tolist()
