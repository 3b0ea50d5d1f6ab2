"""Video decoding, frame sampling and pixel preprocessing.

Frame sampling follows the official UMT / VideoMamba evaluation: the clip (optionally a
``[start, end]`` window in seconds, or only its first ``max_seconds``) is cut into ``T`` equal
segments of frame indices, and one frame is taken per segment — the middle one at test time,
a random one in training. For videos with at least ``T`` frames the indices are exactly those of
the official ``get_frame_indices``; shorter videos repeat frames evenly instead of padding with
the last one.

decord is the primary decoder (fast seeking via its frame index). PyAV is the fallback whenever
decord is missing, cannot open a file, or fails while seeking/decoding (some webm/VP9, variable
frame rate or odd containers); ``info["backend"]`` says which one produced the frames. Every
failure to read ends in :class:`VideoReadError`, so batch jobs catch one exception type and can
record the path and reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SampleMode = Literal["middle", "rand", "uniform_first30"]
Backend = Literal["auto", "decord", "pyav"]

SAMPLE_MODES: tuple[str, ...] = ("middle", "rand", "uniform_first30")
# "uniform_first30" is DiDeMo's test setting ("trimmed30"): middle frames of the first 30 s.
_FIRST30_SECONDS = 30.0
_INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest")

# (total frame count, fps) -> the frame indices to decode
IndexChooser = Callable[[int, float], list[int]]
# frames [T, H, W, 3] uint8, fps, total frame count, indices, timestamps (s)
DecodeResult = tuple[np.ndarray, float, int, list[int], list[float]]


class VideoReadError(Exception):
    """A video could not be read; carries the file's ``path`` and a human ``reason``.

    The constructor arguments are stored in ``args`` so the exception survives pickling (it is
    raised inside DataLoader worker processes and re-raised in the parent).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read video {self.path}: {self.reason}"


