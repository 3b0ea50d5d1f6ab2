"""The plan of an indexing job: sources, parts, shards and windows (no torch, no I/O but probing).

* **Sources.** The corpus entries, de-duplicated by ``(video, start, end)`` (training
  annotation files list a video once per caption) and sorted. Entries whose file is missing
  stay in the list and fail like any unreadable file, so they land in the failures record.
* **Parts.** Fixed-size chunks of the sorted sources, numbered from 0. A part is the unit of
  work, of durability and of distribution: worker ``i`` of ``N`` does the parts with
  ``part % N == i``, whichever launcher started it (``--shard``, torchrun, a Slurm array).
  Because parts are defined by the source list alone, a job may be resumed or merged with a
  different number of shards.
* **Items.** What the index holds: one per source, or with ``window`` one per time window of a
  long video (each with start/end seconds), so a query can land on the moment. A part's
  sources are expanded into items (:func:`expand_parts`) when the part is about to run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.errors import JobError
from retrieval.data.corpora import Corpus, CorpusItem

logger = logging.getLogger(__name__)

#: Sources per part. Small enough that a crash loses at most a few minutes of one worker's
#: time, large enough that a million-video corpus is a few thousand part files.
DEFAULT_PART_SIZE = 256
#: Window times are rounded to milliseconds: ids stay readable, and a duration that a re-probe
#: reports differently in the last float bits still gives the same windows.
TIME_DECIMALS = 3

#: (duration in seconds or None, failure reason or None) of each path, in order.
Probe = Callable[[Sequence[Path]], list[tuple[float | None, str | None]]]


# ----------------------------------------------------------------------------------------------
# sharding


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count``: owns the parts whose number is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise JobError(f"shard must be i/N with 0 <= i < N, got {self.index}/{self.count}")

    @property
    def is_single(self) -> bool:
        return self.count == 1

    def owns(self, part: int) -> bool:
        return part % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` -> ``Shard(i, N)``."""
        try:
            index, count = (int(value) for value in text.split("/"))
        except ValueError:
            raise JobError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
        return cls(index, count)


