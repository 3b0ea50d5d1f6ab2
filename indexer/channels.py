"""Channels of an index, lexical search over on-screen text, and fusion of the channels' rankings.

An index item can carry, beside its clip vector (the ``visual`` channel), the text read from
its frames (the ``text`` channel, :mod:`retrieval.ocr`), stored in the item's ``extra["text"]``
as lines with times and boxes. Because it rides in the item records, everything that carries
items carries it: the job's durable parts (resume, shards, merge), ``index add``/``remove``, the
checksummed ``items.jsonl``. The manifest's ``extra["channels"]`` names the channels and what
made them.

Lexical search (:class:`TextIndex`) runs on SQLite FTS5 (Python's own sqlite3, in memory, built
when an index is opened): FTS5 finds the candidates (BM25), and an item scores the summed idf of
the query terms its text holds, so rare words outweigh common ones. Each item's text is stored *folded*
(:func:`retrieval.ocr.fold`: no spaces, no punctuation, look-alike characters merged) under the
trigram tokenizer, so a query word matches as a substring: "valencia" finds the recogniser's
"FloodinValencia", "breaking" finds "BREAKlNG". Adjacent query words are also searched glued
("chapter 3" -> "chapter3"), which lets short words such as numbers count (a trigram index
cannot match a one-character word alone). bench/channels.py compares this with a plain word
index.

Semantic search (:class:`SemanticIndex`) finds text the query does not quote word for word: each
item's on-screen text has a sentence vector (:mod:`retrieval.sentence`, all-MiniLM-L6-v2, stored in
the item record at index time), searched by an exact cosine scan on the calling thread (see
:meth:`SemanticIndex.search`). It ranks as its own channel,
``semantic``, under the same rule as the lexical one: only items above a calibrated cosine
(:data:`SEMANTIC_FLOOR`) and near the query's best (:data:`SEMANTIC_MARGIN`) rank; otherwise it
abstains.

Fusion (:func:`fuse`) is reciprocal rank fusion, ``sum_c w_c / (K + rank_c)``, made
confidence-aware: a lexical channel ranks only the items it matches; when it matches none it
abstains instead of contributing an arbitrary order of every item, so a query about the picture
ranks exactly as the visual channel alone ranks it.
"""

from __future__ import annotations

import itertools
import math
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.asr import asr_of
from retrieval.ocr import DEFAULT_EVERY_S, fold, folded_with_positions, ocr_available, require_ocr
from retrieval.sentence import unpack
from retrieval.speech import require_speech

#: Every channel an index can have, in display order.
CHANNELS = ("visual", "text", "speech")
#: The rankings a search fuses: the index channels, and the text channel's semantic side.
RANKINGS = (*CHANNELS, "semantic")
#: A lexical match ranks only when it scores at least this share of the query's best match.
RELATIVE_FLOOR = 0.5
#: Items the FTS5 query hands to the term scoring, best BM25 first.
CANDIDATES = 1000
#: Default fusion weights. The text channel weighs a little more than the visual one: it only
#: ranks items that pass its confidence floor, so its first item (a match of the words typed)
#: should beat the visual channel's first (a nearest neighbour), not tie with it.
DEFAULT_WEIGHTS = {"visual": 1.0, "text": 1.5, "speech": 1.5, "semantic": 1.0}
#: The semantic side ranks an item only when the query's cosine to its text reaches this
#: (calibrated on the written synthetic corpus, bench/channels.py: 95 % of picture-only captions
#: score below 0.30 against every item's text, and at a floor of 0.30 the few above it cost
#: picture-only queries 3 points of fused R@5; half of the captions quoting an item's text score
#: above 0.44 against it, half of the paraphrasing ones above 0.29)...
SEMANTIC_FLOOR = 0.33
#: ... and is within this much of the query's best cosine.
SEMANTIC_MARGIN = 0.05
#: The RRF constant (Cormack et al. 2009): flattens the gap between the first ranks.
RRF_K = 60
#: Words that say how the text appears rather than what it says; never searched on screen.
_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is", "it", "of", "on",
    "or", "over", "that", "the", "then", "this", "to", "under", "up", "was", "were", "with", "while",
    "reads", "read", "reading", "says", "saying", "shows", "showing", "written", "title", "titled", "sign",
    "caption", "captioned", "text", "words", "screen", "banner",
))
_WORD = re.compile(r"\w+", re.UNICODE)


