"""Per-frame CLIP ViT (CLIP4Clip-style): an open_clip image tower applied to every frame separately.

Why this baseline: it has no temporal modelling at all, so it shows how much of retrieval quality
comes from CLIP's image-text pretraining alone. Cost is linear in T.

Outputs (``keep_temporal = True``):

* ``pooled`` ``[B, T, D]``: each frame's CLIP image embedding (cls -> ``ln_post`` -> ``proj``),
  D = the tower's output dim (512 for ViT-B/16). Text-side code aggregates over T (mean, or
  CLIP4Clip's sequence transformer).
* ``tokens`` ``[B, T·(1 + N), D]``: frame-major; for each frame its image embedding first, then its
  N patch tokens after ``ln_post`` and the same ``proj`` (MaskCLIP-style, so every token lives in
  the D-dim joint space). The patch tokens come from the same forward pass
  (``output_tokens``), so they cost one extra matmul. Reshape to ``[B, T, 1 + N, D]`` per frame.

Weights: ``pretrained`` is a local open_clip-format file only (``.safetensors`` or a
``torch.save`` state dict, loaded with ``weights_only=True``); we never pass a tag, so nothing is
downloaded. The file is checked against the architecture before loading so that a checkpoint of
another model fails with the mismatching keys named, not with a 200-line ``load_state_dict`` dump.
A custom architecture (e.g. the tiny test tower) is given as an open_clip model-config dict
(``model_config``) and registered with open_clip at build time.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import resize_pos_embed
from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file
from torch import nn

from retrieval.models.layers import validate_video
from retrieval.models.model_dir import strict_load
from retrieval.models.registry import register_arch

_config_dir: Path | None = None


def register_open_clip_config(name: str, model_config: dict[str, Any]) -> None:
    """Make ``name`` an open_clip architecture with ``model_config`` (embed_dim, vision_cfg, text_cfg).

    open_clip only registers configs from JSON files (``add_model_config``), so the dict is written
    to a per-process temporary directory (removed at exit; open_clip keeps the parsed config).
    Re-registering the same dict is a no-op; a different dict under an existing name is an error,
    since silently replacing e.g. the built-in ViT-B-16 would change every later model.
    """
    global _config_dir
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_config]
    if missing:
        raise ValueError(f"open_clip model config {name!r} lacks {missing}")
    if name in open_clip.list_models():
        if open_clip.get_model_config(name) != model_config:
            raise ValueError(f"open_clip already has a different architecture named {name!r}")
        return
    if _config_dir is None:
        _config_dir = Path(tempfile.mkdtemp(prefix="vtr_open_clip_configs_"))
        atexit.register(shutil.rmtree, _config_dir, ignore_errors=True)
    path = _config_dir / f"{name}.json"
    path.write_text(json.dumps(model_config))
    open_clip.add_model_config(path)


def _read_open_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from an open_clip checkpoint file (bare, or under ``state_dict``; DDP prefix removed)."""
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {key.removeprefix("module."): value for key, value in state.items()}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], clip: nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint's image tower in the naming of ``clip.visual``.

    A whole CLIP keeps its ``visual.*`` keys only (the text tower is not used); an image-tower-only
    checkpoint is taken as it is. The position table is resized to ``clip``'s frame size
    (open_clip's ``resize_pos_embed``), so a checkpoint for another size keeps working.
    """
    if any(key.startswith("visual.") for key in state_dict):  # a whole CLIP: keep the image tower
        state = {key: value for key, value in state_dict.items() if key.startswith("visual.")}
    else:  # an image-tower-only checkpoint
        state = {"visual." + key: value for key, value in state_dict.items()}
    resize_pos_embed(state, clip)
    return {key.removeprefix("visual."): value for key, value in state.items()}


class FrameCLIPEncoder(nn.Module):
    """An open_clip ViT image tower run on each frame; ``pooled`` keeps the frame axis."""

    keep_temporal = True
    has_cls_token = False  # one embedding per frame, interleaved with that frame's patches

    def __init__(self, visual: VisionTransformer, clip_arch: str, num_frames: int) -> None:
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True
        self.clip_arch = clip_arch
        self.embed_dim: int = visual.output_dim
        self.num_frames = num_frames
        self.img_size: int = visual.image_size[0]
        pp = visual.preprocess_cfg
        self.preprocess = {
            "size": self.img_size,
            "num_frames": num_frames,
            "mean": list(pp["mean"]),
            "std": list(pp["std"]),
            "interpolation": pp["interpolation"],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        # any frame count works (frames are independent); the frame size is fixed by the position embedding
        validate_video(video, model_name=f"frame CLIP {self.clip_arch}", img_size=self.img_size)
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        frame_embeds, patch_tokens = self.visual(frames)  # [B·T, D], [B·T, N, width]
        if self.visual.proj is not None:
            patch_tokens = patch_tokens @ self.visual.proj
        tokens = torch.cat([frame_embeds.unsqueeze(1), patch_tokens], dim=1)  # [B·T, 1 + N, D]
        return {
            "tokens": tokens.reshape(b, t * tokens.shape[1], self.embed_dim),
            "pooled": frame_embeds.reshape(b, t, self.embed_dim),
        }


@register_arch("frame_clip")
def build(
    clip_arch: str = "ViT-B-16",
    pretrained: str | None = None,
    model_config: dict[str, Any] | None = None,
    num_frames: int = 8,
    img_size: int = 224,
) -> FrameCLIPEncoder:
    """Per-frame CLIP encoder from open_clip architecture ``clip_arch`` (weights: a local file or none).

    ``model_config`` registers ``clip_arch`` as a new open_clip architecture first (how the tiny
    test tower is built without any download). ``num_frames`` is the nominal clip length used by
    data loading; the encoder itself accepts any frame count.
    """
    if model_config is not None:
        register_open_clip_config(clip_arch, model_config)
    if clip_arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {clip_arch!r}; pass model_config to define it")
    weights_path = None
    if pretrained is not None:
        weights_path = Path(pretrained)
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"frame_clip pretrained must be a local open_clip checkpoint file, got {pretrained}"
            )
    clip = open_clip.create_model(
        clip_arch, pretrained=None, force_image_size=img_size, pretrained_text=False
    )
    visual = clip.visual
    if (
        not isinstance(visual, VisionTransformer)
        or visual.attn_pool is not None
        or visual.final_ln_after_pool
        or visual.pool_type not in ("tok", "avg")
    ):
        raise ValueError(
            f"frame_clip needs a plain open_clip ViT image tower (cls or mean pooling, ln_post on all "
            f"tokens, no attentional pooler); {clip_arch!r} does not have one"
        )
    if weights_path is not None:
        visual_state = checkpoint_filter_fn(_read_open_clip_state_dict(weights_path), clip)
        strict_load(
            visual, visual_state, f"open_clip checkpoint {weights_path} (expected architecture {clip_arch!r})"
        )
    return FrameCLIPEncoder(visual, clip_arch, num_frames)
