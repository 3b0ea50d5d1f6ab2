"""Clip batches for every consumer that embeds a corpus (evaluation, indexing, action labels):
decode each clip with the model's pixel pipeline (:meth:`retrieval.data.video.Preprocess.for_model`),
collate, and report the clips that fail to decode instead of raising, so one bad file never
stops a job."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.data.corpora import Corpus
from retrieval.data.video import Preprocess, VideoReadError, load_clip


@dataclass
class ClipBatch:
    """One loader batch: the decoded clips and the corpus indices that failed to decode."""

    indices: list[int]
    clips: torch.Tensor | None  # [len(indices), C, T, H, W], None when every clip failed
    failures: list[tuple[int, str]]


class ClipDataset(Dataset):
    """Corpus clips as ``(index, clip [C, T, H, W] or None, failure reason or None)``.

    A decode failure is returned, not raised, so one bad file neither stops a DataLoader worker
    nor the evaluation.
    """

    def __init__(self, corpus: Corpus, preprocess: Preprocess) -> None:
        self.paths = corpus.paths()
        self.windows = [corpus.window(i) for i in range(len(corpus.items))]
        self.preprocess = preprocess
        self.max_seconds = corpus.max_seconds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            clip = load_clip(self.paths[index], self.preprocess, window=self.windows[index],
                             max_seconds=self.max_seconds)
        except VideoReadError as exc:
            return index, None, str(exc)
        return index, clip, None


def collate_clips(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> ClipBatch:
    ok = [(index, clip) for index, clip, _ in samples if clip is not None]
    failures = [(index, reason) for index, clip, reason in samples if clip is None]
    clips = torch.stack([clip for _, clip in ok]) if ok else None
    return ClipBatch([index for index, _ in ok], clips, failures)


def iter_clip_batches(corpus: Corpus, preprocess: Preprocess, batch_size: int = 8,
                      workers: int = 0) -> Iterator[ClipBatch]:
    """Decoded clip batches in corpus order; ``workers`` processes decode ahead of the consumer."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    loader = DataLoader(ClipDataset(corpus, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_clips,
                        prefetch_factor=2 if workers else None)
    yield from loader


__all__ = ["ClipBatch", "ClipDataset", "collate_clips", "iter_clip_batches"]
