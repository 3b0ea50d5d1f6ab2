"""The search page (``vtr serve``): a Gradio Blocks app over one published index.

Two tabs:

* **Search**: a text query in, the best clips out, each a playable ``<video>`` that starts at the
  matched moment (a ``#t=start,end`` media fragment), with its score, file name, time span and
  top action labels and where they come from (the model's trained action head, or zero-shot
  label prompts). Several matching windows of one long video make one card: the best window
  plays, the others are listed as further moments of that video. ``k`` and re-ranking (the
  matching head) are controls; a line above shows what the index holds.
* **Upload a video**: an example clip in; its action labels (``gr.Label``) and the
  indexed clips most like it (video-to-video search).

Safety
------
* Queries are cleaned once, as every face cleans them (:class:`indexer.query.Query`), before
  they reach the model: control characters become spaces, a query longer than
  :data:`indexer.query.QUERY_LIMIT` characters is cut there (the page says so), and a query
  with nothing to search for gets :data:`BLANK_MESSAGE` instead of results.
* The page serves exactly the videos the index holds, by item key (``vtr/clip/<key>``, the
  item's :func:`indexer.search.clip_key`, which no index update gives to another item): the
  route looks the key up in the version of the index held now, and plays the file only when its
  real path (symlinks and ``..`` resolved) is a file inside a corpus root with a single link
  (:class:`CorpusGuard`: a hard link is how a file outside the root appears inside it). Nothing
  else under the corpus root is reachable, and Gradio's own file route gets no allowed paths. A
  card rendered before an update plays the clip it showed, or nothing once that clip is removed.
* The page follows the index: every search, clip request and page opening asks whether a newer
  version was published (:meth:`indexer.search.Searcher.refresh`); the new version is opened
  and verified in a background thread while requests are answered from the old one, then
  swapped in, so a video taken out with ``vtr index remove`` is neither listed, found, played
  nor offered as an example query once the new version is ready.
* Responses and error messages name videos by their path relative to the corpus root, never by
  their absolute path on the server; unexpected errors are not shown in detail.
* Uploaded clips are checked from their container (frame size, duration, frame count) before
  any decoding, held to that frame size on every decoded frame, decoded a bounded number at a
  time and scaled while decoding (:mod:`app.uploads`); every uploaded file is deleted after its
  lifetime whether or not it is searched, all of them together are capped in bytes, and the
  upload answer names no server path (:mod:`app.upload_routes`).
* The server binds to 127.0.0.1 unless told otherwise, and requests go through Gradio's queue
  with a concurrency limit.
* Text tokenizers are not safe to call from several threads at once, so model calls take one
  lock; on a CPU the model already uses every core, so this costs no throughput.

Everything user-visible that comes from the index or the query is HTML-escaped.
"""
from __future__ import annotations

import html
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from app import upload_routes
from app.uploads import UploadJanitor, UploadLimits, UploadRefused, decode_upload
from indexer.filters import FilterError
from indexer.query import EmptyQuery, Query
from indexer.search import CLIP_KEY_CHARS, Hit, Searcher, clip_key

logger = logging.getLogger(__name__)

BLANK_MESSAGE = "Type something to search for."
DEFAULT_K = 8
MAX_K = 50
DEFAULT_CONCURRENCY = 4
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Action labels shown per result card, and in the upload tab.
CARD_LABELS = 3
#: What each label source means, for the page's tooltips and the upload tab's status line.
LABEL_SOURCE_TEXT = {"head": "the model's trained action head", "zero-shot": "zero-shot label prompts",
                     "supervised": "the video encoder's own classifier"}
UPLOAD_LABELS = 5
GENERIC_EXAMPLES = (
    "a person riding a bike",
    "a red circle moving up",
    "someone cooking in a kitchen",
    "a dog running on the beach",
)
#: The route that plays an indexed clip by item id, relative to the page so the app also works
#: under a root path.
CLIP_ROUTE = "vtr/clip/"
#: What a clip route's key looks like (ASCII hex only: no other digits, no path characters).
CLIP_KEY = re.compile(f"[0-9a-f]{{{CLIP_KEY_CHARS}}}")
#: Every search event shares one queue slot group: ``concurrency`` bounds them all.
MODEL_QUEUE = "vtr-model"
#: Uploads queue separately (``UploadLimits.decoders`` at once), so they never hold up searches.
UPLOAD_QUEUE = "vtr-upload"

