"""How far reduced-precision inference moves features: cosine of bf16 (or fp16) features against
fp32 ones, on inputs with real pixel statistics.

Two kinds of clip, both through the model's own normalisation (ImageNet mean/std): a camera pan
over a photograph (matplotlib's bundled ``grace_hopper.jpg``: natural-image statistics, normalised
mean near 0 and spread near 1) and clips of the synthetic corpus (textured backgrounds, moving
shapes, h264 artefacts). Encoders may carry random weights: what is measured is how the
arithmetic, not the training, reacts to precision.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.device import autocast


def photo_pan_clip(preprocess: dict) -> torch.Tensor:
    """A camera pan over a photograph: T crops sliding diagonally across it, resized to the model's
    size and normalised with its mean/std: [3, T, S, S]."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        photo = np.asarray(Image.open(fh).convert("RGB"), dtype=np.float32) / 255.0      # [H, W, 3]
    img = torch.from_numpy(photo).permute(2, 0, 1)
    h, w = img.shape[1:]
    frames, size = int(preprocess["num_frames"]), int(preprocess["size"])
    side = int(min(h, w) * 0.75)
    crops = []
    for i in range(frames):
        f = i / max(1, frames - 1)
        y, x = int(f * (h - side)), int(f * (w - side))
        crop = img[:, y:y + side, x:x + side][None]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
    clip = torch.stack(crops, dim=1)                                                     # [3, T, S, S]
    mean = torch.tensor(preprocess["mean"]).view(3, 1, 1, 1)
    std = torch.tensor(preprocess["std"]).view(3, 1, 1, 1)
    return (clip - mean) / std


def realistic_clips(preprocess: dict, n: int = 2, workdir: str | Path | None = None, seed: int = 0) -> torch.Tensor:
    """A photo pan (:func:`photo_pan_clip`) and ``n - 1`` synthetic-corpus clips through
    ``preprocess`` (a model's preprocess dict): [n, 3, T, S, S]."""
    from ..data.corpora import load_corpus
    from ..data.synthetic import generate_corpus
    from ..data.video import Preprocess, load_clip

    pre = Preprocess.for_model({k: preprocess[k] for k in ("size", "mean", "std", "interpolation", "num_frames")
                                if k in preprocess})
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        generate_corpus(tmp, n_train=1, n_test=n, size=max(64, -(-pre.size // 32) * 32), seed=seed,
                        long_videos=0, progress=False)
        corpus = load_corpus("generic", Path(tmp) / "test.json", Path(tmp) / "videos")
        synthetic = [load_clip(path, pre) for path in corpus.paths()[:max(0, n - 1)]]
    return torch.stack([photo_pan_clip(preprocess), *synthetic])


def feature_cosine(encode: Callable[[], torch.Tensor], precision: str = "bf16",
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Run ``encode()`` (returns features [B, ...]) in fp32 and under ``precision`` autocast; the
    per-sample cosine between the two (flattened), min and mean."""
    with torch.inference_mode():
        ref = encode().float()
        with autocast(device, precision):
            low = encode().float()
    cos = F.cosine_similarity(low.flatten(1), ref.flatten(1), dim=1)
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "max_abs_diff": float((low - ref).abs().max())}


def text_features(model, captions: Sequence[str]) -> Callable[[], torch.Tensor]:
    """``encode`` for :func:`feature_cosine` over a retrieval model's text tower (hidden states)."""
    def encode() -> torch.Tensor:
        return model.encode_texts(list(captions))["hidden"]

    return encode


def video_features(net, clips: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``encode`` for :func:`feature_cosine` over a video backbone's pooled clip features."""
    def encode() -> torch.Tensor:
        return net(clips)["pooled"]

    return encode
