"""TimeSformer (divided space-time attention) as a vtr video encoder, built on transformers' port.

Why transformers' ``TimesformerModel``: its math matches the official code (the converter checks
logits to 1e-4) and the published checkpoints (``facebook/timesformer-base-finetuned-k400`` ...)
are distributed in its layout, so wrapping it lets us load them unchanged.

What this wrapper adds:

* the vtr interface: ``forward(video [B, C, T, H, W])`` (transformers wants ``[B, T, C, H, W]``)
  returning ``{"tokens": last_hidden_state [B, 1 + N·T, D], "pooled": cls [B, D]}``. The patch
  tokens follow the official order, space-major with time fastest: index ``1 + n·T + t``.
* input checks: transformers' layers read ``config.num_frames`` and ``config.image_size`` when they
  reshape, so any other frame count or size either crashes with a reshape error or silently mixes
  frames. We reject it up front.
* :func:`load_timesformer_hf` reads a local Hugging Face directory *including* the classification
  head and ``config.id2label`` (``classify`` / ``id2label``): the K400 head later provides
  supervised action labels. The key mapping is :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import TimesformerConfig, TimesformerModel
from transformers.models.timesformer.modeling_timesformer import TimesformerDropPath

from retrieval.models.layers import route_linears, validate_video
from retrieval.models.model_dir import register_kind, strict_load
from retrieval.models.registry import merge_size_preset, register_arch

TIMESFORMER_MEAN = (0.45, 0.45, 0.45)
TIMESFORMER_STD = (0.225, 0.225, 0.225)

# the published sizes
TIMESFORMER_SIZES: dict[str, dict[str, int]] = {
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "ti": {"embed_dim": 192, "depth": 12, "num_heads": 3},
}


class TimeSformerEncoder(nn.Module):
    """A ``TimesformerModel`` behind the vtr video-encoder interface, with an optional K-way head.

    ``classifier``/``id2label`` are present only when loaded from a fine-tuned checkpoint; the
    encoder itself never uses them (retrieval reads ``pooled``).
    """

    keep_temporal = False
    has_cls_token = True  # tokens[:, 0] is the cls token

    def __init__(
        self,
        config: TimesformerConfig,
        classifier: nn.Linear | None = None,
        id2label: list[str] | None = None,
    ) -> None:
        super().__init__()
        if config.attention_type != "divided_space_time":
            raise ValueError(f"vtr's TimeSformer is divided space-time; config has {config.attention_type!r}")
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}"
            )
        # its linears as vtr's other encoders': large fp32 CPU inference products on oneDNN where chosen
        self.backbone = route_linears(TimesformerModel(config))
        self.classifier = classifier
        self.id2label: list[str] = list(id2label or [])
        self.embed_dim: int = config.hidden_size
        self.num_frames: int = config.num_frames
        self.img_size: int = config.image_size
        self.preprocess = {
            "size": config.image_size,
            "num_frames": config.num_frames,
            "mean": list(TIMESFORMER_MEAN),
            "std": list(TIMESFORMER_STD),
            "interpolation": "bilinear",
        }

    @property
    def config(self) -> TimesformerConfig:
        return self.backbone.config

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward (transformers' activation checkpointing).

        transformers 5 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` and
        warns on the old names; 4.x (still allowed by pyproject) only has the old ones.
        """
        new_api = hasattr(self.backbone, "activation_checkpointing_enable")
        if enable:
            kwargs = {"use_reentrant": False}
            if new_api:
                self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif new_api:
            self.backbone.activation_checkpointing_disable()
        else:
            self.backbone.gradient_checkpointing_disable()

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        validate_video(
            video,
            model_name="TimeSformer",
            channels=self.config.num_channels,
            num_frames=self.num_frames,
            img_size=self.img_size,
        )
        hidden = self.backbone(pixel_values=video.transpose(1, 2)).last_hidden_state
        return {"tokens": hidden, "pooled": hidden[:, 0]}

    def classify(self, video: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, len(id2label)]`` of the checkpoint's classification head (cls token -> Linear)."""
        if self.classifier is None:
            raise RuntimeError(
                "this TimeSformer has no classification head (load a fine-tuned HF checkpoint)"
            )
        return self.classifier(self(video)["pooled"])


def timesformer_config(
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    patch_size: int = 16,
    num_frames: int = 8,
    img_size: int = 224,
) -> TimesformerConfig:
    """A ``TimesformerConfig`` in vtr's names (those of joint_vit): the dimensions of a size preset
    and the clip shape."""
    return TimesformerConfig(
        image_size=img_size,
        patch_size=patch_size,
        num_frames=num_frames,
        hidden_size=embed_dim,
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        intermediate_size=int(embed_dim * mlp_ratio),
    )


def _set_stochastic_depth(backbone: TimesformerModel, drop_path_rate: float) -> None:
    """Give layer i DropPath rate ``drop_path_rate · i / (depth - 1)`` (the official linear schedule).

    Why not ``TimesformerConfig(drop_path_rate=...)``: transformers 5.x types that field as ``int``
    and rejects 0.1, so the rate is applied to the built layers instead.
    """
    layers = backbone.encoder.layer
    for layer, rate in zip(layers, torch.linspace(0, drop_path_rate, len(layers), device="cpu").tolist()):
        layer.drop_path = TimesformerDropPath(rate) if rate > 0 else nn.Identity()