def resolve_shard(spec: str | None, environ: Mapping[str, str] = os.environ) -> Shard:
    """The shard this process works on: ``spec`` ("i/N"), else the launcher's environment.

    torchrun sets ``RANK``/``WORLD_SIZE``; a Slurm job array sets ``SLURM_ARRAY_TASK_ID`` and
    ``SLURM_ARRAY_TASK_COUNT`` (ids start at ``SLURM_ARRAY_TASK_MIN``, often 1). Without any of
    them the process is the only worker.
    """
    if spec:
        return Shard.parse(spec)
    if "WORLD_SIZE" in environ and "RANK" in environ:
        shard = Shard(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
        logger.info("shard %s from RANK/WORLD_SIZE", shard)
        return shard
    if "SLURM_ARRAY_TASK_COUNT" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        shard = Shard(int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"]))
        logger.info("shard %s from the Slurm array task id", shard)
        return shard
    return Shard()


# ----------------------------------------------------------------------------------------------
# sources


def item_key(video: str, start: float | None = None, end: float | None = None) -> str:
    """An item's stable name: the video's relative path, plus ``#t=start,end`` for a moment
    (the W3C media-fragment syntax, which a browser's ``<video src>`` also understands)."""
    if start is None or end is None:
        return video
    return f"{video}#t={start:.{TIME_DECIMALS}f},{end:.{TIME_DECIMALS}f}"


def printable_name(name: str) -> str:
    """``name`` as it can be written to JSON: a file name that is not valid UTF-8 (read by
    Python with surrogate escapes) gets its undecodable bytes as ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def plan_sources(corpus: Corpus) -> list[CorpusItem]:
    """The corpus as a sorted list of distinct ``(video, start, end)`` entries.

    Captions of duplicate entries are joined, and so are their other annotation fields (the
    first entry's value wins). Videos the annotation lists but the disk lacks are kept (without
    captions) so that they reach the failures record instead of vanishing.
    """
    captions: dict[tuple[str, float | None, float | None], list[str]] = {}
    fields: dict[tuple[str, float | None, float | None], dict[str, Any]] = {}
    for entry in corpus.items:
        key = (entry.video, entry.start, entry.end)
        known = captions.setdefault(key, [])
        known.extend(caption for caption in entry.captions if caption not in known)
        fields[key] = {**entry.extra, **fields.get(key, {})}
    for video in corpus.missing:
        captions.setdefault((video, None, None), [])
    ordered = sorted(captions.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1.0, kv[0][2] or -1.0))
    return [CorpusItem(video, caps, start=start, end=end, extra=fields.get((video, start, end), {}))
            for (video, start, end), caps in ordered]


def sources_fingerprint(sources: Sequence[CorpusItem]) -> str:
    """sha256 of the source list: a resumed or merged job must see the very same corpus."""
    rows = [[source.video, source.start, source.end, source.captions] for source in sources]
    return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()


def window_spans(duration: float, window: float, stride: float) -> list[tuple[float, float]]:
    """Windows of ``window`` seconds every ``stride`` seconds covering ``[0, duration]``.

    The last window is aligned to the video's end rather than cut short, so every window has
    the same length and the encoder samples frames equally densely in each. A video no longer
    than one window is a single item ``(0, duration)``.
    """
    if window <= 0 or stride <= 0:
        raise JobError(f"window and stride must be positive, got {window} and {stride}")
    duration = round(duration, TIME_DECIMALS)
    if duration <= window:
        return [(0.0, duration)]
    spans = []
    start = 0.0
    while start + window < duration:
        spans.append((round(start, TIME_DECIMALS), round(start + window, TIME_DECIMALS)))
        start += stride
    last = (round(duration - window, TIME_DECIMALS), duration)
    if spans[-1][0] < last[0]:
        spans.append(last)
    return spans


# ----------------------------------------------------------------------------------------------
# parts


@dataclass
class Part:
    """One planned part: the items to embed (in index order) and the failures known before
    decoding (probing, unprintable names)."""

    number: int
    items: list[CorpusItem]
    failures: list[dict[str, Any]]
    #: item position -> the whole video's probed duration in seconds (windows know their span)
    durations: dict[int, float] = field(default_factory=dict)

    def item_extra(self, position: int) -> dict[str, Any]:
        """What an index item keeps beside its path, span, captions and labels: its key, the
        annotation's other fields (``meta``, what ``vtr search --where`` filters on) and the
        whole video's duration (``vtr search --min-duration``)."""
        item = self.items[position]
        extra: dict[str, Any] = {"key": item_key(item.video, item.start, item.end)}
        if item.extra:
            extra["meta"] = dict(item.extra)
        if position in self.durations:
            extra["duration"] = round(self.durations[position], 3)
        return extra

    def failure(self, position: int, reason: str) -> dict[str, Any]:
        """The failure record of item ``position``, which could not be decoded."""
        item = self.items[position]
        return {"path": item.video, "item": item_key(item.video, item.start, item.end), "reason": reason}


def part_sources(sources: Sequence[CorpusItem], part: int, part_size: int) -> Sequence[CorpusItem]:
    """The sources of part number ``part``."""
    return sources[part * part_size : (part + 1) * part_size]


def expand_parts(
    sources: Sequence[CorpusItem],
    numbers: Sequence[int],
    part_size: int,
    window: float | None,
    stride: float | None,
    root: Path,
    probe: Probe,
) -> list[Part]:
    """Parts ``numbers`` with their items (windows of long videos when ``window``) and the
    probing failures; ``probe`` measures the whole videos' durations."""
    chosen = [(part, source) for part in numbers for source in part_sources(sources, part, part_size)]
    durations: list[tuple[float | None, str | None]] = [(None, None)] * len(chosen)
    whole = [i for i, (_, source) in enumerate(chosen) if source.start is None]
    if whole:  # windows need the duration; whole videos record it for duration filters
        for i, result in zip(whole, probe([root / chosen[i][1].video for i in whole]), strict=True):
            durations[i] = result
    expanded = {part: Part(part, [], []) for part in numbers}
    for (part, source), (duration, reason) in zip(chosen, durations, strict=True):
        target = expanded[part]
        shown = printable_name(source.video)
        if shown != source.video:  # the index, its JSON records and the page need text names
            reason = "the file name is not valid UTF-8 (its undecodable bytes are shown as \\xNN); rename it"
            target.failures.append({"path": shown, "item": item_key(shown), "reason": reason})
        elif reason is not None and window is not None:
            target.failures.append({"path": source.video, "item": item_key(source.video), "reason": reason})
        elif duration is None or window is None:
            if duration is not None:
                target.durations[len(target.items)] = duration
            target.items.append(source)  # unprobed: decoding records the failure as before
        else:
            target.items.extend(
                CorpusItem(source.video, source.captions, start=start, end=end, extra=source.extra)
                for start, end in window_spans(duration, window, stride or window)
            )
    return list(expanded.values())