PAGE_CSS = """
#vtr-header h1 { margin-bottom: 0; }
#vtr-intro p { margin: 0; }
#vtr-stats { color: var(--body-text-color-subdued); font-size: 0.9em; }
#vtr-status { min-height: 1.5em; }
#vtr-status p { margin: 0; }
.vtr-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 14px; }
.vtr-card { border: 1px solid var(--border-color-primary); border-radius: 10px; overflow: hidden;
            background: var(--background-fill-secondary); display: flex; flex-direction: column; }
.vtr-card video, .vtr-card .vtr-noplay { width: 100%; aspect-ratio: 4 / 3; background: #111; display: block;
            object-fit: contain; }
.vtr-card .vtr-noplay { color: #bbb; display: flex; align-items: center; justify-content: center;
            font-size: 0.85em; padding: 8px; box-sizing: border-box; text-align: center; }
.vtr-meta { padding: 8px 10px 10px; font-size: 0.85em; line-height: 1.4; }
.vtr-row { display: flex; justify-content: space-between; align-items: baseline; gap: 8px; }
.vtr-rank { color: var(--body-text-color-subdued); }
.vtr-score { font-weight: 600; font-variant-numeric: tabular-nums; }
.vtr-file { font-family: var(--font-mono); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.vtr-span { color: var(--body-text-color-subdued); white-space: nowrap; font-variant-numeric: tabular-nums; }
.vtr-moment { color: var(--color-accent); font-weight: 600; }
.vtr-caption { color: var(--body-text-color-subdued); font-style: italic; margin-top: 4px;
            display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; overflow: hidden; }
.vtr-labels { margin-top: 6px; }
.vtr-source { font-size: 0.8em; opacity: 0.7; margin-left: 2px; }
.vtr-more { font-size: 0.85em; margin-top: 4px; }
.vtr-more a { margin-right: 6px; }
.vtr-chip { display: inline-block; padding: 1px 8px; margin: 2px 4px 0 0; border-radius: 999px;
            background: var(--color-accent-soft); color: var(--body-text-color); font-size: 0.92em; }
.vtr-channels { margin-top: 4px; font-size: 0.85em; color: var(--body-text-color-subdued); }
.vtr-channel { margin-right: 6px; }
.vtr-onscreen { margin-top: 4px; }
.vtr-onscreen mark { background: var(--color-accent-soft); color: var(--body-text-color); padding: 0 2px;
            border-radius: 3px; }
.vtr-empty { padding: 28px; text-align: center; color: var(--body-text-color-subdued);
            border: 1px dashed var(--border-color-primary); border-radius: 10px; }
"""


# ---------------------------------------------------------------------------------- queries


# ---------------------------------------------------------------------------------- file access


class CorpusGuard:
    """Decides which files the page may link to: only those whose real path (symlinks and
    ``..`` resolved) lies inside one of the corpus roots."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        self.roots: tuple[Path, ...] = tuple(dict.fromkeys(Path(os.path.realpath(r)) for r in roots))

    def resolve(self, path: str | os.PathLike[str]) -> Path | None:
        """The real path of ``path`` if it is a file inside a root, else None."""
        real = Path(os.path.realpath(path))
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            return None
        try:
            info = real.stat()
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_nlink > 1:
            # another name of the same file may lie outside every root: realpath cannot tell
            logger.warning("not serving %s: it has %d hard links (a file outside the corpus may be linked in)",
                           self.display_name(real), info.st_nlink)
            return None
        return real

    def display_name(self, path: str | os.PathLike[str]) -> str:
        """``path`` relative to its corpus root (e.g. ``test/0003.mp4``), else its file name."""
        real = Path(os.path.realpath(path))
        for root in self.roots:
            if real.is_relative_to(root) and real != root:
                return real.relative_to(root).as_posix()
        return Path(path).name

    def url(self, path: str | os.PathLike[str], start: float | None = None, end: float | None = None,
            play_from: float | None = None) -> str | None:
        """The page-relative URL of the indexed item whose video is ``path`` from ``start`` to
        ``end`` (named by its :func:`indexer.search.clip_key`, which no update gives to another
        item), playing from ``play_from`` (default ``start``) to ``end``; None if the file may
        not be served."""
        real = self.resolve(path)
        if real is None:
            return None
        url = CLIP_ROUTE + clip_key(str(path), start, end)
        play_from = start if play_from is None else play_from
        if play_from is not None:
            url += f"#t={max(0.0, float(play_from)):.2f}" + (f",{float(end):.2f}" if end is not None else "")
        return url


# ---------------------------------------------------------------------------------- rendering


def _esc(text: Any) -> str:
    """HTML-escape, also neutralising template syntax (``${...}``, ``{{...}}``, backticks)."""
    return (html.escape(str(text), quote=True).replace("$", "&#36;").replace("{", "&#123;")
            .replace("}", "&#125;").replace("`", "&#96;"))


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, float(seconds)), 60.0)
    return f"{int(minutes)}:{rest:04.1f}"


def format_span(start: float | None, end: float | None) -> str:
    if start is None:
        return "whole clip"
    if end is None:
        return f"from {format_seconds(start)}"
    return f"{format_seconds(start)}–{format_seconds(end)}"


def render_message(message: str) -> str:
    return f'<div class="vtr-empty">{_esc(message)}</div>'


def preview_start(hit: Hit) -> float | None:
    """Where a hit's preview starts: when its on-screen words first showed, else when its matched
    spoken words were said, else its moment's start."""
    if hit.text:
        return float(hit.text["start"])
    return float(hit.speech["start"]) if hit.speech else hit.start


