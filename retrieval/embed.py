"""Embeddings for library users: sentences and video files in, the vectors search compares out.

Both functions go through the code the commands use: texts through the model's text tower
under its inference precision (what ``vtr search`` embeds a query with), videos through the
clip loader and encoder of ``vtr eval`` (:func:`retrieval.eval.retrieval.embed_corpus`, with the
``generic`` preset's frame sampling that ``vtr index`` uses by default) and
``RetrievalModel.clip_vector``, which is what an index stores. The inner product of a text
vector and a clip vector is the retrieval score.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from retrieval.data.corpora import PRESETS, Corpus, CorpusItem
from retrieval.eval.retrieval import embed_corpus
from retrieval.models.device import evaluating

#: Sentences per text-tower call.
TEXT_BATCH = 64


def embed_texts(model: torch.nn.Module, texts: Sequence[str], batch_size: int = TEXT_BATCH) -> np.ndarray:
    """Unit text vectors, float32 ``[len(texts), E]``, in ``texts`` order."""
    texts = [str(text) for text in texts]
    if not texts:
        raise ValueError("no texts to embed")
    if any(not text.strip() for text in texts):
        raise ValueError("empty text: every sentence needs words")
    feats = []
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            feats.append(model.encode_texts(texts[start : start + batch_size])["feat"].float().cpu())
    return torch.cat(feats).numpy()


def embed_videos(
    model: torch.nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    windows: Sequence[tuple[float, float] | None] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Clip vectors, float32 ``[len(paths), E]`` (norm at most 1), of video files or of
    ``windows[i] = (start, end)`` seconds of them.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file cannot be decoded (named with the reason).
    """
    paths = [Path(path).resolve() for path in paths]
    if not paths:
        raise ValueError("no videos to embed")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"video not found: {path}")
    spans = list(windows) if windows is not None else [None] * len(paths)
    if len(spans) != len(paths):
        raise ValueError(f"{len(spans)} windows for {len(paths)} videos")
    preset = PRESETS["generic"]
    items = [CorpusItem(video=str(path), captions=[], start=None if span is None else float(span[0]),
                        end=None if span is None else float(span[1]))
             for path, span in zip(paths, spans, strict=True)]
    corpus = Corpus(name="videos", root=Path("/"), items=items, missing=[], max_text_len=preset.max_text_len,
                    sample=preset.sample, max_seconds=preset.max_seconds)
    result = embed_corpus(model, corpus, batch_size=batch_size, workers=workers, progress=progress,
                          with_tokens=False)
    if result["failures"]:
        index, reason = next(iter(sorted(result["failures"].items())))
        raise ValueError(f"cannot embed {paths[index]}: {reason}")
    return model.clip_vector(result["feat"]).float().numpy()
