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
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.data.video import VideoReadError, file_key, read_frames, video_duration
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
#: The detector scales a frame up so that its short side is at least this many pixels. PP-OCR's
#: own default (736) quadruples the work on small frames; on the synthetic corpus's 128 px frames
#: the word recall is the same read at their own size as upscaled to 320 px (0.988 vs 0.977), and
#: detection takes a quarter of the time (bench/channels.py); larger frames are read at their own
#: size (up to MAX_SIDE).
DET_MIN_SIDE = 128
#: Two sampled frames whose 32x32 grey thumbnails differ by less than this mean absolute value
#: (0-255) show the same thing: the second reuses the first one's lines instead of being read.
SAME_FRAME = 1.0
#: A detected box whose corners all lie within this many pixels of one of the last read frame's
#: boxes, and whose pixels differ from that frame's by less than :data:`SAME_BOX` (mean absolute,
#: 0-255), keeps that box's text instead of being recognised again (a title over moving shapes).
BOX_SHIFT = 2.0
SAME_BOX = 4.0
#: Frames a reader remembers by file and index (overlapping windows sample the same frames).
RECENT_FRAMES = 256
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
        det_min_side: the detector upscales frames whose short side is below this (pixels).

    Raises:
        OcrUnavailable: the package is not installed.
        FileNotFoundError, ValueError: ``model_dir`` is missing or does not hold the models.
    """

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                 min_score: float = MIN_LINE_SCORE, det_min_side: int = DET_MIN_SIDE) -> None:
        require_ocr()
        files = _model_files(Path(model_dir)) if model_dir is not None else None
        import cv2  # noqa: PLC0415  (the ocr extra: only imported when the text channel runs)
        from rapidocr_onnxruntime import RapidOCR  # noqa: PLC0415

        threads = max(1, int(threads or torch.get_num_threads()))
        cv2.setNumThreads(threads)
        # no angle classifier: on-screen text is upright, and it costs a third of the recognition
        options: dict[str, Any] = {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                   "text_score": min_score, "use_cls": False, "det_limit_side_len": det_min_side}
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
        self.det_min_side = det_min_side
        self.identity = self._identity(files)
        #: work done and saved so far: frames the detector ran on, boxes recognised, sampled frames
        #: that took a look-alike frame's lines, boxes that took the last frame's reading
        self.counts = {"detected": 0, "recognised": 0, "reused_frames": 0, "reused_boxes": 0}
        #: (file, size, mtime, frame index) -> lines, for the frames read last: overlapping
        #: windows of one video sample the same frames, which are read once
        self.recent: OrderedDict[tuple[str, int, int, int], list[tuple[str, Any, float]]] = OrderedDict()

    def _identity(self, files: dict[str, Path | None] | None) -> dict[str, Any]:
        """What made the text: the package and the models (names and hashes), for the manifest."""
        out: dict[str, Any] = {"engine": f"{OCR_PACKAGE} {importlib.metadata.version(OCR_PACKAGE)}",
                               "min_score": self.min_score, "det_min_side": self.det_min_side}
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

    def detect(self, frame: np.ndarray) -> list[np.ndarray]:
        """The text boxes of an RGB uint8 frame (already :func:`fit_frame`-ed): ``[4, 2]`` float32
        corners in its pixels, top to bottom as the detector orders them; ``[]`` without text."""
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an RGB frame [H, W, 3], got shape {tuple(frame.shape)}")
        self.counts["detected"] += 1
        # RapidOCR takes OpenCV's BGR channel order for arrays; detection only: boxes in frame pixels
        boxes, _ = self._engine(np.ascontiguousarray(frame[:, :, ::-1]), use_det=True, use_cls=False,
                                use_rec=False)
        return [np.asarray(box, np.float32).reshape(4, 2) for box in boxes or []]

    def recognise(self, frame: np.ndarray, boxes: list[np.ndarray]) -> list[tuple[str, float]]:
        """What each box of ``frame`` says, with the recogniser's confidence (one batch)."""
        if not boxes:
            return []
        self.counts["recognised"] += len(boxes)
        crops = self._engine.get_crop_img_list(np.ascontiguousarray(frame[:, :, ::-1]), boxes)
        results, _ = self._engine.text_rec(crops)
        return [(str(text), float(score)) for text, score, *_ in results]

    def read(self, frame: np.ndarray) -> list[tuple[str, tuple[tuple[int, int], ...], float]]:
        """The lines in an RGB uint8 frame ``[H, W, 3]``: ``(text, box corners, confidence)``,
        top to bottom as the detector orders them. A frame without text gives ``[]``."""
        fitted, scale = fit_frame(frame)
        boxes = self.detect(fitted)
        return self.lines(boxes, self.recognise(fitted, boxes), scale)

    def lines(self, boxes: list[np.ndarray], results: list[tuple[str, float]],
              scale: float = 1.0) -> list[tuple[str, tuple[tuple[int, int], ...], float]]:
        """Recognised boxes as kept lines: normalised text, corners in the original frame's
        pixels (``scale``: what :func:`fit_frame` scaled it by), confident enough."""
        kept = []
        for box, (text, score) in zip(boxes, results, strict=True):
            text = normalise_line(text)
            if text and score >= self.min_score:
                kept.append((text, tuple((round(float(x) / scale), round(float(y) / scale)) for x, y in box), score))
        return kept