def render_channels(hit: Hit) -> str:
    """Which channels ranked the hit (with their ranks), the on-screen line that matched, its
    matched words highlighted, and the spoken words that matched (as recognised), for a search
    over several channels; empty otherwise."""
    if not hit.channels:
        return ""
    ranked = "".join(f'<span class="vtr-channel" data-channel="{_esc(name)}">{_esc(name)} #{info["rank"]}</span>'
                     for name, info in hit.channels.items() if info.get("rank"))
    out = f'<div class="vtr-channels">matched: {ranked}</div>'
    if hit.text:
        text, pieces, last = hit.text["text"], [], 0
        for lo, hi in hit.text["spans"]:
            pieces += [_esc(text[last:lo]), f"<mark>{_esc(text[lo:hi])}</mark>"]
            last = hi
        pieces.append(_esc(text[last:]))
        out += (f'<div class="vtr-onscreen" data-start="{float(hit.text["start"]):.2f}">on screen at '
                f'{_esc(format_seconds(hit.text["start"]))}: {"".join(pieces)}</div>')
    if hit.speech:
        out += (f'<div class="vtr-spoken" data-start="{float(hit.speech["start"]):.2f}">said at '
                f'{_esc(format_seconds(hit.speech["start"]))}: <mark>{_esc(hit.speech["text"])}</mark></div>')
    return out


def render_hits(hits: Sequence[Hit], guard: CorpusGuard, labels_per_card: int = CARD_LABELS) -> str:
    """Result cards: a player starting at the matched moment (or where the matched on-screen words
    show), score, file, span, the channels that matched, labels."""
    if not hits:
        return render_message("No results.")
    cards = []
    for rank, hit in enumerate(hits, 1):
        url = guard.url(hit.path, hit.start, hit.end, preview_start(hit))
        name = guard.display_name(hit.path)
        if url is None:
            player = '<div class="vtr-noplay">this file is outside the corpus and is not served</div>'
        else:
            player = (f'<video src="{_esc(url)}" controls muted playsinline preload="metadata" '
                      f'title="{_esc(name)}"></video>')
        chips = "".join(f'<span class="vtr-chip">{_esc(label)} {prob:.0%}</span>'
                        for label, prob in hit.labels[:labels_per_card])
        if chips and hit.label_source:
            chips += (f'<span class="vtr-source" data-source="{_esc(hit.label_source)}" title="labels from '
                      f'{_esc(LABEL_SOURCE_TEXT.get(hit.label_source, hit.label_source))}">'
                      f'{_esc(hit.label_source)}</span>')
        caption = f'<div class="vtr-caption">“{_esc(hit.captions[0])}”</div>' if hit.captions else ""
        more = ""
        if hit.moments:
            links = []
            for moment in hit.moments:
                span = _esc(format_span(moment.start, moment.end))
                link = guard.url(hit.path, moment.start, moment.end)
                label = f"{span} ({moment.score:.3f})"
                links.append(f'<a href="{_esc(link)}" target="_blank" rel="noopener">{label}</a>' if link
                             else f"<span>{label}</span>")
            more = f'<div class="vtr-more" data-moments="{len(hit.moments)}">also at {"".join(links)}</div>'
        caption += more + render_channels(hit)
        cards.append(
            f'<div class="vtr-card" data-rank="{rank}" data-score="{hit.score:.6f}" '
            f'data-item="{hit.item_id}">{player}<div class="vtr-meta">'
            f'<div class="vtr-row"><span class="vtr-rank">#{rank}</span>'
            f'<span class="vtr-score">score {hit.score:.3f}</span></div>'
            f'<div class="vtr-row"><span class="vtr-file" title="{_esc(name)}">'
            f'{_esc(name)}</span>'
            f'<span class="vtr-span{" vtr-moment" if hit.start is not None else ""}">'
            f'{_esc(format_span(hit.start, hit.end))}</span></div>'
            f'{caption}<div class="vtr-labels">{chips}</div></div></div>')
    return f'<div class="vtr-grid">{"".join(cards)}</div>'


