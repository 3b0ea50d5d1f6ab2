"""The reader of an indexing job: container durations of the planned videos, probed ahead of
decoding (windows need them; whole videos record them for duration filters). Decoding itself
is :func:`retrieval.data.loader.iter_clip_batches` (local engine) or a Ray task per batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from retrieval.data.video import VideoReadError, video_duration


class DurationDataset(Dataset):
    """Path number -> (number, duration in s or None, failure reason or None)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, float | None, str | None]:
        try:
            return index, video_duration(self.paths[index]), None
        except VideoReadError as exc:
            return index, None, str(exc)


def measure_durations(paths: Sequence[Path], workers: int) -> list[tuple[float | None, str | None]]:
    """Container durations (no decoding), probed by ``workers`` processes."""
    probes = DataLoader(DurationDataset(paths), batch_size=None, num_workers=workers)
    results: list[tuple[float | None, str | None]] = [(None, None)] * len(paths)
    for index, duration, reason in tqdm(
        probes, total=len(paths), desc="measuring videos", unit="video", disable=len(paths) < 100, leave=False
    ):
        results[index] = (duration, reason)
    return results
