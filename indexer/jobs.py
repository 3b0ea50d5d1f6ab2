"""Batch indexing jobs, clip-retrieval's reader -> mapper -> writer: plan, embed, commit, publish.

A job turns a corpus (a folder of videos or an annotation file) into a published index
(:mod:`indexer.store`). The work is planned so that any number of workers, crashes and restarts
give exactly the same index. :func:`run_index_job` walks the stages, each in its own module:

* **checks** (:mod:`indexer.guards`): every option, the corpus root and ``--out``, before any work;
* **plan** (:mod:`indexer.plan`): the sorted, de-duplicated sources, cut into numbered parts
  (the unit of work, of durability and of distribution: worker ``i`` of ``N`` does the parts
  with ``part % N == i``), expanded into items (windows) when they are about to run, after the
  **reader** (:mod:`indexer.reader`) has probed the videos' durations;
* **map** (:mod:`indexer.mapper`): an engine (:mod:`indexer.engines`: this process, or a Ray
  cluster) decodes the clips and runs the one mapper, clip batches -> vectors and labels;
* **write** (:mod:`indexer.parts`): the one part committer adds the channel records (on-screen
  text, speech) and commits each part to the work directory ``INDEX.work`` (vectors, then the
  manifest that is the commit record), so resume redoes only unfinished parts;
* **publish** (:mod:`indexer.publish`): when every part is committed, a single worker (or
  ``vtr index merge``) joins them in part order into the index and removes the work directory.

The job record (``INDEX.work/job.json``: model identity, corpus, windows, part size, labels,
channels, source fingerprint) is written once and checked by every worker, resume and merge.
The model directory's config is read once per job and handed to every stage that needs it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer import guards
from indexer.channels import parse_channels
from indexer.checksums import seal_record
from indexer.engines.local import LocalEngine
from indexer.errors import JobError
from indexer.locks import index_lock, shard_lock
from indexer.mapper import ChannelMapper, EmbedTask
from indexer.parts import WorkDir, create_once, work_dir_for
from indexer.plan import (
    DEFAULT_PART_SIZE,
    Shard,
    expand_parts,
    plan_sources,
    printable_name,
    sources_fingerprint,
)
from indexer.publish import publish_job
from indexer.reader import measure_durations
from indexer.store import open_index, read_published_manifest, same_model
from retrieval.asr import DEFAULT_ASR
from retrieval.data.corpora import CorpusItem, load_corpus
from retrieval.labels import load_labels
from retrieval.models.device import resolve_device, resolve_precision
from retrieval.models.model_dir import model_identity, read_model_config
from retrieval.ocr import DEFAULT_EVERY_S

logger = logging.getLogger(__name__)

JOB_FORMAT = "vtr-index-job"
JOB_VERSION = 1
DEFAULT_BATCH_SIZE = 16
#: Options that may differ between the workers and runs of one job: where the model and the
#: corpus are mounted (the model's weights hash and the source list are compared instead).
_LOCATION_KEYS = ("model_dir", "videos_root", "ann_file")


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
    spec: JobSpec, identity: dict[str, Any], labels: list[str], sources: list[CorpusItem], precision: str,
    removed: list[str], channels: dict[str, Any],
) -> dict[str, Any]:
    label_file = Path(spec.labels)
    return {
        # videos the index being rebuilt had removed: left out, and still listed in the new one
        "removed": removed,
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


def run_index_job(
    spec: JobSpec,
    shard: Shard | None = None,
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
        shard: which parts this process does (``part % count == index``); None: all of them.
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
    shard = shard or Shard()
    config = read_model_config(spec.model_dir)  # the one read of the model's config in this job
    embed_dim = config.get("model", {}).get("embed_dim")
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
    # the recognisers load before any work: a bad --ocr or --asr directory fails here
    channels = ChannelMapper(parse_channels(spec.channels), spec.videos.resolve(), spec.ocr_dir, spec.text_every_s,
                             spec.asr, device)
    lock = index_lock(spec.out) if shard.is_single else shard_lock(spec.out, shard.index, shard.count)
    with lock:
        work = WorkDir(work_dir_for(spec.out))
        created = not work.root.exists()
        try:
            return _run_locked(spec, shard, resume, workers, batch_size, progress, overwrite, work, started,
                               config, device, precision, engine or LocalEngine(), select, channels)
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
    config: dict[str, Any],
    device: str,
    precision: str,
    engine: Any,
    select: Callable[[list[CorpusItem]], list[CorpusItem]] | None,
    channels: ChannelMapper,
) -> JobSummary:
    embed_dim = config.get("model", {}).get("embed_dim")
    embed_dim = embed_dim if isinstance(embed_dim, int) else None
    identity = model_identity(spec.model_dir, config)
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
    channels.load_sentences()
    record = _job_record(spec, identity, load_labels(spec.labels), sources,
                         resolve_precision(precision, resolve_device(device)), sorted(removed), channels.identity)
    _check_can_start(work, shard, record["num_parts"], resume)
    work.parts_dir.mkdir(parents=True, exist_ok=True)
    _check_same_job(create_once(work.job_file, seal_record(record)), record, work.root)
    work.remove_temporaries(shard)

    mine = [part for part in range(record["num_parts"]) if shard.owns(part)]
    done = [part for part in mine if work.is_done(part)]
    skipped = sum(len(work.read_manifest(part)["items"]) for part in done)
    if done:
        logger.info("resuming: %d of this worker's %d parts are done", len(done), len(mine))
    root = spec.videos.resolve()
    parts = expand_parts(sources, sorted(set(mine) - set(done)), spec.part_size, spec.window, spec.stride, root,
                         lambda paths: measure_durations(paths, workers))
    task = EmbedTask(parts, corpus, root, spec.model_dir, config, record["labels"], device, precision, batch_size,
                     workers, progress, f"indexing (shard {shard})")
    indexed, failed, embed_seconds = engine.embed(task, work, channels if channels.extra else None)

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