def _markdown_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\`*_{}[]()#+-.!|<>~" else ch for ch in text)


def stats_line(stats: dict[str, Any]) -> str:
    parts = [f"**{stats.get('items', 0):,}** clips indexed", f"model **{_markdown_escape(str(stats.get('model')))}**",
             f"index **{_markdown_escape(str(stats.get('index_type')))}**"]
    if stats.get("dim"):
        parts.append(f"{stats['dim']}-d vectors")
    if stats.get("failed"):
        parts.append(f"{stats['failed']:,} videos could not be indexed")
    return " · ".join(parts)


def example_queries(searcher: Searcher, count: int = 4, max_chars: int = 90) -> list[str]:
    """A few captions from the index (spread over it), else generic queries."""
    captions: list[str] = []
    for item in getattr(searcher.reader, "items", []):
        for caption in item.get("captions") or []:
            caption = " ".join(str(caption).split())
            if caption and len(caption) <= max_chars and caption not in captions:
                captions.append(caption)
                break
    if not captions:
        return list(GENERIC_EXAMPLES[:count])
    step = max(1, len(captions) // count)
    return captions[::step][:count]


# ---------------------------------------------------------------------------------- the page logic


@dataclass
class SearchPage:
    """What the page's events call; usable without a server (tests call it directly).

    Args:
        searcher: the opened index and its model.
        labels: label set for the upload tab's action labels (a named set or a file; default:
            the set the index was labelled with, else ``synthetic``).
        examples: the example queries shown (default: captions of the version held as a page opens).
        roots: directories whose files may be served (default: the index's corpus roots).
        upload_limits: caps on uploaded clips (default :class:`app.uploads.UploadLimits`).
        group: one card per video, its other matching windows as further moments (False: one
            card per matching window).
    """

    searcher: Searcher
    labels: str | os.PathLike[str] | Sequence[str] | None = None
    roots: Sequence[str | os.PathLike[str]] | None = None
    upload_limits: UploadLimits | None = None
    group: bool = True
    examples: Sequence[str] | None = None
    guard: CorpusGuard = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    label_names: list[str] = field(init=False)
    _classifier: Any = field(init=False, default=None)
    janitor: UploadJanitor = field(init=False)
    _index_roots: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._index_roots = self.roots is None  # follow the index's roots as it is updated
        if self.roots is None:
            self.roots = list(self.searcher.reader.manifest.get("corpus_roots") or [])
        self.guard = CorpusGuard(self.roots)
        self.label_names = self._label_names()
        if self.upload_limits is None:
            self.upload_limits = UploadLimits()
        self.janitor = UploadJanitor(max_bytes=self.upload_limits.space)

    def follow_index(self) -> None:
        """Switch to the version of the index published now, if newer (its corpus roots too,
        unless the page was given its own)."""
        self.searcher.refresh()
        if self._index_roots:
            roots = list(self.searcher.reader.manifest.get("corpus_roots") or [])
            if roots != self.roots:
                self.roots = roots
                self.guard = CorpusGuard(roots)

    def clip_file(self, key: str) -> Path | None:
        """The file the clip route plays for ``key`` (a :func:`indexer.search.clip_key`): the video
        of the item so named in the version held now, if it is a file inside a corpus root; None
        for anything else, an item removed since the key was handed out included."""
        self.follow_index()
        item = self.searcher.version.item(key)
        return None if item is None else self.guard.resolve(item["path"])

    def start_view(self) -> tuple[list[str], str]:
        """What a page shows as it opens, from the version held now: the example queries and the
        stats line."""
        self.follow_index()
        examples = list(self.examples) if self.examples is not None else example_queries(self.searcher)
        return examples, stats_line(self.searcher.stats())

    def redact(self, text: str, *uploads: str | os.PathLike[str]) -> str:
        """``text`` with absolute server paths (corpus roots, uploaded files) made relative."""
        for upload in uploads:
            for form in {str(upload), os.path.realpath(upload)}:
                text = text.replace(form, Path(upload).name)
        for root in sorted(self.guard.roots, key=lambda r: -len(str(r))):
            text = text.replace(str(root) + os.sep, "").replace(str(root), ".")
        return text

    def _label_names(self) -> list[str]:
        """The upload tab's label list, read at start-up so a bad ``labels`` fails early.

        Without ``labels``: the set the index was labelled with; if that file has gone, the
        synthetic set (with a warning)."""
        from retrieval.labels import load_labels

        if self.labels is not None:
            if isinstance(self.labels, Sequence) and not isinstance(self.labels, str):
                if not self.labels:
                    raise ValueError("labels: the list is empty")
                return [str(label) for label in self.labels]
            return load_labels(self.labels)
        recorded = (self.searcher.reader.manifest.get("extra") or {}).get("label_set") or "synthetic"
        try:
            return load_labels(recorded)
        except (FileNotFoundError, ValueError) as exc:
            logger.warning("the index's label set is unusable (%s); the upload tab uses the synthetic set", exc)
            return load_labels("synthetic")

    # -- text search
    def search_hits(self, query: str | None, k: float | None = DEFAULT_K,
                    rerank: bool = False, filters: str | None = None) -> tuple[Query, list[Hit], float]:
        """The query as searched (:meth:`indexer.search.Searcher.query`), its hits, and the
        seconds the search took. ``filters``: the filter box (:meth:`indexer.filters.ItemFilter.parse`),
        applied before the top k.

        Raises:
            EmptyQuery: nothing to search for (its ``notes`` say what cleaning removed).
            FilterError: the filter is malformed or names a column the index lacks.
        """
        prepared = self.searcher.query(query, where=filters)
        k = max(1, min(MAX_K, DEFAULT_K if k is None else int(k)))
        started = time.perf_counter()
        with self._lock:
            self.follow_index()
            hits = self.searcher.search(prepared, k=k, rerank=bool(rerank) and self.searcher.can_rerank,
                                        group=self.group)
        return prepared, hits, time.perf_counter() - started

    def search(self, query: str | None, k: float | None = DEFAULT_K, rerank: bool = False,
               filters: str | None = None) -> tuple[str, str]:
        """The search tab's event: (result cards HTML, status line markdown)."""
        try:
            prepared, hits, seconds = self.search_hits(query, k, rerank, filters)
        except EmptyQuery as exc:
            return render_message(BLANK_MESSAGE), " ".join((BLANK_MESSAGE, *exc.notes))
        except FilterError as exc:
            message = f"Filter not applied: {exc}"
            return render_message(message), _markdown_escape(message)
        notes = " ".join(prepared.notes)
        shown = _markdown_escape(prepared.text if len(prepared.text) <= 80 else prepared.text[:79] + "…")
        how = " (re-ranked by the matching head)" if rerank else ""
        status = f"{len(hits)} results for “{shown}” in {seconds * 1000:.0f} ms{how}."
        return render_hits(hits, self.guard), f"{status} {notes}".strip()

    def search_json(self, query: str, k: int = DEFAULT_K, rerank: bool = False,
                    filters: str | None = None) -> dict[str, Any]:
        """The same search for programs: the query as searched, notes, and the hits as dicts
        (paths resolved; hits outside the corpus roots are left out)."""
        try:
            prepared, hits, seconds = self.search_hits(query, k, rerank, filters)
        except EmptyQuery as exc:
            return {"query": "", "notes": list(exc.notes), "message": BLANK_MESSAGE, "hits": [],
                    "seconds": 0.0, "label_source": self.searcher.label_source}
        except FilterError as exc:
            return {"query": str(query or ""), "notes": [], "message": f"Filter not applied: {exc}", "hits": [],
                    "seconds": 0.0, "label_source": self.searcher.label_source}
        rows = []
        for hit in hits:
            url = self.guard.url(hit.path, hit.start, hit.end, preview_start(hit))
            if url is not None:
                rows.append({**{key: value for key, value in hit.to_dict().items() if key != "path"},
                             "video_path": self.guard.display_name(hit.path), "url": url,
                             "labels": [[label, prob] for label, prob in hit.labels]})
        return {"query": prepared.text, "notes": list(prepared.notes), "message": None, "hits": rows,
                "seconds": seconds, "label_source": self.searcher.label_source}

    # -- video search
    def classifier(self):
        """The upload tab's action classifier: the model's action head when it knows the label set,
        else zero-shot (built on first use: zero-shot encodes every label's prompts)."""
        if self._classifier is None:
            from retrieval.models.actions import ActionClassifier

            with self._lock:
                if self._classifier is None:
                    self._classifier = ActionClassifier(self.searcher.model, self.label_names)
        return self._classifier

    def describe_video(self, path: str | os.PathLike[str],
                       k: float | None = DEFAULT_K) -> tuple[dict[str, float], list[Hit]]:
        """An example clip's action labels ``{label: probability}`` and the most similar clips.

        The clip is probed and decoded once, within :attr:`upload_limits`, and encoded once.

        Raises:
            UploadRefused: the clip is beyond a cap.
            VideoReadError: the file is not a readable video.
        """
        import torch

        classifier = self.classifier()
        k = max(1, min(MAX_K, DEFAULT_K if k is None else int(k)))
        clip = decode_upload(path, self.searcher.preprocess, self.upload_limits)
        with self._lock, torch.inference_mode():
            feat = self.searcher.encode_clip(clip)   # encoded once: for its labels and for the search
            if classifier.source == "supervised":    # the video encoder's own head reads the clip itself
                ranking = classifier.predict_clips(clip[None], top=UPLOAD_LABELS)[0]
            else:
                ranking = classifier.predict(feat, top=UPLOAD_LABELS)[0]
            self.follow_index()
            hits = self.searcher.search_features(feat, k=k, group=self.group)
        return {label: float(prob) for label, prob in ranking}, hits

    def upload(self, video: str | None, k: float | None = DEFAULT_K) -> tuple[dict[str, float] | None, str, str]:
        """The upload tab's event: (labels for gr.Label, similar clips HTML, status)."""
        from retrieval.data.video import VideoReadError

        if not video:
            return None, render_message("Upload a video clip to see its actions and similar clips."), ""
        started = time.perf_counter()
        self.janitor.hold(video)
        try:
            labels, hits = self.describe_video(video, k)
        except UploadRefused as exc:
            raise gr.Error(f"Video refused: {self.redact(str(exc), video)}") from None
        except VideoReadError as exc:
            raise gr.Error(f"Cannot read this video: {self.redact(exc.reason, video)}") from None
        finally:
            self.janitor.release(video)  # the upload is deleted once answered (after a grace period)
        source = self.classifier().source
        status = (f"{len(hits)} similar clips for {_markdown_escape(Path(video).name)} "
                  f"in {(time.perf_counter() - started) * 1000:.0f} ms. Labels from "
                  f"{LABEL_SOURCE_TEXT.get(source, source)}.")
        return labels, render_hits(hits, self.guard), status


# ---------------------------------------------------------------------------------- the app


def build_app(searcher: Searcher, *, labels: str | os.PathLike[str] | Sequence[str] | None = None,
              roots: Sequence[str | os.PathLike[str]] | None = None, examples: Sequence[str] | None = None,
              concurrency: int = DEFAULT_CONCURRENCY, title: str = "vtr · video search",
              upload_limits: UploadLimits | None = None) -> gr.Blocks:
    """The page as a queued ``gr.Blocks`` (not launched: see :func:`launch`).

    Endpoints: ``/search`` (query, k, rerank) -> (cards HTML, status), ``/search_json`` (the same
    as data), ``/similar`` (video, k) -> (labels, cards HTML, status).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    page = SearchPage(searcher, labels=labels, roots=roots, upload_limits=upload_limits,
                      examples=None if examples is None else list(examples))
    uploads_at_once = page.upload_limits.decoders
    examples = page.examples if page.examples is not None else example_queries(searcher)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {_markdown_escape(title)}", elem_id="vtr-header")
        gr.Markdown("Find moments in the indexed videos by describing them in words, or by an example clip. "
                    "Each result plays from the matched moment.", elem_id="vtr-intro")
        stats = gr.Markdown(stats_line(searcher.stats()), elem_id="vtr-stats")
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                with gr.Row(equal_height=False):
                    query = gr.Textbox(label="Describe the moment you are looking for", placeholder=examples[0]
                                       if examples else "", lines=1, max_lines=3, scale=5, elem_id="vtr-query",
                                       autofocus=True)
                    button = gr.Button("Search", variant="primary", scale=1, elem_id="vtr-search",
                                       min_width=120)
                with gr.Row():
                    k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="results (k)", scale=3,
                                  elem_id="vtr-k")
                    can_rerank = page.searcher.can_rerank
                    rerank = gr.Checkbox(False, label="re-rank with the matching head (slower, better)"
                                         if can_rerank else "re-rank (this model's matching head is untrained)",
                                         interactive=can_rerank, scale=2, elem_id="vtr-rerank")
                    filters = gr.Textbox(label="only items matching (optional)", lines=1, max_lines=1, scale=4,
                                         placeholder="source=news path=clips/* duration<=60", elem_id="vtr-filter")
                # re-read from the index as each page opens (demo.load below): an update may
                # have removed the clip a caption came from
                tries = gr.Dataset(components=[query], samples=[[e] for e in examples], label="Try",
                                   type="values", elem_id="vtr-examples")
                tries.click(lambda sample: sample[0], inputs=[tries], outputs=[query], api_visibility="private",
                            queue=False)
                status = gr.Markdown("", elem_id="vtr-status")
                results = gr.HTML(render_message("Results appear here."), elem_id="vtr-results")
                button.click(page.search, inputs=[query, k, rerank, filters], outputs=[results, status],
                             api_name="search", concurrency_id=MODEL_QUEUE)
                query.submit(page.search, inputs=[query, k, rerank, filters], outputs=[results, status],
                             api_visibility="private", concurrency_id=MODEL_QUEUE)
            with gr.Tab("Upload a video", id="upload"):
                with gr.Row():
                    with gr.Column(scale=2):
                        video = gr.Video(sources=["upload"], label="Video clip", elem_id="vtr-video",
                                         height=260)
                        similar_k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="similar clips (k)")
                        find = gr.Button("Find similar clips", variant="primary", elem_id="vtr-find")
                    with gr.Column(scale=3):
                        actions = gr.Label(num_top_classes=UPLOAD_LABELS, label="Predicted actions",
                                           elem_id="vtr-actions")
                upload_status = gr.Markdown("", elem_id="vtr-upload-status")
                similar = gr.HTML(render_message("Upload a video clip to see its actions and similar clips."),
                                  elem_id="vtr-similar")
                find.click(page.upload, inputs=[video, similar_k], outputs=[actions, similar, upload_status],
                           api_name="similar", concurrency_id=UPLOAD_QUEUE, concurrency_limit=uploads_at_once)
                video.upload(page.upload, inputs=[video, similar_k], outputs=[actions, similar, upload_status],
                             api_visibility="private", concurrency_id=UPLOAD_QUEUE,
                             concurrency_limit=uploads_at_once)

        def search_json(query: str, k: int = DEFAULT_K, rerank: bool = False, filters: str = "") -> dict[str, Any]:
            """Search the index (``filters`` as in the page's filter box); returns the query as
            searched, notes and the hits."""
            return page.search_json(query, k, rerank, filters)

        gr.api(search_json, api_name="search_json", concurrency_id=MODEL_QUEUE)

        def page_opened() -> tuple[Any, Any, str]:
            shown, counts = page.start_view()
            return (gr.Dataset(samples=[[e] for e in shown]), gr.Textbox(placeholder=shown[0] if shown else ""),
                    counts)

        demo.load(page_opened, outputs=[tries, query, stats], api_visibility="private", queue=False)

    demo.queue(default_concurrency_limit=concurrency)
    demo.vtr_page = page  # type: ignore[attr-defined]
    return demo


def _theme() -> gr.themes.Base:
    # local font stacks: the page must not fetch fonts from the internet
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate",
                          font=["Inter", "ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def launch(demo: gr.Blocks, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT,
           prevent_thread_lock: bool = False, quiet: bool = True, max_file_size: str | int | None = "200mb",
           ) -> str:
    """Start the server for a page from :func:`build_app`; returns its URL.

    Indexed clips are served by id from :data:`CLIP_ROUTE`; Gradio's own file route is given no
    allowed paths (it still serves what Gradio itself created, such as the page's assets).
    """
    page: SearchPage = demo.vtr_page  # type: ignore[attr-defined]
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True,
                                quiet=quiet, show_error=False, share=False, inbrowser=False, ssr_mode=False,
                                allowed_paths=[], max_file_size=max_file_size,
                                theme=_theme(), css=PAGE_CSS, footer_links=["api"], mcp_server=False)
    except OSError as exc:
        raise ValueError(f"cannot serve on {host}:{port}: {exc}") from exc
    add_clip_route(demo.app, page)
    upload_routes.install(demo.app, page.janitor)   # lifetimes, space, no server paths
    if not prevent_thread_lock:
        demo.block_thread()
    return url


def add_clip_route(app: Any, page: SearchPage) -> None:
    """Add ``GET/HEAD /vtr/clip/{key}`` to the running app, ahead of Gradio's routes: the indexed
    video of the item :func:`indexer.search.clip_key` names in the version held now (byte ranges
    supported, for seeking), else 404."""
    import mimetypes

    from fastapi.responses import FileResponse, Response
    from starlette.routing import Route

    async def clip(request: Any) -> Response:
        key = request.path_params["key"]
        path = page.clip_file(key) if CLIP_KEY.fullmatch(key) else None
        if path is None:
            return Response("no such clip", status_code=404, media_type="text/plain")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    route = Route("/" + CLIP_ROUTE + "{key}", clip, methods=["GET", "HEAD"])
    app.router.routes.insert(0, route)


def open_searcher(index: str | os.PathLike[str], model: str | os.PathLike[str] | None = None,
                  device: str = "cpu", precision: str = "fp32") -> Searcher:
    """The Searcher for ``vtr serve``, with start-up errors a user can act on.

    Raises:
        FileNotFoundError: the index or the model directory does not exist.
        ValueError: the index is unreadable or was built by another model.
    """
    index = Path(index)
    if not index.exists():
        raise FileNotFoundError(f"index {index} does not exist; build one with `vtr index --model M "
                                f"--videos DIR --out {index}`")
    if model is not None and not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model} does not exist")
    searcher = Searcher(index, model=model, device=device, precision=precision, refresh_in_background=True)
    if len(searcher.reader) == 0:
        raise ValueError(f"index {index} holds no clips")
    return searcher


