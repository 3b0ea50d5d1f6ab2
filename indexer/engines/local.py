"""The local engine: decode in DataLoader worker processes, encode in this process.

Decoding overlaps encoding: the DataLoader's worker processes decode and preprocess clips
(:func:`retrieval.data.loader.iter_clip_batches`) while this process runs the mapper
(:class:`indexer.mapper.ClipMapper`); the part committer (:class:`indexer.parts.PartCommitter`)
writes each part as its last clip comes back.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from indexer.mapper import ChannelMapper, EmbedTask
from indexer.parts import PartCommitter, WorkDir
from retrieval.data.loader import iter_clip_batches
from retrieval.data.video import Preprocess


class LocalEngine:
    """Runs the embed loop here: the default, and what ``--shard`` workers use."""

    name = "local"

    def __enter__(self) -> LocalEngine:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def embed(self, task: EmbedTask, work: WorkDir, channels: ChannelMapper | None = None) -> tuple[int, int, float]:
        """Decode, encode and label every item of ``task.parts``; commit each part as it completes.

        Returns the numbers of items indexed and failed (decoding or probing), and the seconds the
        decode-encode-write loop took.
        """
        mapper = task.mapper()
        committer = PartCommitter(work, task.parts, mapper.embed_dim, channels)
        committer.commit_empty()
        clips = committer.clips
        items = task.items()
        started = time.perf_counter()
        batches = iter_clip_batches(items, Preprocess.for_model(mapper.model, items), task.batch_size, task.workers)
        with tqdm(total=len(clips), unit="clip", desc=task.description, disable=not task.progress) as bar:
            for batch in batches:
                for i, reason in batch.failures:
                    part, position = clips[i]
                    committer.fail(part.number, position, reason)
                if batch.clips is not None:
                    vectors, predictions = mapper(batch.clips)
                    for row, i in enumerate(batch.indices):
                        part, position = clips[i]
                        committer.add(part.number, position, vectors[row], predictions[row])
                bar.update(len(batch.failures) + (len(batch.indices) if batch.clips is not None else 0))
        return committer.indexed, committer.failed, time.perf_counter() - started
