"""Retrieval corpora: annotation readers for the standard benchmarks and for plain folders.

The benchmarks ship VindLU-style JSON lists, ``[{"video": relative path, "caption": str |
[str]}, ...]``; what a caption list means depends on the corpus (see the spec's annotation
table): DiDeMo and ActivityNet join the sentences into one paragraph query, MSVD keeps them as
separate ground-truth captions. :data:`PRESETS` records that, the text length and the frame
sampling per corpus, so evaluation code never special-cases a dataset name.

Missing video files are reported and dropped rather than fatal, because public copies of the
benchmarks are routinely incomplete; an annotation file whose videos are *all* missing almost
always means ``--videos`` points at the wrong folder, and that is an error.

Captions are cut at :data:`MAX_CAPTION_CHARS` characters when read (a warning says how many, once
per file): the text tower reads a few dozen tokens, and a caption of megabytes would otherwise
travel into every index record, search answer and tokenizer call.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts"}
)
#: Longest caption kept, in characters (the longest preset reads 150 tokens, well under this).
MAX_CAPTION_CHARS = 4000
_EXPECTED_FIELDS = (
    'expected fields: "video" (path relative to the videos root), "caption" (string or list of '
    'strings), optional "label", "start", "end" (seconds)'
)


@dataclass(frozen=True)
class CorpusPreset:
    """How one benchmark's annotations are read and its clips sampled.

    ``join_captions``: a caption list is one paragraph query (joined with spaces) instead of
    several separate ground-truth captions.
    """

    name: str
    join_captions: bool
    max_text_len: int
    sample: str = "middle"
    max_seconds: float | None = None


PRESETS: dict[str, CorpusPreset] = {
    preset.name: preset
    for preset in (
        CorpusPreset("msrvtt", join_captions=False, max_text_len=32),
        CorpusPreset("didemo", join_captions=True, max_text_len=64, max_seconds=30.0),
        CorpusPreset("anet", join_captions=True, max_text_len=150),
        CorpusPreset("lsmdc", join_captions=False, max_text_len=96),
        CorpusPreset("msvd", join_captions=False, max_text_len=64),
        CorpusPreset("generic", join_captions=False, max_text_len=64),
    )
}


@dataclass
class CorpusItem:
    """One video (or a ``[start, end]`` moment of it) and its captions."""

    video: str
    captions: list[str]
    label: str | None = None
    start: float | None = None
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Corpus:
    """The readable items of an annotation file, plus what was listed but not found on disk."""

    name: str
    root: Path
    items: list[CorpusItem]
    missing: list[str]
    max_text_len: int
    sample: str
    max_seconds: float | None

    def texts(self) -> list[tuple[str, int]]:
        """Every caption as a text-to-video query: ``(caption, index of its ground-truth video)``."""
        return [(caption, index) for index, item in enumerate(self.items) for caption in item.captions]

    def paths(self) -> list[Path]:
        """``root / video`` for every item, in item order (absolute ``video`` paths stay absolute)."""
        return [self.root / item.video for item in self.items]

    def window(self, index: int) -> tuple[float, float] | None:
        """The item's ``(start, end)`` moment in seconds, or ``None`` for the whole video."""
        item = self.items[index]
        if item.start is None or item.end is None:
            return None
        return (item.start, item.end)


# Caption cleanings a model directory can name (``text_cleaning`` in its config.json). The text
# tower was trained on captions cleaned one way; queries and evaluation captions must be cleaned
# the same way, so the rule belongs to the model, not to the corpus or the command.
CAPTION_CLEANINGS = ("umt", "strip_punctuation")
DEFAULT_CAPTION_CLEANING = "umt"

# The characters UMT/VideoMamba's caption preprocessing deletes (everything else reaches the
# tokenizer: "&", "%", "—", "’" become tokens of their own or [UNK]).
_UMT_DELETED = str.maketrans("", "", ",.'!?\"()*#:;~")
_UMT_SPACED = str.maketrans({"-": " ", "/": " "})
_WHITESPACE_RUNS = re.compile(r"\s{2,}")


