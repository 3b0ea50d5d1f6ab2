"""Action label sets: the named sets shipped in ``configs/labels`` and label files, and the
actions a corpus item shows."""
from __future__ import annotations

import os
from pathlib import Path

from retrieval.data.corpora import CorpusItem

NAMED_LABEL_SETS: tuple[str, ...] = ("kinetics400", "synthetic")


def label_sets_dir() -> Path:
    """The named label sets: ``labels/`` under :func:`retrieval.models.registry.config_root`."""
    from retrieval.models.registry import config_root  # noqa: PLC0415

    return config_root() / "labels"


def load_labels(spec: str | os.PathLike[str]) -> list[str]:
    """A label list: a named set (``kinetics400``, ``synthetic``) or a text file, one label a line.

    Blank lines and surrounding whitespace are ignored.

    Raises:
        FileNotFoundError: neither a named set nor an existing file.
        ValueError: the file holds no labels, or a label twice.
    """
    name = str(spec)
    path = label_sets_dir() / f"{name}.txt" if name in NAMED_LABEL_SETS else Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"labels {name!r}: not a named set ({', '.join(NAMED_LABEL_SETS)}) "
                                f"nor a file (one label per line)")
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"label file {path} has no labels (expected one label per line)")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"label file {path} lists some labels twice: {duplicates[:5]}")
    return labels


def item_actions(item: CorpusItem) -> list[str]:
    """The distinct actions a corpus item shows, its annotation's ``label`` (the primary) first,
    then every object's ``action`` under ``attributes.objects`` (the synthetic corpus lists them)."""
    objects = (item.extra.get("attributes") or {}).get("objects") if isinstance(item.extra, dict) else None
    found = [str(o["action"]) for o in objects or [] if isinstance(o, dict) and o.get("action")]
    if item.label is not None:
        found.insert(0, item.label)
    return list(dict.fromkeys(found))


__all__ = ["NAMED_LABEL_SETS", "item_actions", "label_sets_dir", "load_labels"]
