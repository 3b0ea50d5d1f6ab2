"""On-screen text: read the words written in a video's frames (the index's text channel).

The recogniser is behind one small interface, :meth:`OcrReader.read` (an RGB frame in, lines
with boxes out). The embedded default is PP-OCRv4 (detection + recognition, Chinese and English)
with the v2.0 angle classifier, as ONNX models that ship inside the ``rapidocr-onnxruntime``
wheel (the ``ocr`` extra): nothing is downloaded. ``OcrReader(model_dir=DIR)`` takes other local
PP-OCR ONNX files instead (e.g. a Latin-script recogniser): ``*det*.onnx``, ``*rec*.onnx`` and
a character list ``*.txt`` for a recogniser that does not carry its own (an angle classifier
``*cls*.onnx`` is accepted but, as for the embedded models, not run: on-screen text is upright).

:func:`read_span` samples frames of an item's span (about one every :data:`DEFAULT_EVERY_S`
seconds, at least one), reads them, merges a line that stays on screen over consecutive samples
into one line with a start and end time, and records (never raises) what went wrong: a frame
that cannot be decoded or read is a note on the item, not a failed job.

Recognisers lose spaces between words ("FloodinValencia") and confuse look-alike characters
("BREAKlNG"); :func:`fold` is the one normalisation that search applies to indexed text and to
queries alike so that such text can still be found.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.data.video import VideoReadError, read_frames, video_duration
from retrieval.models.model_dir import weights_hash

logger = logging.getLogger(__name__)

#: The optional dependency group that brings the embedded recogniser.
OCR_EXTRA = "ocr"
OCR_PACKAGE = "rapidocr-onnxruntime"
#: Default sampling: one frame about every this many seconds of an item's span.
DEFAULT_EVERY_S = 2.0
#: Frames larger than this (longest side, pixels) are scaled down before reading: detection
#: cost grows with the area, and titles stay legible far below 4K.
MAX_SIDE = 1280
#: Lines the recogniser is less sure of than this are dropped (PP-OCR's own default).
MIN_LINE_SCORE = 0.5
#: The detector scales a frame so that its short side is at least this many pixels. PP-OCR's own
#: default (736) quadruples the work on small frames and reads no more of the synthetic corpus's
#: titles (bench/channels.py); frames above it are read at their own size (up to MAX_SIDE).
DET_MIN_SIDE = 320
#: Two sampled frames whose 32x32 grey thumbnails differ by less than this mean absolute value
#: (0-255) show the same thing: the second reuses the first one's lines instead of being read.
SAME_FRAME = 1.0
#: Upper bound on frames read per item, so one hour-long unwindowed video cannot stall a job.
MAX_FRAMES_PER_ITEM = 64

# look-alike characters a recogniser swaps; folded to one representative on both sides
_LOOK_ALIKES = str.maketrans({"0": "o", "1": "l", "i": "l", "|": "l", "!": "l", "5": "s", "$": "s", "6": "g", "8": "b"})
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


class OcrUnavailable(ValueError):
    """The text channel was asked for but its recogniser is not installed (a user error)."""


def ocr_available() -> bool:
    """Whether the embedded recogniser's package is installed (imports nothing)."""
    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


def require_ocr() -> None:
    """Raise :class:`OcrUnavailable`, naming the extra to install, unless the recogniser is there."""
    if not ocr_available():
        raise OcrUnavailable(f"the text channel needs the {OCR_EXTRA} extra: pip install 'vtr[{OCR_EXTRA}]' "
                             f"(or `make install`), or index with --channels visual")


