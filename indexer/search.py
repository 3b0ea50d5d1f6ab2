"""Searching a published index: a text (or an example clip) in, ranked clips out.

:class:`Searcher` holds one opened index and the model that built it. A query is embedded by
the model's text tower and looked up in FAISS by cosine (the contrastive score, "ITC"). With
``rerank=True`` the best :data:`RERANK_CANDIDATES` are re-scored with the model's matching head
("ITM"), as the official two-stage evaluation does. The matching head needs the candidates'
patch tokens, which the index does not store (they are ~100x larger than the clip vector), so
they are recomputed by decoding those few clips: a fraction of a second for ~20 clips with the
demo model.

Long videos are indexed as overlapping windows, so several windows of one video often match a
query. With ``group=True`` a search returns one hit per video: its best window, with the other
matching windows of that video as further :class:`Moment` s (best first); ``group=False`` keeps
the raw list of items.

An index can only be searched with the model that built it: vectors of two models live in
unrelated spaces, so a different model is refused (:class:`indexer.store.IndexModelMismatch`).
A model is its weights: a copy of the model folder under another name is the same model.

A :class:`Searcher` follows its index: before each search it checks whether a newer version
has been published (``vtr index add`` / ``remove``) and switches to it
(:meth:`Searcher.refresh`), so a removed clip is not found once its removal is published. A
server (``refresh_in_background=True``) opens and verifies the new version in a thread and
keeps answering from the old one until the new one is ready, so no request waits for it.

Items are named across versions by :func:`clip_key` (their video, start and end): an item's row
number changes when an update republishes the index, its key does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.channels import DEFAULT_WEIGHTS, SemanticIndex, TextIndex, fuse, index_channels
from indexer.faiss_index import HeldSubset, hold_subset
from indexer.filters import ItemFilter
from indexer.query import Query
from indexer.store import MANIFEST_FILE, IndexReader, open_index, published_version_dir
from retrieval.data.corpora import DEFAULT_CAPTION_CLEANING
from retrieval.data.video import Preprocess, VideoReadError, load_clip
from retrieval.labels import load_labels
from retrieval.models.actions import label_source
from retrieval.models.device import model_autocast, model_device, resolve_device
from retrieval.models.model_dir import load_model, model_identity, read_model_config, text_cleaning_of
from retrieval.sentence import SentenceEncoder
from retrieval.speech import SpeechIndex

logger = logging.getLogger(__name__)

#: How many cosine hits the matching head re-scores (at least ``k``).
RERANK_CANDIDATES = 20
#: Clips encoded per call while re-ranking, to bound memory with large encoders.
RERANK_BATCH = 8


#: A grouped search reads this many items per wanted video at first (more if they fall short).
GROUP_POOL_FACTOR = 4
#: Resolved filters kept per Searcher (resolving one reads every item's metadata).
FILTER_CACHE_SIZE = 8
#: A resolved filter this small is also held in memory (:func:`indexer.faiss_index.hold_subset`:
#: 16k x 512 float32 plus an 8-bit copy, 40 MB), so repeated queries need not gather its rows.
FILTER_VECTORS_MAX = 16_384
#: Items each channel contributes to a fused search (at least ``k`` times the group factor).
FUSION_POOL = 100
#: Hex digits of a :func:`clip_key` (64 bits).
CLIP_KEY_CHARS = 16
#: With a filter, the text channel's ranking is read this many times deeper before filtering.
TEXT_FILTER_DEPTH = 20


@dataclass(frozen=True)
class Moment:
    """Another matching window of a grouped hit's video."""

    item_id: int
    start: float | None
    end: float | None
    score: float


