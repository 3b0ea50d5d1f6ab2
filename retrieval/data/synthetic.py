"""The procedural moving-shapes corpus: vtr's built-in dataset, needing no download.

Every clip is drawn with numpy (one or two coloured shapes, each doing one action, over a
solid, gradient or noise background) and encoded as a real h264 mp4 with PyAV, so the demo
exercises exactly the decode path real corpora use. Annotations follow the VindLU JSON format
of the official retrieval code (``train.json`` / ``test.json``), with ``long.json`` describing
multi-scene clips for moment search.

The corpus is built to make retrieval *measurable*:

* the test split holds out whole (colour, shape, action) combinations: no object of a train
  clip ever matches one, and every test clip shows one, so a test query describes a
  combination the model never saw;
* no test caption also describes another test clip (object sets are unique and none is a
  subset of another), so R@1 has one right answer;
* a clip's action ``label`` is what its pixels show: a two-object clip shows a large shape (the
  primary, whose action is the label) and a small one, so the labelled action is the one that
  fills most of the frame;
* a share of the test clips comes in *direction pairs* whose frames are exactly the
  time-reverse of each other (left/right, up/down, clockwise/counter-clockwise,
  growing/shrinking): a model that ignores frame order cannot tell them apart. Exactness comes
  from interpolating every pose with ``(a * (n - i) + b * i) / n``, which gives bit-identical
  floats when start/end and ``i``/``n - i`` are swapped, since IEEE addition and multiplication
  commute.

Training entries whose clip reads differently backwards also carry ``caption_reversed``
(paraphrases of the time-reversed scene), which ``data.reversed_share`` in a training recipe
turns into in-batch time-reversed hard negatives.

Everything derives from ``seed`` through separate random streams (held-out set, train, test,
long clips), so changing ``n_train`` does not change the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retrieval.atomic import atomic_write_text
from retrieval.data.spoken import SAMPLE_RATE as SPEECH_RATE
from retrieval.data.spoken import Speech, espeak_available, plan_speech, speak
from retrieval.data.written import Writing, draw_writing, plan_writing

__all__ = [
    "ACTIONS",
    "BACKGROUNDS",
    "COLOURS",
    "REVERSE_ACTION",
    "SHAPES",
    "SIZES",
    "Background",
    "CorpusPlan",
    "Pose",
    "RenderJob",
    "Scene",
    "ShapeObject",
    "generate_corpus",
    "plan_corpus",
    "render_job",
    "render_scene",
]

# ----------------------------------------------------------------------------------------------
# vocabulary

ACTIONS: tuple[str, ...] = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "rotating clockwise",
    "rotating counter-clockwise",
    "growing",
    "shrinking",
    "blinking",
    "bouncing",
)
# Objects are bright and saturated; backgrounds stay dark, so every colour reads on every backdrop.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 70),
    "blue": (40, 110, 255),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "purple": (165, 65, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Solid background tones; gradients and noise textures are mixed from the same dark tones.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 12),
    "gray": (82, 82, 82),
    "navy": (20, 26, 82),
    "brown": (80, 48, 24),
}

REVERSE_ACTION: dict[str, str] = {
    "moving left": "moving right",
    "moving right": "moving left",
    "moving up": "moving down",
    "moving down": "moving up",
    "rotating clockwise": "rotating counter-clockwise",
    "rotating counter-clockwise": "rotating clockwise",
    "growing": "shrinking",
    "shrinking": "growing",
}
# The half of each reversible pair that the placement code places directly; the other half is
# placed as a forward object with start and end swapped (``ShapeObject.reversed``).
_FORWARD_ACTIONS: tuple[str, ...] = ("moving right", "moving down", "rotating clockwise", "growing")
_ROTATIONS = ("rotating clockwise", "rotating counter-clockwise")
_SCALINGS = ("growing", "shrinking")
_HORIZONTAL = ("moving left", "moving right")
_VERTICAL = ("moving up", "moving down", "bouncing")

# (colour, shape, action): the unit held out of training
Triple = tuple[str, str, str]
# (colour, shape, size, action): one object as a caption describes it
ObjectKey = tuple[str, str, str, str]

# A circle looks the same at every angle, so it never rotates.
VALID_TRIPLES: tuple[Triple, ...] = tuple(
    (colour, shape, action)
    for colour in COLOURS
    for shape in SHAPES
    for action in ACTIONS
    if not (shape == "circle" and action in _ROTATIONS)
)

# ----------------------------------------------------------------------------------------------
# geometry and timing (positions and radii are fractions of the frame side)

_BASE_RADIUS = {"small": 0.09, "large": 0.16}
_MIN_SCALE, _MAX_SCALE = 0.55, 1.35
_MARGIN = 0.02
# A rotating clip turns 1.2 symmetry periods: with 8 sampled frames each step is ~0.17 period,
# well under the half period at which clockwise and counter-clockwise become indistinguishable.
_ROTATION_PERIODS = 1.2
# Blinking toggles every 3 frames: the middle frames of 8 segments of a 24-frame clip (stride 3)
# then alternate on/off.
_BLINK_HALF_PERIOD = 3
_BOUNCES = 2
_BOUNCE_MAX_HEIGHT = 0.4
_TWO_OBJECT_SHARE = 0.35
_LONG_SCENE_SECONDS = 4.0

# held-out set: this many forward triples (each with its reverse) plus unpaired ones
_HELD_OUT_PAIRED = 16
_HELD_OUT_UNPAIRED = 8
_PAIR_SHARE = 0.4  # target share of test clips that belong to a direction pair

# independent random streams, so one split's size never changes another split's content
_STREAM_HELD_OUT, _STREAM_TRAIN, _STREAM_TEST, _STREAM_LONG, _STREAM_REVERSED, _STREAM_WRITTEN, _STREAM_SPOKEN = range(7)
_log = logging.getLogger(__name__)

_FORMAT = "vtr-synthetic"
_FORMAT_VERSION = 3  # 2: train entries carry caption_reversed; 3: two-object clips are large + small
_MANIFEST = "corpus.json"
#: The generator's own record in its output folder: the files it wrote (relative paths) with the
#: sha256 of what it wrote. Only a file whose content still has that digest is ever replaced or
#: removed; a non-empty folder without the record is refused.
_MARKER = ".vtr-synthetic"
#: Its private folder beside the record: temporaries are written here and renamed into place, and
#: a receipt (name, sha256) is left for each file before it is renamed, so the files of a run
#: that was killed are still known as its own.
_WORK = ".vtr-synthetic.work"
_MAX_WORKERS = 2  # the target machines have two cores
_POOL_MIN_JOBS = 32  # below this, starting worker processes costs more than it saves
_AUDIO_CHUNK = 1024  # samples per AAC frame

# ----------------------------------------------------------------------------------------------
# scene description


@dataclass(frozen=True)
class Pose:
    """Where an object is at one instant: centre (fractions of the frame), angle (radians,
    positive turns clockwise on screen) and scale (times the size's base radius)."""

    x: float
    y: float
    angle: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class ShapeObject:
    """One shape and its action, as the pose at the first and last frame plus the two
    actions that are not an interpolation (blinking, bouncing)."""

    colour: str
    shape: str
    size: str
    action: str
    start: Pose
    end: Pose
    blink_phase: int | None = None
    bounce_height: float = 0.0

    @property
    def key(self) -> ObjectKey:
        return (self.colour, self.shape, self.size, self.action)

    def reversed(self) -> ShapeObject:
        """The same object playing its action backwards in time (left <-> right, ...)."""
        return replace(self, action=REVERSE_ACTION[self.action], start=self.end, end=self.start)


@dataclass(frozen=True)
class Background:
    """A static backdrop; ``name`` is the word captions use (a tone, "gradient" or "noisy")."""

    kind: str  # "solid" | "gradient" | "noise"
    name: str
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]
    angle: float = 0.0
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """What one clip (or one segment of a long clip) shows; the first object is the primary, whose
    action is the clip's label (of two objects, the large one)."""

    background: Background
    objects: tuple[ShapeObject, ...]
    writing: Writing | None = None  # text drawn over the clip (the written layer)
    speech: Speech | None = None  # a sentence said over the clip (the spoken layer)

    @property
    def label(self) -> str:
        return self.objects[0].action