def normalise_line(text: str) -> str:
    """A recognised line as stored: Unicode-compatibility folded (full-width forms, ligatures),
    control characters dropped, whitespace runs collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    return " ".join(text.split())


def fold(text: str) -> str:
    """The form text is matched in: lower case, accents, spaces and punctuation removed,
    look-alike characters (0/o, 1/l/i, 5/s, 6/g, 8/b) made one. ``fold("BREAKlNG NEWS") == fold("breaking news")``."""
    text = unicodedata.normalize("NFKD", normalise_line(text).lower())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return _NOT_WORD.sub("", text).translate(_LOOK_ALIKES)


def folded_with_positions(text: str) -> tuple[str, list[int]]:
    """:func:`fold` of ``text`` and, for each folded character, the index of the character of
    ``text`` it came from (to highlight a match in the text as shown)."""
    chars, where = [], []
    for position, ch in enumerate(text):
        for piece in fold(ch):
            chars.append(piece)
            where.append(position)
    return "".join(chars), where


@dataclass(frozen=True)
class TextLine:
    """One line of on-screen text: what it says, where (box corners in the frame's pixels, as
    read) and when (seconds in the video: first and last sampled frame that showed it)."""

    text: str
    start: float
    end: float
    box: tuple[tuple[int, int], ...]
    score: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["box"] = [list(point) for point in self.box]
        return out


def _model_files(model_dir: Path) -> dict[str, Path | None]:
    """``det``/``rec``/``cls`` ONNX files and the optional ``keys`` list of a recogniser directory."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--ocr {model_dir}: no such directory of PP-OCR model files")
    found: dict[str, Path | None] = {}
    for role in ("det", "rec", "cls"):
        matches = sorted(p for p in model_dir.glob("*.onnx") if role in p.name.lower())
        if len(matches) > 1:
            raise ValueError(f"--ocr {model_dir}: several {role} models ({', '.join(p.name for p in matches)}); "
                             "keep one")
        found[role] = matches[0] if matches else None
    missing = [role for role in ("det", "rec") if found[role] is None]
    if missing:
        raise ValueError(f"--ocr {model_dir}: no {' or '.join(missing)} model (*det*.onnx and *rec*.onnx "
                         "are needed, *cls*.onnx and a *.txt character list are optional)")
    keys = sorted(model_dir.glob("*.txt"))
    if len(keys) > 1:
        raise ValueError(f"--ocr {model_dir}: several character lists ({', '.join(p.name for p in keys)}); keep one")
    found["keys"] = keys[0] if keys else None
    return found


class OcrReader:
    """Reads the text in frames with PP-OCR models run by onnxruntime.

    Args:
        model_dir: a directory of local PP-OCR ONNX files (see the module docstring); None: the
            models inside the ``rapidocr-onnxruntime`` wheel.
        threads: onnxruntime (and OpenCV) threads; default: torch's, i.e. what the job was given.
        min_score: lines recognised with less confidence are dropped.

    Raises:
        OcrUnavailable: the package is not installed.
        FileNotFoundError, ValueError: ``model_dir`` is missing or does not hold the models.
    """

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                 min_score: float = MIN_LINE_SCORE) -> None:
        require_ocr()
        files = _model_files(Path(model_dir)) if model_dir is not None else None
        import cv2  # noqa: PLC0415  (the ocr extra: only imported when the text channel runs)
        from rapidocr_onnxruntime import RapidOCR  # noqa: PLC0415

        threads = max(1, int(threads or torch.get_num_threads()))
        cv2.setNumThreads(threads)
        # no angle classifier: on-screen text is upright, and it costs a third of the recognition
        options: dict[str, Any] = {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                   "text_score": min_score, "use_cls": False, "det_limit_side_len": DET_MIN_SIDE}
        if files is not None:
            options["det_model_path"] = str(files["det"])
            options["rec_model_path"] = str(files["rec"])
            if files["cls"] is not None:
                options["cls_model_path"] = str(files["cls"])
            if files["keys"] is not None:
                options["rec_keys_path"] = str(files["keys"])
        self._engine = RapidOCR(**options)
        self.threads = threads
        self.min_score = min_score
        self.identity = self._identity(files)

    def _identity(self, files: dict[str, Path | None] | None) -> dict[str, Any]:
        """What made the text: the package and the models (names and hashes), for the manifest."""
        out: dict[str, Any] = {"engine": f"{OCR_PACKAGE} {importlib.metadata.version(OCR_PACKAGE)}",
                               "min_score": self.min_score, "det_min_side": DET_MIN_SIDE}
        if files is None:
            out["models"] = "embedded (PP-OCRv4 det + rec)"
        else:
            out["models"] = {role: {"file": path.name, "sha256": weights_hash(path)}
                             for role, path in files.items() if path is not None}
            out["model_dir"] = str(next(iter(files.values())).parent.resolve())
        return out

    @property
    def onnx_threads(self) -> dict[str, int]:
        """The intra-op thread count each onnxruntime session runs with (``det``, ``cls``, ``rec``)."""
        engines = {"det": self._engine.text_det, "cls": self._engine.text_cls, "rec": self._engine.text_rec}
        threads = {}
        for role, engine in engines.items():
            wrapper = getattr(engine, "infer", None) or engine.session  # rapidocr names it either way
            threads[role] = wrapper.session.get_session_options().intra_op_num_threads
        return threads

    def read(self, frame: np.ndarray) -> list[tuple[str, tuple[tuple[int, int], ...], float]]:
        """The lines in an RGB uint8 frame ``[H, W, 3]``: ``(text, box corners, confidence)``,
        top to bottom as the detector orders them. A frame without text gives ``[]``."""
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an RGB frame [H, W, 3], got shape {tuple(frame.shape)}")
        scale = 1.0
        if max(frame.shape[:2]) > MAX_SIDE:
            import cv2  # noqa: PLC0415

            scale = MAX_SIDE / max(frame.shape[:2])
            frame = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
        # RapidOCR takes OpenCV's BGR channel order for arrays
        result, _ = self._engine(np.ascontiguousarray(frame[:, :, ::-1]))
        lines = []
        for box, text, score in result or []:
            text = normalise_line(text)
            if text and float(score) >= self.min_score:
                corners = tuple((round(x / scale), round(y / scale)) for x, y in box)
                lines.append((text, corners, float(score)))
        return lines


