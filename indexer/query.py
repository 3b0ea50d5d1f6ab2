"""A search query as every face hands it to :meth:`indexer.search.Searcher.search`.

The page, ``vtr search`` and the Python API build one :class:`Query` from what the user typed
(:meth:`Query.parse`), and nothing downstream cleans or checks it again:

* control characters (and other invisible code points) become spaces, whitespace runs collapse,
  and text beyond :data:`QUERY_LIMIT` characters is dropped, at a word boundary when one is near
  (``notes`` says so, for the page);
* the model's caption cleaning (``text_cleaning`` in its ``config.json``,
  :func:`retrieval.data.corpora.clean_caption`) makes ``caption``, what the tokenizer reads; a
  query it leaves blank would match everything, so it is refused (:class:`EmptyQuery`);
* each channel's part is read from the cleaned text once: the words searched in speech (a quoted
  part, else what follows "says", :func:`retrieval.speech.query_words`) and the terms searched
  on screen (:func:`indexer.channels.query_terms`);
* the filter (:class:`indexer.filters.ItemFilter`, or the page's filter line) is checked here; a
  column the index lacks can only be known against the index, when the search resolves it.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from indexer.channels import query_terms
from indexer.filters import ItemFilter
from retrieval.data.corpora import DEFAULT_CAPTION_CLEANING, clean_caption
from retrieval.speech import query_words, says_spoken

#: Longest query searched, in characters; longer ones are cut (the text tower truncates far
#: earlier anyway: ~32-40 tokens).
QUERY_LIMIT = 500


class EmptyQuery(ValueError):
    """A query with nothing to search: blank, or only control characters and punctuation.
    ``notes``: what cleaning did on the way (the page shows them with its message)."""

    def __init__(self, notes: tuple[str, ...] = ()) -> None:
        super().__init__("empty query")
        self.notes = notes


@dataclass(frozen=True)
class Query:
    """One cleaned and checked query (build it with :meth:`parse`).

    ``text``: the query as searched and shown (control characters removed, whitespace
    collapsed, cut at the limit); what the on-screen meaning search embeds. ``caption``:
    ``text`` after the model's caption cleaning ``cleaning``; what the text tower tokenizes.
    ``spoken``: the words searched in speech; ``written``: the terms searched on screen (either
    may be empty: that channel then abstains). ``where``: the items a search may return.
    ``notes``: what cleaning did to the query, for the page. ``said``: the query says that
    ``spoken`` is said ("a voice says ..."), so the speech channel ranks weaker matches
    (:func:`retrieval.speech.says_spoken`).
    """

    text: str
    caption: str
    cleaning: str
    spoken: tuple[str, ...]
    written: tuple[str, ...]
    where: ItemFilter = field(default_factory=ItemFilter)
    notes: tuple[str, ...] = ()
    said: bool = False

    @classmethod
    def parse(cls, raw: str | None, cleaning: str = DEFAULT_CAPTION_CLEANING, limit: int | None = QUERY_LIMIT,
              where: ItemFilter | str | None = None) -> Query:
        """The query ``raw`` as searched with a model whose caption cleaning is ``cleaning``.
        ``where``: a filter, or a line of them as the page's filter box takes them
        (:meth:`ItemFilter.parse`, read up to ``limit`` characters).

        Raises:
            EmptyQuery: nothing searchable is left of ``raw``.
            ValueError: ``where`` is malformed; an unknown ``cleaning``.
        """
        notes: list[str] = []
        raw = "" if raw is None else str(raw)
        visible = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in raw)
        if any(unicodedata.category(ch).startswith("C") and not ch.isspace() for ch in raw):
            notes.append("Removed control characters from the query.")
        text = " ".join(visible.split())
        if limit is not None and len(text) > limit:
            cut = text[:limit]
            if not text[limit].isspace() and " " in cut[limit // 2:]:
                cut = cut[:cut.rindex(" ")]
            notes.append(f"The query was {len(text):,} characters long; searched its first {len(cut):,} "
                         f"(the limit is {limit:,}).")
            text = cut.rstrip()
        caption = clean_caption(text, cleaning)
        if not caption.strip():
            raise EmptyQuery(tuple(notes))
        if not isinstance(where, ItemFilter):
            line = str(where or "")
            where = ItemFilter.parse(line if limit is None else line[:limit])
        return cls(text, caption, cleaning, tuple(query_words(text)), tuple(query_terms(text)), where, tuple(notes),
                   said=says_spoken(text))
