"""Action accuracy of a model on a labelled corpus (top-1, top-5, and top-1 counting any action
a clip shows), with labels from :class:`retrieval.models.actions.ActionClassifier`."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from retrieval.data.corpora import Corpus
from retrieval.data.loader import iter_clip_batches
from retrieval.data.video import Preprocess
from retrieval.eval.metrics import topk_accuracy
from retrieval.eval.retrieval import embed_corpus
from retrieval.labels import item_actions, load_labels
from retrieval.models.actions import ActionClassifier, Source

logger = logging.getLogger(__name__)


def evaluate_actions(model: torch.nn.Module, corpus: Corpus, labels: str | Sequence[str] | None,
                     source: Source = "auto", batch_size: int = 8, workers: int = 0,
                     cache_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (percent) of the labels predicted for ``corpus`` items' ``label``.

    Items without a label are skipped; clips that cannot be decoded are skipped with a warning
    and counted in ``failed``. Zero-shot evaluation reuses :func:`embed_corpus` (and its cache).
    ``top1_any`` counts a clip's top label as right when any object of the clip does that action
    (:func:`item_actions`; the annotation's ``label`` names the primary object's).
    Returns ``{"top1", "top5", "top1_any", "n", "failed", "unlabelled", "source"}``.

    Raises:
        ValueError: no item has a label, or an item's label is not among the labels.
    """
    names = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels
    classifier = ActionClassifier(model, names, source=source)
    labelled = replace(corpus, items=[item for item in corpus.items if item.label is not None])
    if not labelled.items:
        raise ValueError(f"no item of {corpus.name!r} has a 'label'; action evaluation needs labelled clips")
    index_of = {label: i for i, label in enumerate(classifier.labels)}
    unknown = sorted({item.label for item in labelled.items} - index_of.keys())
    if unknown:
        raise ValueError(f"corpus labels not in the label list: {unknown[:5]} "
                         f"(the list has {len(index_of)}, e.g. {classifier.labels[:3]})")
    targets = torch.tensor([index_of[item.label] for item in labelled.items])
    probs = torch.zeros((len(labelled.items), len(classifier.labels)))
    if classifier.source in ("zero-shot", "head"):
        clips = embed_corpus(model, labelled, batch_size, workers, cache_dir, progress, with_tokens=False)
        probs = classifier.probabilities_from_features(clips["feat"])
        failed = clips["failed"]
    else:
        failed = []
        for batch in iter_clip_batches(labelled, Preprocess.for_model(model, labelled), batch_size, workers):
            for index, reason in batch.failures:
                logger.warning("skipping clip %d: %s", index, reason)
                failed.append(index)
            if batch.clips is not None:
                probs[batch.indices] = classifier.probabilities(batch.clips)
    keep = torch.ones(len(targets), dtype=torch.bool)
    keep[failed] = False
    if not keep.any():
        raise ValueError(f"none of the {len(targets)} labelled clips of {corpus.name!r} could be decoded")
    accuracy = topk_accuracy(probs[keep], targets[keep], ks=(1, 5))
    # a clip showing two objects shows two actions: its top label is right when either does it
    top = probs.argmax(1).tolist()
    shown = [classifier.labels[top[i]] in item_actions(item) for i, item in enumerate(labelled.items) if keep[i]]
    accuracy["top1_any"] = 100.0 * sum(shown) / len(shown)
    return {**accuracy, "n": int(keep.sum()), "failed": len(failed),
            "unlabelled": len(corpus.items) - len(labelled.items), "source": classifier.source}


__all__ = ["evaluate_actions"]
