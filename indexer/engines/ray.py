"""The Ray engine: the embed loop of an indexing job as a Ray Data pipeline on a cluster.

::

    items of the pending parts          (driver: one row per clip, with its part and position)
      -> decode + preprocess            CPU tasks, ``batch_size`` clips per task
      -> encode + label                 an actor pool, one model per actor (``num_gpus`` each
                                        on GPU clusters)
      -> commit parts                   driver: a part is written once all its clips are back

Ray Data streams the rows and applies backpressure, so a slow encoder pool stops the decoders
from filling the object store. Parts are committed by the driver exactly as the local engine
commits them (:class:`indexer.parts.PartCommitter`: vectors, then the manifest that marks
the part done), so killing the driver or any worker at any point loses at most the parts in
flight, and ``--resume`` redoes only those.

Failures: a clip that cannot be decoded (:class:`retrieval.data.video.VideoReadError`) comes
back as a failure row and lands in the part's failure records, like with the local engine; it
is never retried. A task or actor whose process dies is retried by Ray.

Nothing outlives the driver: a local cluster the engine starts is watched by a small process
that kills what is left of it once the driver is gone, however it ended (``kill -9``
included; :mod:`indexer.engines.reaper`), and each worker process on the driver's machine
watches the driver itself (:func:`exit_with_driver`), which also covers a cluster joined with
``--ray-address`` on this machine.

Ray is an optional dependency (``pip install 'vtr[ray]'``), imported only when this engine
starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from indexer.engines.reaper import WATCH_INTERVAL_S, driver_identity, driver_running, start_reaper
from indexer.errors import JobError
from indexer.mapper import ChannelMapper, ClipMapper, EmbedTask
from indexer.parts import PartCommitter, WorkDir
from retrieval.data.video import Preprocess, VideoReadError, load_clip

logger = logging.getLogger(__name__)

INSTALL_HINT = "the ray engine needs Ray: pip install 'vtr[ray]' (or pip install 'ray[data]')"
#: Seconds to wait for a TCP connection to ``--ray-address`` before giving up.
CONNECT_TIMEOUT_S = 5.0


class EngineError(JobError):
    """The engine cannot run (Ray missing, cluster unreachable): a user-fixable problem."""


def import_ray() -> Any:
    """``import ray`` and Ray Data, or one actionable line naming the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with one line when nothing listens at ``address`` ("host:port" or "ray://host:port").

    ``auto`` (the cluster this machine joined with ``ray start``) is left to Ray to find.
    """
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise EngineError(f"--ray-address must be HOST:PORT (e.g. 10.0.0.1:6379), ray://HOST:PORT or auto, "
                          f"got {address!r}")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise EngineError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` there, or drop --ray-address to run a local cluster"
        ) from None


# ---------------------------------------------------------------------------------------------
# workers exit with the driver

_watched: set[int] = set()  # drivers this process already watches


def _watch(driver: dict[str, Any]) -> None:
    while driver_running(driver):
        time.sleep(WATCH_INTERVAL_S)
    logger.warning("the indexing driver (process %s) is gone: this Ray worker exits", driver["pid"])
    os._exit(1)


def exit_with_driver(driver: dict[str, Any] | None) -> None:
    """End this worker process soon after the driver ``driver`` (:func:`driver_identity`) is
    gone. Only a worker on the driver's machine can see it; elsewhere Ray's own job clean-up
    applies. Starts one watching thread per process and driver; later calls cost nothing."""
    if not driver or driver.get("host") != socket.gethostname() or int(driver["pid"]) == os.getpid():
        return
    if int(driver["pid"]) in _watched or not os.path.isdir("/proc"):
        return
    _watched.add(int(driver["pid"]))
    threading.Thread(target=_watch, args=(dict(driver),), name="vtr-driver-watch", daemon=True).start()


# ---------------------------------------------------------------------------------------------
# the two pipeline stages; they run in Ray worker processes


def _decode_batch(batch: dict[str, np.ndarray], preprocess: dict[str, Any], max_seconds: float | None,
                  clip_shape: tuple[int, ...], driver: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Decode and preprocess a batch of clips; an unreadable clip becomes an error row."""
    exit_with_driver(driver)
    pre = Preprocess.from_dict(preprocess)
    n = len(batch["path"])
    clips = np.zeros((n, *clip_shape), dtype=np.float32)
    errors = []
    for row in range(n):
        start, end = float(batch["start"][row]), float(batch["end"][row])
        window = None if math.isnan(start) else (start, end)
        try:
            clip = load_clip(str(batch["path"][row]), pre, window=window, max_seconds=max_seconds)
        except VideoReadError as exc:
            errors.append(str(exc))
            continue
        clips[row] = clip.numpy()
        errors.append("")
    return {"part": batch["part"], "position": batch["position"], "error": np.array(errors, dtype=object),
            "clip": clips}