@dataclass(frozen=True)
class Hit:
    """One search result.

    ``score`` is the cosine similarity, or the matching head's logit when re-ranked.
    ``start``/``end`` (seconds) locate the moment for window and moment items, None for a
    whole video. ``labels`` are the clip's top action labels, most probable first;
    ``label_source`` says where they come from: ``"head"`` (the model's trained action head),
    ``"zero-shot"`` (label prompts through the text tower) or ``"supervised"`` (the video
    encoder's own classifier). ``moments``: in a grouped search, the video's other matching
    windows, best first. In a search over several channels (:meth:`Searcher.search` with
    ``channels``), ``score`` is the fused score, ``channels`` gives each channel's ``rank`` and
    ``score`` for this item (absent: the channel did not rank it), and ``text`` the on-screen line
    that matched (:class:`indexer.channels.TextMatch` as a dict: ``text``, ``start``/``end`` seconds,
    ``spans``, ``snippet``), ``speech`` the recognised words that matched
    (:class:`retrieval.speech.SpeechMatch` as a dict: ``words`` as recognised, ``text``,
    ``start``/``end`` seconds, ``confidence``, ``query_words``).
    """

    item_id: int
    path: str
    start: float | None
    end: float | None
    score: float
    labels: list[tuple[str, float]]
    captions: list[str]
    label_source: str | None = None
    moments: tuple[Moment, ...] = ()
    channels: dict[str, dict[str, float]] = field(default_factory=dict)
    text: dict[str, Any] | None = None
    speech: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["moments"] = [asdict(m) for m in self.moments]
        return out


def group_hits(hits: list[Hit], k: int | None = None) -> list[Hit]:
    """One hit per video, in the order of each video's best hit; the video's other hits become
    its ``moments`` (best first). ``k`` caps the number of videos."""
    groups: dict[str, list[Hit]] = {}
    for hit in hits:
        groups.setdefault(hit.path, []).append(hit)
    grouped = []
    for members in groups.values():
        best, rest = members[0], members[1:]
        moments = tuple(Moment(h.item_id, h.start, h.end, h.score) for h in rest)
        grouped.append(replace(best, moments=best.moments + moments))
    return grouped if k is None else grouped[:k]


def _recorded_model_dir(index: Path) -> Path:
    """The model directory the index's manifest records (``vtr index`` writes it)."""
    manifest_path = index / MANIFEST_FILE
    if not manifest_path.is_file():
        open_index(index)  # raises the store's own "not a vtr index" error
    model_dir = json.loads(manifest_path.read_text(encoding="utf-8")).get("extra", {}).get("model_dir")
    if not model_dir:
        raise ValueError(f"index {index} does not record the model that built it; pass --model DIR")
    return Path(model_dir)


def query_cleaning(index: str | os.PathLike[str], model: str | os.PathLike[str] | None = None) -> str:
    """The caption cleaning of the model that searches ``index`` (``model``, default: the one its
    manifest records), read from its config without loading it: what :meth:`Query.parse` needs
    to refuse an empty query before the model is loaded.

    Raises:
        FileNotFoundError, ValueError: as :class:`Searcher` does for the same index and model.
    """
    model_dir = Path(model) if model is not None else _recorded_model_dir(Path(index))
    return text_cleaning_of(read_model_config(model_dir))