def fit_frame(frame: np.ndarray) -> tuple[np.ndarray, float]:
    """``frame`` scaled down to :data:`MAX_SIDE` on its longest side (unchanged when smaller),
    and the scale applied."""
    if max(frame.shape[:2]) <= MAX_SIDE:
        return frame, 1.0
    import cv2  # noqa: PLC0415  (the ocr extra)

    scale = MAX_SIDE / max(frame.shape[:2])
    size = (round(frame.shape[1] * scale), round(frame.shape[0] * scale))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA), scale


def sample_count(span_s: float, every_s: float = DEFAULT_EVERY_S) -> int:
    """Frames read from a span of ``span_s`` seconds: one per whole ``every_s`` seconds, at least
    one (a 3 s clip reads its middle frame, a 4 s window two), at most :data:`MAX_FRAMES_PER_ITEM`."""
    if every_s <= 0:
        raise ValueError(f"the text channel's sampling interval must be positive, got {every_s}")
    return max(1, min(MAX_FRAMES_PER_ITEM, math.floor(span_s / every_s + 1e-9)))


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


@dataclass
class _Reading:
    """The last frame read in full: the frame as read, its thumbnail, its boxes and their readings."""

    frame: np.ndarray
    thumb: np.ndarray
    boxes: list[np.ndarray]
    results: list[tuple[str, float]]
    lines: list[tuple[str, Any, float]]


def _same_box(box: np.ndarray, frame: np.ndarray, last: _Reading) -> tuple[str, float] | None:
    """The last reading of ``box`` when the last frame had a box at the same place (every corner
    within :data:`BOX_SHIFT` pixels) whose pixels barely changed; None: read it again."""
    for old, result in zip(last.boxes, last.results, strict=True):
        if float(np.abs(old - box).max()) > BOX_SHIFT:
            continue
        x0, y0 = np.floor(box.min(axis=0)).astype(int).clip(0)
        x1, y1 = np.ceil(box.max(axis=0)).astype(int)
        now, before = frame[y0:y1, x0:x1], last.frame[y0:y1, x0:x1]
        if now.size and float(np.abs(now.astype(np.int16) - before.astype(np.int16)).mean()) < SAME_BOX:
            return result
    return None


def _read_frame(reader: OcrReader, frame: np.ndarray, last: _Reading | None) -> _Reading:
    """Read one sampled frame, reusing what ``last`` (the item's previous full reading) already
    read: all its lines when the frame looks the same, else each unchanged box's text."""
    fitted, scale = fit_frame(frame)
    thumb = thumbnail(fitted)
    if last is not None and last.frame.shape == fitted.shape and float(np.abs(thumb - last.thumb).mean()) < SAME_FRAME:
        reader.counts["reused_frames"] += 1
        return last
    boxes = reader.detect(fitted)
    known = [_same_box(box, fitted, last) if last is not None and last.frame.shape == fitted.shape else None
             for box in boxes]
    fresh = iter(reader.recognise(fitted, [box for box, result in zip(boxes, known, strict=True) if result is None]))
    reader.counts["reused_boxes"] += sum(result is not None for result in known)
    results = [result if result is not None else next(fresh) for result in known]
    return _Reading(fitted, thumb, boxes, results, reader.lines(boxes, results, scale))


def read_span(reader: OcrReader, path: str | os.PathLike[str], start: float | None = None,
              end: float | None = None, every_s: float = DEFAULT_EVERY_S) -> dict[str, Any]:
    """The on-screen text of a video (or its span ``[start, end]`` in seconds).

    Work is reused where the picture did not change: a sampled frame whose thumbnail is within
    :data:`SAME_FRAME` of the last frame read takes its lines; otherwise the detector runs and a
    box at the same place as one of the last frame's, over unchanged pixels, keeps its text (only
    new or changed boxes are recognised); a frame this reader read for an overlapping window of
    the same file is not read again.

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
    key_of_file = file_key(path)
    read: list[tuple[float, list[tuple[str, Any, float]]]] = []
    seen: set[int] = set()  # the same frame index twice (a span shorter than the sampling) is read once
    last: _Reading | None = None
    for frame, index, time in zip(frames.numpy(), info["indices"], info["times"], strict=True):
        if index in seen:
            continue
        seen.add(index)
        key = (*key_of_file, int(index))
        if key in reader.recent:
            reader.recent.move_to_end(key)
            reader.counts["reused_frames"] += 1
            read.append((round(float(time), 3), reader.recent[key]))
            continue
        try:
            last = _read_frame(reader, frame, last)
        except Exception as exc:  # noqa: BLE001  (one unreadable frame never fails the item)
            notes.append(f"frame at {float(time):.2f} s: {type(exc).__name__}: {exc}")
            logger.warning("text channel: %s frame at %.2f s: %s", path, float(time), exc)
            continue
        read.append((round(float(time), 3), last.lines))
        reader.recent[key] = last.lines
        while len(reader.recent) > RECENT_FRAMES:
            reader.recent.popitem(last=False)
    if read and not any(lines for _, lines in read):
        notes.append("no text")
    return {"lines": [line.to_dict() for line in merge_repeats(read)], "frames": len(read), "notes": notes}
