"""Batch indexing jobs: plan the work, embed it in numbered parts, resume, merge, publish.

A job turns a corpus (a folder of videos or an annotation file) into a published index
(:mod:`indexer.store`). The work is planned so that any number of workers, crashes and restarts
give exactly the same index:

* **Sources.** The corpus entries, de-duplicated by ``(video, start, end)`` (training
  annotation files list a video once per caption) and sorted. Entries whose file is missing
  stay in the list and fail like any unreadable file, so they land in the failures record.
* **Parts.** Fixed-size chunks of the sorted sources, numbered from 0. A part is the unit of
  work, of durability and of distribution: worker ``i`` of ``N`` does the parts with
  ``part % N == i``, whichever launcher started it (``--shard``, torchrun, a Slurm array).
  Because parts are defined by the source list alone, a job may be resumed or merged with a
  different number of shards.
* **Items.** What the index holds: one per source, or with ``window`` one per time window of a
  long video (each with start/end seconds), so a query can land on the moment. A part's
  sources are expanded into items when the part is about to run.

On disk, next to the index (``INDEX.work/``)::

    job.json                    what the job is (model identity, corpus, windows, part size,
                                labels, source fingerprint); written once, checked by every
                                worker, resume and merge
    parts/part-000007.npy       float32 [n, dim] clip vectors of part 7's items, in item order
    parts/part-000007.json      part 7's manifest: items (paths relative to the corpus root,
                                top-5 labels), failures, vector count; written last, so its
                                presence is the commit record

Each file is written to a temporary name, fsynced and renamed, then the directory is fsynced:
a part exists whole or not at all, even after ``kill -9`` or a power cut. Resume skips
committed parts and redoes the rest from scratch, so no item is ever indexed twice. When every
part is committed, :func:`publish_job` joins them (in part order, so the result does not depend
on who did what) into the index and removes the work directory.

Decoding overlaps encoding: DataLoader worker processes decode and preprocess clips
(:func:`retrieval.data.loader.iter_clip_batches`) while the main process encodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from indexer import guards
from indexer.channels import parse_channels, text_of
from indexer.checksums import ChecksumMismatch, read_sealed_json, seal_record, verify_file
from indexer.locks import index_lock, shard_lock
from indexer.store import open_index, read_published_manifest, same_model, write_index
from retrieval.atomic import atomic_write, fsync_path, write_temp
from retrieval.data.corpora import Corpus, CorpusItem, load_corpus
from retrieval.data.loader import iter_clip_batches
from retrieval.data.video import Preprocess, VideoReadError, video_duration
from retrieval.labels import load_labels
from retrieval.models.actions import ActionClassifier
from retrieval.models.device import model_autocast, model_device, resolve_device, resolve_precision
from retrieval.models.model_dir import load_model, model_identity, read_model_config
from retrieval.ocr import DEFAULT_EVERY_S, OcrReader, read_span
from retrieval.sentence import SentenceEncoder, pack
from retrieval.asr import DEFAULT_ASR, Recognizer, load_recognizer
from retrieval.speech import read_speech

logger = logging.getLogger(__name__)

JOB_FORMAT = "vtr-index-job"
JOB_VERSION = 1
#: Sources per part. Small enough that a crash loses at most a few minutes of one worker's
#: time, large enough that a million-video corpus is a few thousand part files.
DEFAULT_PART_SIZE = 256
DEFAULT_BATCH_SIZE = 16
#: On-screen texts embedded by the sentence model at once
SENTENCE_BATCH = 64
#: How many zero-shot action labels are stored per item.
TOP_LABELS = 5
#: Window times are rounded to milliseconds: ids stay readable, and a duration that a re-probe
#: reports differently in the last float bits still gives the same windows.
TIME_DECIMALS = 3
#: Options that may differ between the workers and runs of one job: where the model and the
#: corpus are mounted (the model's weights hash and the source list are compared instead).
_LOCATION_KEYS = ("model_dir", "videos_root", "ann_file")
# keys that job records written by earlier versions lack, with the value those jobs ran with
_RECORD_DEFAULTS: dict[str, Any] = {"precision": "fp32", "removed": [], "channels": {"visual": {}}}


class JobError(ValueError):
    """A job cannot start or finish as asked (a user-fixable problem, not a crash)."""


# ----------------------------------------------------------------------------------------------
# sharding


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count``: owns the parts whose number is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise JobError(f"shard must be i/N with 0 <= i < N, got {self.index}/{self.count}")

    @property
    def is_single(self) -> bool:
        return self.count == 1

    def owns(self, part: int) -> bool:
        return part % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` -> ``Shard(i, N)``."""
        try:
            index, count = (int(value) for value in text.split("/"))
        except ValueError:
            raise JobError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
        return cls(index, count)


