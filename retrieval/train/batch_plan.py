"""Which source (video or image batches) each training step draws from.

An epoch is every video batch plus every image batch, in a random order drawn from
``(seed, epoch)``: a uniform shuffle of ``n_video`` "video" and ``n_image`` "image" slots, as
UMT's MetaLoader interleaves its loaders in proportion to their batch counts. The ``k``-th
"video" slot of an epoch is video batch ``k`` of that epoch (likewise for images), so every
batch of each source is used exactly once per epoch. Everything is a pure function of
``(seed, epoch)``: every process takes the same source at a step, and a resumed run the same
order. Without images the plan is the plain sequence of video batches.
"""
from __future__ import annotations

from functools import lru_cache

import torch

VIDEO, IMAGE = "video", "image"


@lru_cache(maxsize=4)
def epoch_plan(n_video: int, n_image: int, seed: int, epoch: int) -> tuple[tuple[str, int], ...]:
    """``(source, batch index within that source's epoch)`` for every step of ``epoch``."""
    if n_video < 0 or n_image < 0 or n_video + n_image == 0:
        raise ValueError(f"an epoch needs batches: got {n_video} video and {n_image} image batches")
    if n_image == 0:
        return tuple((VIDEO, j) for j in range(n_video))
    if n_video == 0:
        return tuple((IMAGE, j) for j in range(n_image))
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7919 + 17)
    is_image = torch.zeros(n_video + n_image, dtype=torch.bool)
    is_image[torch.randperm(n_video + n_image, generator=gen)[:n_image]] = True
    seen = {VIDEO: 0, IMAGE: 0}
    plan = []
    for flag in is_image.tolist():
        source = IMAGE if flag else VIDEO
        plan.append((source, seen[source]))
        seen[source] += 1
    return tuple(plan)


def step_source(step: int, n_video: int, n_image: int, seed: int) -> tuple[int, str, int]:
    """``(epoch, source, batch index within that source's epoch)`` of global step ``step``."""
    epoch, position = divmod(step, n_video + n_image)
    source, j = epoch_plan(n_video, n_image, seed, epoch)[position]
    return epoch, source, j
