"""Uploaded example clips: checked from the container before decoding, decoded with bounded memory.

A video file of a few kilobytes can describe thousands of 4096x4096 frames: decoding it the
way corpus clips are decoded (whole frames to RGB, then resized in float) costs gigabytes. An
upload therefore goes through three steps:

1. :func:`probe` reads the stream's frame size, duration and frame count from the container
   (headers and packet demuxing only, no decoding) and :meth:`UploadLimits.check` refuses
   anything beyond the caps with a message that names the cap.
2. :func:`decode_upload` runs under a bounded semaphore (:attr:`UploadLimits.decoders` uploads
   at once, whatever the number of requests). Small clips take the corpus path
   (:func:`retrieval.data.video.load_clip`, the same pixels the index was built from); large
   ones are scaled while decoding: each wanted frame is converted straight to the model's
   ``size x size`` by the decoder's scaler, so no full-size RGB frame or float copy ever exists.
   The decoder runs without frame threading (no extra full-size frame per thread). Either way
   every decoded frame is held to the size the container stated: FFmpeg refuses a larger one
   before allocating it, so a stream that switches to 8192x8192 after a 320x320 header is
   refused, not decoded.
3. :class:`UploadJanitor` deletes every uploaded file after a short grace period, counted from
   its arrival on the upload route or from the answer to the last request using it (Gradio
   stores identical uploads under one path, so a second request for the same content may still
   be waiting in the queue), and caps the bytes all uploads on disk take together.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval.data.video import (
    FrameTooLarge,
    Preprocess,
    VideoReadError,
    decode_frames,
    frame_to_rgb,
    limit_frame_size,
    load_clip,
    sample_frame_indices,
)

logger = logging.getLogger(__name__)

#: Clips up to this many pixels per frame decode the way corpus clips do (exact same pixels);
#: larger ones are scaled while decoding.
DIRECT_DECODE_PIXELS = 1280 * 720


class UploadRefused(ValueError):
    """An upload exceeds a cap (the message says which, and the limit)."""


@dataclass(frozen=True)
class VideoProbe:
    """What the container says about an upload's video stream."""

    width: int
    height: int
    frames: int
    seconds: float


@dataclass
class UploadLimits:
    """Caps on uploaded clips (``vtr serve --upload-max-pixels / --upload-max-seconds /
    --upload-max-frames / --upload-decoders / --upload-space``); the byte size of one file is
    Gradio's ``--max-upload``. ``space`` is what all uploads on disk may take together."""

    max_pixels: int = 4096 * 4096
    max_seconds: float = 600.0
    max_frames: int = 18_000
    decoders: int = 1
    space: int = 2 << 30
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_frames", "decoders", "space"):
            if getattr(self, name) < 1:
                raise ValueError(f"upload {name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not self.max_seconds > 0:
            raise ValueError(f"upload max seconds must be positive, got {self.max_seconds}")
        self._slots = threading.BoundedSemaphore(self.decoders)

    def check(self, probe: VideoProbe) -> None:
        """Raise :class:`UploadRefused` when ``probe`` exceeds a cap."""
        pixels = probe.width * probe.height
        if pixels > self.max_pixels:
            raise UploadRefused(
                f"the video is {probe.width}x{probe.height} ({pixels / 1e6:.1f} megapixels per frame); this page "
                f"accepts up to {self.max_pixels / 1e6:.1f} megapixels"
            )
        if probe.seconds > self.max_seconds:
            raise UploadRefused(
                f"the video lasts {probe.seconds:.0f} s; this page accepts clips up to {self.max_seconds:.0f} s"
            )
        if probe.frames > self.max_frames:
            raise UploadRefused(
                f"the video has {probe.frames:,} frames; this page accepts clips of up to {self.max_frames:,} frames"
            )


def _open(path: Path):
    import av

    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, EOFError) as exc:
        raise VideoReadError(path, f"not a video PyAV can open ({type(exc).__name__})") from None