def resolve_shard(spec: str | None, environ: Mapping[str, str] = os.environ) -> Shard:
    """The shard this process works on: ``spec`` ("i/N"), else the launcher's environment.

    torchrun sets ``RANK``/``WORLD_SIZE``; a Slurm job array sets ``SLURM_ARRAY_TASK_ID`` and
    ``SLURM_ARRAY_TASK_COUNT`` (ids start at ``SLURM_ARRAY_TASK_MIN``, often 1). Without any of
    them the process is the only worker.
    """
    if spec:
        return Shard.parse(spec)
    if "WORLD_SIZE" in environ and "RANK" in environ:
        shard = Shard(int(environ["RANK"]), int(environ["WORLD_SIZE"]))
        logger.info("shard %s from RANK/WORLD_SIZE", shard)
        return shard
    if "SLURM_ARRAY_TASK_COUNT" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        shard = Shard(int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"]))
        logger.info("shard %s from the Slurm array task id", shard)
        return shard
    return Shard()


# ----------------------------------------------------------------------------------------------
# planning


def item_key(video: str, start: float | None = None, end: float | None = None) -> str:
    """An item's stable name: the video's relative path, plus ``#t=start,end`` for a moment
    (the W3C media-fragment syntax, which a browser's ``<video src>`` also understands)."""
    if start is None or end is None:
        return video
    return f"{video}#t={start:.{TIME_DECIMALS}f},{end:.{TIME_DECIMALS}f}"


def printable_name(name: str) -> str:
    """``name`` as it can be written to JSON: a file name that is not valid UTF-8 (read by
    Python with surrogate escapes) gets its undecodable bytes as ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def plan_sources(corpus: Corpus) -> list[CorpusItem]:
    """The corpus as a sorted list of distinct ``(video, start, end)`` entries.

    Captions of duplicate entries are joined, and so are their other annotation fields (the
    first entry's value wins). Videos the annotation lists but the disk lacks are kept (without
    captions) so that they reach the failures record instead of vanishing.
    """
    captions: dict[tuple[str, float | None, float | None], list[str]] = {}
    fields: dict[tuple[str, float | None, float | None], dict[str, Any]] = {}
    for entry in corpus.items:
        key = (entry.video, entry.start, entry.end)
        known = captions.setdefault(key, [])
        known.extend(caption for caption in entry.captions if caption not in known)
        fields[key] = {**entry.extra, **fields.get(key, {})}
    for video in corpus.missing:
        captions.setdefault((video, None, None), [])
    ordered = sorted(captions.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1.0, kv[0][2] or -1.0))
    return [CorpusItem(video, caps, start=start, end=end, extra=fields.get((video, start, end), {}))
            for (video, start, end), caps in ordered]


def sources_fingerprint(sources: Sequence[CorpusItem]) -> str:
    """sha256 of the source list: a resumed or merged job must see the very same corpus."""
    rows = [[source.video, source.start, source.end, source.captions] for source in sources]
    return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()


def window_spans(duration: float, window: float, stride: float) -> list[tuple[float, float]]:
    """Windows of ``window`` seconds every ``stride`` seconds covering ``[0, duration]``.

    The last window is aligned to the video's end rather than cut short, so every window has
    the same length and the encoder samples frames equally densely in each. A video no longer
    than one window is a single item ``(0, duration)``.
    """
    if window <= 0 or stride <= 0:
        raise JobError(f"window and stride must be positive, got {window} and {stride}")
    duration = round(duration, TIME_DECIMALS)
    if duration <= window:
        return [(0.0, duration)]
    spans = []
    start = 0.0
    while start + window < duration:
        spans.append((round(start, TIME_DECIMALS), round(start + window, TIME_DECIMALS)))
        start += stride
    last = (round(duration - window, TIME_DECIMALS), duration)
    if spans[-1][0] < last[0]:
        spans.append(last)
    return spans


# ----------------------------------------------------------------------------------------------
# durable files


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _create_once(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Create ``path`` holding ``data`` unless it exists; return what the file holds.

    ``os.link`` fails when the target exists, so when several shard workers start at once
    exactly one of them writes the file and the others read the winner's.
    """
    tmp = write_temp(path, lambda handle: handle.write(_json_bytes(data)))
    try:
        os.link(tmp, path)
        fsync_path(path.parent)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# the work directory


def work_dir_for(index_path: str | os.PathLike[str]) -> Path:
    """Where the job building the index at ``index_path`` keeps its parts: ``INDEX.work``."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".work")


@dataclass(frozen=True)
class WorkDir:
    """A job's directory of committed parts (layout in the module docstring)."""

    root: Path

    @property
    def job_file(self) -> Path:
        return self.root / "job.json"

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    def manifest_path(self, part: int) -> Path:
        return self.parts_dir / f"part-{part:06d}.json"

    def vectors_path(self, part: int) -> Path:
        return self.parts_dir / f"part-{part:06d}.npy"

    def is_done(self, part: int) -> bool:
        return self.manifest_path(part).is_file()

    def read_job(self) -> dict[str, Any]:
        if not self.job_file.is_file():
            raise JobError(
                f"no index job at {self.root} (missing {self.job_file.name}); start one with `vtr index`"
            )
        try:
            return read_sealed_json(self.job_file, f"delete {self.root} and run the job again")
        except ChecksumMismatch as error:
            raise JobError(str(error)) from None

    def read_manifest(self, part: int) -> dict[str, Any]:
        """A committed part's manifest, checked against its own checksum (a damaged one is named)."""
        try:
            return read_sealed_json(self.manifest_path(part), self.redo(part))
        except ChecksumMismatch as error:
            raise JobError(str(error)) from None

    def redo(self, part: int) -> str:
        """What to do about a damaged part."""
        return f"delete {self.manifest_path(part)} and run the job again with --resume to redo part {part}"

    def commit_part(self, part: int, vectors: np.ndarray, manifest: dict[str, Any]) -> None:
        """Write a part's vectors, then its manifest (with the vectors' checksum): the manifest
        is the commit record."""
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        data = buffer.getvalue()
        manifest = seal_record(
            {**manifest, "vectors_file": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}})
        with guards.disk_full_as(
            f"writing part {part} in {self.root}; the parts committed so far are kept: free space, "
            "then run the same command with --resume"
        ):
            atomic_write(self.vectors_path(part), lambda handle: handle.write(data))
            atomic_write(self.manifest_path(part), lambda handle: handle.write(_json_bytes(manifest)))

    def load_vectors(self, part: int, manifest: dict[str, Any]) -> np.ndarray:
        """A committed part's vectors, checked against the checksum its manifest records."""
        path = self.vectors_path(part)
        try:
            if "vectors_file" in manifest:
                verify_file(path, manifest["vectors_file"], str(self.parts_dir), self.redo(part))
            vectors = np.load(path)
        except ChecksumMismatch as error:
            raise JobError(str(error)) from None
        except (OSError, ValueError, EOFError) as error:
            raise JobError(f"{path} is unreadable ({error}); {self.redo(part)}") from None
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise JobError(f"{path} holds {vectors.dtype} {vectors.shape}, not float32 vectors; {self.redo(part)}")
        zero = int((np.abs(vectors).max(axis=1) == 0).sum()) if len(vectors) else 0
        if zero:
            raise JobError(f"{path} holds {zero} all-zero vectors (damaged); {self.redo(part)}")
        return vectors

    def remove_temporaries(self, shard: Shard) -> None:
        """Delete half-written part files a killed worker of ``shard`` left (their part is redone).

        Only the shard that owns a part ever writes it, so the other shards' files, which may
        be in flight right now, are left alone.
        """
        for leftover in self.parts_dir.glob(".part-*.tmp-*"):
            if shard.owns(int(leftover.name[len(".part-") :].split(".", 1)[0])):
                leftover.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# the job


