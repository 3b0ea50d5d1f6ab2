"""Retrieval quality of each channel of an index, and of their fusion, on an annotated corpus.

Every caption of the corpus is a query whose right answer is its video. For each query the
ground-truth video's rank is taken under: the visual channel alone (cosine over every item), the
text channel alone (items its lexical search matches; an unmatched video ranks last), the
confidence-aware fusion :func:`indexer.channels.fuse` (what search does), and, for comparison,
plain rank fusion in which the text channel ranks *every* item (its matches first, then the
rest in index order), the variant that lets a meaningless ranking drown a strong match.

Queries are split by what they mention: a corpus entry whose ``attributes`` record ``written``
text (the synthetic corpus's written layer) is a text-mentioning query, any other a
picture-only one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from indexer.channels import fuse
from indexer.search import Searcher
from retrieval.data.corpora import Corpus
from retrieval.eval.metrics import rank_metrics
from retrieval.models.device import model_autocast

#: Query subsets reported beside the whole corpus.
SUBSETS = ("all", "picture_only", "text_mentioning")
_TEXT_BATCH = 64


def _video_rank(item_order: list[int], paths: list[str], target: str) -> int:
    """1-based rank of ``target`` among the distinct videos of ``item_order`` (best first)."""
    seen: set[str] = set()
    for item in item_order:
        path = paths[item]
        if path == target:
            return len(seen) + 1
        seen.add(path)
    return len(set(paths)) + 1  # never ranked: after every video


@torch.inference_mode()
def channel_ranks(searcher: Searcher, corpus: Corpus,
                  weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Each query's ground-truth rank per way of ranking, and which subset it belongs to.

    Returns ``{"visual": [...], "text": [...], "fused": [...], "plain_fusion": [...],
    "text_mentioning": [bool, ...], "captions": [...]}`` (``text``, ``fused`` and
    ``plain_fusion`` only when the index has a text channel).
    """
    items = searcher.reader.items
    paths = [item["path"] for item in items]
    queries = [(caption, str(corpus.root / entry.video), bool((entry.extra.get("attributes") or {}).get("written")))
               for entry in corpus.items for caption in entry.captions]
    vectors = np.asarray(searcher.reader.vectors, np.float32)
    has_text = searcher.text_index is not None
    everyone = list(range(len(items)))
    out: dict[str, Any] = {"visual": [], "captions": [q[0] for q in queries], "text_mentioning": [q[2] for q in queries]}
    if has_text:
        out.update(text=[], fused=[], plain_fusion=[])
    for start in range(0, len(queries), _TEXT_BATCH):
        batch = queries[start : start + _TEXT_BATCH]
        with model_autocast(searcher.model):
            encoded = searcher.model.encode_texts([caption for caption, _, _ in batch])["feat"]
        scores = encoded.float().cpu().numpy() @ vectors.T
        for (caption, target, _), row in zip(batch, scores, strict=True):
            visual = np.argsort(-row, kind="stable").tolist()
            out["visual"].append(_video_rank(visual, paths, target))
            if not has_text:
                continue
            matched = [item for item, _ in searcher.text_index.search(caption)]
            out["text"].append(_video_rank(matched, paths, target))
            fused = [item for item, _, _ in fuse({"visual": visual, "text": matched}, weights)]
            out["fused"].append(_video_rank(fused, paths, target))
            known = set(matched)
            padded = matched + [item for item in everyone if item not in known]
            plain = [item for item, _, _ in fuse({"visual": visual, "text": padded}, weights)]
            out["plain_fusion"].append(_video_rank(plain, paths, target))
    return out


def evaluate_channels(searcher: Searcher, corpus: Corpus,
                      weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """R@1/5/10 (and MdR, MnR) per way of ranking on each query subset (:data:`SUBSETS`):
    ``{"all": {"visual": {...}, "fused": {...}, ...}, ..., "queries": {"all": n, ...}}``."""
    ranks = channel_ranks(searcher, corpus, weights)
    mentions = np.asarray(ranks["text_mentioning"], bool)
    masks = {"all": np.ones_like(mentions), "picture_only": ~mentions, "text_mentioning": mentions}
    ways = [way for way in ("visual", "text", "fused", "plain_fusion") if way in ranks]
    result: dict[str, Any] = {"queries": {name: int(mask.sum()) for name, mask in masks.items()}}
    for name, mask in masks.items():
        if mask.any():
            result[name] = {way: rank_metrics(np.asarray(ranks[way])[mask]) for way in ways}
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """The R@1/5/10 of each way of ranking on each subset, one line each."""
    lines = [f"{'queries':16} {'ranking':13} {'n':>5} {'R@1':>6} {'R@5':>6} {'R@10':>6}"]
    for subset in SUBSETS:
        for way, metrics in (result.get(subset) or {}).items():
            lines.append(f"{subset:16} {way:13} {result['queries'][subset]:>5} {metrics['R@1']:>6.1f} "
                         f"{metrics['R@5']:>6.1f} {metrics['R@10']:>6.1f}")
    return "\n".join(lines)
