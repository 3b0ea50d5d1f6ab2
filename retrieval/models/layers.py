"""Small pieces every video backbone shares: the input check, the ImageNet pixel statistics,
the fixed sinusoidal position table and stochastic depth (timm's ``DropPath``)."""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def validate_video(
    video: Any,
    *,
    model_name: str,
    channels: int = 3,
    num_frames: int | None = None,
    img_size: int | None = None,
    size_multiple: int = 1,
) -> None:
    """Raise ``ValueError`` unless ``video`` is a float ``[B, C, T, H, W]`` tensor this backbone can take.

    Why: shape errors deep inside a conv or attention reshape are cryptic; failing at the door with
    the expected shape named saves a debugging session. ``num_frames``/``img_size`` are enforced
    only when the backbone's parameters fix them (pass ``None`` otherwise); ``size_multiple``
    checks H and W for conv backbones whose strides must divide the frame size.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{model_name} expects a torch.Tensor [B, C, T, H, W], got {type(video).__name__}")
    if video.ndim != 5:
        raise ValueError(f"{model_name} expects a 5-D video [B, C, T, H, W], got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"{model_name} expects a float (normalised) video, got dtype {video.dtype}")
    _, c, t, h, w = video.shape
    if c != channels:
        raise ValueError(
            f"{model_name} expects {channels} channels in dim 1 of [B, C, T, H, W], "
            f"got shape {tuple(video.shape)}"
        )
    if t < 1:
        raise ValueError(f"{model_name} got a video with no frames")
    if num_frames is not None and t != num_frames:
        built = f"{num_frames} frames" + (f" at {img_size} px" if img_size is not None else "")
        raise ValueError(f"{model_name} built for {built} got {t} frames")
    if img_size is not None and (h != img_size or w != img_size):
        built = (f"{num_frames} frames at " if num_frames is not None else "") + f"{img_size} px"
        raise ValueError(f"{model_name} built for {built} got {h}x{w} px frames")
    if h % size_multiple or w % size_multiple or h < size_multiple or w < size_multiple:
        raise ValueError(
            f"{model_name} needs frame height and width that are positive multiples of {size_multiple}, "
            f"got {h}x{w}"
        )


def sincos_table(positions: int, dim: int) -> torch.Tensor:
    """The Transformer's fixed position table ``[positions, dim]``: channel ``j`` of position ``p`` is
    ``sin`` (even ``j``) or ``cos`` (odd ``j``) of ``p / 10000^(2·(j // 2) / dim)``.

    Computed in float64 and rounded once, so the values match tables built with NumPy.
    """
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angles = pos / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DropPath", "sincos_table", "validate_video"]