@dataclass(frozen=True)
class JobSpec:
    """Everything that decides a job's output: two runs with equal specs build the same index.

    ``labels`` names the label set of the stored top-5 action labels: "synthetic" (the
    default: the built-in corpus, which the demo model is trained on), "kinetics400" or a
    text file with one label per line.
    """

    model_dir: Path
    out: Path
    videos: Path
    ann_file: Path | None = None
    dataset: str = "generic"
    window: float | None = None
    stride: float | None = None
    part_size: int = DEFAULT_PART_SIZE
    labels: str = "synthetic"
    index_type: str | None = None
    max_memory_bytes: int | None = None
    channels: tuple[str, ...] = ("visual",)
    ocr_dir: Path | None = None
    text_every_s: float = DEFAULT_EVERY_S
    #: the speech channel's recogniser: ``pocketsphinx`` or ``whisper:DIR`` (:mod:`retrieval.asr`)
    asr: str = DEFAULT_ASR


@dataclass
class JobSummary:
    """What one run of a job did; ``skipped`` counts items committed before it started.

    ``seconds`` is the whole run; ``embed_seconds`` only the decode + encode + part-writing
    loop, the throughput that scales with the corpus (model loading and publishing do not).
    """

    indexed: int
    failed: int
    skipped: int
    parts_written: int
    seconds: float
    embed_seconds: float
    shard: Shard
    work_dir: Path
    published: Path | None

    @property
    def clips_per_second(self) -> float:
        done = self.indexed + self.failed
        return done / self.embed_seconds if self.embed_seconds > 0 else 0.0


