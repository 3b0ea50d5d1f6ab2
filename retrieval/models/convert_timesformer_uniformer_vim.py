"""Official TimeSformer, UniFormer and Vim weights -> vtr ``video_encoder`` model directories.

* ``timesformer``: a local Hugging Face directory (``TimesformerModel`` or
  ``TimesformerForVideoClassification``); such a directory also loads as it is wherever a model
  directory is expected (see ``retrieval.models.model_dir.HF_KINDS``).
* ``uniformer``: Sense-X/UniFormer video checkpoints.
* ``vim``: hustvl/Vim image checkpoints.

Each family's key mapping lives beside its model, as ``checkpoint_filter_fn`` and
``infer_config_from_state`` in ``retrieval.models.timesformer`` / ``uniformer`` / ``vim``; the
entry points here read the checkpoint (``convert.load_checkpoint``), call them, load strictly and
write the model directory. Every conversion is strict: a key that is neither used nor dropped by
name is an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TimesformerConfig

from . import uniformer, vim
from .convert import CheckpointError, list_keys, load_checkpoint, save_video_encoder
from .model_dir import save_model_dir
from .timesformer import load_timesformer_hf

FORMATS = ("timesformer", "uniformer", "vim")


def convert(fmt: str, checkpoint: str | Path, out: str | Path, *, num_frames: int | None = None,
            head_dim: int = 64, name: str | None = None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported here: {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if fmt == "timesformer":
        return convert_timesformer(checkpoint, out, num_frames=num_frames, name=name)
    if fmt == "uniformer":
        return convert_uniformer(checkpoint, out, num_frames=num_frames, head_dim=head_dim, name=name)
    if num_frames not in (None, 1):
        raise ValueError("Vim is an image model: --num-frames does not apply")
    return convert_vim(checkpoint, out, name=name)


def convert_timesformer(hf_dir: str | Path, out: str | Path, num_frames: int | None = None,
                        name: str | None = None) -> Path:
    """A local Hugging Face TimeSformer directory (``TimesformerModel`` or
    ``TimesformerForVideoClassification``) -> a vtr model directory, head and labels kept."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"--format timesformer takes a Hugging Face model directory; not a directory: {hf_dir}")
    encoder = load_timesformer_hf(hf_dir, num_frames=num_frames)  # timesformer.checkpoint_filter_fn + strict load
    hf_config = encoder.config.to_dict()
    keep = set(TimesformerConfig().to_dict()) - {"id2label", "label2id", "transformers_version", "architectures"}
    cfg = {"arch": "timesformer", "name": name or hf_dir.resolve().name,
           "hf_config": {k: v for k, v in hf_config.items() if k in keep}, "id2label": list(encoder.id2label)}
    return save_model_dir(encoder, out, "video_encoder", cfg, encoder.preprocess,
                          source={"checkpoint": str(hf_dir.resolve()), "format": "timesformer"})


def convert_uniformer(checkpoint: str | Path, out: str | Path, num_frames: int | None = None, head_dim: int = 64,
                      name: str | None = None, img_size: int = 224) -> Path:
    """An official UniFormer video checkpoint (bare, or under ``model_state`` / ``model``) -> a model dir.

    Strict: every key is renamed or it is an error (listing the keys); the classification ``head``
    is kept for ``classify``. ``num_frames`` is the clip length to record (the weights are frame
    count agnostic; default 16, the published 16x4 models).
    """
    state = load_checkpoint(checkpoint)
    try:
        cfg = uniformer.infer_config_from_state(state, head_dim)
    except CheckpointError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from exc
    cfg.update(num_frames=num_frames or 16, img_size=img_size)
    unknown: list[str] = []
    renamed = uniformer.checkpoint_filter_fn(state, unmapped=unknown)
    if unknown:
        raise CheckpointError(f"{checkpoint}: keys that are not part of UniFormer's video model: {list_keys(unknown)}")
    return save_video_encoder(cfg, renamed, checkpoint, out, name, "UniFormer", {"format": "uniformer"},
                              sizes=f"dims={cfg['dims']} depths={cfg['depths']}")


def convert_vim(checkpoint: str | Path, out: str | Path, name: str | None = None, *, img_size: int | None = None,
                patch_stride: int | None = None) -> Path:
    """An official Vim checkpoint (``{"model": ...}`` or bare) -> a ``video_encoder`` model directory.

    ``img_size`` / ``patch_stride`` are read from the position table's length (the published 224
    and 384 px models, "+" ones included); give them for other sizes.
    """
    state = load_checkpoint(checkpoint)
    try:
        cfg = vim.infer_config_from_state(state, img_size, patch_stride)
    except CheckpointError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from exc
    return save_video_encoder(cfg, vim.checkpoint_filter_fn(state), checkpoint, out, name, "Vim", {"format": "vim"})


def describe(path: str | Path) -> str:
    """One line about a converted model directory."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    m: dict[str, Any] = cfg["model"]
    bits = [m["arch"]]
    for key in ("embed_dim", "depth", "num_frames", "img_size"):
        if key in m:
            bits.append(f"{key}={m[key]}")
    if "hf_config" in m:
        hc = m["hf_config"]
        bits.append(f"D={hc.get('hidden_size')} depth={hc.get('num_hidden_layers')} frames={hc.get('num_frames')}")
    n = m.get("num_classes") or len(m.get("id2label") or [])
    if n:
        bits.append(f"head {n} classes")
    return " ".join(str(b) for b in bits)
