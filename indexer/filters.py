"""Which items a search may return: folders or path globs, durations, annotation columns.

A filter is resolved once against an index's items into the sorted ids that match
(:meth:`ItemFilter.select`); the search then ranks only those ids, so a filtered search returns
the top ``k`` of the matching subset, never "k hits of which two survived"
(:func:`indexer.faiss_index.search_index` with ``subset=``).

* ``paths``: globs on an item's path relative to the corpus root (``news/*``, ``*/2024-*.mp4``);
  ``*`` also crosses ``/``. A pattern without glob characters names a folder or a file
  (``news`` keeps ``news/a.mp4`` and ``news/sub/b.mp4``). Several patterns: any may match.
* ``min_seconds`` / ``max_seconds``: the item's duration (a window's or moment's span, else the
  whole video's as probed at indexing time; items of unknown duration never pass a duration
  bound).
* ``where``: ``column=value`` or ``column!=value`` on the columns an index knows
  (:func:`item_columns`): ``path``, ``start``, ``end``, ``duration``, ``label`` (the top action
  label) and every field the corpus annotation carried beside video/caption (``source``,
  ``channel``, ...). All conditions must hold. Numbers compare as numbers (``start=10``
  matches 10.0).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Columns every index has, whatever its annotation carried.
BUILTIN_COLUMNS = ("path", "start", "end", "duration", "label")
_GLOB_CHARS = re.compile(r"[*?\[]")
_WHERE = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(!=|=)\s*(.*?)\s*$")


class FilterError(ValueError):
    """A malformed filter, or one naming a column the index lacks (the message says which)."""


def relative_path(path: str, roots: Sequence[str]) -> str:
    """``path`` relative to the first corpus root that holds it (as posix), else unchanged."""
    for root in roots:
        root = root.rstrip("/")
        if root and path.startswith(root + "/"):
            return path[len(root) + 1:]
    return path


def item_duration(item: Mapping[str, Any]) -> float | None:
    """Seconds an item spans: its window or moment, else the whole video's probed duration."""
    if item.get("start") is not None and item.get("end") is not None:
        return float(item["end"]) - float(item["start"])
    duration = (item.get("extra") or {}).get("duration")
    return None if duration is None else float(duration)


def item_meta(item: Mapping[str, Any]) -> dict[str, Any]:
    """The annotation fields an item carried beside video/caption (``extra["meta"]``)."""
    return dict((item.get("extra") or {}).get("meta") or {})