def _job_record(
    spec: JobSpec, identity: dict[str, Any], labels: list[str], sources: list[CorpusItem], precision: str = "fp32",
    removed: list[str] | None = None,
    reader: OcrReader | None = None,
    recognizer: Recognizer | None = None,
    sentences: SentenceEncoder | None = None,
) -> dict[str, Any]:
    label_file = Path(spec.labels)
    channels: dict[str, Any] = {"visual": {}}
    if reader is not None:
        channels["text"] = {"every_s": spec.text_every_s, **reader.identity}
        if sentences is not None:
            channels["text"]["semantic"] = sentences.identity
    if recognizer is not None:
        channels["speech"] = dict(recognizer.identity)
    return {
        # videos the index being rebuilt had removed: left out, and still listed in the new one
        "removed": removed or [],
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "model": identity,
        # the resolved inference precision: a resumed job must not mix fp32 and bf16 vectors
        "precision": precision,
        "model_dir": str(spec.model_dir.resolve()),
        "videos_root": str(spec.videos.resolve()),
        "ann_file": str(spec.ann_file.resolve()) if spec.ann_file else None,
        "dataset": spec.dataset,
        "window": spec.window,
        "stride": spec.stride,
        "part_size": spec.part_size,
        "label_set": str(label_file.resolve()) if label_file.is_file() else spec.labels,
        "labels": labels,
        "index_type": spec.index_type,
        "max_memory_bytes": spec.max_memory_bytes,
        "num_sources": len(sources),
        "num_parts": math.ceil(len(sources) / spec.part_size),
        "sources_sha256": sources_fingerprint(sources),
        # what each channel is made by; the manifest publishes it as extra["channels"]
        "channels": channels,
    }


def _check_same_job(found: dict[str, Any], wanted: dict[str, Any], work_dir: Path) -> None:
    """Refuse to mix two different jobs' parts in one work directory."""
    if (found.get("format"), found.get("version")) != (JOB_FORMAT, JOB_VERSION):
        raise JobError(
            f"{work_dir} holds a job of another format ({found.get('format')!r} "
            f"v{found.get('version')}); delete it to start over"
        )
    found = {**_RECORD_DEFAULTS, **found}
    differ = [key for key in wanted if key not in _LOCATION_KEYS and found.get(key) != wanted[key]
              and not (key == "model" and same_model(found.get(key) or {}, wanted[key]))]
    if differ:
        details = "; ".join(
            f"{key}: job has {_short(found.get(key))}, now {_short(wanted[key])}" for key in differ
        )
        raise JobError(
            f"{work_dir} belongs to a different job ({details}); resume with the same options, "
            "model and corpus, or delete the work directory to start over"
        )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_can_start(work: WorkDir, shard: Shard, num_parts: int, resume: bool) -> None:
    """Without ``resume``, an earlier run's output for this worker is an error, never reused.

    A single worker owns everything, so any content counts; shard workers share the directory,
    so one only objects to committed parts of its own.
    """
    if resume or not work.root.exists():
        return
    if shard.is_single:
        busy = any(work.root.iterdir())
    else:
        busy = any(work.is_done(part) for part in range(num_parts) if shard.owns(part))
    if busy:
        raise JobError(
            f"work directory {work.root} already holds output of this job; pass --resume to "
            "continue it (done parts are skipped), or delete it to start over"
        )


class _DurationDataset(Dataset):
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


def _measure_durations(paths: Sequence[Path], workers: int) -> list[tuple[float | None, str | None]]:
    """Container durations (no decoding), probed by ``workers`` processes."""
    probes = DataLoader(_DurationDataset(paths), batch_size=None, num_workers=workers)
    results: list[tuple[float | None, str | None]] = [(None, None)] * len(paths)
    for index, duration, reason in tqdm(
        probes, total=len(paths), desc="measuring videos", unit="video", disable=len(paths) < 100, leave=False
    ):
        results[index] = (duration, reason)
    return results