class _Encoder:
    """One mapper per actor (:class:`indexer.mapper.ClipMapper`): clip batches -> clip vectors
    and top-5 action labels."""

    def __init__(self, model_dir: str, config: dict[str, Any], labels: list[str], threads: int, device: str = "cpu",
                 precision: str = "fp32", driver: dict[str, Any] | None = None) -> None:
        exit_with_driver(driver)
        torch.set_num_threads(max(1, threads))
        # the job's device kind; Ray shows an actor only the GPUs it was given, so "cuda" is its own
        device = "cuda" if str(device).startswith("cuda") and torch.cuda.is_available() else "cpu"
        self.mapper = ClipMapper(model_dir, config, labels, device, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([error == "" for error in batch["error"]], dtype=bool)
        n = len(ok)
        vectors = np.zeros((n, self.mapper.embed_dim), dtype=np.float32)
        labels = [""] * n
        if ok.any():
            vectors[ok], predictions = self.mapper(torch.from_numpy(np.ascontiguousarray(batch["clip"][ok])))
            for row, prediction in zip(np.flatnonzero(ok), predictions, strict=True):
                labels[row] = json.dumps([[label, float(prob)] for label, prob in prediction])
        return {"part": batch["part"], "position": batch["position"], "error": batch["error"],
                "vector": vectors, "labels": np.array(labels, dtype=object)}


# ---------------------------------------------------------------------------------------------
# the engine


class RayEngine:
    """Embed a job's pending parts on a Ray cluster (see the module docstring).

    Args:
        address: the cluster to join ("HOST:PORT", "ray://HOST:PORT" or "auto"); None starts a
            local cluster for the job and stops it afterwards. A Ray runtime this process has
            already started is used as it is (and left running).
        actors: encoder actors (models in memory at once); default one per GPU of the cluster,
            else one per ``cpus_per_actor`` CPUs beyond one left for decoding.
        cpus_per_actor: CPUs each encoder actor reserves (and torch threads it uses).
        gpus_per_actor: GPUs each encoder actor reserves; default 1 when the cluster has GPUs.
        num_cpus: CPUs of the local cluster (default: all of this machine's).
    """

    name = "ray"

    def __init__(self, address: str | None = None, actors: int | None = None, cpus_per_actor: float | None = None,
                 gpus_per_actor: float | None = None, num_cpus: int | None = None) -> None:
        if actors is not None and actors < 1:
            raise EngineError(f"--ray-actors must be >= 1, got {actors}")
        if cpus_per_actor is not None and cpus_per_actor <= 0:
            raise EngineError(f"--ray-cpus-per-actor must be > 0, got {cpus_per_actor}")
        if gpus_per_actor is not None and gpus_per_actor < 0:
            raise EngineError(f"--ray-gpus-per-actor must be >= 0, got {gpus_per_actor}")
        self.address = address
        self.actors = actors
        self.cpus_per_actor = cpus_per_actor or 1.0
        self.gpus_per_actor = gpus_per_actor
        self.num_cpus = num_cpus
        self._ray: Any = None
        self._owns_runtime = False
        self._reaper: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def __enter__(self) -> RayEngine:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Import Ray, then join ``address`` or start a local cluster; one-line errors, exit 2."""
        ray = import_ray()
        self._ray = ray
        if self.address is not None:
            check_reachable(self.address)
        if ray.is_initialized():
            return
        if self.address is None:
            self._reaper = start_reaper()  # first: it must see the cluster's processes start
        try:
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False)
            else:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self._stop_reaper()
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
            raise EngineError(f"cannot start {where}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        self._owns_runtime = True

    def stop(self) -> None:
        if self._owns_runtime and self._ray is not None:
            self._ray.shutdown()
        self._owns_runtime = False
        self._stop_reaper()

    def _stop_reaper(self) -> None:
        """The cluster ended normally: its watcher is not needed any more."""
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None

    def _pool(self) -> tuple[int, float, float]:
        """(actors, CPUs per actor, GPUs per actor) for the cluster at hand."""
        resources = self._ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = float(resources.get("CPU", 1))
        per_gpu = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        if self.actors is not None:
            actors = self.actors
        elif per_gpu > 0:
            actors = max(1, int(gpus / per_gpu))
        else:
            actors = max(1, int((cpus - 1) // self.cpus_per_actor))
        return actors, self.cpus_per_actor, per_gpu

    # -- the work

    def embed(self, task: EmbedTask, work: WorkDir, channels: ChannelMapper | None = None) -> tuple[int, int, float]:
        """Same contract as :meth:`indexer.engines.local.LocalEngine.embed` (``task.workers`` is
        unused: Ray schedules the decoding tasks over the cluster's CPUs)."""
        if self._ray is None:
            self.start()
        ray = self._ray
        preprocess = Preprocess.for_model(task.config["preprocess"], task.corpus)
        committer = PartCommitter(work, task.parts, task.embed_dim, channels)
        committer.commit_empty()
        rows = [
            {"part": part.number, "position": position, "path": str(task.root / item.video),
             "start": math.nan if item.start is None else float(item.start),
             "end": math.nan if item.end is None else float(item.end)}
            for part, position in committer.clips for item in (part.items[position],)
        ]
        started = time.perf_counter()
        if not rows:
            return committer.indexed, committer.failed, 0.0

        if not logger.isEnabledFor(logging.INFO):  # Ray Data reports every execution at INFO
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False
        context.execution_options.preserve_order = False
        actors, cpus, gpus = self._pool()
        logger.info("ray engine: %d clips, %d encoder actor(s) (%.1f CPU, %.1f GPU each)", len(rows), actors, cpus,
                    gpus)
        clip_shape = (3, preprocess.num_frames, preprocess.size, preprocess.size)
        driver = driver_identity()
        dataset = (
            ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / task.batch_size)))
            .map_batches(_decode_batch, batch_size=task.batch_size, num_cpus=1,
                         fn_kwargs={"preprocess": preprocess.to_dict(), "max_seconds": task.corpus.max_seconds,
                                    "clip_shape": clip_shape, "driver": driver})
            .map_batches(_Encoder, batch_size=task.batch_size, num_cpus=cpus, num_gpus=gpus,
                         compute=ray.data.ActorPoolStrategy(size=actors),
                         fn_constructor_kwargs={"model_dir": str(Path(task.model_dir).resolve()),
                                                "config": task.config, "labels": task.labels,
                                                "threads": max(1, int(cpus)), "device": str(task.device),
                                                "precision": task.precision, "driver": driver})
            .select_columns(["part", "position", "error", "vector", "labels"])
        )
        with tqdm(total=len(rows), unit="clip", desc=task.description, disable=not task.progress) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for part, position, error, vector, label_json in zip(
                    batch["part"], batch["position"], batch["error"], batch["vector"], batch["labels"], strict=True
                ):
                    if error:
                        committer.fail(int(part), int(position), str(error))
                    else:
                        committer.add(int(part), int(position), np.asarray(vector, np.float32),
                                      [(label, prob) for label, prob in json.loads(label_json)])
                bar.update(len(batch["part"]))
        return committer.indexed, committer.failed, time.perf_counter() - started