def clip_key(path: str, start: float | None, end: float | None) -> str:
    """A short stable name of an indexed item (its video ``path`` and ``start``/``end`` seconds):
    the same in every version of an index that holds the item, whatever its row there."""
    text = json.dumps([str(path), None if start is None else float(start), None if end is None else float(end)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:CLIP_KEY_CHARS]


@dataclass(frozen=True)
class IndexVersion:
    """One opened version of an index with what searching it needs, built once per version and
    swapped in as a whole: the reader, its channels, the lexical (SQLite FTS5) and semantic
    (FAISS over sentence vectors) indexes of its on-screen text (None without a text channel; the
    semantic one empty for an index built before it), the phonetic index of its speech (None
    without a speech channel) and its items by :func:`clip_key`."""

    reader: IndexReader
    channels: tuple[str, ...]
    text_index: TextIndex | None
    keys: Mapping[str, int]
    speech_index: SpeechIndex | None = None
    semantic_index: SemanticIndex | None = None

    @classmethod
    def of(cls, reader: IndexReader) -> IndexVersion:
        channels = index_channels(reader.manifest)
        keys: dict[str, int] = {}
        for row, item in enumerate(reader.items):
            keys.setdefault(clip_key(item["path"], item["start"], item["end"]), row)
        text = "text" in channels
        return cls(reader, channels, TextIndex(reader.items) if text else None, keys,
                   SpeechIndex(reader.items) if "speech" in channels else None,
                   SemanticIndex(reader.items) if text else None)

    def item(self, key: str) -> dict[str, Any] | None:
        """The item named ``key`` in this version, None if it holds no such item."""
        row = self.keys.get(key)
        return None if row is None else self.reader.items[row]


class Searcher:
    """Text-to-video (and video-to-video) search over one published index.

    Args:
        index: the index directory (what ``vtr index --out`` published).
        model: the model directory; default: the one recorded in the index's manifest.
        device: where the model runs.
        refresh_in_background: open a newly published version in a thread and answer from the
            held one meanwhile (a server); False: the search that notices it waits for it.

    Raises:
        IndexModelMismatch: ``model`` is not the model the index was built with.
        FileNotFoundError: the index or the model directory does not exist.
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        model: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        refresh_in_background: bool = False,
    ) -> None:
        index = Path(index)
        model_dir = Path(model) if model is not None else _recorded_model_dir(index)
        # on a CUDA device the FAISS index goes to the GPU too when faiss-gpu sees one (logged);
        # the index on disk stays a CPU index either way
        on_cuda = resolve_device(device).type == "cuda"
        self.index_path = index
        self._identity = model_identity(model_dir)
        self._use_gpu = None if on_cuda else False
        self.refresh_in_background = refresh_in_background
        self._refresh_lock = threading.Lock()  # one version is opened at a time
        self._loader_lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._unusable: Path | None = None  # a newer version that failed to open (not retried)
        self._held = IndexVersion.of(open_index(index, expect_model=self._identity, use_gpu=self._use_gpu))
        self._sentences: SentenceEncoder | None = None
        self._load_sentences(self._held)
        self.model = load_model(model_dir, device=device, precision=precision)
        self.device = model_device(self.model)
        self.preprocess = Preprocess.for_model(self.model)
        self.label_source = self._label_source()
        # resolved filters of one index version: (version dir, filter) -> (ids, held subset)
        self._selections: dict[tuple[Path, ItemFilter], tuple[np.ndarray, HeldSubset | None]] = {}

    def _load_sentences(self, version: IndexVersion) -> None:
        """Load the sentence model with the first version whose text has sentence vectors."""
        if version.semantic_index and self._sentences is None:
            self._sentences = SentenceEncoder()

    @property
    def version(self) -> IndexVersion:
        """The version of the index held now (searches started later use it)."""
        return self._held

    @property
    def reader(self) -> IndexReader:
        """The held version's reader."""
        return self._held.reader

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels the held version of the index has (``visual``, ``text``)."""
        return self._held.channels

    @property
    def text_index(self) -> TextIndex | None:
        """The lexical index of the held version's on-screen text (None without a text channel)."""
        return self._held.text_index

    @property
    def speech_index(self) -> SpeechIndex | None:
        """The phonetic index of the held version's speech (None without a speech channel)."""
        return self._held.speech_index

    @property
    def semantic_index(self) -> SemanticIndex | None:
        """The sentence vectors of the held version's on-screen text (None without a text
        channel; empty for an index built before the semantic side)."""
        return self._held.semantic_index

    def sentence_vectors(self, texts: Sequence[str]) -> np.ndarray | None:
        """Queries as the semantic side searches them (None when no version held had sentence vectors)."""
        return None if self._sentences is None else self._sentences.encode(texts)

    def select(self, where: ItemFilter | str | None) -> np.ndarray | None:
        """The ids of the items ``where`` keeps (None: no filter, search everything). A string is
        read by :meth:`ItemFilter.parse`. Resolutions are cached per filter and index version.

        Raises:
            ValueError: an unknown column or a malformed condition.
        """
        self.refresh()
        return self._subset(where, self.reader)[0]

    def _subset(self, where: ItemFilter | str | None, reader: IndexReader
                ) -> tuple[np.ndarray | None, HeldSubset | None]:
        """(ids, the subset held in memory when small enough) of a filter over ``reader``'s
        version; (None, None) for no filter."""
        if where is None or isinstance(where, str):
            where = ItemFilter.parse(where)
        if where.empty:
            return None, None
        key = (reader.snapshot_dir, where)
        if key not in self._selections:
            for old in [old for old in self._selections if old[0] != reader.snapshot_dir]:
                self._selections.pop(old)  # ids of another version name other items
            while len(self._selections) >= FILTER_CACHE_SIZE:
                self._selections.pop(next(iter(self._selections)))
            ids = where.select(reader.items, reader.manifest.get("corpus_roots") or [])
            held = hold_subset(reader.index, ids, reader.vectors) if 0 < len(ids) <= FILTER_VECTORS_MAX else None
            self._selections[key] = (ids, held)
        return self._selections[key]

    def refresh(self, wait: bool | None = None) -> bool:
        """Switch to the version published at the index's path now, if it is not the one held
        (``vtr index add`` / ``remove`` published since); True when this call switched.

        Asking costs one ``readlink``; every search asks first. With ``wait`` (default: not
        :attr:`refresh_in_background`) the new version is opened, verified and built here, so no
        search, listing or clip lookup after this call uses the old version. Without, that work
        runs in a background thread (one at a time) and this call returns at once, still on the
        held version; the thread swaps the new version in when it is ready. Either way the switch
        is one attribute assignment: a search already running finishes on the version it started
        with. A newer version that cannot be opened (damaged, another model) is logged once and
        the held one kept.
        """
        if wait is None:
            wait = not self.refresh_in_background
        if not self._is_stale():
            return False
        if wait:
            return self._load_published()
        with self._loader_lock:
            if self._loader is None or not self._loader.is_alive():
                self._loader = threading.Thread(target=self._load_in_background, name="vtr-index-refresh", daemon=True)
                self._loader.start()
        return False

    def wait_for_refresh(self, timeout: float | None = None) -> bool:
        """Wait until a background refresh started by :meth:`refresh` has finished; True if none
        is running any more."""
        loader = self._loader
        if loader is not None:
            loader.join(timeout)
        return loader is None or not loader.is_alive()

    def _is_stale(self) -> bool:
        now = published_version_dir(self.index_path)
        return now != self.reader.snapshot_dir and now != self._unusable

    def _load_in_background(self) -> None:
        try:
            self._load_published()
        except Exception:  # a thread has no caller to raise to: log it, keep the held version
            self._unusable = published_version_dir(self.index_path)
            logger.exception("index %s: opening the newly published version failed; still serving generation %s",
                             self.index_path, self.reader.manifest.get("generation", "?"))

    def _load_published(self) -> bool:
        """Open the version published now and swap it in (in the caller's thread); True if switched."""
        with self._refresh_lock:
            now = published_version_dir(self.index_path)
            if now == self.reader.snapshot_dir or now == self._unusable:
                return False
            try:
                version = IndexVersion.of(open_index(self.index_path, expect_model=self._identity,
                                                     use_gpu=self._use_gpu))
            except (OSError, ValueError) as exc:
                self._unusable = now
                logger.warning("index %s was republished but the new version cannot be opened (%s); still "
                               "serving generation %s", self.index_path, exc,
                               self.reader.manifest.get("generation", "?"))
                return False
            logger.info("index %s: switched to generation %s (%d items)", self.index_path,
                        version.reader.manifest.get("generation", "?"), len(version.reader))
            self._load_sentences(version)
            self._held = version  # its lexical index and keys are ready before searches see it
            return True

    def _label_source(self) -> str | None:
        """Where the stored labels came from: the index was labelled by this model with the
        label set its manifest records, by the same rule (:func:`retrieval.models.actions.label_source`)."""
        recorded = (self.reader.manifest.get("extra") or {}).get("label_set")
        try:
            names = load_labels(recorded) if recorded else None
        except (FileNotFoundError, ValueError):
            names = None
        if names is None:  # the label file has gone: judge by the labels the items carry
            seen = {label for item in getattr(self.reader, "items", [])[:50] for label, _ in item.get("labels") or []}
            head = set(getattr(self.model, "action_labels", []) or [])
            if head and seen and seen <= head:
                return "head"
            return "zero-shot" if seen else None
        try:
            return label_source(self.model, names)
        except ValueError:
            return None

    def stats(self) -> dict[str, Any]:
        """What the index holds: items, model name, index type, vector width, creation time."""
        self.refresh()
        manifest = self.reader.manifest
        return {
            "items": len(self.reader),
            "model": manifest["model"]["name"],
            "index_type": manifest["index_type"],
            "dim": manifest["dim"],
            "created": manifest["created"],
            "failed": manifest["counts"]["failed"],
            "corpus_roots": manifest["corpus_roots"],
        }

    @property
    def can_rerank(self) -> bool:
        """Whether the model has a trained matching head to re-rank with."""
        return bool(getattr(self.model, "matching_trained", True))

    @property
    def text_cleaning(self) -> str:
        """The caption cleaning of the model's text tower (its ``config.json``)."""
        return getattr(self.model, "text_cleaning", DEFAULT_CAPTION_CLEANING)

    def query(self, text: str, where: ItemFilter | str | None = None) -> Query:
        """``text`` (and the filter ``where``) as this model's searches take it (:meth:`Query.parse`).

        Raises:
            EmptyQuery: the query has no words.
            ValueError: a malformed filter.
        """
        return Query.parse(text, self.text_cleaning, where=where)

    @torch.inference_mode()
    def search(self, query: Query | str, k: int = 10, rerank: bool = False, group: bool = False,
               channels: Sequence[str] | None = None, weights: Mapping[str, float] | None = None,
               where: ItemFilter | str | None = None) -> list[Hit]:
        """The ``k`` best clips for ``query``, best first; with ``group``, the ``k`` best videos,
        each with its other matching windows as ``moments``. The query's filter keeps only the
        items it matches (:meth:`select`), before the top ``k`` is taken.

        ``query`` is a :class:`indexer.query.Query`, or a text that is made one here
        (:meth:`query`, with the filter ``where``), cleaned and checked once: control characters
        are dropped and a query beyond :data:`indexer.query.QUERY_LIMIT` characters is cut
        (the tokenizer truncates far earlier anyway).

        ``channels`` (default: every channel the index has) are searched and their rankings
        fused (:func:`indexer.channels.fuse`, per-channel ``weights``); a channel that matches
        nothing abstains, so a query about the picture ranks as the visual channel ranks it.
        ``rerank`` re-scores the visual channel's candidates alone.

        Raises:
            EmptyQuery: the query has no words.
            ValueError: a channel the index does not have; a malformed filter or one naming a
                column the index lacks; a :class:`Query` with a filter and ``where`` too, or one
                cleaned for another model.
        """
        if isinstance(query, Query):
            if where is not None:
                raise ValueError("give the filter in the Query (Query.parse(..., where=...)), not beside it")
            if query.cleaning != self.text_cleaning:
                raise ValueError(f"the query was cleaned by the {query.cleaning!r} rule; this model's text "
                                 f"tower reads {self.text_cleaning!r} (build it with Searcher.query)")
        else:
            query = self.query(query, where)
        self.refresh()
        wanted = self.channels if channels is None else tuple(channels)
        missing = [name for name in wanted if name not in self.channels]
        if missing:
            raise ValueError(f"the index has no {missing[0]} channel (it has {', '.join(self.channels)})")
        if not wanted:
            raise ValueError("search needs at least one channel")
        if rerank and not self.can_rerank:
            raise ValueError("this model's matching head was never trained (its recipe had loss.vtm = 0): "
                             "search without re-ranking")
        reader = self.reader  # one version for the filter and the lookup, whatever a refresh does
        ids, held = self._subset(query.where, reader)  # a bad filter fails before the query is embedded
        with model_autocast(self.model):
            encoded = self.model.encode_texts([query.caption], cleaned=True)
        vector = encoded["feat"].float().cpu().numpy()
        if not rerank and wanted != ("visual",):
            return self._fused(query, vector, k, group, wanted, weights)
        if rerank:
            pool = max(k * GROUP_POOL_FACTOR if group else k, RERANK_CANDIDATES)
            ranked = reader.search(vector, pool, subset=ids, held=held)[0]
            hits = self._rerank(ranked, encoded["hidden"], encoded["mask"])
            return group_hits(hits, k) if group else hits[:k]
        return self._lookup(vector, k, group, query.where, reader)

    def search_vector(self, vector: np.ndarray, k: int = 10, group: bool = False,
                      where: ItemFilter | str | None = None) -> list[Hit]:
        """The ``k`` items (with ``group``: videos) of highest inner product with ``vector``
        (``[E]``, e.g. a row of :func:`retrieval.embed_texts`), as :meth:`search` ranks them."""
        self.refresh()
        return self._lookup(np.asarray(vector, dtype=np.float32).reshape(1, -1), k, group, where)

    def _lookup(self, vector: np.ndarray, k: int, group: bool, where: ItemFilter | str | None = None,
                reader: IndexReader | None = None) -> list[Hit]:
        """Cosine top ``k`` items, or (``group``) top ``k`` videos: the pool of items read grows
        until it holds ``k`` videos or the whole index (or every item ``where`` keeps)."""
        reader = reader or self.reader  # one version for the whole lookup, whatever a refresh does meanwhile
        ids, held = self._subset(where, reader)
        if ids is not None and len(ids) == 0:
            return []

        def ranked(n: int) -> list[Hit]:
            return [self._hit(item, score) for item, score in reader.search(vector, n, subset=ids, held=held)[0]]

        if not group:
            return ranked(k)
        total = len(reader) if ids is None else len(ids)
        pool = min(total, k * GROUP_POOL_FACTOR)
        while True:
            hits = ranked(pool)
            grouped = group_hits(hits)
            if len(grouped) >= k or pool >= total:
                return grouped[:k]
            pool = min(total, pool * GROUP_POOL_FACTOR)

    def _fused(self, query: Query, vector: np.ndarray, k: int, group: bool, channels: Sequence[str],
               weights: Mapping[str, float] | None) -> list[Hit]:
        """Each channel's best :data:`FUSION_POOL` items (of those the query's filter keeps),
        fused by confidence-aware rank fusion; each channel reads its own part of ``query``."""
        pool = max(FUSION_POOL, k * GROUP_POOL_FACTOR)
        version = self._held  # one version throughout, even if a refresh switches meanwhile
        reader, text_index, speech_index = version.reader, version.text_index, version.speech_index
        semantic_index = version.semantic_index
        where = query.where
        ids, held = self._subset(where, reader)
        if ids is not None and len(ids) == 0:
            return []
        rankings: dict[str, list[int]] = {}
        scores: dict[str, dict[int, float]] = {}
        if "visual" in channels:
            found = reader.search(vector, pool, subset=ids, held=held)[0]
            rankings["visual"] = [item["id"] for item, _ in found]
            scores["visual"] = {item["id"]: score for item, score in found}
        if "text" in channels and text_index is not None:
            # the lexical index takes no id filter: its ranking is read deeper and then filtered
            found_text = text_index.search(query.written, pool if ids is None else pool * TEXT_FILTER_DEPTH)
            if ids is not None:
                keep = set(ids.tolist())
                found_text = [(item_id, score) for item_id, score in found_text if item_id in keep][:pool]
            rankings["text"] = [item_id for item_id, _ in found_text]
            scores["text"] = dict(found_text)
        semantic_weight = {**DEFAULT_WEIGHTS, **(weights or {})}["semantic"]
        if "text" in channels and semantic_index and self._sentences is not None and semantic_weight > 0:
            found_meaning = semantic_index.search(self.sentence_vectors([query.text])[0],
                                                  pool if ids is None else pool * TEXT_FILTER_DEPTH)
            if ids is not None:
                keep = set(ids.tolist())
                found_meaning = [(item_id, score) for item_id, score in found_meaning if item_id in keep][:pool]
            rankings["semantic"] = [item_id for item_id, _ in found_meaning]
            scores["semantic"] = dict(found_meaning)
        if "speech" in channels and speech_index is not None:
            found_speech = speech_index.search(query.spoken, said=query.said)  # every confident item: the filter applies after
            if ids is not None:
                keep = set(ids.tolist())
                found_speech = [(item_id, score) for item_id, score in found_speech if item_id in keep]
            found_speech = found_speech[:pool]
            rankings["speech"] = [item_id for item_id, _ in found_speech]
            scores["speech"] = dict(found_speech)
        if "visual" in rankings and not any(rankings[name] for name in rankings if name != "visual"):
            return self._lookup(vector, k, group, where, reader)  # every other channel abstained: the visual search as is
        hits, videos = [], set()
        for item_id, fused, ranks in fuse(rankings, weights):
            if not group and len(hits) == k:
                break
            hit = self._hit(reader.items[item_id], fused)
            if group:
                if hit.path in videos:  # a further moment of a video already held: its place and score only
                    hits.append(hit)
                    continue
                if len(videos) == k:  # a video past the k best: grouping would drop it
                    continue
                videos.add(hit.path)
            # a hit shown: its per-channel ranks and scores, and the words each channel matched
            per_channel = {name: {"rank": rank, "score": scores[name][item_id]} for name, rank in ranks.items()}
            if "visual" in channels and "visual" not in per_channel:  # the exact cosine, for the record
                cosine = float(np.asarray(reader.vectors[item_id], np.float32) @ vector[0])
                per_channel["visual"] = {"rank": None, "score": cosine}
            match = None
            if text_index is not None and ("text" in ranks or "semantic" in ranks):
                # the line holding the query's words, else (a semantic match alone) the item's first line
                match = text_index.match(item_id, query.written) or text_index.first_line(item_id)
            spoken = speech_index.match(item_id, query.spoken) if "speech" in ranks and speech_index else None
            hits.append(replace(hit, channels=per_channel, text=None if match is None else asdict(match),
                                speech=None if spoken is None else spoken.to_dict()))
        return group_hits(hits, k) if group else hits

    @torch.inference_mode()
    def search_video(
        self, path: str | os.PathLike[str], k: int = 10, window: tuple[float, float] | None = None,
        group: bool = False, where: ItemFilter | str | None = None,
    ) -> list[Hit]:
        """The ``k`` clips (with ``group``: videos) most like the video at ``path`` (or its
        ``window`` in seconds).

        The query is the example's own clip vector, so a hit's score is the mean over
        (example frame, indexed frame) pairs of the per-frame cosine: plain cosine for a model
        with one feature per clip, and for one with a feature per frame the natural extension
        of the text score (a text is one "frame").

        Raises:
            VideoReadError: the example cannot be decoded.
        """
        return self.search_clip(load_clip(path, self.preprocess, window=window), k, group, where)

    @torch.inference_mode()
    def search_clip(self, clip: torch.Tensor, k: int = 10, group: bool = False,
                    where: ItemFilter | str | None = None) -> list[Hit]:
        """The ``k`` clips (with ``group``: videos) most like ``clip``, a preprocessed float
        ``[C, T, H, W]`` tensor."""
        return self.search_features(self.encode_clip(clip), k, group, where)

    @torch.inference_mode()
    def encode_clip(self, clip: torch.Tensor) -> torch.Tensor:
        """The model's features ``[1, E]`` (or ``[1, T, E]``) of a preprocessed ``[C, T, H, W]`` clip:
        what :meth:`search_features` searches with and an action classifier labels."""
        with model_autocast(self.model):
            return self.model.encode_video(clip[None].to(self.device))["feat"]

    def search_features(self, feat: torch.Tensor, k: int = 10, group: bool = False,
                        where: ItemFilter | str | None = None) -> list[Hit]:
        """The ``k`` clips (with ``group``: videos) most like the clip whose features
        (:meth:`encode_clip`) are ``feat``."""
        vector = self.model.clip_vector(feat)
        self.refresh()
        return self._lookup(vector.float().cpu().numpy(), k, group, where)

    def _rerank(
        self, ranked: list[tuple[dict[str, Any], float]], text_hidden: torch.Tensor, text_mask: torch.Tensor
    ) -> list[Hit]:
        """Order candidates by the matching head's logit; clips that no longer decode are dropped."""
        clips, kept = [], []
        for item, _ in ranked:
            window = None if item["start"] is None else (item["start"], item["end"])
            try:
                clips.append(load_clip(item["path"], self.preprocess, window=window))
                kept.append(item)
            except VideoReadError as exc:
                logger.warning("re-rank skips %s: %s", item["path"], exc.reason)
        scores: list[float] = []
        # the query's caption-only part of matching is computed once, not once per candidate
        text_state = self.model.match_text_state(text_hidden, text_mask)
        for start in range(0, len(clips), RERANK_BATCH):
            batch = torch.stack(clips[start : start + RERANK_BATCH]).to(self.device)
            n = len(batch)
            with model_autocast(self.model):
                video_state = self.model.match_video_state(self.model.encode_video(batch)["tokens"])
                logits = self.model.match_score_cached(video_state, text_state.expand(n, -1, -1),
                                                       text_mask.expand(n, -1))
            scores.extend(logits.float().cpu().tolist())
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        return [self._hit(kept[i], scores[i]) for i in order]

    def _hit(self, item: dict[str, Any], score: float) -> Hit:
        return Hit(
            item_id=item["id"],
            path=item["path"],
            start=item["start"],
            end=item["end"],
            score=float(score),
            labels=[(label, prob) for label, prob in item["labels"]],
            captions=list(item["captions"]),
            label_source=self.label_source if item["labels"] else None,
        )