@dataclass
class _Part:
    """One part while it runs: its items, and their results as batches come in."""

    number: int
    items: list[CorpusItem]
    failures: list[dict[str, Any]]
    results: dict[int, tuple[np.ndarray, list[tuple[str, float]]]] = field(default_factory=dict)
    pending: int = 0
    #: item position -> the whole video's probed duration in seconds (windows know their span)
    durations: dict[int, float] = field(default_factory=dict)

    def item_extra(self, position: int) -> dict[str, Any]:
        """What an index item keeps beside its path, span, captions and labels: its key, the
        annotation's other fields (``meta``, what ``vtr search --where`` filters on) and the
        whole video's duration (``vtr search --min-duration``)."""
        item = self.items[position]
        extra: dict[str, Any] = {"key": item_key(item.video, item.start, item.end)}
        if item.extra:
            extra["meta"] = dict(item.extra)
        if position in self.durations:
            extra["duration"] = round(self.durations[position], 3)
        return extra
    #: reads an item's on-screen text (the text channel) when the part is committed; None: no text channel
    read_text: Callable[[CorpusItem], dict[str, Any]] | None = None
    #: adds the sentence vectors to the part's texts (``read_text``'s results), in one batch
    embed_texts: Callable[[list[dict[str, Any]]], None] | None = None
    #: recognises an item's speech (the speech channel) when the part is committed; None: no speech channel
    read_speech: Callable[[CorpusItem], dict[str, Any]] | None = None

    def manifest_and_vectors(self, dim: int) -> tuple[dict[str, Any], np.ndarray]:
        rows, records = [], []
        for position, item in enumerate(self.items):
            if position not in self.results:
                continue
            vector, labels = self.results[position]
            rows.append(vector)
            records.append(
                {
                    "path": item.video,
                    "start": item.start,
                    "end": item.end,
                    "captions": item.captions,
                    "labels": [[label, round(float(prob), 6)] for label, prob in labels],
                    "extra": self.item_extra(position),
                }
            )
            if self.read_text is not None:
                records[-1]["extra"]["text"] = self.read_text(item)
            if self.read_speech is not None:
                records[-1]["extra"]["speech"] = self.read_speech(item)
        if self.embed_texts is not None:
            self.embed_texts([record["extra"]["text"] for record in records if "text" in record["extra"]])
        vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
        manifest = {
            "part": self.number,
            "items": records,
            "failures": self.failures,
            "num_vectors": len(rows),
        }
        return manifest, vectors


def _expand_parts(
    sources: Sequence[CorpusItem], parts: list[int], spec: JobSpec, root: Path, workers: int
) -> list[_Part]:
    """Each part's items (windows of long videos when ``spec.window``) and probing failures."""
    chosen = [
        (part, source)
        for part in parts
        for source in sources[part * spec.part_size : (part + 1) * spec.part_size]
    ]
    durations: list[tuple[float | None, str | None]] = [(None, None)] * len(chosen)
    whole = [i for i, (_, source) in enumerate(chosen) if source.start is None]
    if whole:  # windows need the duration; whole videos record it for duration filters
        for i, result in zip(
            whole, _measure_durations([root / chosen[i][1].video for i in whole], workers), strict=True
        ):
            durations[i] = result
    expanded = {part: _Part(part, [], []) for part in parts}
    for (part, source), (duration, reason) in zip(chosen, durations, strict=True):
        target = expanded[part]
        shown = printable_name(source.video)
        if shown != source.video:  # the index, its JSON records and the page need text names
            reason = "the file name is not valid UTF-8 (its undecodable bytes are shown as \\xNN); rename it"
            target.failures.append({"path": shown, "item": item_key(shown), "reason": reason})
        elif reason is not None and spec.window is not None:
            target.failures.append({"path": source.video, "item": item_key(source.video), "reason": reason})
        elif duration is None or spec.window is None:
            if duration is not None:
                target.durations[len(target.items)] = duration
            target.items.append(source)  # unprobed: decoding records the failure as before
        else:
            target.items.extend(
                CorpusItem(source.video, source.captions, start=start, end=end, extra=source.extra)
                for start, end in window_spans(duration, spec.window, spec.stride or spec.window)
            )
    for target in expanded.values():
        target.pending = len(target.items)
    return list(expanded.values())


