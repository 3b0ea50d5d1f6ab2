"""Action-label targets for the supervised action head (recipe key ``loss.action``).

A clip's target is its annotation's ``label`` (in the synthetic corpus, the action of the
primary object: of two, the large one). An annotation without a ``label`` that lists its
objects' actions (``attributes.objects[*].action``) gets an equal share of the target on each.
A time-reversed copy (``data.reversed_share``) shows the action backwards, so its target is the
reversed action (moving left <-> moving right, growing <-> shrinking, ...; blinking and
bouncing read the same both ways).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.corpora import CorpusItem
from ..data.synthetic import REVERSE_ACTION
from ..labels import item_actions
from .recipe import Recipe, RecipeError


def action_label_set(recipe: Recipe, items: Sequence[CorpusItem]) -> list[str]:
    """The head's labels: ``loss.action_labels`` (a named set or file), else the corpus's, sorted.

    Raises:
        RecipeError: no clip has a label, or a clip's action is not in the set.
    """
    seen = sorted({action for item in items for action in item_actions(item)})
    if not seen:
        raise RecipeError("loss.action > 0 needs action labels: no training clip has a 'label'")
    if not recipe.loss.action_labels:
        return seen
    from ..labels import load_labels  # noqa: PLC0415

    try:
        labels = load_labels(recipe.loss.action_labels)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(f"loss.action_labels: {exc}") from exc
    unknown = sorted(set(seen) - set(labels))
    if unknown:
        raise RecipeError(f"loss.action_labels {recipe.loss.action_labels!r} lacks actions of the corpus: "
                          f"{unknown[:5]}")
    return labels


class ActionTargets:
    """Soft targets ``[B, n_labels]`` for a batch's indices (reversed copies: index + len(items))."""

    def __init__(self, items: Sequence[CorpusItem], labels: Sequence[str]) -> None:
        index = {label: i for i, label in enumerate(labels)}
        self.n = len(items)
        self.forward = torch.zeros(len(items), len(labels))
        self.backward = torch.zeros(len(items), len(labels))
        for row, item in enumerate(items):
            actions = [item.label] if item.label is not None else item_actions(item)
            for action in actions:
                self.forward[row, index[action]] += 1 / len(actions)
                back = REVERSE_ACTION.get(action, action)
                if back in index:
                    self.backward[row, index[back]] += 1 / len(actions)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.cpu()
        rows = torch.where((idx < self.n)[:, None], self.forward[idx % self.n], self.backward[idx % self.n])
        return rows