def clean_caption_umt(text: str) -> str:
    """UMT/VideoMamba's caption preprocessing (``pre_text`` in their ``dataset/utils.py``).

    Lower-cases; deletes ``, . ' ! ? " ( ) * # : ; ~`` (ASCII only); turns ``-`` and ``/`` into
    spaces and ``<person>`` into ``person``; replaces each run of two or more whitespace
    characters by one space (a single newline or tab is kept: the tokenizer splits on it anyway);
    drops trailing newlines, then leading and trailing spaces. The order of the steps matters
    (``"<per.son>"`` becomes ``"person"``) and is the authors'.
    """
    text = text.lower().translate(_UMT_DELETED).translate(_UMT_SPACED).replace("<person>", "person")
    return _WHITESPACE_RUNS.sub(" ", text).rstrip("\n").strip(" ")


def clean_caption_strip_punctuation(text: str) -> str:
    """vtr's earlier rule, kept for model directories that name it: lower-case, every Unicode
    dash and "/" to a space, every ASCII and Unicode punctuation mark removed, whitespace runs
    collapsed. "don’t" and "don't" clean alike; it is not what the official checkpoints saw.
    """
    chars = []
    for ch in text.lower():
        category = unicodedata.category(ch)
        if ch == "/" or category == "Pd":
            chars.append(" ")
        elif ch in string.punctuation or category.startswith("P"):
            continue
        else:
            chars.append(ch)
    return " ".join("".join(chars).split())


_CLEANERS = {"umt": clean_caption_umt, "strip_punctuation": clean_caption_strip_punctuation}


def check_caption_cleaning(name: str) -> str:
    """``name`` if it is a known caption cleaning, else a ValueError listing them."""
    if name not in _CLEANERS:
        raise ValueError(f"unknown caption cleaning {name!r} (known: {', '.join(CAPTION_CLEANINGS)})")
    return name


def clean_caption(text: str, cleaning: str = DEFAULT_CAPTION_CLEANING) -> str:
    """``text`` cleaned by the named rule (:data:`CAPTION_CLEANINGS`), as the tokenizer receives it."""
    return _CLEANERS[check_caption_cleaning(cleaning)](text)


def is_blank_caption(text: str, cleaning: str = DEFAULT_CAPTION_CLEANING) -> bool:
    """Whether nothing but whitespace is left of ``text`` after cleaning: it would match anything."""
    return not clean_caption(text, cleaning).strip()


# ----------------------------------------------------------------------------------------------
# annotation readers


def _read_json_list(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of entries, got a {type(data).__name__}; {_EXPECTED_FIELDS}"
        )
    return data


def _read_jsonl(path: Path) -> list[Any]:
    entries = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {line_number} is not valid JSON ({exc})") from exc
    return entries


def _read_csv(
    path: Path, required: tuple[str, ...] = ("video", "caption"), fields: str = _EXPECTED_FIELDS
) -> list[Any]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not set(required) <= columns:
            raise ValueError(f"{path}: CSV columns are {sorted(columns)}; {fields}")
        entries = []
        for row in reader:
            # empty optional cells mean "absent", so they do not turn into "" labels or bad times
            entries.append({key: value for key, value in row.items() if value not in (None, "")})
    return entries


_READERS = {".json": _read_json_list, ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".csv": _read_csv}


def _shown(entry: Any, limit: int = 200) -> str:
    """An entry for an error message, cut short (an entry may hold megabytes of caption)."""
    text = repr(entry)
    return text if len(text) <= limit else text[:limit] + "..."


def _optional_seconds(entry: dict[str, Any], key: str, index: int) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"entry {index}: {key!r} must be a number of seconds, got {_shown(value)}: {_shown(entry)}"
        ) from None
    if not math.isfinite(seconds):
        raise ValueError(f"entry {index}: {key!r} must be a finite number of seconds, got {value!r}: "
                         f"{_shown(entry)}")
    return seconds


