"""The synthetic corpus's written layer: titles, signs and captions rendered into clips.

A clip with writing shows a short text (e.g. "Chapter 3", "OPEN 24 HOURS", "Harbor Lantern")
drawn with one of the fonts available offline (Pillow's built-in font, and the DejaVu TrueType
fonts Debian's ``fonts-dejavu-core`` installs), at a size, position and colour drawn at random;
some texts scroll across the frame. The clip's caption then refers to it ("... under a title that
reads Chapter 3"), so the text channel has something to find and the evaluation can split
queries into picture-only and text-mentioning ones.

Everything is decided at planning time (:func:`plan_writing`, a pure function of the random
stream) and drawn per frame by :func:`draw_writing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: How each kind of writing is shown, and how a caption refers to it.
KINDS: dict[str, str] = {
    "title": "under a title that reads {text}",
    "sign": "next to a sign saying {text}",
    "caption": "with the caption {text}",
}
#: TrueType fonts used when installed (Debian: fonts-dejavu-core); Pillow's own font is always there.
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf",
)
DEFAULT_FONT = "pillow-default"
_WORDS = (
    "harbor", "lantern", "meadow", "summit", "falcon", "orchard", "canyon", "harvest", "glacier", "market",
    "station", "garden", "bakery", "museum", "theatre", "library", "stadium", "forest", "river", "castle",
)
_PATTERNS = ("Chapter {n}", "OPEN {n} HOURS", "{W} {n}", "{W} {V}", "Exit {n}", "Room {n}", "{W} SALE")
_MAX_TRIES = 10_000  # the patterns give a few thousand distinct texts
_INK = {"white": (250, 250, 250), "yellow": (250, 225, 40), "cyan": (60, 230, 240), "black": (10, 10, 10)}


@dataclass(frozen=True)
class Writing:
    """Text drawn over a clip: ``x``/``y`` are the top-left corner as fractions of the frame,
    ``height`` the font size as a fraction of the frame height, ``scroll`` how far (fraction of
    the frame width) the text moves left over the clip, ``plate`` whether it sits on a box."""

    text: str
    kind: str
    font: str
    height: float
    x: float
    y: float
    ink: str
    plate: bool
    scroll: float = 0.0

    def phrase(self) -> str:
        """How a caption mentions it."""
        return KINDS[self.kind].format(text=self.text)


def available_fonts() -> tuple[str, ...]:
    """Pillow's built-in font and the TrueType fonts of :data:`FONT_CANDIDATES` that exist here."""
    return (DEFAULT_FONT, *(path for path in FONT_CANDIDATES if Path(path).is_file()))


@lru_cache(maxsize=64)
def _font(name: str, pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if name == DEFAULT_FONT:
        return ImageFont.load_default(size=pixels)
    return ImageFont.truetype(name, pixels)


def _text(rng: np.random.Generator) -> str:
    pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    first, second = (_WORDS[int(i)] for i in rng.choice(len(_WORDS), size=2, replace=False))
    return pattern.format(n=int(rng.integers(2, 100)), W=first.capitalize(), V=second.capitalize())


def plan_writing(rng: np.random.Generator, taken: set[str], fonts: tuple[str, ...] | None = None) -> Writing:
    """A random writing whose text is not in ``taken`` (which it joins), so no two clips share one."""
    for _ in range(_MAX_TRIES):
        if (text := _text(rng)) not in taken:
            break
    else:
        raise ValueError(f"cannot draw another distinct on-screen text after {len(taken)}: ask for fewer written clips")
    taken.add(text)
    fonts = fonts or available_fonts()
    kind = tuple(KINDS)[int(rng.integers(len(KINDS)))]
    height = float(rng.uniform(0.11, 0.16))
    y = {"title": rng.uniform(0.04, 0.12), "sign": rng.uniform(0.35, 0.55), "caption": rng.uniform(0.78, 0.84)}[kind]
    ink = tuple(_INK)[int(rng.integers(len(_INK) - 1))]  # black only on a plate
    plate = bool(rng.random() < 0.4)
    if plate:
        ink = "black"
    return Writing(
        text=text,
        kind=kind,
        font=fonts[int(rng.integers(len(fonts)))],
        height=height,
        x=float(rng.uniform(0.03, 0.12)),
        y=float(y),
        ink=ink,
        plate=plate,
        scroll=float(rng.uniform(0.05, 0.15)) if rng.random() < 0.3 else 0.0,
    )


def draw_writing(frame: np.ndarray, writing: Writing, index: int, last: int) -> np.ndarray:
    """``frame`` (uint8 ``[H, W, 3]``) with the writing drawn as at frame ``index`` of ``0..last``."""
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    height, width = frame.shape[:2]
    pixels = max(8, round(writing.height * height))
    room = (0.97 - writing.x) * width
    while pixels > 8 and draw.textlength(writing.text, font=_font(writing.font, pixels)) > room:
        pixels -= 1  # long texts get a smaller font rather than leave the frame
    font = _font(writing.font, pixels)
    shift = writing.scroll * width * (index / last if last else 0.0)
    x, y = writing.x * width - shift, writing.y * height
    if writing.plate:
        left, top, right, bottom = draw.textbbox((x, y), writing.text, font=font)
        pad = max(2, round(0.02 * height))
        draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=(235, 235, 225))
    draw.text((x, y), writing.text, font=font, fill=_INK[writing.ink])
    return np.asarray(image)