def probe(path: str | os.PathLike[str], limits: UploadLimits) -> VideoProbe:
    """Frame size, frame count and duration of the first video stream, without decoding.

    The frame count is the container's when it states one; otherwise the packets are demuxed
    and counted (stopping once past ``limits.max_frames``).

    Raises:
        VideoReadError: no file, no video stream, or no frame size.
        UploadRefused: the stream is beyond ``limits``.
    """
    import av

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise VideoReadError(path, "empty or missing file")
    with _open(path) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream in the file")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width < 1 or height < 1:
            raise VideoReadError(path, "the container states no frame size")
        seconds = 0.0
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / av.time_base
        frames = int(stream.frames or 0)
        # size and duration are known now: refuse before demuxing a stream that is too big
        limits.check(VideoProbe(width, height, frames, seconds))
        if frames == 0:
            try:
                for packet in container.demux(stream):
                    if packet.size:
                        frames += 1
                        if frames > limits.max_frames:
                            break
            except (av.error.FFmpegError, OSError, EOFError) as exc:
                raise VideoReadError(path, f"unreadable stream ({type(exc).__name__})") from None
    found = VideoProbe(width, height, frames, seconds)
    limits.check(found)
    if frames == 0:
        raise VideoReadError(path, "the video stream has no frames")
    return found


def _decode_scaled(path: Path, preprocess: Preprocess, found: VideoProbe, max_pixels: int) -> torch.Tensor:
    """The clip with every wanted frame scaled to ``size x size`` by the decoder's scaler; every
    decoded frame is held to ``max_pixels`` (:class:`FrameTooLarge`)."""
    import av

    indices = sample_frame_indices(0, found.frames, preprocess.num_frames, "middle")
    wanted, last = set(indices), max(indices)
    decoded: dict[int, np.ndarray] = {}
    size = preprocess.size
    try:
        with _open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # frame threading keeps one full-size frame per thread
            limit_frame_size(stream, max_pixels)
            for position, frame in enumerate(decode_frames(container, stream, path, max_pixels)):
                if position in wanted:
                    decoded[position] = frame_to_rgb(frame, width=size, height=size, interpolation="BICUBIC")
                if position >= last:
                    break
    except (av.error.FFmpegError, OSError, EOFError) as exc:
        raise VideoReadError(path, f"undecodable ({type(exc).__name__})") from None
    missing = sorted(wanted - decoded.keys())
    if missing:
        raise VideoReadError(path, f"could not decode frame {missing[0]} of {found.frames}")
    frames = torch.from_numpy(np.stack([decoded[i] for i in indices]))
    return preprocess(frames)


def decode_upload(path: str | os.PathLike[str], preprocess: Preprocess, limits: UploadLimits) -> torch.Tensor:
    """Probe, check and decode an uploaded clip: float ``[C, T, H, W]`` for the video encoder.

    Raises:
        UploadRefused: beyond a cap (nothing was decoded).
        VideoReadError: not a readable video.
    """
    path = Path(path)
    found = probe(path, limits)
    # every decoded frame is held to the size the container stated (itself within the cap): a
    # stream that switches to larger frames after its header is refused as the first one arrives
    stated = found.width * found.height
    with limits._slots:
        try:
            if stated <= DIRECT_DECODE_PIXELS:
                return load_clip(path, preprocess, max_pixels=stated)
            return _decode_scaled(path, preprocess, found, stated)
        except FrameTooLarge as exc:
            seen = f" to {exc.size[0]}x{exc.size[1]}" if exc.size else ""
            raise UploadRefused(
                f"the video changes its frame size{seen} after its first frames (the container states "
                f"{found.width}x{found.height}); this page accepts only clips that keep their size within "
                f"{limits.max_pixels / 1e6:.1f} megapixels"
            ) from None


class UploadSpaceFull(UploadRefused):
    """The uploads on disk already take the space the page allows."""


@dataclass
class _Stored:
    size: int
    deadline: float
    users: int = 0