def serve(index: str | os.PathLike[str], model: str | os.PathLike[str] | None = None, host: str = DEFAULT_HOST,
          port: int | None = DEFAULT_PORT, concurrency: int = DEFAULT_CONCURRENCY,
          labels: str | os.PathLike[str] | None = None, prevent_thread_lock: bool = False,
          quiet: bool = True, max_file_size: str | int | None = "200mb",
          upload_limits: UploadLimits | None = None, device: str = "cpu",
          precision: str = "fp32") -> tuple[gr.Blocks, str]:
    """Open the index (failing fast with a clear message), build the page and serve it.

    Blocks until interrupted unless ``prevent_thread_lock``; returns the app and its URL.
    """
    searcher = open_searcher(index, model, device, precision)
    demo = build_app(searcher, labels=labels, concurrency=concurrency, upload_limits=upload_limits)
    for root in demo.vtr_page.guard.roots:
        home = Path(os.path.realpath(Path.home()))
        if root == Path(root.anchor) or home.is_relative_to(root):
            logger.warning("the index's corpus root is %s: only its indexed videos are served, but re-index "
                           "a narrower folder of videos", root)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: the page and the corpus videos are reachable from other machines", host)
    url = launch(demo, host=host, port=port, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
                 max_file_size=max_file_size)
    return demo, url