@dataclass(frozen=True)
class RenderJob:
    """One video file to write: its scenes played back to back."""

    video: str  # path relative to <out_dir>/videos
    scenes: tuple[Scene, ...]
    frames_per_scene: int


@dataclass
class CorpusPlan:
    """Everything about a corpus except its pixels: annotations and what to render."""

    held_out: tuple[Triple, ...]
    train: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)
    long: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[RenderJob] = field(default_factory=list)

    def job(self, video: str) -> RenderJob:
        """The render job of a video path as written in the annotations."""
        return next(job for job in self.jobs if job.video == video)


# ----------------------------------------------------------------------------------------------
# rendering


def _lerp(a: float, b: float, i: int, last: int) -> float:
    # Symmetric in (a, i) <-> (b, last - i) down to the last bit: see the module docstring.
    return (a * (last - i) + b * i) / last


def _pose_at(obj: ShapeObject, i: int, last: int) -> Pose:
    s, e = obj.start, obj.end
    y = _lerp(s.y, e.y, i, last)
    if obj.bounce_height:
        y -= obj.bounce_height * abs(math.sin(math.pi * _BOUNCES * i / last))
    return Pose(
        x=_lerp(s.x, e.x, i, last),
        y=y,
        angle=_lerp(s.angle, e.angle, i, last),
        scale=_lerp(s.scale, e.scale, i, last),
    )