def _parse_entry(entry: Any, index: int, preset: CorpusPreset) -> tuple[CorpusItem, bool]:
    """Validate one annotation entry and apply the preset's caption rule; also says whether a
    caption was cut at :data:`MAX_CAPTION_CHARS`."""
    if not isinstance(entry, dict) or "video" not in entry or "caption" not in entry:
        raise ValueError(
            f"entry {index} is not an object with 'video' and 'caption'; {_EXPECTED_FIELDS}: {_shown(entry)}"
        )
    video = entry["video"]
    if not isinstance(video, str) or not video:
        raise ValueError(f"entry {index}: 'video' must be a non-empty path string: {_shown(entry)}")
    caption = entry["caption"]
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(
            f"entry {index}: 'caption' must be a string or a non-empty list of strings: {_shown(entry)}"
        )
    if any(not c.strip() for c in captions):
        raise ValueError(f"entry {index} ({video[:200]}) has an empty caption: {_shown(entry)}")
    if preset.join_captions:
        captions = [" ".join(c.strip() for c in captions)]
    cut = any(len(c) > MAX_CAPTION_CHARS for c in captions)
    captions = [c[:MAX_CAPTION_CHARS] for c in captions]
    start = _optional_seconds(entry, "start", index)
    end = _optional_seconds(entry, "end", index)
    if (start is None) != (end is None) or (start is not None and not 0 <= start < end):
        raise ValueError(
            f"entry {index}: 'start' and 'end' must both be given with 0 <= start < end: {_shown(entry)}"
        )
    label = entry.get("label")
    extra = {
        key: value for key, value in entry.items() if key not in ("video", "caption", "label", "start", "end")
    }
    item = CorpusItem(
        video=video,
        captions=list(captions),
        label=None if label is None else str(label),
        start=start,
        end=end,
        extra=extra,
    )
    return item, cut


def _parse_entries(entries: list[Any], preset: CorpusPreset, path: Path) -> list[CorpusItem]:
    """Every entry of the annotation file ``path`` parsed; an invalid one is a ValueError that
    names the file and the entry, and cut captions are reported in one warning."""
    items, cut = [], 0
    for index, entry in enumerate(entries):
        try:
            item, was_cut = _parse_entry(entry, index, preset)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        items.append(item)
        cut += was_cut
    if cut:
        logger.warning("%d caption(s) in %s are longer than %d characters and were cut there", cut, path,
                       MAX_CAPTION_CHARS)
    return items


def _folder_items(videos_root: Path) -> list[CorpusItem]:
    """Every video file under the root (recursively, sorted), with no captions."""
    if not videos_root.is_dir():
        raise FileNotFoundError(f"videos folder not found: {videos_root}")
    found = sorted(
        path for path in videos_root.rglob("*") if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file()
    )
    if not found:
        extensions = " ".join(sorted(VIDEO_EXTENSIONS))
        raise FileNotFoundError(f"no video files ({extensions}) found under {videos_root}")
    return [CorpusItem(video=path.relative_to(videos_root).as_posix(), captions=[]) for path in found]