def run_index_job(
    spec: JobSpec,
    shard: Shard = Shard(),
    resume: bool = False,
    workers: int = 2,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    engine: Any = None,
    select: Callable[[list[CorpusItem]], list[CorpusItem]] | None = None,
) -> JobSummary:
    """Index this worker's parts of the corpus; a single worker then publishes the index.

    Args:
        spec: what to index and how (see :class:`JobSpec`).
        shard: which parts this process does (``part % count == index``).
        resume: continue the job whose work directory exists, skipping committed parts.
        workers: DataLoader processes decoding clips (0 decodes in this process).
        batch_size: clips per encoder call.
        progress: show a tqdm bar (clips/s and ETA).
        overwrite: replace an index of another model or corpus already at ``spec.out``.
        device, precision: where and in which precision the encoder runs (``retrieval.models.device``).

    Every option is checked before anything is written, and the run holds an exclusive lock
    (:mod:`indexer.locks`) on the index, or on its shard of the job.
        engine: who runs the embed loop (:mod:`indexer.engines`); None runs it here.
        select: keeps a subset of the planned sources (``vtr index add``: the new videos only).

    Raises:
        JobError: an option is invalid; the work directory holds output and ``resume`` is
            false, or it belongs to a job with other options, another corpus or another model;
            ``spec.out`` holds something this job may not replace (see
            :func:`indexer.guards.check_output`).
        LockBusy: another process works on the same index (or shard).
    """
    started = time.perf_counter()
    embed_dim = read_model_config(spec.model_dir).get("model", {}).get("embed_dim")
    guards.check_options(
        window=spec.window,
        stride=spec.stride,
        part_size=spec.part_size,
        batch_size=batch_size,
        workers=workers,
        index_type=spec.index_type,
        max_memory_bytes=spec.max_memory_bytes,
        embed_dim=embed_dim if isinstance(embed_dim, int) else None,
    )
    guards.check_corpus_root(spec.videos)
    channels = parse_channels(spec.channels)
    if "visual" not in channels:
        raise JobError("--channels must include visual: an index is built around its clip vectors")
    if spec.text_every_s <= 0:
        raise JobError(f"the text channel's sampling interval must be positive, got {spec.text_every_s} s")
    if spec.asr != DEFAULT_ASR and "speech" not in channels:
        raise JobError("--asr sets the speech channel's recogniser, but --channels leaves the speech channel out")
    # the recognisers load before any work: a bad --ocr or --asr directory fails here
    reader = OcrReader(spec.ocr_dir) if "text" in channels else None
    recognizer = load_recognizer(spec.asr, device=device) if "speech" in channels else None
    lock = index_lock(spec.out) if shard.is_single else shard_lock(spec.out, shard.index, shard.count)
    with lock:
        work = WorkDir(work_dir_for(spec.out))
        created = not work.root.exists()
        try:
            return _run_locked(spec, shard, resume, workers, batch_size, progress, overwrite, work, started,
                               embed_dim if isinstance(embed_dim, int) else None, device, precision, engine, select,
                               reader, recognizer)
        except BaseException:
            # a run that fails before committing anything leaves no work directory to trip over
            if created and shard.is_single and work.root.is_dir() and not any(work.parts_dir.glob("part-*.json")):
                shutil.rmtree(work.root, ignore_errors=True)
            raise


