"""Training data: clips + captions with deterministic per-sample randomness.

Every random choice a sample makes (which frame of each segment, which paraphrase) is drawn from
a generator seeded by ``(seed, epoch, index)``, so a sample is the same whichever process,
worker or resumed run produces it: the basis of the multi-process and resume guarantees.

Small corpora (the synthetic demo) can be cached in memory: each clip is decoded once at
``frames_per_segment`` candidate frames per segment, resized to the model's size (uint8), and
training draws one candidate per segment, which is "rand" sampling on a fixed grid.
"""
from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .corpora import Corpus, ImageCaptions
from .video import ImageReadError, Preprocess, VideoReadError, read_frames, read_image

log = logging.getLogger(__name__)


class ClipTextDataset(Dataset):
    """Item ``i`` -> ``(video [C, T, H, W], caption, i)`` for epoch ``set_epoch(e)``."""

    def __init__(self, corpus: Corpus, preprocess: Preprocess, seed: int = 0, cache: bool = False,
                 frames_per_segment: int = 3, progress: bool = True):
        self.items = [it for it in corpus.items if it.captions]
        if not self.items:
            raise ValueError(f"corpus {corpus.name!r} at {corpus.root} has no captioned clips to train on")
        self.corpus, self.pre, self.seed, self.epoch = corpus, preprocess, seed, 0
        self.fps = frames_per_segment
        self._cache: list[torch.Tensor | None] | None = None
        if cache:
            self._fill_cache(progress)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _rng(self, index: int) -> random.Random:
        return random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)

    def _path(self, index: int) -> Path:
        return self.corpus.root / self.items[index].video

    def _window(self, index: int):
        it = self.items[index]
        return (it.start, it.end) if it.start is not None and it.end is not None else None

    def _decode(self, i: int) -> torch.Tensor | None:
        try:
            frames, _ = read_frames(self._path(i), num_frames=self.pre.num_frames * self.fps, sample="middle",
                                    window=self._window(i), max_seconds=self.corpus.max_seconds)
        except VideoReadError as exc:
            log.warning("skipping unreadable training clip: %s", exc)
            return None
        return self.pre.resize(frames)

    def _fill_cache(self, progress: bool) -> None:
        # the decoder and the resize release the GIL: one thread per core the process may use
        threads = max(1, min(torch.get_num_threads(), len(self.items)))
        with ThreadPoolExecutor(threads) as pool:
            cache = list(tqdm(pool.map(self._decode, range(len(self.items))), total=len(self.items),
                              desc="decoding clips", disable=not progress, leave=False))
        failed = sum(x is None for x in cache)
        if failed == len(cache):
            raise ValueError(f"none of the {len(cache)} training clips under {self.corpus.root} could be read")
        self._cache = cache

    def __getitem__(self, index: int):
        rng = self._rng(index)
        caption = rng.choice(self.items[index].captions)
        if self._cache is not None:
            frames = self._cache[index]
            if frames is None:  # unreadable: substitute a deterministic readable neighbour
                return self[(index + 1) % len(self)]
            t = self.pre.num_frames
            pick = [seg * self.fps + rng.randrange(self.fps) for seg in range(t)]
            return self.pre(frames[pick]), caption, index
        frames, _ = read_frames(self._path(index), num_frames=self.pre.num_frames, sample="rand",
                                window=self._window(index), max_seconds=self.corpus.max_seconds, rng=rng)
        return self.pre(frames), caption, index


    def reversed_captions(self, index: int) -> list[str]:
        """Captions of item ``index`` played backwards (annotation key ``caption_reversed``)."""
        rev = self.items[index].extra.get("caption_reversed")
        return [rev] if isinstance(rev, str) else [str(c) for c in rev or []]

    def reversed_sample(self, index: int, sample=None):
        """``(video, caption, index)`` of sample ``index`` with its frames in reverse order and a
        caption that describes it so, or None when the annotation has no ``caption_reversed``.

        The frames are exactly those of ``self[index]`` for the same epoch, so the two form a
        time-reversed pair that only a model reading frame order can tell apart. Pass that
        ``sample`` when it is at hand: without a cache, drawing it again decodes the file again.
        """
        captions = self.reversed_captions(index)
        if not captions or (self._cache is not None and self._cache[index] is None):
            return None
        video = (sample if sample is not None else self[index])[0]
        # seeded by a string (hashed with SHA-512 by random.Random), not by hash() of a tuple holding
        # one: str hashes change from process to process, and so would the caption
        caption = random.Random(f"reversed/{self.seed}/{self.epoch}/{index}").choice(captions)
        return video.flip(1), caption, index


class ImageTextDataset(Dataset):
    """Item ``i`` -> ``(video [C, 1, H, W], caption, i)``: image-caption pairs as one-frame clips.

    Images are resized like frames (``preprocess``, no crop); the caption is drawn from
    ``(seed, epoch, index)`` as :class:`ClipTextDataset` draws it. An unreadable image is skipped
    with one warning: its item returns the next readable one, as unreadable cached clips do.
    """

    def __init__(self, images: ImageCaptions, preprocess: Preprocess, seed: int = 0, cache: bool = False,
                 progress: bool = True):
        self.items, self.root = images.items, images.root
        if not self.items:
            raise ValueError(f"no image-caption pairs to train on under {self.root}")
        self.pre, self.seed, self.epoch = preprocess, seed, 0
        self._bad: set[int] = set()
        self._cache: list[torch.Tensor | None] | None = None
        if cache:
            self._cache = [self._load(i) for i in tqdm(range(len(self.items)), desc="decoding images",
                                                       disable=not progress, leave=False)]
        readable = (any(x is not None for x in self._cache) if self._cache is not None
                    else any(self._load(i) is not None for i in range(len(self.items))))  # stops at the first
        if not readable:
            raise ValueError(f"none of the {len(self.items)} training images under {self.root} could be read")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int) -> torch.Tensor | None:
        """uint8 ``[1, size, size, 3]``, or None (warned once) when the image cannot be read."""
        if index in self._bad:
            return None
        try:
            frames = read_image(self.root / self.items[index].video)
        except ImageReadError as exc:
            log.warning("skipping unreadable training image: %s", exc)
            self._bad.add(index)
            return None
        return self.pre.resize(frames)

    def __getitem__(self, index: int):
        for k in range(len(self)):
            i = (index + k) % len(self)  # unreadable: the next readable neighbour, deterministically
            frames = self._cache[i] if self._cache is not None else self._load(i)
            if frames is not None:
                rng = random.Random(hash((self.seed, self.epoch, i)) & 0xFFFFFFFF)
                return self.pre(frames), rng.choice(self.items[i].captions), i
        raise ValueError(f"none of the {len(self.items)} training images under {self.root} could be read")


def collate(batch):
    videos, captions, idx = zip(*batch)
    return torch.stack(videos), list(captions), torch.tensor(idx)
