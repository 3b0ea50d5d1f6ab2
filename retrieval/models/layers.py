"""Small pieces every video backbone shares: the input check, the ImageNet pixel statistics,
the fixed sinusoidal position table, stochastic depth (timm's ``DropPath``) and the linear layer
whose large fp32 CPU products may run on oneDNN (:func:`linear`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from retrieval.models.device import cpu_matmul_backend

# below this many multiply-adds a oneDNN call's fixed cost (~25 us) outweighs its faster kernel
ONEDNN_MIN_MACS = 1 << 24


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() < 2 or weight.dim() != 2 or not x.is_contiguous() or not weight.is_contiguous():
        return False
    if x.shape[-1] != weight.shape[1]:           # F.linear raises its usual error
        return False
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                             or bias.shape != weight.shape[:1]):
        return False
    if x.numel() * weight.shape[0] < ONEDNN_MIN_MACS:     # M * K * N multiply-adds
        return False
    # oneDNN's op has no autograd formula; autocast and compilers expect F.linear
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return type(x) is torch.Tensor and torch.backends.mkldnn.enabled and cpu_matmul_backend() == "onednn"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except that a large fp32 product on the CPU outside autograd runs on oneDNN's
    inner product where :func:`retrieval.models.device.cpu_matmul_backend` chose it (``VTR_CPU_MATMUL``).
    Same result up to the summation order (fp32 rounding)."""
    if _onednn_applies(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product, inference only (no autograd formula); where
    :func:`retrieval.models.device.onednn_linear_available`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters and state-dict keys)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


def route_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` inside ``module`` a :class:`Linear` (in place: the class only,
    parameters and hooks stay) and return ``module``. For layers built by other libraries (timm's
    transformer blocks)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module

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
