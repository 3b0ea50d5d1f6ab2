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
   The decoder runs without frame threading (no extra full-size frame per thread), and frames
   larger than the probe said are refused.
3. :class:`UploadJanitor` deletes the uploaded file once the request is answered, after a
   short grace period: Gradio stores identical uploads under one path, so a second request for
   the same content may still be waiting in the queue; a request that starts within the grace
   period keeps the file.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval.data.video import Preprocess, VideoReadError, load_clip, sample_frame_indices

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
    --upload-max-frames / --upload-decoders``); the byte size is Gradio's ``--max-upload``."""

    max_pixels: int = 4096 * 4096
    max_seconds: float = 600.0
    max_frames: int = 18_000
    decoders: int = 1
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_frames", "decoders"):
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


def _decode_scaled(path: Path, preprocess: Preprocess, found: VideoProbe, limits: UploadLimits) -> torch.Tensor:
    """The clip with every wanted frame scaled to ``size x size`` by the decoder's scaler."""
    import av

    indices = sample_frame_indices(0, found.frames, preprocess.num_frames, "middle")
    wanted, last = set(indices), max(indices)
    decoded: dict[int, np.ndarray] = {}
    size = preprocess.size
    try:
        with _open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # frame threading keeps one full-size frame per thread
            for position, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > limits.max_pixels:
                    raise UploadRefused(
                        f"a frame is {frame.width}x{frame.height}, more than the container stated and more than "
                        f"the {limits.max_pixels / 1e6:.1f} megapixels this page accepts"
                    )
                if position in wanted:
                    decoded[position] = frame.to_ndarray(format="rgb24", width=size, height=size,
                                                         interpolation="BICUBIC")
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
    with limits._slots:
        if found.width * found.height <= DIRECT_DECODE_PIXELS:
            return load_clip(path, preprocess)
        return _decode_scaled(path, preprocess, found, limits)


class UploadJanitor:
    """Deletes uploads ``grace_s`` seconds after the last request using them was answered."""

    def __init__(self, grace_s: float = 60.0) -> None:
        self.grace_s = grace_s
        self._users: dict[str, int] = {}
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    def hold(self, path: str | os.PathLike[str]) -> None:
        """A request starts using ``path``: it is not deleted until released."""
        key = os.fspath(path)
        with self._lock:
            self._users[key] = self._users.get(key, 0) + 1
            timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def release(self, path: str | os.PathLike[str]) -> None:
        """A request using ``path`` is answered: delete it once nobody has used it for ``grace_s``."""
        key = os.fspath(path)
        with self._lock:
            self._users[key] = self._users.get(key, 1) - 1
            if self._users[key] > 0:
                return
            del self._users[key]
            if self.grace_s <= 0:
                timer = None
            else:
                timer = self._timers[key] = threading.Timer(self.grace_s, self._expire, args=(key,))
                timer.daemon = True
        if timer is None:
            discard(key)
        else:
            timer.start()

    def _expire(self, key: str) -> None:
        with self._lock:
            if self._users.get(key) or self._timers.get(key) is None:
                return
            del self._timers[key]
        discard(key)


def discard(path: str | os.PathLike[str] | None) -> None:
    """Delete an uploaded file (and its folder, if that is now empty) when it lies in Gradio's
    upload folder; files anywhere else are never touched."""
    if not path:
        return
    from gradio.utils import get_upload_folder

    uploads = Path(os.path.realpath(get_upload_folder()))
    real = Path(os.path.realpath(path))
    if real == uploads or not real.is_relative_to(uploads) or not real.is_file():
        return
    try:
        real.unlink()
        if real.parent != uploads and not any(real.parent.iterdir()):
            real.parent.rmdir()
    except OSError as exc:
        logger.warning("could not delete the upload %s: %s", real.name, exc)
