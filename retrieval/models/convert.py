"""Official checkpoints -> vtr model directories, strictly.

``convert_videomamba(checkpoint, out)`` takes either a full official UMT_VIDEOMAMBA checkpoint
(state dict under ``model``, vision keys under ``vision_encoder.``) or a bare vision-encoder
state dict (keys as in ``shared/specs/videomamba_official_keys.json``), infers the architecture
from the tensor shapes, and writes a model directory. Every key must be accounted for: a key
that is neither used nor dropped by name below is an error that lists it.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from .io import ModelDirError, save_model_dir, strict_load
from .registry import build_from_config
from .videomamba import resize_temporal_pos

log = logging.getLogger(__name__)

# containers the official training scripts save the state dict under
_WRAPPERS = ("model", "module", "state_dict", "model_state")
# parts of a full retrieval checkpoint that are not the vision encoder (handled by the
# retrieval-model converter, or training-only and dropped by name)
VISION_PREFIX = "vision_encoder."
# aliases used by other official VideoMamba folders (video_sm: norm_f, K400 head)
_ALIASES = {"norm_f.weight": "norm.weight"}


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin (weights_only) or .safetensors file and unwrap the state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
            raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint: {exc}") from exc
    for key in _WRAPPERS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def split_vision(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(vision-encoder keys with the prefix stripped, every other key)."""
    if any(k.startswith(VISION_PREFIX) for k in state):
        vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
        rest = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
        return vision, rest
    return dict(state), {}


def infer_videomamba_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture hyper-parameters from the shapes of a VideoMamba vision state dict."""
    need = ("patch_embed.proj.weight", "pos_embed", "temporal_pos_embedding", "layers.0.mixer.A_log")
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError("not a VideoMamba vision encoder: missing " + ", ".join(absent)
                              + f" (first keys seen: {', '.join(list(sd)[:5])})")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 5:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; VideoMamba uses a Conv3d [D,3,1,p,p]")
    dim, in_chans, _, patch, _ = w.shape
    n_patches = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_patches ** 0.5))
    if grid * grid != n_patches:
        raise CheckpointError(f"pos_embed has {n_patches} patch slots, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    e, n = sd["layers.0.mixer.A_log"].shape
    in_rows = sd["layers.0.mixer.in_proj.weight"].shape[0]
    cfg: dict[str, Any] = {
        "arch": "videomamba", "embed_dim": int(dim), "depth": depth, "img_size": int(grid * patch),
        "patch_size": int(patch), "num_frames": int(sd["temporal_pos_embedding"].shape[1]), "in_chans": int(in_chans),
        "d_state": int(n), "expand": int(e // dim), "dt_rank": int(sd["layers.0.mixer.dt_proj.weight"].shape[1]),
        "d_conv": int(sd["layers.0.mixer.conv1d.weight"].shape[-1]), "gate": in_rows == 2 * e,
        "clip_output_dim": int(sd["clip_decoder.0.head.weight"].shape[0]) if "clip_decoder.0.head.weight" in sd else None,
        "pool_norm": "pool_norm.weight" in sd,
        "keep_temporal": True,
    }
    if "head.weight" in sd:
        cfg["num_classes"] = int(sd["head.weight"].shape[0])
    return cfg


def convert_videomamba(checkpoint: str | Path, out: str | Path, num_frames: int | None = None,
                       variant: str = "videomamba", name: str | None = None) -> Path:
    """Convert an official VideoMamba checkpoint (full UMT_VIDEOMAMBA or vision-only) to a model dir.

    ``variant="pro"`` marks the weights as VideoMambaPro (masked backward + elemental residual;
    the parameters are the same, so this cannot be inferred). ``num_frames`` re-samples the
    temporal position embeddings for another clip length.
    """
    state = load_checkpoint(checkpoint)
    vision, rest = split_vision(state)
    if rest:
        prefixes = sorted({k.split(".")[0] for k in rest})
        log.info("vision-encoder conversion ignores the non-vision parts: %s "
                 "(use the retrieval-model conversion to keep them)", ", ".join(prefixes))
    vision = {_ALIASES.get(k, k): v for k, v in vision.items()}
    cfg = infer_videomamba_config(vision)
    if variant == "pro":
        cfg.update(mask_backward=True, elemental_residual=True)
    elif variant != "videomamba":
        raise ValueError(f"variant must be 'videomamba' or 'pro', got {variant!r}")
    if num_frames and num_frames != cfg["num_frames"]:
        vision["temporal_pos_embedding"] = resize_temporal_pos(vision["temporal_pos_embedding"], num_frames)
        cfg["num_frames"] = num_frames
    cfg["name"] = name or Path(checkpoint).stem
    model = build_from_config(cfg)
    try:
        strict_load(model, vision, f"{checkpoint} (as {cfg['arch']} D={cfg['embed_dim']} depth={cfg['depth']})")
    except ModelDirError as exc:
        raise CheckpointError(str(exc)) from exc
    return save_model_dir(model, out, "video_encoder", cfg, model.preprocess,
                          source={"checkpoint": str(Path(checkpoint).resolve()), "format": "videomamba",
                                  "variant": variant})