def _run_locked(
    spec: JobSpec,
    shard: Shard,
    resume: bool,
    workers: int,
    batch_size: int,
    progress: bool,
    overwrite: bool,
    work: WorkDir,
    started: float,
    embed_dim: int | None,
    device: str = "cpu",
    precision: str = "fp32",
    engine: Any = None,
    select: Callable[[list[CorpusItem]], list[CorpusItem]] | None = None,
    reader: OcrReader | None = None,
    recognizer: Recognizer | None = None,
) -> JobSummary:
    identity = model_identity(spec.model_dir)
    has_work = work.root.exists()
    own_index = guards.check_output(
        spec.out,
        weights_sha256=identity["weights_sha256"],
        videos_root=str(spec.videos.resolve()),
        ann_file=str(spec.ann_file.resolve()) if spec.ann_file else None,
        resume=resume,
        overwrite=overwrite,
        has_work=has_work,
    )
    if resume and own_index and not has_work:
        return _already_published(spec.out, shard, work.root, started)

    corpus = load_corpus(spec.dataset, spec.ann_file, spec.videos)
    sources = plan_sources(corpus)
    # rebuilding an index in place keeps its takedowns: videos removed from it stay out
    removed = set((read_published_manifest(spec.out) or {}).get("removed") or []) if own_index else set()
    if removed:
        root = spec.videos.resolve()
        kept = [source for source in sources if str(root / printable_name(source.video)) not in removed]
        logger.info("%d videos removed from %s earlier are left out", len(sources) - len(kept), spec.out)
        sources = kept
    if select is not None:
        sources = select(sources)
    guards.check_memory_budget(len(sources), embed_dim, spec.max_memory_bytes, spec.index_type)
    guards.check_index_size(len(sources), embed_dim, spec.index_type, spec.window is not None)
    # the text channel's semantic side: a sentence vector of each item's on-screen text
    sentences = SentenceEncoder() if reader is not None else None
    record = _job_record(spec, identity, load_labels(spec.labels), sources,
                         resolve_precision(precision, resolve_device(device)), sorted(removed), reader, recognizer,
                         sentences)
    _check_can_start(work, shard, record["num_parts"], resume)
    work.parts_dir.mkdir(parents=True, exist_ok=True)
    _check_same_job(_create_once(work.job_file, seal_record(record)), record, work.root)
    work.remove_temporaries(shard)

    mine = [part for part in range(record["num_parts"]) if shard.owns(part)]
    done = [part for part in mine if work.is_done(part)]
    skipped = sum(len(work.read_manifest(part)["items"]) for part in done)
    if done:
        logger.info("resuming: %d of this worker's %d parts are done", len(done), len(mine))
    root = spec.videos.resolve()
    parts = _expand_parts(sources, sorted(set(mine) - set(done)), spec, root, workers)
    if reader is not None:
        def read_text(item: CorpusItem) -> dict[str, Any]:
            return read_span(reader, root / item.video, item.start, item.end, spec.text_every_s)

        def embed_texts(texts: list[dict[str, Any]]) -> None:
            """Sentence vectors of the texts that have lines (a batch is several times cheaper
            than one text at a time: bench/channels.py --parts cost)."""
            with_lines = [text for text in texts if text["lines"]]
            for at in range(0, len(with_lines), SENTENCE_BATCH):
                batch = with_lines[at : at + SENTENCE_BATCH]
                for text, vector in zip(batch, sentences.encode([text_of(text) for text in batch]), strict=True):
                    text["vector"] = pack(vector)

        for part in parts:
            part.read_text = read_text
            part.embed_texts = embed_texts if sentences is not None else None
    if recognizer is not None:
        def speech_of(item: CorpusItem) -> dict[str, Any]:
            return read_speech(recognizer, root / item.video, item.start, item.end)

        for part in parts:
            part.read_speech = speech_of
    embed = _embed_parts if engine is None else engine.embed_parts
    indexed, failed, embed_seconds = embed(
        work,
        parts,
        corpus,
        root,
        spec.model_dir,
        record["labels"],
        workers,
        batch_size,
        progress,
        f"indexing (shard {shard})",
        device,
        precision,
    )

    published = None
    if shard.is_single:
        published = publish_job(spec.out)
    else:
        logger.info("shard %s finished; run `vtr index merge %s` once every shard has", shard, spec.out)
    return JobSummary(
        indexed=indexed,
        failed=failed,
        skipped=skipped,
        parts_written=len(parts),
        seconds=time.perf_counter() - started,
        embed_seconds=embed_seconds,
        shard=shard,
        work_dir=work.root,
        published=published,
    )


