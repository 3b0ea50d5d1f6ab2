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

With a speech channel the same is done for it (``speech``: items its phonetic search finds
confidently; fusion of visual and every other channel), and the recogniser's word error rate is
measured on the videos whose ``attributes`` record the ``spoken`` sentence.

Queries are split by what they mention: a corpus entry whose ``attributes`` record ``written``
text (the synthetic corpus's written layer) is a text-mentioning query, one that records a
``spoken`` sentence (the spoken layer) a speech-mentioning one, any other a picture-only one.
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
from retrieval.speech import item_words, word_error_rate

#: Query subsets reported beside the whole corpus.
SUBSETS = ("all", "picture_only", "text_mentioning", "speech_mentioning")
_WAYS = ("visual", "text", "speech", "semantic", "text_semantic", "fused_lexical", "fused", "plain_fusion")
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

    Returns ``{"visual": [...], "text": [...], "speech": [...], "fused": [...],
    "plain_fusion": [...], "text_mentioning": [bool, ...], "speech_mentioning": [bool, ...],
    "captions": [...]}`` (``text``/``speech`` only when the index has that channel, ``fused`` and
    ``plain_fusion`` when it has either).
    """
    items = searcher.reader.items
    paths = [item["path"] for item in items]
    queries = [(caption, str(corpus.root / entry.video), _mentions(entry.extra))
               for entry in corpus.items for caption in entry.captions]
    vectors = np.asarray(searcher.reader.vectors, np.float32)
    others = {name: index for name, index in (("text", searcher.text_index), ("speech", searcher.speech_index))
              if index is not None}
    semantic = searcher.text_index is not None and bool(searcher.semantic_index)
    everyone = list(range(len(items)))
    out: dict[str, Any] = {"visual": [], "captions": [q[0] for q in queries],
                           "text_mentioning": [q[2][0] for q in queries],
                           "speech_mentioning": [q[2][1] for q in queries]}
    if others:
        out.update({name: [] for name in others}, fused=[], plain_fusion=[])
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
            if not others:
                continue
            matched = {name: [item for item, *_ in index.search(caption)] for name, index in others.items()}
            for name, found in matched.items():
                out[name].append(_video_rank(found, paths, target))
            rankings = {"visual": visual, **matched}
            if semantic:
                near = [item for item, _ in searcher.semantic_index.search(meaning, len(items))]
                out["semantic"].append(_video_rank(near, paths, target))
                both = [item for item, _, _ in fuse({"text": matched["text"], "semantic": near}, weights)]
                out["text_semantic"].append(_video_rank(both, paths, target))
                lexical = [item for item, _, _ in fuse(rankings, weights)]
                out["fused_lexical"].append(_video_rank(lexical, paths, target))
                rankings["semantic"] = near
            fused = [item for item, _, _ in fuse(rankings, weights)]
            out["fused"].append(_video_rank(fused, paths, target))
            padded = {name: found + [item for item in everyone if item not in set(found)]
                      for name, found in matched.items()}
            plain = [item for item, _, _ in fuse({"visual": visual, **padded}, weights)]
            out["plain_fusion"].append(_video_rank(plain, paths, target))
    return out


def _mentions(extra: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether a corpus entry's caption mentions on-screen text, and whether it mentions speech."""
    attributes = extra.get("attributes") or {}
    return bool(attributes.get("written")), bool(attributes.get("spoken"))


def recognition_error(searcher: Searcher, corpus: Corpus) -> dict[str, Any] | None:
    """The recogniser's word error rate on the corpus videos whose spoken sentence is recorded:
    ``{"wer": errors / reference words, "videos": n, "reference_words": n}`` (None when no
    entry records one or the index has no speech channel)."""
    if searcher.speech_index is None:
        return None
    heard: dict[str, list[tuple[float, str]]] = {}
    for item in searcher.reader.items:
        heard.setdefault(item["path"], []).extend((word["start"], word["word"]) for word in item_words(item))
    errors = words = videos = 0
    for entry in corpus.items:
        spoken = (entry.extra.get("attributes") or {}).get("spoken")
        if not spoken:
            continue
        reference = spoken["text"].lower().split()
        # items of one video may overlap: a word heard twice at the same time counts once
        hypothesis = [word for _, word in sorted(set(heard.get(str(corpus.root / entry.video), [])))]
        errors += word_error_rate(reference, hypothesis) * len(reference)
        words += len(reference)
        videos += 1
    return None if not videos else {"wer": errors / words, "videos": videos, "reference_words": words}


def evaluate_channels(searcher: Searcher, corpus: Corpus,
                      weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """R@1/5/10 (and MdR, MnR) per way of ranking on each query subset (:data:`SUBSETS`):
    ``{"all": {"visual": {...}, "fused": {...}, ...}, ..., "queries": {"all": n, ...}}``."""
    ranks = channel_ranks(searcher, corpus, weights)
    text, speech = np.asarray(ranks["text_mentioning"], bool), np.asarray(ranks["speech_mentioning"], bool)
    masks = {"all": np.ones_like(text), "picture_only": ~text & ~speech, "text_mentioning": text,
             "speech_mentioning": speech}
    ways = [way for way in _WAYS if way in ranks]
    result: dict[str, Any] = {"queries": {name: int(mask.sum()) for name, mask in masks.items()}}
    for name, mask in masks.items():
        if mask.any():
            result[name] = {way: rank_metrics(np.asarray(ranks[way])[mask]) for way in ways}
    recognition = recognition_error(searcher, corpus)
    if recognition is not None:
        result["recognition"] = recognition
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """The R@1/5/10 of each way of ranking on each subset, one line each."""
    lines = [f"{'queries':16} {'ranking':13} {'n':>5} {'R@1':>6} {'R@5':>6} {'R@10':>6}"]
    for subset in SUBSETS:
        for way, metrics in (result.get(subset) or {}).items():
            lines.append(f"{subset:16} {way:13} {result['queries'][subset]:>5} {metrics['R@1']:>6.1f} "
                         f"{metrics['R@5']:>6.1f} {metrics['R@10']:>6.1f}")
    if "recognition" in result:
        recognition = result["recognition"]
        lines.append(f"speech recognition: WER {recognition['wer']:.3f} over {recognition['reference_words']} "
                     f"words of {recognition['videos']} videos")
    return "\n".join(lines)
