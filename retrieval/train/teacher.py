"""The frozen CLIP teacher of unmasked-teacher alignment (UTA), as UMT and VideoMamba compute it.

The teacher is an open_clip ViT image tower (CLIP ViT-B/16 in the official recipes; open_clip's
``ViT-B-16-quickgelu`` holds OpenAI's weights exactly), frozen, run on each of the B·T frames as
an image. It sees the very tensor the student sees (the official code normalises frames once,
for the student, and hands the same tensor to CLIP), resized bicubically to the tower's image
size if the two differ. One pass gives both things UTA needs:

* **attention** ``[B, T, N]``: the last block's attention weights (per head a softmax over all
  ``1 + N`` keys, cls key included, then the mean over heads), the cls query's row over the N
  patch keys, not renormalised. The student's visible patches are drawn from it per frame
  (:func:`retrieval.train.losses.teacher_guided_mask`).
* **targets** ``[K, B, L, Dt]``: the outputs of the last K blocks, projected by CLIP's ``proj``
  and L2-normalised. Two layouts, chosen by the student (``uta_layout``):

  - VideoMamba (``cls_target=True``, ``ln_post=False``, K = 1): no ``ln_post``; the T per-frame
    cls tokens averaged into one cls target placed first, then the patches frame by frame:
    ``L = 1 + T·N``.
  - UMT's ViT (``cls_target=False``, ``ln_post=True``, K = 6): ``ln_post`` on the patch tokens,
    no cls target: ``L = T·N``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: the registered model config a bare open_clip checkpoint file is built with
DEFAULT_TEACHER_ARCH = "clip_teacher_b16"
#: what a student without its own ``uta_layout`` gets: VideoMamba's
VIDEOMAMBA_LAYOUT = {"cls_target": True, "ln_post": False, "layers": 1}


@dataclass(frozen=True)
class TeacherOutput:
    targets: torch.Tensor    # [K, B, L, Dt], unit vectors
    attention: torch.Tensor  # [B, T, N], cls-to-patch attention of the last block


class CLIPTeacher(nn.Module):
    """A frozen open_clip ViT image tower (``visual``) that returns UTA targets and attention."""

    def __init__(self, visual: nn.Module, cls_target: bool = True, ln_post: bool = False, layers: int = 1):
        super().__init__()
        for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post"):
            if not hasattr(visual, name):
                raise ValueError(f"the UTA teacher must be an open_clip ViT image tower (no {name!r})")
        blocks = visual.transformer.resblocks
        if not 1 <= layers <= len(blocks):
            raise ValueError(f"the UTA teacher has {len(blocks)} blocks; cannot return the last {layers}")
        if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
            raise ValueError("the UTA teacher's blocks must use nn.MultiheadAttention (a plain CLIP ViT)")
        self.visual = visual.eval().requires_grad_(False)
        self.cls_target, self.ln_post, self.layers = cls_target, ln_post, layers
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list))
                              else visual.image_size)
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.out_dim = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.conv1.out_channels)

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        return super().train(False)

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> TeacherOutput:
        """``video`` [B, C, T, H, W], normalised for the student."""
        if video.dim() != 5:
            raise ValueError(f"the UTA teacher expects video [B, C, T, H, W], got {tuple(video.shape)}")
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        if (h, w) != (self.image_size, self.image_size):
            frames = F.interpolate(frames.float(), size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).to(video.dtype)
        v = self.visual
        x = v.conv1(frames.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)      # [BT, N, W]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        blocks = v.transformer.resblocks
        outputs, attention = [], None
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                x, attention = _block_with_attention(block, x)
            else:
                x = block(x)
            if i >= len(blocks) - self.layers:
                outputs.append(x)
        z = torch.stack(outputs)                                                      # [K, BT, 1+N, W]
        k, n = z.shape[0], z.shape[2] - 1
        if self.cls_target:
            cls_t = z[:, :, :1].reshape(k, b, t, 1, -1).mean(2)                       # [K, B, 1, W]
            z = torch.cat([cls_t, z[:, :, 1:].reshape(k, b, t * n, -1)], dim=2)       # [K, B, 1+T*N, W]
        else:
            z = z[:, :, 1:]
            if self.ln_post:
                z = v.ln_post(z)
            z = z.reshape(k, b, t * n, -1)                                            # [K, B, T*N, W]
        if v.proj is not None:
            z = z @ v.proj
        attn = attention[:, 0, 1:].reshape(b, t, n)                                   # not renormalised
        return TeacherOutput(F.normalize(z.float(), dim=-1), attn.float())


def _block_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip residual attention block that also returns its head-averaged attention weights."""
    y = block.ln_1(x)
    batch_first = getattr(block.attn, "batch_first", False)
    q = y if batch_first else y.transpose(0, 1)
    out, weights = block.attn(q, q, q, need_weights=True, average_attn_weights=True)  # weights [BT, L, L]
    out = out if batch_first else out.transpose(0, 1)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, weights


CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


def check_teacher_spec(spec: str) -> None:
    """Refuse, before any work, a teacher that names a missing file or an unknown model."""
    path = Path(spec)
    if path.exists():
        return
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in spec or "\\" in spec:
        raise FileNotFoundError(f"UTA teacher checkpoint not found: {spec}")
    from ..models.registry import list_models

    if spec not in list_models():
        raise ValueError(f"UTA teacher {spec!r} is neither a file, a model directory nor a registered model")


def load_teacher(spec: str, student: nn.Module, arch: str | None = None) -> CLIPTeacher:
    """The UTA teacher for ``student`` (a video encoder) from ``spec``.

    ``spec`` is a local open_clip checkpoint file (built as the registered model ``arch``,
    default :data:`DEFAULT_TEACHER_ARCH`, the QuickGELU CLIP ViT-B/16), a registered ``frame_clip``
    model name, or a model directory whose video tower is one. The target layout (cls target,
    ``ln_post``, number of layers) is the student's ``uta_layout``.
    """
    from ..models.registry import create_model

    check_teacher_spec(spec)
    path = Path(spec)
    if path.is_file():
        net = create_model(arch or DEFAULT_TEACHER_ARCH, pretrained=str(path))
    elif path.is_dir():
        from ..models.model_dir import load_model

        net = load_model(path)
        net = getattr(net, "video", net)
    else:
        if arch is not None:
            raise ValueError(f"UTA teacher {spec!r} is not a file; loss.uta_teacher_arch only applies to a "
                             "checkpoint file")
        net = create_model(spec)
    visual = getattr(net, "visual", None)
    if visual is None:
        raise ValueError(f"UTA teacher {spec!r} is not a CLIP ViT image tower (a frame_clip model or an "
                         f"open_clip checkpoint file); got {type(net).__name__}")
    layout = {**VIDEOMAMBA_LAYOUT, **dict(getattr(student, "uta_layout", {}) or {})}
    return CLIPTeacher(visual, **layout)