def _embed_parts(
    work: WorkDir,
    parts: list[_Part],
    corpus: Corpus,
    root: Path,
    model_dir: Path,
    labels: list[str],
    workers: int,
    batch_size: int,
    progress: bool,
    description: str,
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[int, int, float]:
    """Decode, encode and label every item of ``parts``; commit each part as it completes.

    Returns the numbers of items indexed and failed (decoding or probing), and the seconds the
    decode-encode-write loop took.
    """
    model = load_model(model_dir, device, precision)
    classifier = ActionClassifier(model, labels)
    places = [(part, position) for part in parts for position in range(len(part.items))]
    items = Corpus(
        corpus.name,
        root,
        [item for part in parts for item in part.items],
        [],
        corpus.max_text_len,
        corpus.sample,
        max_seconds=None,
    )
    counts = {"indexed": 0, "failed": 0}

    def commit(part: _Part) -> None:
        manifest, vectors = part.manifest_and_vectors(model.embed_dim)
        work.commit_part(part.number, vectors, manifest)
        counts["indexed"] += manifest["num_vectors"]
        counts["failed"] += len(manifest["failures"])
        for failure in manifest["failures"]:
            logger.warning("cannot index %s: %s", failure["item"], failure["reason"])

    for part in parts:
        if not part.items:  # nothing to encode (every source failed probing): commit it now
            commit(part)
    started = time.perf_counter()
    batches = iter_clip_batches(items, Preprocess.for_model(model, items), batch_size, workers)
    with (
        torch.inference_mode(),
        model_autocast(model),
        tqdm(total=len(places), unit="clip", desc=description, disable=not progress) as bar,
    ):
        for batch in batches:
            done = [places[i] for i, _ in batch.failures]
            for (part, position), (_, reason) in zip(done, batch.failures, strict=True):
                item = part.items[position]
                part.failures.append(
                    {"path": item.video, "item": item_key(item.video, item.start, item.end), "reason": reason}
                )
            if batch.clips is not None:
                feat = model.encode_video(batch.clips.to(model_device(model)))["feat"]
                vectors = model.clip_vector(feat).float().cpu().numpy()
                predictions = classifier.predict(feat, top=TOP_LABELS)
                for row, i in enumerate(batch.indices):
                    part, position = places[i]
                    part.results[position] = (vectors[row], predictions[row])
                    done.append(places[i])
            for part, _ in done:
                part.pending -= 1
                if part.pending == 0:
                    commit(part)
            bar.update(len(done))
    return counts["indexed"], counts["failed"], time.perf_counter() - started


def _already_published(out: Path, shard: Shard, work_root: Path, started: float) -> JobSummary:
    """A resumed job whose index is already published: nothing to do, everything skipped."""
    return JobSummary(
        indexed=0,
        failed=0,
        skipped=len(open_index(out)),
        parts_written=0,
        seconds=time.perf_counter() - started,
        embed_seconds=0.0,
        shard=shard,
        work_dir=work_root,
        published=out,
    )


def missing_parts(out: str | os.PathLike[str]) -> list[int]:
    """Parts of the job for the index at ``out`` that no worker has committed yet."""
    work = WorkDir(work_dir_for(out))
    return [part for part in range(work.read_job()["num_parts"]) if not work.is_done(part)]


def publish_job(out: str | os.PathLike[str]) -> Path:
    """Join every committed part into the index at ``out`` (``vtr index merge``), then remove
    the work directory.

    Parts are read in part order, so the index is the same whichever shards wrote them. Item and
    failure paths become absolute under the job's corpus root. The manifest's ``extra`` records
    the model directory (the default model of ``vtr search`` and ``vtr serve``), the label set
    and the windowing; an index already at ``out`` is replaced atomically.

    Raises:
        JobError: parts are missing (some shard has not finished) or a part is corrupt.
    """
    out = Path(out)
    with index_lock(out):
        return _publish_locked(out)


def _publish_locked(out: Path) -> Path:
    work = WorkDir(work_dir_for(out))
    job = work.read_job()
    missing = missing_parts(out)
    if missing:
        shown = ", ".join(str(part) for part in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise JobError(
            f"{len(missing)} of {job['num_parts']} parts are not done (parts {shown}); with N "
            "shards part p is shard (p mod N)'s: finish those shards (--resume) and merge again"
        )
    from indexer.ondisk import publish_job_ondisk, wants_ondisk

    if wants_ondisk(sum(work.read_manifest(p)["num_vectors"] for p in range(job["num_parts"])), job["index_type"]):
        return publish_job_ondisk(out)  # bounded memory: lists built part by part, merged on disk
    root = Path(job["videos_root"])
    vectors, items, failures = [], [], []
    for part in range(job["num_parts"]):
        manifest = work.read_manifest(part)
        part_vectors = work.load_vectors(part, manifest)
        if len(part_vectors) != manifest["num_vectors"] or len(manifest["items"]) != manifest["num_vectors"]:
            raise JobError(
                f"part {part} is corrupt ({len(part_vectors)} vectors, {len(manifest['items'])} items, "
                f"manifest says {manifest['num_vectors']}); delete {work.manifest_path(part)} "
                "and resume to redo it"
            )
        vectors.append(part_vectors)
        items.extend({**item, "path": str(root / item["path"])} for item in manifest["items"])
        failures.extend({**failure, "path": str(root / failure["path"])} for failure in manifest["failures"])
    extra = {key: job[key] for key in ("model_dir", "dataset", "ann_file", "window", "stride", "label_set")}
    extra["channels"] = job.get("channels") or _RECORD_DEFAULTS["channels"]
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()  # an empty folder given as --out holds nothing to keep
    with guards.disk_full_as(
        f"publishing {out}; every part is kept in {work.root}: free space, then run `vtr index merge {out}`"
    ):
        write_index(
            out,
            np.concatenate(vectors),
            items,
            model_identity=job["model"],
            corpus_roots=[str(root)],
            failures=failures,
            index_type=job["index_type"],
            max_memory_bytes=job["max_memory_bytes"],
            extra=extra,
            removed=job.get("removed") or [],
        )
    shutil.rmtree(work.root)
    return out