class FrameTooLarge(VideoReadError):
    """A frame is larger than the caller's pixel cap (e.g. a stream that switches to a larger
    size after its header); ``size`` is ``(width, height)`` when the frame was seen, None when
    FFmpeg refused it before allocating it."""

    def __init__(self, path: str | os.PathLike[str], reason: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(path, reason)
        self.size = size


def limit_frame_size(stream: Any, max_pixels: int) -> None:
    """Have FFmpeg refuse any frame of ``stream`` far above ``max_pixels`` before allocating it (set
    before the first packet is decoded). FFmpeg counts padded buffer sizes, so its limit has a
    margin; it guards memory, and :func:`check_frame_size` holds each returned frame to the cap."""
    guard = 2 * int(max_pixels) + (1 << 16)
    stream.codec_context.options = {**dict(stream.codec_context.options or {}), "max_pixels": str(guard)}


def check_frame_size(path: str | os.PathLike[str], frame: Any, max_pixels: int) -> None:
    """Raise :class:`FrameTooLarge` when a decoded frame is above ``max_pixels``."""
    if frame.width * frame.height > max_pixels:
        raise FrameTooLarge(path, f"a frame is {frame.width}x{frame.height}, more than {max_pixels:,} pixels",
                            (frame.width, frame.height))


# ----------------------------------------------------------------------------------------------
# frame index sampling


def _validate_limits(window: tuple[float, float] | None, max_seconds: float | None) -> None:
    if window is not None and not 0 <= float(window[0]) < float(window[1]):
        raise ValueError(f"window must satisfy 0 <= start < end, got {window}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")


def _frame_range(
    path: Path,
    num_frames_total: int,
    fps: float,
    window: tuple[float, float] | None,
    max_seconds: float | None,
) -> tuple[int, int]:
    """Frame indices ``[lo, hi)`` covered by the window and the ``max_seconds`` limit.

    The window end is clamped to the video's end (annotations often overshoot by a fraction of a
    second). A window that starts at or after the end cannot be read from this file, which a
    batch job should record like any other unreadable item, hence :class:`VideoReadError`.
    """
    lo, hi = 0, num_frames_total
    if window is not None:
        lo = math.floor(float(window[0]) * fps)
        if lo >= num_frames_total:
            duration = num_frames_total / fps
            raise VideoReadError(
                path, f"window {tuple(window)} starts after the video ends ({duration:.2f} s)"
            )
        hi = min(num_frames_total, max(lo + 1, math.ceil(float(window[1]) * fps)))
    if max_seconds is not None:
        hi = min(hi, max(lo + 1, int(max_seconds * fps)))
    return lo, hi


def sample_frame_indices(
    lo: int, hi: int, num_frames: int, pick: Literal["middle", "rand"], rng: random.Random | None = None
) -> list[int]:
    """One index per equal segment of ``[lo, hi)``: the segment's middle, or a random member.

    Segment bounds are ``linspace(lo, hi, num_frames + 1)`` truncated to integers (as the
    official code does); a segment that is empty because the range is shorter than
    ``num_frames`` collapses to its start, so short clips repeat frames evenly.
    """
    if hi <= lo:
        raise ValueError(f"empty frame range [{lo}, {hi})")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    bounds = np.linspace(lo, hi, num_frames + 1).astype(np.int64)
    chooser = rng if rng is not None else random
    indices = []
    for first, next_first in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        last = max(first, next_first - 1)
        if pick == "middle":
            indices.append((first + last) // 2)
        else:
            indices.append(chooser.randint(first, last))
    return indices


def _resolve_sample(sample: str, max_seconds: float | None) -> tuple[Literal["middle", "rand"], float | None]:
    if sample not in SAMPLE_MODES:
        raise ValueError(f"unknown sample mode {sample!r}; expected one of {SAMPLE_MODES}")
    if sample == "uniform_first30":
        return "middle", _FIRST30_SECONDS if max_seconds is None else max_seconds
    return sample, max_seconds  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# decoders


def _read_with_decord(path: Path, choose_indices: IndexChooser) -> DecodeResult:
    """Decode the chosen frames with decord; any decord exception propagates to the caller."""
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    total = len(reader)
    fps = float(reader.get_avg_fps())
    if total < 1 or not math.isfinite(fps) or fps <= 0:
        raise RuntimeError(f"decord reports {total} frames at {fps} fps")
    indices = choose_indices(total, fps)
    unique = sorted(set(indices))
    batch = reader.get_batch(unique)
    # decord's bridge is process-global; another module may have switched it to torch.
    array = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    # decord has returned wrong shapes and types on odd files: check before trusting it (any
    # mismatch raises here, which sends the file to PyAV)
    _check_frames(array, len(unique), "decord")
    lookup = {index: row for row, index in enumerate(unique)}
    frames = array[[lookup[i] for i in indices]]
    times = [float(t) for t in reader.get_frame_timestamp(indices)[:, 0]]
    return frames, fps, total, indices, times


def _check_frames(frames: Any, count: int, backend: str) -> None:
    """Raise RuntimeError unless ``frames`` is a uint8 ``[count, H, W, 3]`` array with H, W >= 1."""
    shape = getattr(frames, "shape", None)
    dtype = getattr(frames, "dtype", None)
    if not isinstance(frames, np.ndarray) or dtype != np.uint8 or len(shape) != 4 or shape[0] != count \
            or shape[1] < 1 or shape[2] < 1 or shape[3] != 3:
        raise RuntimeError(f"{backend} returned {type(frames).__name__} {dtype} {tuple(shape or ())} where "
                           f"uint8 frames [{count}, H, W, 3] were expected")


def _pyav_open(path: Path) -> Any:
    import av

    return av.open(str(path), mode="r")


def _pyav_video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        raise VideoReadError(path, "no video stream in the file")
    return container.streams.video[0]


def _pyav_packet_times(path: Path) -> tuple[list[float], float | None]:
    """Presentation times (s) of every video packet, sorted, and the stream's nominal rate.

    Demuxing without decoding is cheap and gives the true frame count even where the container
    header has none (webm) or lies (variable frame rate); a header count larger than what is in
    the file means the file was truncated.
    """
    with _pyav_open(path) as container:
        stream = _pyav_video_stream(container, path)
        time_base = stream.time_base or Fraction(1, 1)
        pts_values: list[int] = []
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end of the stream
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            pts_values.append(pts if pts is not None else len(pts_values))
        rate = stream.average_rate or stream.guessed_rate
        declared = stream.frames
    if declared and len(pts_values) < declared:
        raise VideoReadError(
            path, f"truncated: header declares {declared} frames, only {len(pts_values)} present"
        )
    first = min(pts_values) if pts_values else 0
    times = sorted(float((pts - first) * time_base) for pts in pts_values)
    return times, (float(rate) if rate else None)


def _read_with_pyav(path: Path, choose_indices: IndexChooser, max_pixels: int | None = None) -> DecodeResult:
    """Decode the chosen frames with PyAV: one demux pass to count, one sequential decode pass.

    Decoding is sequential from the start up to the last wanted frame (no seeking), which is
    slower than decord on long videos but does not depend on a correct seek index. With
    ``max_pixels`` every decoded frame is held to that size (:class:`FrameTooLarge`).
    """
    times, rate = _pyav_packet_times(path)
    total = len(times)
    if total == 0:
        raise VideoReadError(path, "the video stream has no frames")
    span = times[-1] - times[0]
    fps = rate if rate else (total - 1) / span if span > 0 else 1.0
    indices = choose_indices(total, fps)
    wanted = set(indices)
    last_wanted = max(wanted)
    decoded: dict[int, np.ndarray] = {}
    with _pyav_open(path) as container:
        stream = _pyav_video_stream(container, path)
        stream.thread_type = "AUTO"
        if max_pixels is not None:
            limit_frame_size(stream, max_pixels)
        for position, frame in enumerate(decode_frames(container, stream, path, max_pixels)):
            if position in wanted:
                decoded[position] = frame_to_rgb(frame)
            if position >= last_wanted:
                break
    if len(decoded) < len(wanted):
        missing = sorted(wanted - decoded.keys())
        raise VideoReadError(path, f"undecodable frames: could not decode frame {missing[0]} of {total}")
    try:
        frames = np.stack([decoded[i] for i in indices])  # frames of differing sizes cannot stack
    except ValueError as exc:
        raise VideoReadError(path, f"frames of differing shapes ({exc})") from None
    return frames, fps, total, indices, [times[i] for i in indices]


# Recent PyAV (18 here) converts frames with a pool of swscale threads by default, and keeps the
# converter, pool included, for later frames of the process. A process forked after its parent
# converted a frame (a DataLoader worker, a loader process) then waits forever on threads it does
# not have. vtr converts on one thread everywhere (as older PyAV always did; loaders parallelise
# across videos instead), so no converter with a pool exists to be inherited.
_SWS_ONE_THREAD: dict[str, int] = {"threads": 1}


def frame_to_rgb(frame: Any, **kwargs: Any) -> np.ndarray:
    """``frame.to_ndarray(format="rgb24", **kwargs)`` with swscale on one thread (fork-safe; a PyAV
    whose converter takes no ``threads`` argument is single-threaded anyway)."""
    if _SWS_ONE_THREAD:
        try:
            return frame.to_ndarray(format="rgb24", **kwargs, **_SWS_ONE_THREAD)
        except TypeError:
            _SWS_ONE_THREAD.clear()
    return frame.to_ndarray(format="rgb24", **kwargs)


def decode_frames(container: Any, stream: Any, path: str | os.PathLike[str], max_pixels: int | None = None) -> Any:
    """The decoded frames of ``stream``; with ``max_pixels`` (after :func:`limit_frame_size`),
    each is checked, and a frame FFmpeg refused to allocate is a :class:`FrameTooLarge`."""
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except _pyav_error_types() as exc:
            if max_pixels is None:
                raise
            raise FrameTooLarge(path, f"a frame could not be decoded within {max_pixels:,} pixels "
                                      f"({type(exc).__name__}: the stream grows, or is damaged)") from None
        if max_pixels is not None:
            check_frame_size(path, frame, max_pixels)
        yield frame


def _pyav_error_types() -> tuple[type[BaseException], ...]:
    """What PyAV raises for unreadable input (imported lazily with PyAV itself)."""
    import av

    return (av.error.FFmpegError, OSError, EOFError)


# ----------------------------------------------------------------------------------------------
# public reading API


def read_frames(
    path: str | os.PathLike[str],
    num_frames: int = 8,
    sample: SampleMode = "middle",
    window: tuple[float, float] | None = None,
    max_seconds: float | None = None,
    rng: random.Random | None = None,
    backend: Backend = "auto",
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode ``num_frames`` sampled frames of a video.

    Args:
        path: video file.
        num_frames: ``T``, the number of frames returned.
        sample: ``"middle"`` (test), ``"rand"`` (training; uses ``rng``, default the global
            ``random`` module so DataLoader worker seeding applies), or ``"uniform_first30"``
            (middle frames of the first 30 s unless ``max_seconds`` says otherwise).
        window: optional ``(start, end)`` in seconds to sample within.
        max_seconds: sample only the first ``max_seconds`` of the (windowed) range.
        backend: ``"auto"`` (decord, PyAV on any decord failure), or one decoder only.
        max_pixels: refuse any decoded frame above this many pixels (:class:`FrameTooLarge`),
            checked on every frame as it is decoded, so PyAV decodes (decord converts whole
            frames before they can be checked).

    Returns:
        ``frames``: uint8 tensor ``[T, H, W, 3]`` (RGB), and ``info`` with ``fps``,
        ``duration`` (s), ``num_frames_total``, ``backend`` (``"decord"`` or ``"pyav"``),
        ``indices`` (the decoded frame indices) and ``times`` (their timestamps in s).

    Raises:
        VideoReadError: the file is missing, empty, truncated, not a video, has no video
            stream, or its frames cannot be decoded.
        ValueError: invalid arguments (unknown sample mode or backend, ``start >= end``).
    """
    path = Path(path)
    pick, max_seconds = _resolve_sample(sample, max_seconds)
    _validate_limits(window, max_seconds)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'decord' or 'pyav'")
    _check_file(path)

    def choose_indices(total: int, fps: float) -> list[int]:
        lo, hi = _frame_range(path, total, fps, window, max_seconds)
        return sample_frame_indices(lo, hi, num_frames, pick, rng)

    if max_pixels is not None and backend == "decord":
        raise ValueError("max_pixels needs the PyAV decoder (decord cannot check frames as it decodes)")
    decord_failure: str | None = None
    if backend in ("auto", "decord") and max_pixels is None:
        try:
            result = _read_with_decord(path, choose_indices)
            _check_frames(result[0], len(result[3]), "decord")
            return _frames_and_info(result, "decord")
        except VideoReadError:
            raise  # a window past the end: PyAV would measure the same file the same way
        except Exception as exc:  # decord raises RuntimeError, IndexError, DECORDError, ...
            decord_failure = f"{type(exc).__name__}: {exc}"
            if backend == "decord":
                raise VideoReadError(path, f"decord: {decord_failure}") from exc
            logger.debug("decord failed on %s (%s); falling back to PyAV", path, decord_failure)
    suffix = f" (decord: {decord_failure})" if decord_failure else ""
    try:
        capped = () if max_pixels is None else (max_pixels,)
        result = _read_with_pyav(path, choose_indices, *capped)
        try:
            _check_frames(result[0], len(result[3]), "PyAV")
        except RuntimeError as exc:
            raise VideoReadError(path, str(exc)) from None
        return _frames_and_info(result, "pyav")
    except VideoReadError as exc:
        if not suffix:
            raise
        raise VideoReadError(path, exc.reason + suffix) from exc
    except _pyav_error_types() as exc:
        raise VideoReadError(path, f"PyAV: {type(exc).__name__}: {exc}{suffix}") from exc


def _check_file(path: Path) -> None:
    """Refuse missing and empty files up front, with a clearer reason than a decoder gives."""
    if not path.exists():
        raise VideoReadError(path, "file not found")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "empty file (0 bytes)")


def _frames_and_info(result: DecodeResult, backend: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Package a decoder's result as :func:`read_frames` returns it."""
    frames, fps, total, indices, times = result
    info = {
        "fps": fps,
        "duration": total / fps,
        "num_frames_total": total,
        "backend": backend,
        "indices": indices,
        "times": [round(t, 6) for t in times],  # decord reports float32 seconds
    }
    return torch.from_numpy(np.ascontiguousarray(frames)), info


class ImageReadError(VideoReadError):
    """An image could not be read (a :class:`VideoReadError`, so one handler catches both)."""

    def __str__(self) -> str:
        return f"cannot read image {self.path}: {self.reason}"


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode an image with PIL as a one-frame clip: uint8 ``[1, H, W, 3]`` (RGB).

    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image PIL can decode.
    """
    from PIL import Image

    path = Path(path)
    try:
        _check_file(path)
    except VideoReadError as exc:
        raise ImageReadError(path, exc.reason) from None
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))  # a writable copy
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"PIL: {type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(array).unsqueeze(0)


def file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """What tells a file apart from another and from its own earlier content: its resolved path,
    size and modification time (``(path, -1, -1)`` when it cannot be read); channel readers key
    the work they share between overlapping windows of one file by it."""
    try:
        stat = os.stat(path)
    except OSError:
        return (str(path), -1, -1)
    return (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def video_duration(path: str | os.PathLike[str]) -> float:
    """Duration in seconds from container metadata (no decoding).

    Uses the video stream's duration, else the container's; files that carry neither are
    demuxed (still no decoding) and measured from their packet timestamps.
    """
    path = Path(path)
    _check_file(path)
    try:
        with _pyav_open(path) as container:
            stream = _pyav_video_stream(container, path)
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                import av

                return container.duration / av.time_base
        times, rate = _pyav_packet_times(path)
    except _pyav_error_types() as exc:
        raise VideoReadError(path, f"PyAV: {type(exc).__name__}: {exc}") from exc
    if not times:
        raise VideoReadError(path, "the video stream has no frames")
    frame_step = 1.0 / rate if rate else 0.0
    return times[-1] - times[0] + frame_step


# ----------------------------------------------------------------------------------------------
# preprocessing


@dataclass(frozen=True)
class Preprocess:
    """The pixel pipeline a model was trained with; stored in its directory's ``config.json``.

    ``__call__`` resizes every frame to ``size x size`` (no crop: the official evaluation
    squashes the aspect ratio), scales to ``[0, 1]`` and normalises. Resizing mirrors
    torchvision's ``Resize`` on uint8 tensors as the official code ran it (interpolate in float
    without antialiasing, round back to uint8), so converted checkpoints see the same pixels.
    """

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    num_frames: int = 8
    sample: str = "middle"

    def __post_init__(self) -> None:
        # JSON round-trips turn tuples into lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.size < 1 or self.num_frames < 1:
            raise ValueError(f"size and num_frames must be >= 1, got {self.size} and {self.num_frames}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; expected one of {_INTERPOLATIONS}"
            )
        if self.sample not in SAMPLE_MODES:
            raise ValueError(f"unknown sample mode {self.sample!r}; expected one of {SAMPLE_MODES}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocess:
        """Build from a config dict; unknown keys are refused so a typo cannot go unnoticed."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown preprocess keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def for_model(cls, model: Any, corpus: Any = None) -> Preprocess:
        """The pixel pipeline of ``model`` (its ``preprocess`` record: size, mean/std,
        interpolation, frames; a model directory's config or the dict itself also do), with the
        test-time frame sampling of ``corpus`` when given. Every consumer builds it here: training,
        evaluation, indexing, search and action labels see the same pixels."""
        record = model if isinstance(model, dict) else model.preprocess
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in record.items() if key in known}
        if corpus is not None:
            values["sample"] = corpus.sample
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists) that :meth:`from_dict` reads back."""
        values = dataclasses.asdict(self)
        values["mean"] = list(self.mean)
        values["std"] = list(self.std)
        return values

    def _resized(self, pixels: torch.Tensor) -> torch.Tensor:
        """float ``[T, 3, H, W]`` pixel values -> ``[T, 3, size, size]``, rounded to whole values."""
        if pixels.shape[-2:] == (self.size, self.size):
            return pixels
        align = False if self.interpolation in ("bicubic", "bilinear") else None
        size = (self.size, self.size)
        pixels = F.interpolate(pixels, size=size, mode=self.interpolation, align_corners=align)
        return pixels.round_().clamp_(0, 255)

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, size, size, 3]``: the resize of ``__call__`` alone,
        for callers that keep frames (training caches) and normalise them later."""
        if frames.shape[1:3] == (self.size, self.size):
            return frames
        pixels = self._resized(frames.permute(0, 3, 1, 2).float())
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` frames -> normalised float ``[C, T, H, W]``."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        pixels = self._resized(frames.permute(0, 3, 1, 2).float()) / 255.0  # [T, 3, H, W]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((pixels - mean) / std).permute(1, 0, 2, 3).contiguous()


def load_clip(
    path: str | os.PathLike[str],
    preprocess: Preprocess,
    window: tuple[float, float] | None = None,
    train: bool = False,
    max_seconds: float | None = None,
    rng: random.Random | None = None,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """Read and preprocess one clip: float ``[C, T, H, W]`` ready for a video encoder.

    ``train=True`` samples a random frame per segment; otherwise ``preprocess.sample`` decides.
    The 30 s limit of ``"uniform_first30"`` is a test-time setting; training keeps a corpus's
    limit only through ``max_seconds`` (e.g. the DiDeMo preset's 30 s). ``max_pixels``: see
    :func:`read_frames`.
    """
    sample = "rand" if train else preprocess.sample
    frames, _ = read_frames(
        path, num_frames=preprocess.num_frames, sample=sample, window=window, max_seconds=max_seconds, rng=rng,
        max_pixels=max_pixels,
    )
    return preprocess(frames)