def item_columns(items: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every column a ``where`` condition may name for these items."""
    seen: dict[str, None] = dict.fromkeys(BUILTIN_COLUMNS)
    for item in items:
        seen.update(dict.fromkeys(item_meta(item)))
    return list(seen)


def check_glob(pattern: str) -> str:
    """A usable path glob, or :class:`FilterError` saying what is wrong with it."""
    if not pattern or not pattern.strip():
        raise FilterError("empty path filter; give a folder or a glob such as 'news/*'")
    opened = pattern.rfind("[")
    if opened >= 0 and "]" not in pattern[opened + 2:]:  # "[]...]" : a "]" right after "[" is literal
        raise FilterError(f"malformed glob {pattern!r}: '[' without a closing ']'")
    return pattern.strip()


def parse_where(text: str) -> tuple[str, str, str]:
    """``"source=news"`` -> ``("source", "=", "news")``; ``!=`` negates."""
    match = _WHERE.match(text or "")
    if not match:
        raise FilterError(f"cannot read filter {text!r}; write COLUMN=VALUE or COLUMN!=VALUE "
                          "(e.g. source=news)")
    return match.group(1), match.group(2), match.group(3)


def _same(value: Any, wanted: str) -> bool:
    if value is None:
        return wanted.lower() in ("", "none", "null")
    if isinstance(value, bool):
        return str(value).lower() == wanted.lower()
    if isinstance(value, (int, float)):
        try:
            return float(value) == float(wanted)
        except ValueError:
            return False
    if isinstance(value, (list, tuple)):
        return any(_same(v, wanted) for v in value)
    return str(value) == wanted


@dataclass(frozen=True)
class ItemFilter:
    """Conditions an item must meet to be searched (see the module docstring)."""

    paths: tuple[str, ...] = ()
    min_seconds: float | None = None
    max_seconds: float | None = None
    where: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def build(
        cls,
        paths: str | Sequence[str] | None = None,
        where: str | Sequence[str] | None = None,
        min_seconds: float | None = None,
        max_seconds: float | None = None,
    ) -> ItemFilter:
        """Check and assemble a filter from user input (:class:`FilterError` names what is wrong)."""
        paths = [paths] if isinstance(paths, str) else list(paths or [])
        where = [where] if isinstance(where, str) else list(where or [])
        for bound, name in ((min_seconds, "minimum"), (max_seconds, "maximum")):
            if bound is not None and not (np.isfinite(bound) and bound >= 0):
                raise FilterError(f"the {name} duration must be a number of seconds >= 0, got {bound}")
        if min_seconds is not None and max_seconds is not None and min_seconds > max_seconds:
            raise FilterError(f"the minimum duration {min_seconds} s exceeds the maximum {max_seconds} s")
        return cls(tuple(check_glob(p) for p in paths), min_seconds, max_seconds,
                   tuple(parse_where(w) for w in where))

    @classmethod
    def parse(cls, text: str | None) -> ItemFilter:
        """One line of filters as the page's filter box takes them, separated by spaces or commas:
        ``source=news path=clips/* duration>=5 duration<=60`` (``path=`` takes a glob)."""
        paths, where, low, high = [], [], None, None
        for token in re.split(r"[,\s]+", (text or "").strip()):
            if not token:
                continue
            bound = re.match(r"^duration\s*(>=|<=)\s*([0-9.]+)$", token)
            if bound:
                try:
                    seconds = float(bound.group(2))
                except ValueError:
                    raise FilterError(f"cannot read filter {token!r}: {bound.group(2)!r} is not a number "
                                      "of seconds") from None
                low, high = (seconds, high) if bound.group(1) == ">=" else (low, seconds)
            elif token.startswith("path="):
                paths.append(token[len("path="):])
            else:
                where.append(token)
        return cls.build(paths, where, low, high)

    @property
    def empty(self) -> bool:
        return not (self.paths or self.where) and self.min_seconds is None and self.max_seconds is None

    def check_columns(self, columns: Sequence[str]) -> None:
        for column, _, _ in self.where:
            if column not in columns:
                raise FilterError(f"unknown filter column {column!r}; this index has: {', '.join(columns)}")

    def _path_ok(self, rel: str) -> bool:
        for pattern in self.paths:
            if _GLOB_CHARS.search(pattern):
                if fnmatch.fnmatchcase(rel, pattern):
                    return True
            elif rel == pattern.strip("/") or rel.startswith(pattern.strip("/") + "/"):
                return True
        return False

    def matches(self, item: Mapping[str, Any], roots: Sequence[str] = ()) -> bool:
        """Whether one item passes every condition (paths relative to ``roots``)."""
        rel = relative_path(os.fspath(item["path"]), roots)
        if self.paths and not self._path_ok(rel):
            return False
        if self.min_seconds is not None or self.max_seconds is not None:
            seconds = item_duration(item)
            if seconds is None:
                return False
            if self.min_seconds is not None and seconds < self.min_seconds:
                return False
            if self.max_seconds is not None and seconds > self.max_seconds:
                return False
        if self.where:
            row = {"path": rel, "start": item.get("start"), "end": item.get("end"),
                   "duration": item_duration(item),
                   "label": (item.get("labels") or [[None]])[0][0], **item_meta(item)}
            for column, op, wanted in self.where:
                if _same(row.get(column), wanted) != (op == "="):
                    return False
        return True

    def select(self, items: Sequence[Mapping[str, Any]], roots: Sequence[str] = ()) -> np.ndarray:
        """The sorted int64 ids (row numbers) of the items that pass; an unknown ``where``
        column is a :class:`FilterError` naming the columns the items have."""
        keep, columns = [], dict.fromkeys(BUILTIN_COLUMNS)
        for row, item in enumerate(items):  # one pass: a large items file is parsed row by row
            if self.where:
                columns.update(dict.fromkeys(item_meta(item)))
            if self.matches(item, roots):
                keep.append(row)
        if self.where:
            self.check_columns(list(columns))
        return np.asarray(keep, dtype=np.int64)