def _read_hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a single-file HF checkpoint (safetensors preferred; ``.bin`` with weights_only)."""
    safetensors_path = model_dir / "model.safetensors"
    if safetensors_path.is_file():
        return load_file(str(safetensors_path))
    bin_path = model_dir / "pytorch_model.bin"
    if bin_path.is_file():
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or pytorch_model.bin")


def load_timesformer_hf(model_dir: str | Path, num_frames: int | None = None) -> TimeSformerEncoder:
    """Load a local Hugging Face TimeSformer directory (config.json + weights), head and labels included.

    Accepts both ``TimesformerForVideoClassification`` checkpoints (keys ``timesformer.*`` and
    ``classifier.*``; the head and ``config.id2label`` become ``classifier``/``id2label``) and bare
    ``TimesformerModel`` ones. ``num_frames`` other than the checkpoint's resizes the learned time
    embedding by linear interpolation along time (endpoints kept), the usual way to run a
    TimeSformer-8 checkpoint on longer clips; frame size stays the checkpoint's.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    with open(config_path) as fh:
        model_type = json.load(fh).get("model_type")
    if model_type != "timesformer":
        raise ValueError(
            f"{model_dir}: expected a Hugging Face model of type 'timesformer', found {model_type!r}"
        )
    config = TimesformerConfig.from_pretrained(str(model_dir), local_files_only=True)

    state = checkpoint_filter_fn(_read_hf_state_dict(model_dir), num_frames=num_frames)
    if num_frames is not None:
        config.num_frames = num_frames
    classifier = None
    id2label: list[str] = []
    if "classifier.weight" in state:
        weight = state["classifier.weight"]
        classifier = nn.Linear(weight.shape[1], weight.shape[0])
        id2label = [config.id2label[i] for i in range(weight.shape[0])]

    encoder = TimeSformerEncoder(config, classifier=classifier, id2label=id2label)
    strict_load(encoder, state, f"TimeSformer checkpoint {model_dir}")
    return encoder


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], num_frames: int | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face TimeSformer state dict in :class:`TimeSformerEncoder` naming.

    ``TimesformerForVideoClassification`` keys ``timesformer.*`` and bare ``TimesformerModel``
    keys both become ``backbone.*``; the head ``classifier.*`` keeps its name. ``num_frames``
    other than the checkpoint's resizes the learned time embedding ``[1, T, D]`` by linear
    interpolation along time (endpoints kept).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            out[key] = value
        else:
            out["backbone." + key.removeprefix("timesformer.")] = value
    time_key = "backbone.embeddings.time_embeddings"
    if num_frames is not None and time_key in out and out[time_key].shape[1] != num_frames:
        out[time_key] = F.interpolate(
            out[time_key].transpose(1, 2), size=num_frames, mode="linear", align_corners=True
        ).transpose(1, 2)
    return out


@register_arch("timesformer")
def build(
    size: str | None = "base",
    drop_path_rate: float = 0.0,
    hf_dir: str | None = None,
    hf_config: dict | None = None,
    id2label: list[str] | None = None,
    **kwargs: Any,
) -> TimeSformerEncoder:
    """A TimeSformer of a named size (base/ti, dims overridable), or loaded from ``hf_dir``.

    With ``hf_dir`` the architecture comes from the checkpoint's config; the size arguments are
    checked against it (a mismatch is an error, never silently ignored) and ``num_frames`` may
    differ (the time embedding is resized).
    """
    if hf_config is not None:
        # a converted Hugging Face checkpoint: its own config, and its head when it had one
        config = TimesformerConfig(**hf_config)
        head = nn.Linear(config.hidden_size, len(id2label)) if id2label else None
        encoder = TimeSformerEncoder(config, classifier=head, id2label=id2label)
        _set_stochastic_depth(encoder.backbone, drop_path_rate)
        return encoder
    wanted = timesformer_config(**merge_size_preset("TimeSformer", TIMESFORMER_SIZES, size, kwargs))
    if hf_dir is None:
        encoder = TimeSformerEncoder(wanted)
    else:
        encoder = load_timesformer_hf(hf_dir, num_frames=wanted.num_frames)
        found = encoder.config
        fields = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "image_size",
        )
        mismatched = {
            f: (getattr(wanted, f), getattr(found, f))
            for f in fields
            if getattr(wanted, f) != getattr(found, f)
        }
        if mismatched:
            detail = ", ".join(f"{f}: asked {a}, checkpoint {b}" for f, (a, b) in mismatched.items())
            raise ValueError(f"TimeSformer checkpoint {hf_dir} does not match the requested size: {detail}")
    _set_stochastic_depth(encoder.backbone, drop_path_rate)
    return encoder


@register_kind("hf_timesformer")
def _load_hf_dir(path: Path, cfg: dict) -> TimeSformerEncoder:
    """A local Hugging Face TimeSformer directory used wherever a model directory is."""
    return load_timesformer_hf(path)
