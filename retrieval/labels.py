"""Action labels: the label sets (named ones ship beside the model configs, so
:mod:`retrieval.models.registry` resolves them) and the actions a corpus item shows."""
from __future__ import annotations

from retrieval.data.corpora import CorpusItem
from retrieval.models.registry import NAMED_LABEL_SETS, label_sets_dir, load_labels


def item_actions(item: CorpusItem) -> list[str]:
    """The distinct actions a corpus item shows, its annotation's ``label`` (the primary) first,
    then every object's ``action`` under ``attributes.objects`` (the synthetic corpus lists them)."""
    objects = (item.extra.get("attributes") or {}).get("objects") if isinstance(item.extra, dict) else None
    found = [str(o["action"]) for o in objects or [] if isinstance(o, dict) and o.get("action")]
    if item.label is not None:
        found.insert(0, item.label)
    return list(dict.fromkeys(found))


__all__ = ["NAMED_LABEL_SETS", "item_actions", "label_sets_dir", "load_labels"]