def parse_channels(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"visual,text"`` -> ``("visual", "text")``; None -> ``visual``, and ``text`` when its
    package is installed (``speech`` costs a third of the audio's duration: it is asked for by name).

    Raises:
        ValueError: an unknown channel name, or no channel at all.
        OcrUnavailable: ``text`` asked for without the ``ocr`` extra.
        SpeechUnavailable: ``speech`` asked for without the ``speech`` extra.
    """
    if spec is None:
        return ("visual", "text") if ocr_available() else ("visual",)
    names = channel_names(spec)
    if "text" in names:
        require_ocr()
    if "speech" in names:
        require_speech()
    return names


def channel_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"text, visual"`` -> ``("visual", "text")`` (known names, in :data:`CHANNELS` order).

    Raises:
        ValueError: an unknown channel name, or none at all.
    """
    names = [name.strip().lower() for name in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in CHANNELS]
    if unknown:
        raise ValueError(f"--channels: unknown channel {unknown[0]!r}; channels are {', '.join(CHANNELS)}")
    if not names:
        raise ValueError(f"--channels names no channel; channels are {', '.join(CHANNELS)}")
    return tuple(name for name in CHANNELS if name in names)


def index_channels(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The channels a published index holds (indexes from before channels hold ``visual`` only)."""
    recorded = (manifest.get("extra") or {}).get("channels") or {"visual": {}}
    return tuple(name for name in CHANNELS if name in recorded)


def channel_options(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`indexer.jobs.JobSpec` channel options that reproduce a published index's
    channels (``vtr index add`` indexes new videos the way the index was built)."""
    recorded = (manifest.get("extra") or {}).get("channels") or {"visual": {}}
    text = recorded.get("text")
    options: dict[str, Any] = {"channels": index_channels(manifest)}
    if text:
        options["text_every_s"] = float(text.get("every_s", DEFAULT_EVERY_S))
        if text.get("model_dir"):
            options["ocr_dir"] = Path(text["model_dir"])
    if recorded.get("speech"):
        options["asr"] = asr_of(recorded["speech"])
    return options


def item_lines(item: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The on-screen text lines an index item carries (``[]`` when it has none)."""
    return list(((item.get("extra") or {}).get("text") or {}).get("lines") or [])


def text_of(text: Mapping[str, Any]) -> str:
    """An item's on-screen text (its ``extra["text"]``) as one string: the lines in order."""
    return " ".join(line["text"] for line in text.get("lines") or [])


def query_terms(query: str) -> list[str]:
    """The folded terms a lexical search looks for: content words of at least 3 characters, and
    each pair of adjacent words glued (so "chapter 3" also looks for "chapter3")."""
    words = [word for word in _WORD.findall(query.lower()) if word not in _STOPWORDS]
    terms = [fold(word) for word in words if len(fold(word)) >= 3]
    terms += [fold(a + b) for a, b in itertools.pairwise(words)]
    return list(dict.fromkeys(term for term in terms if len(term) >= 3))


@dataclass(frozen=True)
class TextMatch:
    """An item's best-matching on-screen line: its text, when it was on screen, the matched
    character ranges ``[start, end)`` of ``text`` and a ``snippet`` with them in «...»."""

    text: str
    start: float
    end: float
    spans: tuple[tuple[int, int], ...]
    snippet: str
    terms: tuple[str, ...]


def highlight(text: str, terms: Sequence[str]) -> tuple[tuple[tuple[int, int], ...], str]:
    """Where the folded ``terms`` occur in ``text`` (character ranges of ``text`` as shown,
    merged) and the text with those ranges marked «like this»."""
    folded, where = folded_with_positions(text)
    marks = [False] * len(text)
    for term in terms:
        at = folded.find(term)
        while at >= 0:
            for position in where[at : at + len(term)]:
                marks[position] = True
            at = folded.find(term, at + 1)
    spans: list[tuple[int, int]] = []
    for position, marked in enumerate(marks):
        if not marked:
            continue
        # a run of marked characters, or two runs apart by whitespace only, is one span
        if spans and not text[spans[-1][1] : position].strip():
            spans[-1] = (spans[-1][0], position + 1)
        else:
            spans.append((position, position + 1))
    pieces, last = [], 0
    for lo, hi in spans:
        pieces += [text[last:lo], "«", text[lo:hi], "»"]
        last = hi
    return tuple(spans), "".join(pieces) + text[last:]


class TextIndex:
    """BM25 search over the folded on-screen text of an index's items (SQLite FTS5, trigram).

    Args:
        items: the index's item records (``id`` and ``extra["text"]``).
    """

    def __init__(self, items: Iterable[Mapping[str, Any]]) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize='trigram')")
        self._lines: dict[int, list[dict[str, Any]]] = {}
        self._docs: dict[int, str] = {}  # item id -> its folded text, as indexed
        for item in items:
            lines = item_lines(item)
            if lines:
                self._lines[int(item["id"])] = lines
                self._docs[int(item["id"])] = " ".join(fold(line["text"]) for line in lines)
        with self._db:
            self._db.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)", self._docs.items())

    def __len__(self) -> int:
        """Items that carry any text."""
        return len(self._docs)

    def search(self, query: str | Sequence[str], k: int | None = None,
               relative_floor: float = RELATIVE_FLOOR) -> list[tuple[int, float]]:
        """Items whose text matches ``query`` (a text, or its terms as :func:`query_terms` reads
        them: :attr:`indexer.query.Query.written`), best first, as ``(item id, score)``.

        An item's score is the summed BM25 idf of the query terms (:func:`query_terms`) its text
        contains, so rare words and glued pairs ("chapter3") outweigh common ones; BM25 over the
        trigrams breaks ties. Only items scoring at least ``relative_floor`` times the best are
        ranked: a partial match ("Chapter 7" for "chapter 3") is not evidence. ``[]`` when nothing
        matches: the channel abstains.
        """
        terms = query_terms(query) if isinstance(query, str) else list(query)
        if not terms or not self._docs:
            return []
        weights = {}
        for term in terms:
            (found,) = self._db.execute("SELECT count(*) FROM docs WHERE docs MATCH ?", (_phrase(term),)).fetchone()
            if found:
                weights[term] = math.log(1.0 + (len(self._docs) - found + 0.5) / (found + 0.5))
        if not weights:
            return []
        expression = " OR ".join(_phrase(term) for term in weights)
        rows = self._db.execute(f"SELECT rowid, -bm25(docs) FROM docs WHERE docs MATCH ? ORDER BY bm25(docs) "
                                f"LIMIT {CANDIDATES}", (expression,)).fetchall()
        scored = [(sum(w for term, w in weights.items() if term in self._docs[rowid]), bm25, int(rowid))
                  for rowid, bm25 in rows]
        best = max(score for score, _, _ in scored)
        kept = sorted((row for row in scored if row[0] >= relative_floor * best), key=lambda row: (-row[0], -row[1]))
        return [(rowid, score) for score, _, rowid in kept[:k]]

    def match(self, item_id: int, query: str | Sequence[str]) -> TextMatch | None:
        """The item's line that holds the most of the query's terms (earliest on ties); ``query``
        as :meth:`search` takes it."""
        terms = query_terms(query) if isinstance(query, str) else list(query)
        best, best_count = None, 0
        for line in self._lines.get(int(item_id), []):
            folded = fold(line["text"])
            found = [term for term in terms if term in folded]
            if len(found) > best_count:
                best, best_count = (line, found), len(found)
        if best is None:
            return None
        line, found = best
        spans, snippet = highlight(line["text"], found)
        return TextMatch(line["text"], float(line["start"]), float(line["end"]), spans, snippet, tuple(found))

    def first_line(self, item_id: int) -> TextMatch | None:
        """The item's first on-screen line, nothing highlighted (None without text)."""
        lines = self._lines.get(int(item_id))
        if not lines:
            return None
        line = lines[0]
        return TextMatch(line["text"], float(line["start"]), float(line["end"]), (), line["text"], ())


class SemanticIndex:
    """Cosine search over the sentence vectors of the items' on-screen text (exact).

    The scan is one matrix-vector product over every item's vector (``einsum``: numpy's own loop,
    on the calling thread). A multi-threaded scan (FAISS's ``IndexFlatIP`` with its OpenMP
    threads, or a threaded BLAS) was several times slower for one query vector on a busy machine:
    its threads wait at their barriers (bench/channels.py ``--parts scale``). Being single-threaded
    and free of process-wide thread settings, concurrent searches (the page's workers) do not
    disturb each other.

    Args:
        items: the index's item records; those whose ``extra["text"]`` holds a ``vector``
            (indexes built before the semantic side have none: the channel then abstains).
    """

    def __init__(self, items: Iterable[Mapping[str, Any]]) -> None:
        ids, rows = [], []
        for item in items:
            packed = ((item.get("extra") or {}).get("text") or {}).get("vector")
            if packed:
                ids.append(int(item["id"]))
                rows.append(unpack(packed))
        self._ids = np.asarray(ids, np.int64)
        self._vectors = np.ascontiguousarray(np.stack(rows), np.float32) if rows else None

    def __len__(self) -> int:
        """Items with a sentence vector."""
        return len(self._ids)

    def cosines(self, vector: np.ndarray) -> np.ndarray:
        """The query's cosine to every item's text (``[len(self)]``, in item order; the vectors are
        unit length)."""
        if self._vectors is None:
            return np.zeros(0, np.float32)
        query = np.asarray(vector, np.float32).reshape(-1)
        if query.shape[0] != self._vectors.shape[1]:
            raise ValueError(f"a sentence vector of {query.shape[0]} values for an index of {self._vectors.shape[1]}")
        return np.einsum("ij,j->i", self._vectors, query)

    def search(self, vector: np.ndarray, k: int, floor: float = SEMANTIC_FLOOR,
               margin: float = SEMANTIC_MARGIN) -> list[tuple[int, float]]:
        """Items whose text is near the query's sentence ``vector`` (``[dim]``), best first (ties in
        item order), as ``(item id, cosine)``: at most ``k``, at least ``floor``, and within
        ``margin`` of the best. ``[]``: the channel abstains."""
        scores = self.cosines(vector)
        if scores.size == 0 or k <= 0:
            return []
        best = float(scores.max())
        if not best >= floor:  # NaN abstains too
            return []
        near = np.flatnonzero(scores >= max(floor, best - margin))
        order = near[np.argsort(-scores[near], kind="stable")][:k]
        return [(int(self._ids[row]), float(scores[row])) for row in order]


def _phrase(term: str) -> str:
    """An FTS5 string literal (with the trigram tokenizer: a substring match)."""
    return '"' + term.replace('"', '""') + '"'


def fuse(rankings: Mapping[str, Sequence[int]], weights: Mapping[str, float] | None = None,
         k: int = RRF_K) -> list[tuple[int, float, dict[str, int]]]:
    """Reciprocal rank fusion of each channel's ranked item ids (best first).

    ``weights`` override :data:`DEFAULT_WEIGHTS` per channel. A channel with an empty ranking
    has abstained and adds nothing. Returns ``(item id, fused
    score, {channel: 1-based rank})`` best first; ties keep the order of the first channel
    that ranked the item (so a lone channel's order is kept exactly).
    """
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for channel, ranking in rankings.items():
        weight = float(weights.get(channel, 1.0))
        if weight <= 0:  # a channel weighed 0 is left out, not appended at score 0
            continue
        for rank, item in enumerate(ranking, start=1):
            if channel in ranks.get(item, {}):  # a repeated id keeps its first rank
                continue
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
            ranks.setdefault(item, {})[channel] = rank
    order = sorted(scores, key=lambda item: -scores[item])  # stable: first-seen order on ties
    return [(item, scores[item], ranks[item]) for item in order]


def parse_weights(spec: str | None) -> dict[str, float]:
    """``"visual=1,text=2"`` -> ``{"visual": 1.0, "text": 2.0}``."""
    weights: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name not in RANKINGS:
            raise ValueError(f"--weights: unknown channel {name!r}; channels are {', '.join(RANKINGS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--weights: {part.strip()!r} is not CHANNEL=NUMBER") from None
        if weights[name] < 0:
            raise ValueError(f"--weights: {name} must be >= 0, got {weights[name]}")
    return weights

