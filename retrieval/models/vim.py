"""Vision Mamba (hustvl/Vim) image checkpoints as vtr encoders.

Vim is VideoMamba's image ancestor, so its weights run on :class:`~retrieval.models.videomamba.
VideoMamba` with one frame and four options, read from ``vim/models_mamba.py``:

* ``cls_position="middle"``: the class token is inserted at index M // 2 of the M patch tokens
  *before* the position table is added, so the table's row M // 2 is the cls position (moved to
  row 0 here, where VideoMamba keeps it);
* ``divide_out=True`` (``if_divide_out``): the two directions' sum is halved before ``out_proj``
  (bimamba v2 layout, convolved scan input, zero start state, no mask);
* a 2-D patch convolution (stored here as the equivalent one-frame Conv3d); the "+" models
  (``..._stride8_...``) take 16-pixel patches every 8 pixels (``patch_stride``);
* ``pool="cls"``: the image feature is the middle cls token's output after ``norm_f``, which is
  what Vim's ``head`` classifies (``classify``).

The mapping is :func:`checkpoint_filter_fn`, the config :func:`infer_config_from_state`
(``vtr convert --format vim``). Images [B, 3, H, W] are accepted as they are (a one-frame clip). Vim trains with timm's ImageNet
normalisation and bicubic resizing, which a converted model carries.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from .model_dir import CheckpointError

# image sizes of the published models, used to tell a "+" model (overlapping patches) from a
# larger image when only the position table's length is known
_PUBLISHED_SIZES = (224, 384)


def infer_config_from_state(sd: dict[str, torch.Tensor], img_size: int | None = None,
                            patch_stride: int | None = None) -> dict[str, Any]:
    """VideoMamba builder config of a Vim state dict (official key names). ``img_size`` /
    ``patch_stride`` are read from the position table's length (the published 224 and 384 px
    models, "+" ones included); give them for other sizes."""
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token", "layers.0.mixer.A_log", "norm_f.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError("not a Vim checkpoint: missing " + ", ".join(absent)
                              + f" (first keys seen: {', '.join(list(sd)[:5])})")
    if "cls_token_head" in sd or "layers.0.mixer.conv1d_b.weight" not in sd:
        raise CheckpointError("only Vim's published layout is supported (one middle class token, bimamba v2)")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; Vim uses a Conv2d [D, 3, p, p]")
    dim, in_chans, p, _ = (int(x) for x in w.shape)
    m = sd["pos_embed"].shape[1] - 1
    g = math.isqrt(m)
    if g * g != m:
        raise CheckpointError(f"pos_embed has {m} patch rows, not a square grid")
    if patch_stride is None:
        if img_size is not None:
            if g == 1 or (img_size - p) % (g - 1):
                raise CheckpointError(f"a {g}x{g} patch grid of {p} px patches does not tile a {img_size} px image")
            patch_stride = (img_size - p) // (g - 1) if g > 1 else p
        else:  # a published "+" model (p/2 stride at 224/384 px), else non-overlapping patches
            plus = [s for s in _PUBLISHED_SIZES if g > 1 and (s - p) % (g - 1) == 0 and (s - p) // (g - 1) == p // 2]
            patch_stride = p // 2 if plus and g * p not in _PUBLISHED_SIZES else p
    img = (g - 1) * patch_stride + p
    if img_size is not None and img != img_size:
        raise CheckpointError(f"patch grid {g}x{g} with patches of {p} px every {patch_stride} px covers {img} px, "
                              f"not {img_size}")
    depth = 1 + max(int(mm.group(1)) for k in sd if (mm := re.match(r"layers\.(\d+)\.", k)))
    e, n = sd["layers.0.mixer.A_log"].shape
    cfg: dict[str, Any] = {
        "arch": "videomamba", "embed_dim": dim, "depth": depth, "img_size": img, "patch_size": p,
        "patch_stride": patch_stride, "num_frames": 1, "in_chans": in_chans, "d_state": int(n),
        "expand": int(e // dim), "dt_rank": int(sd["layers.0.mixer.dt_proj.weight"].shape[1]),
        "d_conv": int(sd["layers.0.mixer.conv1d.weight"].shape[-1]), "cls_position": "middle",
        "keep_temporal": False, "pool_norm": False, "clip_output_dim": None, "divide_out": True, "pool": "cls",
    }
    if "head.weight" in sd:
        cfg["num_classes"] = int(sd["head.weight"].shape[0])
    return cfg


def checkpoint_filter_fn(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Vim keys -> VideoMamba's: the cls row of the position table moved first, the 2-D
    patch conv as a one-frame Conv3d, ``norm_f`` -> ``norm``, and a zero temporal table (one frame)."""
    out = dict(sd)
    pos = out.pop("pos_embed")
    mid = (pos.shape[1] - 1) // 2
    out["pos_embed"] = torch.cat([pos[:, mid:mid + 1], pos[:, :mid], pos[:, mid + 1:]], dim=1)
    out["patch_embed.proj.weight"] = out["patch_embed.proj.weight"].unsqueeze(2)
    out["norm.weight"] = out.pop("norm_f.weight")
    out["temporal_pos_embedding"] = torch.zeros(1, 1, pos.shape[-1], dtype=pos.dtype)
    return out