def _is_visible(obj: ShapeObject, i: int) -> bool:
    return obj.blink_phase is None or ((i + obj.blink_phase) // _BLINK_HALF_PERIOD) % 2 == 0


@dataclass(frozen=True)
class _StarGeometry:
    """A regular polygon or star folded into one half-sector: vertex ``(1, 0)``, the edge's
    outward normal and the angle at which the first vertex points (0 = up)."""

    points: int
    offset: float
    normal: tuple[float, float]

    @classmethod
    def build(cls, points: int, inner_radius: float, offset: float = 0.0) -> _StarGeometry:
        half = math.pi / points
        ex, ey = inner_radius * math.cos(half) - 1.0, inner_radius * math.sin(half)
        length = math.hypot(ex, ey)
        nx, ny = ey / length, -ex / length
        if nx < 0:  # point away from the centre
            nx, ny = -nx, -ny
        return cls(points=points, offset=offset, normal=(nx, ny))


_POLYGONS: dict[str, _StarGeometry] = {
    # inner radius cos(pi/n) puts the inner vertex on the edge midpoint: a convex polygon
    "triangle": _StarGeometry.build(3, math.cos(math.pi / 3)),
    "square": _StarGeometry.build(4, math.cos(math.pi / 4), offset=math.pi / 4),
    "star": _StarGeometry.build(5, 0.42),
}
_CROSS_HALF_WIDTH = 0.32
# the symmetry period of each rotating shape: how far a turn can go before it looks the same
_SYMMETRY_PERIOD = {
    "triangle": 2 * math.pi / 3,
    "square": math.pi / 2,
    "star": 2 * math.pi / 5,
    "cross": math.pi / 2,
}


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to a unit-radius shape (negative inside), ``v`` pointing down."""
    if shape == "circle":
        return np.sqrt(u * u + v * v) - 1.0
    if shape == "cross":
        bar_h = np.maximum(np.abs(u) - 1.0, np.abs(v) - _CROSS_HALF_WIDTH)
        bar_v = np.maximum(np.abs(u) - _CROSS_HALF_WIDTH, np.abs(v) - 1.0)
        return np.minimum(bar_h, bar_v)
    geometry = _POLYGONS[shape]
    sector = 2 * math.pi / geometry.points
    phi = np.mod(np.arctan2(u, -v) - geometry.offset, sector)
    folded = np.minimum(phi, sector - phi)  # angle from the nearest outer vertex
    radius = np.sqrt(u * u + v * v)
    nx, ny = geometry.normal
    return (radius * np.cos(folded) - 1.0) * nx + radius * np.sin(folded) * ny


def _draw_object(canvas: np.ndarray, obj: ShapeObject, pose: Pose) -> None:
    """Alpha-blend one object into ``canvas`` (float32 [H, W, 3]), touching only its bounding box."""
    side = canvas.shape[0]
    radius = _BASE_RADIUS[obj.size] * pose.scale * side
    cx, cy = pose.x * side, pose.y * side
    reach = radius * 1.1 + 2  # the cross's corners stick out slightly past the unit radius
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, side)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, side)
    if x0 >= x1 or y0 >= y1:
        return
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / radius
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / radius
    u, v = xs[None, :], ys[:, None]
    cos, sin = math.cos(pose.angle), math.sin(pose.angle)
    # rotate the pixel offsets by -angle, which turns the drawn shape by +angle (clockwise)
    distance = _signed_distance(obj.shape, cos * u + sin * v, cos * v - sin * u) * radius
    alpha = np.clip(0.5 - distance, 0.0, 1.0)[..., None]  # one pixel of anti-aliasing
    patch = canvas[y0:y1, x0:x1]
    patch += alpha * (np.asarray(COLOURS[obj.colour], dtype=np.float32) - patch)


def _bilinear_matrix(side: int, grid: int) -> np.ndarray:
    """[side, grid] weights that upsample a coarse grid linearly to ``side`` samples."""
    position = (np.arange(side) + 0.5) / side * (grid - 1)
    low = np.minimum(position.astype(int), grid - 2)
    weight = position - low
    matrix = np.zeros((side, grid))
    matrix[np.arange(side), low] = 1.0 - weight
    matrix[np.arange(side), low + 1] = weight
    return matrix


def _render_background(background: Background, side: int) -> np.ndarray:
    colour_a = np.asarray(background.colour_a, dtype=np.float32)
    colour_b = np.asarray(background.colour_b, dtype=np.float32)
    if background.kind == "solid":
        return np.broadcast_to(colour_a, (side, side, 3)).copy()
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5
    if background.kind == "gradient":
        t = coords[None, :] * math.cos(background.angle) + coords[:, None] * math.sin(background.angle)
        t = np.clip(t + 0.5, 0.0, 1.0)[..., None]
        return colour_a + t * (colour_b - colour_a)
    rng = np.random.default_rng(background.noise_seed)
    coarse = rng.uniform(-1.0, 1.0, size=(5, 5, 3))
    upsample = _bilinear_matrix(side, 5)
    smooth = (upsample @ coarse.transpose(2, 0, 1) @ upsample.T).transpose(1, 2, 0)
    grain = rng.uniform(-1.0, 1.0, size=(side, side, 1))
    return np.clip(colour_a + 28.0 * smooth + 10.0 * grain, 0, 255).astype(np.float32)


def render_scene(scene: Scene, size: int, num_frames: int) -> np.ndarray:
    """Draw a scene as ``num_frames`` RGB frames, uint8 ``[T, size, size, 3]``.

    Pure and deterministic: the same scene always gives the same pixels, which is what lets
    tests compare direction pairs frame by frame without the lossy codec in between.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2, got {num_frames}")
    background = _render_background(scene.background, size)
    last = num_frames - 1
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i in range(num_frames):
        canvas = background.copy()
        for obj in scene.objects:
            if _is_visible(obj, i):
                _draw_object(canvas, obj, _pose_at(obj, i, last))
        frames[i] = np.rint(np.clip(canvas, 0, 255))
        if scene.writing is not None:
            frames[i] = draw_writing(frames[i], scene.writing, i, last)
    return frames


def render_job(job: RenderJob, size: int) -> np.ndarray:
    """All frames of one video: its scenes back to back."""
    return np.concatenate([render_scene(scene, size, job.frames_per_scene) for scene in job.scenes])


# ----------------------------------------------------------------------------------------------
# scene sampling

_Region = tuple[float, float, float, float]  # x0, y0, x1, y1
_FULL_FRAME: _Region = (0.0, 0.0, 1.0, 1.0)


def _layout(actions: list[str], rng: np.random.Generator) -> list[_Region]:
    """One region per object. Two objects split the frame so they never overlap: stacked when
    one moves sideways (it keeps the full width), side by side when one moves vertically."""
    if len(actions) == 1:
        return [_FULL_FRAME]
    horizontal = any(a in _HORIZONTAL for a in actions)
    vertical = any(a in _VERTICAL for a in actions)
    stacked = horizontal or (not vertical and rng.random() < 0.5)
    halves: list[_Region] = (
        [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
        if stacked
        else [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    )
    if rng.random() < 0.5:
        halves.reverse()
    return halves


def _place(key: ObjectKey, region: _Region, rng: np.random.Generator) -> ShapeObject:
    """Choose start/end poses for an object doing its action inside ``region``."""
    colour, shape, size, action = key
    if action in REVERSE_ACTION and action not in _FORWARD_ACTIONS:
        return _place((colour, shape, size, REVERSE_ACTION[action]), region, rng).reversed()
    extent = _BASE_RADIUS[size] * (_MAX_SCALE if action in _SCALINGS else 1.0)
    x_lo, y_lo = region[0] + _MARGIN + extent, region[1] + _MARGIN + extent
    x_hi, y_hi = region[2] - _MARGIN - extent, region[3] - _MARGIN - extent
    x, y = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
    start = end = Pose(x, y)
    blink_phase, bounce_height = None, 0.0
    if action == "moving right":
        slack = (x_hi - x_lo) * 0.15
        start, end = (
            Pose(x_lo + float(rng.uniform(0, slack)), y),
            Pose(x_hi - float(rng.uniform(0, slack)), y),
        )
    elif action == "moving down":
        slack = (y_hi - y_lo) * 0.15
        start, end = (
            Pose(x, y_lo + float(rng.uniform(0, slack))),
            Pose(x, y_hi - float(rng.uniform(0, slack))),
        )
    elif action == "rotating clockwise":
        angle = float(rng.uniform(0, 2 * math.pi))
        turn = _ROTATION_PERIODS * _SYMMETRY_PERIOD[shape]
        start, end = Pose(x, y, angle=angle), Pose(x, y, angle=angle + turn)
    elif action == "growing":
        start, end = Pose(x, y, scale=_MIN_SCALE), Pose(x, y, scale=_MAX_SCALE)
    elif action == "blinking":
        blink_phase = int(rng.integers(2 * _BLINK_HALF_PERIOD))
    elif action == "bouncing":
        start = end = Pose(x, y_hi)  # bounce off the region's floor
        bounce_height = min(_BOUNCE_MAX_HEIGHT, y_hi - y_lo)
    return ShapeObject(colour, shape, size, action, start, end, blink_phase, bounce_height)


def _random_background(rng: np.random.Generator) -> Background:
    tones = list(BACKGROUNDS)
    kind = str(rng.choice(["solid", "solid", "gradient", "noise"]))
    first, second = (str(t) for t in rng.choice(tones, size=2, replace=False))
    if kind == "solid":
        return Background("solid", first, BACKGROUNDS[first], BACKGROUNDS[first])
    if kind == "gradient":
        angle = float(rng.uniform(0, 2 * math.pi))
        return Background("gradient", "gradient", BACKGROUNDS[first], BACKGROUNDS[second], angle=angle)
    return Background(
        "noise", "noisy", BACKGROUNDS[first], BACKGROUNDS[first], noise_seed=int(rng.integers(2**31))
    )


def _scene(keys: list[ObjectKey], rng: np.random.Generator) -> Scene:
    background = _random_background(rng)
    regions = _layout([key[3] for key in keys], rng)
    return Scene(background, tuple(_place(key, region, rng) for key, region in zip(keys, regions)))


def _triple(key: ObjectKey) -> Triple:
    return (key[0], key[1], key[3])


def _keys_of(triples: list[Triple] | tuple[Triple, ...]) -> list[ObjectKey]:
    return [(colour, shape, size, action) for colour, shape, action in triples for size in SIZES]


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _pick_where(rng: np.random.Generator, items: list[Any], ok: Callable[[Any], bool]) -> Any:
    """A uniform pick among the items for which ``ok`` holds (by rejection: draw until one does)."""
    while not ok(item := _pick(rng, items)):
        pass
    return item


# ----------------------------------------------------------------------------------------------
# captions

_ACTION_PHRASES: dict[str, tuple[str, ...]] = {
    "moving left": ("moving left", "going to the left", "sliding left", "moving leftwards"),
    "moving right": ("moving right", "going to the right", "sliding right", "moving rightwards"),
    "moving up": ("moving up", "going upwards", "sliding up", "rising"),
    "moving down": ("moving down", "going downwards", "sliding down", "sinking"),
    "rotating clockwise": ("rotating clockwise", "spinning clockwise", "turning clockwise"),
    "rotating counter-clockwise": (
        "rotating counter-clockwise",
        "spinning anticlockwise",
        "turning counterclockwise",
    ),
    "growing": ("growing", "getting bigger", "expanding"),
    "shrinking": ("shrinking", "getting smaller", "contracting"),
    "blinking": ("blinking", "flashing", "flickering on and off"),
    "bouncing": ("bouncing", "hopping", "bouncing around"),
}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
}
_BACKGROUND_PHRASES = {
    "solid": ("on a {name} background", "against a {name} backdrop", "over a plain {name} background"),
    "gradient": ("on a gradient background", "over a colour gradient", "against a shaded backdrop"),
    "noise": ("on a noisy background", "on a textured background", "over a grainy backdrop"),
}
_OBJECT_TEMPLATES = (
    "{det} {size} {colour} {shape} {action}",
    "{det} {size} {colour} {shape} that is {action}",
)
_SINGLE_TEMPLATES = ("{o1}", "{o1} {bg}", "there is {o1}", "a video of {o1}", "a clip of {o1} {bg}")
_DOUBLE_TEMPLATES = ("{o1} and {o2}", "{o1} while {o2}", "{o1} and {o2} {bg}", "two shapes: {o1} and {o2}")


def _describe_object(obj: ShapeObject, rng: np.random.Generator) -> str:
    return _pick(rng, list(_OBJECT_TEMPLATES)).format(
        det=_pick(rng, ["a", "one"]),
        size=_pick(rng, list(_SIZE_WORDS[obj.size])),
        colour=obj.colour,
        shape=_pick(rng, list(_SHAPE_WORDS[obj.shape])),
        action=_pick(rng, list(_ACTION_PHRASES[obj.action])),
    )


def _caption(scene: Scene, rng: np.random.Generator) -> str:
    """One paraphrase naming every object's size, colour, shape and action."""
    objects = list(scene.objects)
    if len(objects) == 2 and rng.random() < 0.5:
        objects.reverse()
    templates = _SINGLE_TEMPLATES if len(objects) == 1 else _DOUBLE_TEMPLATES
    phrases = {f"o{n}": _describe_object(obj, rng) for n, obj in enumerate(objects, start=1)}
    background = _pick(rng, list(_BACKGROUND_PHRASES[scene.background.kind])).format(
        name=scene.background.name
    )
    return _pick(rng, list(templates)).format(bg=background, **phrases)


def _paraphrases(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    captions: list[str] = []
    while len(captions) < count:  # the template space is far larger than 3, so this ends fast
        caption = _caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
    return captions


def _reverse_scene(scene: Scene) -> Scene | None:
    """The scene its clip shows when played backwards, or None when that looks the same
    (no object has a reversible action: blinking and bouncing read the same either way).
    The held-out triples are closed under reversal, so this never shows a held-out one."""
    if not any(o.action in REVERSE_ACTION for o in scene.objects):
        return None
    return replace(scene, objects=tuple(o.reversed() if o.action in REVERSE_ACTION else o for o in scene.objects))


def _attributes(scene: Scene) -> dict[str, Any]:
    return {
        "objects": [
            {"colour": o.colour, "shape": o.shape, "size": o.size, "action": o.action} for o in scene.objects
        ],
        "background": scene.background.name,
    }


# ----------------------------------------------------------------------------------------------
# planning


def _video_name(index: int, count: int) -> str:
    return f"{index:0{max(4, len(str(count - 1)))}d}.mp4"


def _held_out_triples(seed: int) -> tuple[Triple, ...]:
    """The (colour, shape, action) combinations kept out of training, closed under reversal
    so that both halves of a direction pair are unseen."""
    rng = np.random.default_rng([seed, _STREAM_HELD_OUT])
    forward = [t for t in VALID_TRIPLES if t[2] in _FORWARD_ACTIONS]
    unpaired = [t for t in VALID_TRIPLES if t[2] not in REVERSE_ACTION]
    held: set[Triple] = set()
    for index in rng.choice(len(forward), size=_HELD_OUT_PAIRED, replace=False):
        colour, shape, action = forward[index]
        held |= {(colour, shape, action), (colour, shape, REVERSE_ACTION[action])}
    held |= {unpaired[index] for index in rng.choice(len(unpaired), size=_HELD_OUT_UNPAIRED, replace=False)}
    return tuple(sorted(held))


def _plan_train(n_train: int, held_out: tuple[Triple, ...], rng: np.random.Generator) -> list[Scene]:
    held = set(held_out)
    seen_keys = [key for key in _keys_of(VALID_TRIPLES) if _triple(key) not in held]
    large_keys = [key for key in seen_keys if key[2] == "large"]
    scenes = []
    for _ in range(n_train):
        # every clip draws a single-object key first, used or not: the train stream's order is
        # part of the corpus format (changing it changes every corpus built from a seed)
        alone = _pick(rng, seen_keys)
        if rng.random() < _TWO_OBJECT_SHARE:
            # two objects: the labelled primary is large and the other small (and looks different:
            # two same-looking shapes would make captions vague)
            primary = _pick(rng, large_keys)
            second = _pick_where(rng, seen_keys, lambda k, p=primary: k[2] == "small" and k[:2] != p[:2])
            keys = [primary, second]
        else:
            keys = [alone]
        scenes.append(_scene(keys, rng))
    return scenes


def _plan_test(
    n_test: int, held_out: tuple[Triple, ...], rng: np.random.Generator
) -> list[tuple[Scene, int | None]]:
    """Test scenes, each with the index of its direction twin (or None).

    Unambiguity rule: object sets are unique, and an object shown alone appears in no other
    test clip (otherwise its caption would also describe the clip that shows it with another
    object). Direction pairs come first, then single-object clips, then two-object clips of a
    large and a small object, at least one of them held out. Pairs need held-out forward
    objects (32 of them), so their 40% share holds up to n_test = 160 and shrinks beyond.
    """
    all_held_keys = _keys_of(held_out)
    held_keys = [all_held_keys[i] for i in rng.permutation(len(all_held_keys))]
    used: set[ObjectKey] = set()
    planned: list[tuple[Scene, int | None]] = []

    forward_keys = [key for key in held_keys if key[3] in _FORWARD_ACTIONS]
    n_pairs = min(len(forward_keys), n_test // 2, math.ceil(math.ceil(_PAIR_SHARE * n_test) / 2))
    for key in forward_keys[:n_pairs]:
        scene = _scene([key], rng)
        twin = Scene(scene.background, (scene.objects[0].reversed(),))
        first = len(planned)
        planned += [(scene, first + 1), (twin, first)]
        used |= {key, twin.objects[0].key}

    remaining = n_test - len(planned)
    available = [key for key in held_keys if key not in used]
    # about half the rest show one object, keeping a quarter of the free held-out objects to
    # lead the two-object clips
    for key in available[: min((remaining + 1) // 2, len(available) * 3 // 4)]:
        planned.append((_scene([key], rng), None))
        used.add(key)

    # two-object clips: a free held-out object of either size, with a free object of the other
    # size that looks different; the large one comes first (it carries the label)
    object_sets: set[frozenset[ObjectKey]] = set()
    leads = [key for key in held_keys if key not in used]
    partners = [key for key in _keys_of(VALID_TRIPLES) if key not in used]
    candidates = [(a, b) if a[2] == "large" else (b, a)
                  for a in leads for b in partners if a[2] != b[2] and a[:2] != b[:2]]
    for index in rng.permutation(len(candidates)):
        if len(planned) == n_test:
            break
        large, small = candidates[index]
        if frozenset((large, small)) in object_sets:
            continue
        object_sets.add(frozenset((large, small)))
        planned.append((_scene([large, small], rng), None))
    if len(planned) < n_test:
        raise ValueError(
            f"n_test={n_test} is too many: only {len(planned)} test clips with distinct, unambiguous "
            f"captions can be built from the {len(held_out)} held-out combinations"
        )
    return planned


def _plan_long(long_videos: int, rng: np.random.Generator) -> list[list[Scene]]:
    """Multi-scene clips: 3-4 single-object scenes with different actions and backgrounds."""
    videos = []
    for _ in range(long_videos):
        actions = [str(a) for a in rng.choice(ACTIONS, size=int(rng.integers(3, 5)), replace=False)]
        scenes = []
        for action in actions:
            triples = [t for t in VALID_TRIPLES if t[2] == action]
            colour, shape, _ = _pick(rng, triples)
            scenes.append(_scene([(colour, shape, _pick(rng, list(SIZES)), action)], rng))
        videos.append(scenes)
    return videos


def plan_corpus(
    n_train: int = 600,
    n_test: int = 100,
    seed: int = 0,
    num_frames: int = 24,
    fps: int = 8,
    long_videos: int = 4,
    written_share: float = 0.0,
    spoken_share: float = 0.0,
) -> CorpusPlan:
    """Decide every clip, caption and annotation without drawing a pixel (fast, deterministic).

    ``generate_corpus`` renders this plan; tests use it to re-render a clip's exact frames.
    ``written_share`` is the share of test clips that show a title, sign or caption
    (:mod:`retrieval.data.written`) which their caption then mentions; it draws from its own
    random stream, so everything else about the corpus stays the same. ``spoken_share`` likewise
    picks test clips over which a sentence is said (:mod:`retrieval.data.spoken`).
    """
    _validate_counts(n_train, n_test, num_frames, fps, long_videos)
    for name, share in (("written_share", written_share), ("spoken_share", spoken_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {share}")
    held_out = _held_out_triples(seed)
    plan = CorpusPlan(held_out=held_out)

    rng = np.random.default_rng([seed, _STREAM_TRAIN])
    rev_rng = np.random.default_rng([seed, _STREAM_REVERSED])
    for index, scene in enumerate(_plan_train(n_train, held_out, rng)):
        video = f"train/{_video_name(index, n_train)}"
        count = int(rng.integers(2, 4))
        entry: dict[str, Any] = {
            "video": video,
            "caption": _paraphrases(scene, rng, count),
            "label": scene.label,
            "attributes": _attributes(scene),
        }
        backwards = _reverse_scene(scene)
        if backwards is not None:  # what the clip shows played backwards (data.reversed_share)
            entry["caption_reversed"] = _paraphrases(backwards, rev_rng, count)
        plan.train.append(entry)
        plan.jobs.append(RenderJob(video, (scene,), num_frames))

    rng = np.random.default_rng([seed, _STREAM_TEST])
    planned = _plan_test(n_test, held_out, rng)
    # shuffle so that twins are not neighbours; twin indices follow the new order
    order = [int(i) for i in rng.permutation(len(planned))]
    position = {old: new for new, old in enumerate(order)}
    names = [f"test/{_video_name(i, n_test)}" for i in range(n_test)]
    write_rng = np.random.default_rng([seed, _STREAM_WRITTEN])
    with_writing = set(write_rng.permutation(n_test)[: round(written_share * n_test)].tolist())
    texts: set[str] = set()
    speak_rng = np.random.default_rng([seed, _STREAM_SPOKEN])
    with_speech = set(speak_rng.permutation(n_test)[: round(spoken_share * n_test)].tolist())
    sentences: set[str] = set()
    for new, old in enumerate(order):
        scene, twin = planned[old]
        attributes = _attributes(scene)
        attributes["direction_twin"] = None if twin is None else names[position[twin]]
        caption = _caption(scene, rng)
        if new in with_writing:
            scene = replace(scene, writing=plan_writing(write_rng, texts))
            caption = f"{caption} {scene.writing.phrase()}"
            attributes["written"] = {"text": scene.writing.text, "kind": scene.writing.kind,
                                     "font": Path(scene.writing.font).stem, "moving": scene.writing.scroll > 0}
        if new in with_speech:
            scene = replace(scene, speech=plan_speech(speak_rng, sentences))
            caption = f"{caption} {scene.speech.phrase()}"
            attributes["spoken"] = {"text": scene.speech.text, "voice": scene.speech.voice,
                                    "speed": scene.speech.speed, "start": scene.speech.start,
                                    "snr_db": scene.speech.snr_db}
        plan.test.append(
            {
                "video": names[new],
                "caption": caption,
                "label": scene.label,
                "attributes": attributes,
            }
        )
        plan.jobs.append(RenderJob(names[new], (scene,), num_frames))

    rng = np.random.default_rng([seed, _STREAM_LONG])
    scene_frames = max(2, round(_LONG_SCENE_SECONDS * fps))
    for index, scenes in enumerate(_plan_long(long_videos, rng)):
        video = f"long/{_video_name(index, long_videos)}"
        segments = [
            {
                "start": k * scene_frames / fps,
                "end": (k + 1) * scene_frames / fps,
                "caption": _caption(scene, rng),
                "label": scene.label,
            }
            for k, scene in enumerate(scenes)
        ]
        plan.long.append({"video": video, "duration": len(scenes) * scene_frames / fps, "segments": segments})
        plan.jobs.append(RenderJob(video, tuple(scenes), scene_frames))
    return plan


# ----------------------------------------------------------------------------------------------
# writing


def _validate_counts(n_train: int, n_test: int, num_frames: int, fps: int, long_videos: int) -> None:
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    if n_test < 1:
        raise ValueError(f"n_test must be at least 1, got {n_test}")
    if num_frames < 4:
        raise ValueError(f"num_frames must be at least 4, got {num_frames}")
    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}")
    if long_videos < 0:
        raise ValueError(f"long_videos must be >= 0, got {long_videos}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(root: Path, name: str, write: Callable[[Path], None]) -> str:
    """Write ``root/name`` through a temporary in the work folder, leave a receipt of its digest,
    then rename it into place; returns the digest."""
    work = root / _WORK
    temporary = work / f"{name.replace('/', '__')}.tmp-{os.getpid()}"
    write(temporary)
    digest = _sha256(temporary)
    receipt = json.dumps({"name": name, "sha256": digest})
    atomic_write_text(work / "receipts" / f"{name.replace('/', '__')}.json", receipt, durable=False)
    os.replace(temporary, root / name)
    return digest


def _write_text(root: Path, name: str, text: str) -> str:
    return _publish(root, name, lambda path: path.write_text(text, encoding="utf-8"))


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None) -> None:
    """An H.264 clip of ``frames``; with ``audio`` (16 kHz mono int16) also an AAC track."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        # one encoder thread: the pool already keeps every core busy, and it keeps output stable
        stream = container.add_stream(
            "libx264", rate=fps, options={"crf": "18", "preset": "superfast", "threads": "1"}
        )
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=SPEECH_RATE, layout="mono") if audio is not None else None
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
        if sound is not None:
            for at in range(0, len(audio), _AUDIO_CHUNK):
                piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, at : at + _AUDIO_CHUNK]),
                                                   format="s16", layout="mono")
                piece.rate, piece.pts = SPEECH_RATE, at
                container.mux(sound.encode(piece))
            container.mux(sound.encode(None))


def _write_job(task: tuple[RenderJob, str, int, int]) -> tuple[str, str]:
    job, root, size, fps = task
    name = f"videos/{job.video}"
    said = job.scenes[0].speech if len(job.scenes) == 1 else None
    audio = None if said is None else speak(said, job.frames_per_scene / fps)
    return name, _publish(Path(root), name, lambda path: write_mp4(path, render_job(job, size), fps, audio))


def _render_all(root: Path, jobs: list[RenderJob], size: int, fps: int, progress: bool) -> dict[str, str]:
    """Write every clip; returns ``{relative name: sha256}``."""
    # longest first, so a multi-scene clip never ends up alone in the pool's last chunk
    ordered = sorted(jobs, key=lambda job: len(job.scenes) * job.frames_per_scene, reverse=True)
    tasks = [(job, str(root), size, fps) for job in ordered]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(_MAX_WORKERS, cpus)
    if len(tasks) < _POOL_MIN_JOBS or workers < 2:
        return dict(_write_job(task) for task in tqdm(tasks, desc="synthetic corpus", unit="clip",
                                                        disable=not progress))
    # fork (where available) starts workers instantly and, unlike spawn, does not re-import the
    # caller's __main__, so scripts without a main guard work. The pool is created before tqdm
    # starts its monitor thread.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers)
    bar = tqdm(total=len(tasks), desc="synthetic corpus", unit="clip", disable=not progress)
    written: dict[str, str] = {}
    with pool, bar:
        for name, digest in pool.imap_unordered(_write_job, tasks, chunksize=4):
            written[name] = digest
            bar.update()
    return written


def _ours(root: Path, name: str, proofs: dict[str, str]) -> bool:
    """Whether ``root/name`` is a file this generator wrote and nobody changed since."""
    path = root / name
    return name in proofs and path.is_file() and not path.is_symlink() and _sha256(path) == proofs[name]


def _claim(root: Path) -> dict[str, str]:
    """The files this generator wrote into ``root`` before, with their digests (from its record
    and the receipts of an interrupted run).

    A missing or empty folder is claimed as new; a finished corpus written before the record
    existed is recognised by its manifest, but none of its files is proven ours. Any other
    non-empty folder is refused: the generator would overwrite its annotations.
    """
    marker = root / _MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            files = record["files"]
            # a record of an older vtr lists names without digests: nothing in it is proven
            proofs = {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{marker} is damaged; delete the folder {root} to write the corpus again") from None
        for receipt in sorted((root / _WORK / "receipts").glob("*.json")):
            try:
                entry = json.loads(receipt.read_text(encoding="utf-8"))
                proofs.setdefault(str(entry["name"]), str(entry["sha256"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue   # a receipt cut short by the interruption proves nothing
        return proofs
    if not root.is_dir() or not any(root.iterdir()):
        return {}
    try:
        legacy = json.loads((root / _MANIFEST).read_text(encoding="utf-8")).get("format") == _FORMAT
    except (OSError, ValueError, AttributeError):
        legacy = False
    if legacy:
        return {}
    raise ValueError(
        f"{root} is not empty and was not written by the synthetic corpus generator (no {_MARKER}); "
        "choose a new or empty folder"
    )


def _record(root: Path, proofs: dict[str, str]) -> None:
    text = json.dumps({"format": _FORMAT, "files": dict(sorted(proofs.items()))}, indent=1) + "\n"
    atomic_write_text(root / _MARKER, text, durable=False)


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """Whether ``root`` holds a finished corpus built with exactly ``params``."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (manifest.get("format"), manifest.get("version"), manifest.get("params")) != (
        _FORMAT,
        _FORMAT_VERSION,
        params,
    ):
        return False
    counts = {"train": params["n_train"], "test": params["n_test"], "long": params["long_videos"]}
    videos = [
        root / "videos" / split / _video_name(index, count)
        for split, count in counts.items()
        for index in range(count)
    ]
    files = [root / name for name in ("train.json", "test.json", "long.json", "labels.txt")]
    return all(path.is_file() for path in videos + files)


def generate_corpus(
    out_dir: str | os.PathLike[str],
    n_train: int = 600,
    n_test: int = 100,
    seed: int = 0,
    size: int = 128,
    num_frames: int = 24,
    fps: int = 8,
    long_videos: int = 4,
    progress: bool = True,
    written_share: float = 0.0,
    spoken_share: float = 0.0,
) -> dict[str, Any]:
    """Write the synthetic corpus to ``out_dir`` and return a summary.

    Layout: ``videos/{train,test,long}/NNNN.mp4``, ``train.json``, ``test.json``, ``long.json``,
    ``labels.txt`` and, written last, ``corpus.json`` (parameters, counts, held-out triples).
    A directory that already holds a complete corpus with the same parameters is returned as
    is, so the demo can call this on every start. ``written_share``: the share of test clips with
    on-screen text, ``spoken_share`` with a sentence said over them (see :func:`plan_corpus`;
    without espeak-ng one warning and no spoken layer). Returns ``{"out", "n_train", "n_test",
    "n_long", "labels", "seconds"}``.
    """
    started = time.perf_counter()
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16 (yuv420p needs even sides), got {size}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"out_dir {str(root)!r} exists and is not a directory")
    params = {
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "size": size,
        "num_frames": num_frames,
        "fps": fps,
        "long_videos": long_videos,
    }
    if written_share:  # recorded only when used: corpora written before the option stay complete
        params["written_share"] = written_share
    if spoken_share and not espeak_available():
        _log.warning("espeak-ng is not installed (make espeak): the corpus is written without its spoken layer")
        spoken_share = 0.0
    if spoken_share:
        params["spoken_share"] = spoken_share

    def summary() -> dict[str, Any]:
        return {
            "out": str(root),
            "n_train": n_train,
            "n_test": n_test,
            "n_long": long_videos,
            "labels": list(ACTIONS),
            "seconds": time.perf_counter() - started,
        }

    proofs = _claim(root)
    if _is_complete(root, params):
        return summary()

    plan = plan_corpus(n_train, n_test, seed, num_frames, fps, long_videos, written_share,
                       spoken_share)  # validates the counts
    planned = {f"videos/{job.video}" for job in plan.jobs} | {
        _MANIFEST, "train.json", "test.json", "long.json", "labels.txt"
    }
    # only files it can prove it wrote are replaced or removed: anything else stops the run here
    ours = {name for name in proofs if _ours(root, name, proofs)}
    for name in sorted(planned):
        if (root / name).exists() and name not in ours:
            raise ValueError(f"{root / name} was not written by the synthetic corpus generator (or was changed "
                             "since); move it away or choose a new or empty folder")
    for split in ("train", "test", "long"):
        (root / "videos" / split).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / _WORK, ignore_errors=True)   # its own interrupted temporaries and receipts
    (root / _WORK / "receipts").mkdir(parents=True)
    kept = {name: proofs[name] for name in ours}
    _record(root, kept)   # from here on, receipts name what this run writes
    if _MANIFEST in kept:
        (root / _MANIFEST).unlink()   # the corpus is incomplete until written again
        del kept[_MANIFEST]
    for name in sorted(set(kept) - planned):   # its own clips of a different, earlier corpus
        (root / name).unlink()
        del kept[name]
    _record(root, kept)
    written = _render_all(root, plan.jobs, size, fps, progress)

    labels = "".join(f"{label}\n" for label in ACTIONS)
    for name, content in (("train.json", plan.train), ("test.json", plan.test), ("long.json", plan.long)):
        written[name] = _write_text(root, name, json.dumps(content, indent=1) + "\n")
    written["labels.txt"] = _write_text(root, "labels.txt", labels)
    manifest = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "params": params,
        "counts": {"train": n_train, "test": n_test, "long": long_videos},
        "labels": list(ACTIONS),
        "held_out": [list(triple) for triple in plan.held_out],
    }
    written[_MANIFEST] = _write_text(root, _MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _record(root, written)
    shutil.rmtree(root / _WORK, ignore_errors=True)
    return summary()
