"""Inputs of the end-to-end comparison with the authors' evaluation: videos, captions, checkpoint.

Kept free of vtr imports (numpy, PyAV and torch only) so that the same functions write the same
inputs for vtr's test and for the authors' code, which needs other library versions. The videos
are lossless (PNG frames in QuickTime): every decoder returns exactly the pixels written here, so
the comparison is about the models and the protocol, not about codecs.
"""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np

# Six clips, ten captions (MSVD layout: a list of captions per clip, each its own query). The
# captions carry what the caption cleaning must treat as the authors' code does.
ANNOTATION = [
    {"video": "kitchen.mov", "caption": ["A man & a woman cook pasta.", "Two people\u2014cooking dinner"]},
    {"video": "market.mov", "caption": ["Prices drop 50% at the market!", "a crowd  walks / shops"]},
    {"video": "street.mov", "caption": ["<person> rides a bike -- fast", "She doesn\u2019t stop: \u201cGo on\u201d"]},
    {"video": "cafe.mov", "caption": ["Caf\u00e9 owner serves cr\u00e8me br\u00fbl\u00e9e"]},
    {"video": "park.mov", "caption": ["a  dog\nruns\tin the park", "x-ray of a dog's paw"]},
    {"video": "lake.mov", "caption": ["A single\ttab and\na newline near the lake"]},
]
FRAMES, WIDTH, HEIGHT, FPS = 16, 64, 48, 8
CHECKPOINT_SEED = 3


def clip_frames(index: int) -> np.ndarray:
    """[FRAMES, HEIGHT, WIDTH, 3] uint8: a lit, textured scene with a moving object, per clip."""
    rng = np.random.default_rng(100 + index)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    base = rng.uniform(40, 200, size=3)
    tilt = rng.uniform(-1.2, 1.2, size=(2, 3))
    texture = rng.normal(0, 1, size=(HEIGHT // 8 + 1, WIDTH // 8 + 1, 3))
    texture = np.kron(texture, np.ones((8, 8, 1)))[:HEIGHT, :WIDTH] * 18
    color = rng.uniform(0, 255, size=3)
    start, velocity = rng.uniform([8, 8], [WIDTH - 8, HEIGHT - 8]), rng.uniform(-3, 3, size=2)
    radius = rng.uniform(5, 11)
    frames = []
    for t in range(FRAMES):
        light = 1 + 0.15 * np.sin(2 * np.pi * t / FRAMES + index)
        scene = (base + tilt[0] * xs[..., None] + tilt[1] * ys[..., None] + texture) * light
        cx, cy = start + velocity * t
        inside = ((xs - cx) ** 2 / radius ** 2 + (ys - cy) ** 2 / (0.6 * radius) ** 2) <= 1
        scene[inside] = color
        scene += rng.normal(0, 4, size=scene.shape)  # sensor noise
        frames.append(np.clip(scene, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_videos(root: Path) -> None:
    """The clips of :data:`ANNOTATION` under ``root``, and ``root/annotation.json``."""
    root.mkdir(parents=True, exist_ok=True)
    for index, entry in enumerate(ANNOTATION):
        with av.open(str(root / entry["video"]), mode="w") as container:
            stream = container.add_stream("png", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "rgb24"
            for frame in clip_frames(index):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    (root / "annotation.json").write_text(json.dumps(ANNOTATION, indent=1), encoding="utf-8")