class UploadJanitor:
    """Every file the page's uploads put on disk: its lifetime, and the space they take together.

    A file is deleted ``lifetime_s`` seconds after it arrived through the upload route, or
    ``grace_s`` seconds after the last request using it was answered, whichever is later; a file
    that is never searched is deleted all the same. Gradio stores identical uploads under one
    path, so a request that starts within the grace period keeps the file. :meth:`reserve`
    refuses an upload while the files on disk plus the uploads under way would exceed
    ``max_bytes``.
    """

    def __init__(self, grace_s: float = 60.0, max_bytes: int = 2 << 30, lifetime_s: float = 60.0) -> None:
        if max_bytes < 1:
            raise ValueError(f"upload space must be >= 1 byte, got {max_bytes}")
        self.grace_s = grace_s
        self.lifetime_s = lifetime_s
        self.max_bytes = max_bytes
        self._files: dict[str, _Stored] = {}
        self._reserved = 0
        self._changed = threading.Condition()
        self._sweeper: threading.Thread | None = None

    # -- space
    def used(self) -> int:
        """Bytes of the uploads on disk, plus those still arriving."""
        with self._changed:
            return sum(stored.size for stored in self._files.values()) + self._reserved

    def reserve(self, nbytes: int) -> None:
        """An upload of ``nbytes`` starts: refused when it would not fit (:class:`UploadSpaceFull`)."""
        with self._changed:
            used = sum(stored.size for stored in self._files.values()) + self._reserved
            if used + nbytes > self.max_bytes:
                raise UploadSpaceFull(
                    f"the server's space for uploads ({_megabytes(self.max_bytes)}) is full; try again in "
                    f"{max(self.grace_s, self.lifetime_s):.0f} s, once earlier uploads have been deleted"
                )
            self._reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        with self._changed:
            self._reserved -= nbytes

    # -- lifetimes
    def add(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        """A file arrived through the upload route: delete it after ``lifetime_s``."""
        key = os.fspath(path)
        if size is None:
            size = _size(key)
        with self._changed:
            stored = self._files.setdefault(key, _Stored(size, 0.0))
            stored.size = max(stored.size, size)
            stored.deadline = max(stored.deadline, time.monotonic() + self.lifetime_s)
            self._wake()

    # -- names: the client sees a stored upload by its path inside Gradio's upload folder only
    def name(self, path: str | os.PathLike[str]) -> str:
        """What the upload route answers for the stored file ``path``: its path relative to the
        upload folder (the server's absolute temporary path is not shown)."""
        return os.path.relpath(os.fspath(path), _upload_folder())

    def resolve(self, name: str) -> str | None:
        """The stored upload a client names with :meth:`name`'s answer; None for anything that is
        not a live upload (so no other file can be reached this way)."""
        if not isinstance(name, str) or not name or os.path.isabs(name):
            return None
        key = os.path.join(_upload_folder(), name)
        with self._changed:
            return key if key in self._files else None

    def hold(self, path: str | os.PathLike[str]) -> None:
        """A request starts using ``path``: it is not deleted until released."""
        key = os.fspath(path)
        with self._changed:
            stored = self._files.get(key)
            if stored is None:
                stored = self._files[key] = _Stored(_size(key), 0.0)
            stored.users += 1

    def release(self, path: str | os.PathLike[str]) -> None:
        """A request using ``path`` is answered: delete it once nobody has used it for ``grace_s``."""
        key = os.fspath(path)
        with self._changed:
            stored = self._files.get(key)
            if stored is None:
                return
            stored.users = max(0, stored.users - 1)
            stored.deadline = time.monotonic() + self.grace_s
            now = stored.users == 0 and self.grace_s <= 0
            if now:
                del self._files[key]
            else:
                self._wake()
        if now:
            discard(key)

    def sweep(self) -> list[str]:
        """Delete every file past its deadline that no request is using; returns their paths."""
        with self._changed:
            clock = time.monotonic()
            due = [key for key, stored in self._files.items() if not stored.users and stored.deadline <= clock]
            for key in due:
                del self._files[key]
        for key in due:
            discard(key)
        return due

    def _wake(self) -> None:
        # called with the lock held: start the sweeper on first use, or let it see a new deadline
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_forever, name="vtr-upload-janitor", daemon=True)
            self._sweeper.start()
        self._changed.notify()

    def _sweep_forever(self) -> None:
        while True:
            with self._changed:
                waiting = [stored.deadline for stored in self._files.values() if not stored.users]
                pause = min(waiting) - time.monotonic() if waiting else None
                if pause is None or pause > 0:
                    self._changed.wait(None if pause is None else min(pause, 5.0))
            self.sweep()


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes:,} bytes"


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _upload_folder() -> str:
    from gradio.utils import get_upload_folder

    return os.fspath(get_upload_folder())


def discard(path: str | os.PathLike[str] | None) -> None:
    """Delete an uploaded file (and its folder, if that is now empty) when it lies in Gradio's
    upload folder; files anywhere else are never touched."""
    if not path:
        return
    uploads = Path(os.path.realpath(_upload_folder()))
    real = Path(os.path.realpath(path))
    if real == uploads or not real.is_relative_to(uploads) or not real.is_file():
        return
    try:
        real.unlink()
        if real.parent != uploads and not any(real.parent.iterdir()):
            real.parent.rmdir()
    except OSError as exc:
        logger.warning("could not delete the upload %s: %s", real.name, exc)