def load_corpus(
    dataset: str,
    ann_file: str | Path | None,
    videos_root: str | Path,
    check_files: bool = True,
) -> Corpus:
    """Read a benchmark annotation file (or a folder of videos) into a :class:`Corpus`.

    Args:
        dataset: a key of :data:`PRESETS` (``msrvtt``, ``didemo``, ``anet``, ``lsmdc``, ``msvd``,
            ``generic``).
        ann_file: VindLU JSON list (``.json``), JSON lines (``.jsonl``/``.ndjson``) or CSV
            (columns ``video,caption[,label,start,end]``); ``None`` lists every video file under
            ``videos_root`` with no captions.
        videos_root: the folder the annotation's video paths are relative to.
        check_files: drop entries whose file is missing (listed in ``corpus.missing``).

    Raises:
        KeyError: unknown dataset name.
        FileNotFoundError: the annotation file or the videos folder does not exist, or none of
            the listed videos does.
        ValueError: the annotation file has another shape or an entry is invalid.
    """
    if dataset not in PRESETS:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[dataset]
    root = Path(videos_root)

    if ann_file is None:
        items = _folder_items(root)
    else:
        ann_path = Path(ann_file)
        if not ann_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {ann_path}")
        reader = _READERS.get(ann_path.suffix.lower())
        if reader is None:
            raise ValueError(f"{ann_path}: unsupported annotation format; expected one of {sorted(_READERS)}")
        entries = reader(ann_path)
        if not entries:
            raise ValueError(f"{ann_path} contains no entries")
        items = _parse_entries(entries, preset, ann_path)

    missing: list[str] = []
    if check_files and ann_file is not None:
        exists = [(root / item.video).is_file() for item in items]
        present = [item for item, found in zip(items, exists, strict=True) if found]
        missing = [item.video for item, found in zip(items, exists, strict=True) if not found]
        if not present:
            raise FileNotFoundError(
                f"none of the {len(items)} videos listed in {ann_file} exist under {root} "
                f"(looked for e.g. {root / items[0].video}); check that --videos points at the folder "
                "the annotation's video paths are relative to"
            )
        if missing:
            logger.warning(
                "%d of %d videos listed in %s are missing under %s and are skipped (first: %s)",
                len(missing),
                len(items),
                ann_file,
                root,
                missing[0],
            )
        items = present

    return Corpus(
        name=dataset,
        root=root,
        items=items,
        missing=missing,
        max_text_len=preset.max_text_len,
        sample=preset.sample,
        max_seconds=preset.max_seconds,
    )


# ----------------------------------------------------------------------------------------------
# image-caption pairs (images trained as one-frame videos)

_IMAGE_FIELDS = (
    'expected fields: "image" (path relative to the image root), "caption" (string or list of strings)'
)


@dataclass
class ImageCaptions:
    """The image-caption pairs of an annotation file whose image files exist."""

    root: Path
    items: list[CorpusItem]      # ``video`` holds the image path relative to ``root``
    missing: list[str]


def load_image_captions(ann_file: str | Path, image_root: str | Path | None = None) -> ImageCaptions:
    """Read image-caption pairs: a VindLU image JSON list ``[{"image": path, "caption": str |
    [str]}, ...]``, JSON lines, or CSV with ``image,caption`` columns.

    ``image_root`` defaults to the annotation's folder. A caption list holds alternative
    captions (training draws one per epoch). Missing image files are reported and skipped.

    Raises:
        FileNotFoundError: the annotation file, or every listed image, is missing.
        ValueError: unsupported format, no entries, or an invalid entry.
    """
    ann_path = Path(ann_file)
    if not ann_path.is_file():
        raise FileNotFoundError(f"image annotation file not found: {ann_path}")
    root = Path(image_root) if image_root else ann_path.parent
    suffix = ann_path.suffix.lower()
    if suffix == ".csv":
        entries = _read_csv(ann_path, ("image", "caption"), _IMAGE_FIELDS)
    elif suffix in _READERS:
        entries = _READERS[suffix](ann_path)
    else:
        raise ValueError(f"{ann_path}: unsupported annotation format; expected one of {sorted(_READERS)}")
    if not entries:
        raise ValueError(f"{ann_path} contains no entries")
    items = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ValueError(f"{ann_path}: entry {index} has no 'image' path; {_IMAGE_FIELDS}: {entry!r}")
        caption = entry.get("caption")
        captions = [caption] if isinstance(caption, str) else caption
        if (not isinstance(captions, list) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise ValueError(
                f"{ann_path}: entry {index}: 'caption' must be a non-empty string or list of them: "
                f"{entry!r}"
            )
        items.append(CorpusItem(video=entry["image"], captions=list(captions)))
    present = [item for item in items if (root / item.video).is_file()]
    missing = [item.video for item in items if not (root / item.video).is_file()]
    if not present:
        raise FileNotFoundError(
            f"none of the {len(items)} images listed in {ann_path} exist under {root} (looked for e.g. "
            f"{root / items[0].video}); check that data.image_root is the folder the image paths are "
            "relative to"
        )
    if missing:
        logger.warning("%d of %d images listed in %s are missing under %s and are skipped (first: %s)",
                       len(missing), len(items), ann_path, root, missing[0])
    return ImageCaptions(root=root, items=present, missing=missing)
