"""One cleaned and checked query from every face (page, CLI, library) to the tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import indexer
from app.cli import app
from app.web import SearchPage
from indexer.filters import FilterError, ItemFilter
from indexer.query import QUERY_LIMIT, EmptyQuery, Query
from indexer.search import Searcher
from retrieval.models import retrieval_model
from retrieval.ocr import fold

# -------------------------------------------------------------------------- the constructor


def test_queries_are_cleaned_and_limited() -> None:
    assert Query.parse("  a  red\tcircle \n").text == "a red circle"
    for blank in ("", None, " \t\r\n ", "\x00\x07\x1b", "?! ..."):
        with pytest.raises(EmptyQuery, match="empty query"):
            Query.parse(blank)

    cleaned = Query.parse("red\x00circle\x1b[31m moving\u200b up")
    assert cleaned.text == "red circle [31m moving up"
    assert any("control characters" in note for note in cleaned.notes)
    assert not Query.parse("red circle").notes

    long = Query.parse("word " * 2000)  # 10,000 characters
    assert len(long.text) <= QUERY_LIMIT and long.text.endswith("word")
    assert any(f"first {len(long.text)}" in note for note in long.notes)
    assert Query.parse("x" * 10_000).text == "x" * QUERY_LIMIT
    assert Query.parse("x" * 10_000, limit=None).text == "x" * 10_000


def test_an_empty_query_keeps_what_cleaning_did() -> None:
    with pytest.raises(EmptyQuery) as caught:
        Query.parse("\x00\x07 ?!")
    assert isinstance(caught.value, ValueError)
    assert any("control characters" in note for note in caught.value.notes)


def test_the_caption_is_the_models_cleaning_applied_once() -> None:
    query = Query.parse("A Red-Circle, moving <<person>>!")
    assert query.text == "A Red-Circle, moving <<person>>!"  # shown and searched on screen as typed
    assert query.caption == "a red circle moving <person>"  # a second pass would give "person"
    assert query.cleaning == "umt"
    assert Query.parse("&").caption == "&"
    with pytest.raises(EmptyQuery):
        Query.parse("&", cleaning="strip_punctuation")
    assert Query.parse("A—B & c", cleaning="strip_punctuation").caption == "a b c"
    with pytest.raises(ValueError, match="unknown caption cleaning"):
        Query.parse("a red circle", cleaning="nonsense")


def test_each_channel_reads_its_part_once() -> None:
    said = Query.parse("a red circle while a voice says the bridge is closed")
    assert said.spoken == ("bridge", "closed")
    assert {fold("bridge"), "closed", fold("circle")} <= set(said.written)
    assert "says" not in said.written and "while" not in said.written

    quoted = Query.parse('a sign that reads "Chapter 3" while a voice says the bridge is closed')
    assert quoted.spoken == ("chapter",)  # the quoted part wins over what follows "says"
    assert fold("chapter3") in quoted.written and "reads" not in quoted.written

    assert Query.parse("the").written == ()  # nothing to look for on screen: that channel abstains


def test_filters_are_checked_with_the_query() -> None:
    assert Query.parse("a red circle").where == ItemFilter()
    line = Query.parse("a red circle", where="source=news path=test/* duration>=1 duration<=5")
    assert line.where == ItemFilter.build(["test/*"], ["source=news"], 1.0, 5.0)
    given = ItemFilter.build(min_seconds=2.0)
    assert Query.parse("a red circle", where=given).where is given
    for bad in ("path=[abc", "sourcenews", "duration>=1.2.3", "duration>=5 duration<=1"):
        with pytest.raises(FilterError):
            Query.parse("a red circle", where=bad)
    with pytest.raises(EmptyQuery):  # nothing to search comes first, as the page shows it
        Query.parse("  ", where="path=[abc")


def test_the_package_root_names_the_query() -> None:
    assert {"Query", "EmptyQuery", "FilterError"} <= set(indexer.__all__)
    assert indexer.Query is Query and indexer.EmptyQuery is EmptyQuery


# ------------------------------------------------------------------ page = CLI = library


@pytest.fixture()
def spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Every query built (:meth:`Query.parse`) and every batch the tokenizer receives."""
    seen: dict[str, list] = {"queries": [], "tokenized": []}
    parse, tokenize = Query.parse.__func__, retrieval_model.tokenize

    def parse_spy(cls, *args, **kwargs):
        query = parse(cls, *args, **kwargs)
        seen["queries"].append(query)
        return query

    def tokenize_spy(tokenizer, texts, *args, **kwargs):
        seen["tokenized"].append(list(texts))
        return tokenize(tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(Query, "parse", classmethod(parse_spy))
    monkeypatch.setattr(retrieval_model, "tokenize", tokenize_spy)
    return seen


RAW = ' A "Red" circle\x00 moving—left,  while a voice says <<person>>!!  '


def test_page_cli_and_library_search_the_same_query(spied: dict[str, list], search_index: Path) -> None:
    searcher = Searcher(search_index)
    page = SearchPage(searcher)
    expected = Query.parse(RAW, searcher.text_cleaning, where=ItemFilter.build(min_seconds=1.0))
    assert expected.notes and expected.spoken == ("red",)  # the quoted word

    results = {}
    for face in ("page", "cli", "library"):
        spied["queries"].clear()
        spied["tokenized"].clear()
        if face == "page":
            html, status = page.search(RAW, 3, False, "duration>=1")
            assert "vtr-card" in html and "Removed control characters" in status
        elif face == "cli":
            result = CliRunner().invoke(app, ["search", RAW, "--index", str(search_index), "-k", "3",
                                              "--min-duration", "1"])
            assert result.exit_code == 0, result.output
            assert "Removed control characters" in result.stderr
        else:
            searcher.search(RAW, k=3, where="duration>=1")
        results[face] = (spied["queries"][:], spied["tokenized"][:])

    for face, (queries, tokenized) in results.items():
        assert queries == [expected], face  # built once
        assert tokenized == [[expected.caption]], face  # tokenized once, cleaned once
    assert expected.caption == 'a red circle moving—left while a voice says <person>'


def test_a_query_cleaned_for_another_model_or_with_two_filters_is_refused(search_index: Path) -> None:
    searcher = Searcher(search_index)
    other = Query.parse("a red circle", cleaning="strip_punctuation")
    with pytest.raises(ValueError, match="'strip_punctuation' rule"):
        searcher.search(other)
    with pytest.raises(ValueError, match="give the filter in the Query"):
        searcher.search(searcher.query("a red circle"), where="duration>=1")
    assert searcher.search(searcher.query("a red circle", where="path=nowhere/*")) == []