def sample_count(span_s: float, every_s: float = DEFAULT_EVERY_S) -> int:
    """Frames read from a span of ``span_s`` seconds: one per ``every_s`` seconds, at least one."""
    if every_s <= 0:
        raise ValueError(f"the text channel's sampling interval must be positive, got {every_s}")
    return max(1, min(MAX_FRAMES_PER_ITEM, math.floor(span_s / every_s + 0.5)))


def merge_repeats(frames: list[tuple[float, list[tuple[str, Any, float]]]]) -> list[TextLine]:
    """Lines of consecutive sampled frames ``[(time, lines)]`` with the same folded text become
    one line spanning their times (a title on screen for ten seconds is one line, not five)."""
    merged: list[TextLine] = []
    open_lines: dict[str, int] = {}  # folded text -> position in merged, for lines on the last frame
    for time, lines in frames:
        still_open: dict[str, int] = {}
        for text, box, score in lines:
            key = fold(text) or text
            if key in still_open:
                continue
            if key in open_lines:
                position = open_lines[key]
                line = merged[position]
                merged[position] = TextLine(line.text, line.start, time, line.box, max(line.score, score))
            else:
                position = len(merged)
                merged.append(TextLine(text, time, time, tuple(tuple(p) for p in box), score))
            still_open[key] = position
        open_lines = still_open
    return merged


def thumbnail(frame: np.ndarray, side: int = 32) -> np.ndarray:
    """A ``side`` x ``side`` grey float thumbnail (block means) of an RGB frame, for comparing frames."""
    grey = frame.astype(np.float32).mean(axis=2)
    rows = np.array_split(np.arange(grey.shape[0]), min(side, grey.shape[0]))
    cols = np.array_split(np.arange(grey.shape[1]), min(side, grey.shape[1]))
    return np.array([[grey[r[0] : r[-1] + 1, c[0] : c[-1] + 1].mean() for c in cols] for r in rows])


def read_span(reader: OcrReader, path: str | os.PathLike[str], start: float | None = None,
              end: float | None = None, every_s: float = DEFAULT_EVERY_S) -> dict[str, Any]:
    """The on-screen text of a video (or its span ``[start, end]`` in seconds).

    Returns ``{"lines": [TextLine.to_dict()...], "frames": frames read, "notes": [...]}``;
    problems (undecodable video, a frame the recogniser fails on) are notes, never exceptions.
    """
    notes: list[str] = []
    try:
        if start is None or end is None:
            start, end = 0.0, video_duration(path)
        count = sample_count(end - start, every_s)
        frames, info = read_frames(path, num_frames=count, sample="middle", window=(start, end))
    except (VideoReadError, ValueError) as exc:
        return {"lines": [], "frames": 0, "notes": [f"cannot decode frames: {exc}"]}
    # the same frame index twice (a span shorter than the sampling) is read once, and a frame
    # that looks like the last one read (a slide, a still) takes its lines
    read: list[tuple[float, list[tuple[str, Any, float]]]] = []
    seen: set[int] = set()
    last: tuple[np.ndarray, list[tuple[str, Any, float]]] | None = None
    for frame, index, time in zip(frames.numpy(), info["indices"], info["times"], strict=True):
        if index in seen:
            continue
        seen.add(index)
        thumb = thumbnail(frame)
        if last is not None and float(np.abs(thumb - last[0]).mean()) < SAME_FRAME:
            read.append((round(float(time), 3), last[1]))
            continue
        try:
            lines = reader.read(frame)
            read.append((round(float(time), 3), lines))
            last = (thumb, lines)
        except Exception as exc:  # noqa: BLE001  (one unreadable frame never fails the item)
            notes.append(f"frame at {float(time):.2f} s: {type(exc).__name__}: {exc}")
            logger.warning("text channel: %s frame at %.2f s: %s", path, float(time), exc)
    if read and not any(lines for _, lines in read):
        notes.append("no text")
    return {"lines": [line.to_dict() for line in merge_repeats(read)], "frames": len(read), "notes": notes}
