"""Retrieval quality of each channel of an index, and of their fusion, on an annotated corpus.

Every caption of the corpus is a query whose right answer is its video. For each query the
ground-truth video's rank is taken under: the visual channel alone (cosine over every item), the
text channel alone (items its lexical search matches; an unmatched video ranks last), the
confidence-aware fusion :func:`indexer.channels.fuse` (what search does), and, for comparison,
plain rank fusion in which the text channel ranks *every* item (its matches first, then the
rest in index order), the variant that lets a meaningless ranking drown a strong match. When the
index holds sentence vectors of its text, also: the semantic side alone (``semantic``), lexical +
semantic without the picture (``text_semantic``), and the fusion without the semantic side
(``fused_lexical``), so that what the semantic side adds can be read off.

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
    semantic = has_text and bool(searcher.semantic_index)
    everyone = list(range(len(items)))
    out: dict[str, Any] = {"visual": [], "captions": [q[0] for q in queries], "text_mentioning": [q[2] for q in queries]}
    if has_text:
        out.update(text=[], fused=[], plain_fusion=[])
    if semantic:
        out.update(semantic=[], text_semantic=[], fused_lexical=[])
    for start in range(0, len(queries), _TEXT_BATCH):
        batch = queries[start : start + _TEXT_BATCH]
        with model_autocast(searcher.model):
            encoded = searcher.model.encode_texts([caption for caption, _, _ in batch])["feat"]
        scores = encoded.float().cpu().numpy() @ vectors.T
        meanings = searcher.sentence_vectors([caption for caption, _, _ in batch]) if semantic else [None] * len(batch)
        for (caption, target, _), row, meaning in zip(batch, scores, meanings, strict=True):
            visual = np.argsort(-row, kind="stable").tolist()
            out["visual"].append(_video_rank(visual, paths, target))
            if not has_text:
                continue
            matched = [item for item, _ in searcher.text_index.search(caption)]
            out["text"].append(_video_rank(matched, paths, target))
            rankings = {"visual": visual, "text": matched}
            if semantic:
                near = [item for item, _ in searcher.semantic_index.search(meaning, len(items))]
                out["semantic"].append(_video_rank(near, paths, target))
                both = [item for item, _, _ in fuse({"text": matched, "semantic": near}, weights)]
                out["text_semantic"].append(_video_rank(both, paths, target))
                lexical = [item for item, _, _ in fuse(rankings, weights)]
                out["fused_lexical"].append(_video_rank(lexical, paths, target))
                rankings["semantic"] = near
            fused = [item for item, _, _ in fuse(rankings, weights)]
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
    ways = [way for way in ("visual", "text", "semantic", "text_semantic", "fused_lexical", "fused", "plain_fusion")
            if way in ranks]
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
