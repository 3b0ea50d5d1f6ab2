"""Official checkpoints -> vtr model directories, strictly.

Two conversions:

* ``convert_videomamba(checkpoint, out)``: the vision encoder alone. Takes either a full official
  UMT_VIDEOMAMBA checkpoint (state dict under ``model``, vision keys under ``vision_encoder.``) or
  a bare vision-encoder state dict (keys as in ``shared/specs/videomamba_official_keys.json``),
  infers the architecture from the tensor shapes, and writes a ``video_encoder`` model directory.
* ``convert_retrieval(checkpoint, out, tokenizer_dir, fmt=...)``: the whole retrieval model of a
  UMT_VIDEOMAMBA (``fmt="videomamba"``) or UMT (``fmt="umt"``, a joint space-time ViT) checkpoint:
  vision encoder, BERT text encoder with its cross-attention ("fusion") layers, ``vision_proj``,
  ``text_proj``, ``temp`` and ``itm_head``, written as a ``retrieval`` model directory with the
  tokenizer of a local BERT directory (checkpoints carry none).

The key mappings live beside each model, as ``checkpoint_filter_fn`` (renames, drops, reshapes)
and ``infer_config_from_state`` (the architecture read from the shapes): VideoMamba/VideoMambaPro
in ``videomamba``, UMT's ViT in ``joint_vit``, the BERT text tower in ``convert_bert`` (and TimeSformer,
UniFormer and Vim in theirs; ``convert_timesformer_uniformer_vim`` converts those). This module holds the
generic parts: reading checkpoints safely, splitting vision and text, the strict loading, the
report of what was dropped, and writing the model directory.

Every key must be accounted for: a key that is neither used nor dropped by name (the training-only
parts, logged) is an error that lists it, and so is every slot of the built model the checkpoint
does not fill. The official code only logs mismatches, which users see as 0 % retrieval accuracy;
here they stop the conversion.
"""
from __future__ import annotations

import logging
import pickle
import re
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import joint_vit, videomamba
from .model_dir import CheckpointError, ModelDirError, save_model_dir, strict_load
from .registry import build_from_config

__all__ = [
    "FORMATS",
    "CheckpointError",
    "convert_retrieval",
    "convert_umt_vision",
    "convert_videomamba",
    "dropped_summary",
    "has_text_encoder",
    "load_checkpoint",
    "save_video_encoder",
    "split_vision",
]

log = logging.getLogger(__name__)

# containers the official training scripts save the state dict under
_WRAPPERS = ("model", "module", "state_dict", "model_state")
# parts of a full retrieval checkpoint that are not the vision encoder (handled by the
# retrieval-model converter, or training-only and dropped by name)
VISION_PREFIX = "vision_encoder."
TEXT_PREFIX = "text_encoder."
# the heads of the official retrieval models, named as in RetrievalModel
_HEAD_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.")
_HEAD_KEYS = frozenset({"temp"})
FORMATS = ("videomamba", "umt")

# Training-only parts of full checkpoints outside either tower, dropped by name (full official key
# -> reason). The towers' own training-only parts are dropped by their checkpoint_filter_fn
# (text: MLM head, NSP pooler, id buffers; UMT: the distillation decoder). Anything not matched and
# not used is an error.
_DROP_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("CLIP teacher (UTA distillation)", re.compile(r"^(clip_teacher|teacher)\.")),
)


# --------------------------------------------------------------------------- reading


class _Inert:
    """Stands in for a non-tensor class in a checkpoint's training metadata (a config object,
    ``argparse.Namespace``, NumPy scalars): accepts whatever the pickle stream hands it and keeps
    nothing, so no code from the file runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


def _load_with_inert_metadata(path: Path) -> tuple[Any, list[str]]:
    """``torch.load`` whose unpickler resolves only the globals torch's weights-only loader allows;
    every other global becomes :class:`_Inert`. Returns the object and the replaced names.

    Why: the official training scripts save ``{"model": ..., "config": <EasyDict>, "optimizer":
    ...}``; ``weights_only=True`` refuses the whole file because of the config class, although the
    weights themselves are plain tensors. Nothing outside torch's own allow-list is imported or
    called here either. (Allow-listing stand-ins with ``torch.serialization.safe_globals`` does
    not work: the weights-only unpickler only fills exact ``dict`` types, and EasyDict is a
    subclass filled with SETITEMS.)
    """
    from torch._weights_only_unpickler import _get_allowed_globals  # noqa: PLC0415

    allowed = _get_allowed_globals()
    replaced: list[str] = []

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            replaced.append(full)
            return _Inert

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    restricted = types.ModuleType("vtr_restricted_pickle")
    restricted.Unpickler = Unpickler  # type: ignore[attr-defined]
    restricted.load = load  # type: ignore[attr-defined]
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)
    return obj, sorted(set(replaced))


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin or .safetensors file and unwrap the state dict.

    PyTorch files are read with ``weights_only=True``; when that refuses the file only because of
    non-tensor training metadata (a config object beside the weights), the file is read again
    with those classes replaced by inert stand-ins (logged), and the state dict must still be
    tensors only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    replaced: list[str] = []
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" not in str(exc):
                raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint: {exc}") from exc
            try:
                obj, replaced = _load_with_inert_metadata(path)
            except Exception as exc2:  # any failure here means "not a readable checkpoint"
                raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint: {exc2}") from exc2
        except Exception as exc:  # truncated files, non-tensor payloads
            raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint: {exc}") from exc
    for key in _WRAPPERS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if replaced:
            raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint: its state dict holds "
                                  f"objects of classes other than tensors ({', '.join(replaced)})")
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if replaced:
        log.info("%s: ignored the non-tensor training metadata (classes %s)", path, ", ".join(replaced))
    return {k.removeprefix("module."): v for k, v in obj.items()}


def split_vision(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(vision-encoder keys with the prefix stripped, every other key)."""
    if any(k.startswith(VISION_PREFIX) for k in state):
        vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
        rest = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
        return vision, rest
    return dict(state), {}


def has_text_encoder(state: Iterable[str]) -> bool:
    """Whether a checkpoint holds a text tower (``text_encoder.`` encoder layers), i.e. can become a
    whole retrieval model. A stray text tensor without layers does not count."""
    return any(k.startswith(TEXT_PREFIX) and ".encoder.layer." in f".{k[len(TEXT_PREFIX):]}" for k in state)


def _drop_reason(key: str, rules: Iterable[tuple[str, re.Pattern[str]]]) -> str | None:
    for reason, pattern in rules:
        if pattern.search(key):
            return reason
    return None


def _summarise(dropped: dict[str, list[str]]) -> str:
    return "; ".join(f"{reason}: {len(keys)} tensors ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for reason, keys in dropped.items())


def list_keys(keys: list[str]) -> str:
    return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")


# --------------------------------------------------------------------------- vision encoders


def save_video_encoder(cfg: dict[str, Any], sd: dict[str, torch.Tensor], checkpoint: str | Path, out: str | Path,
                       name: str | None, arch_label: str, source: dict[str, Any], sizes: str | None = None) -> Path:
    """Build ``cfg``, load ``sd`` strictly (a mismatch is a :class:`CheckpointError`), save a model dir.

    ``sizes`` describes the architecture in the error (default: ``D=<embed_dim> depth=<depth>``).
    """
    cfg["name"] = name or Path(checkpoint).stem
    model = build_from_config(cfg)
    sizes = sizes or f"D={cfg['embed_dim']} depth={cfg['depth']}"
    try:
        strict_load(model, sd, f"{checkpoint} (as {arch_label} {sizes})")
    except ModelDirError as exc:
        raise CheckpointError(str(exc)) from exc
    return save_model_dir(model, out, "video_encoder", cfg, model.preprocess,
                          source={"checkpoint": str(Path(checkpoint).resolve()), **source})


def convert_videomamba(checkpoint: str | Path, out: str | Path, num_frames: int | None = None,
                       variant: str = "videomamba", name: str | None = None, *,
                       state: dict[str, torch.Tensor] | None = None) -> Path:
    """Convert an official VideoMamba checkpoint (full UMT_VIDEOMAMBA or vision-only) to a model dir.

    ``variant="pro"`` marks the weights as VideoMambaPro: the scan reads the un-convolved input,
    both directions start from their first input, and the layout (v1: shared conv/x_proj/dt_proj/D,
    masked backward scan; v2: VideoMamba's keys, no mask) is read from the keys. The v2 keys are
    VideoMamba's, so ``pro`` itself cannot be inferred. ``num_frames`` re-samples the
    temporal position embeddings for another clip length. Only the vision encoder is kept; use
    :func:`convert_retrieval` for the whole retrieval model. ``state``: the checkpoint already
    read with :func:`load_checkpoint` (saves reading a large file twice).
    """
    state = load_checkpoint(checkpoint) if state is None else state
    vision, rest = split_vision(state)
    if rest:
        prefixes = sorted({k.split(".")[0] for k in rest})
        log.info("vision-encoder conversion ignores the non-vision parts: %s "
                 "(use the retrieval-model conversion to keep them)", ", ".join(prefixes))
    cfg = videomamba.infer_config_from_state(vision, num_frames, variant)
    vision = videomamba.checkpoint_filter_fn(vision, num_frames)
    return save_video_encoder(cfg, vision, checkpoint, out, name, cfg["arch"],
                              {"format": "videomamba", "variant": variant})


def convert_umt_vision(checkpoint: str | Path, out: str | Path, num_frames: int | None = None,
                       name: str | None = None, *, num_heads: int | None = None,
                       state: dict[str, torch.Tensor] | None = None) -> Path:
    """Convert the vision encoder of an official UMT checkpoint (full or vision-only) to a joint_vit
    model dir. The distillation decoder (``clip_decoder.*``) and non-vision parts are dropped and
    logged; everything else must map (see ``joint_vit.umt_key_mapping``)."""
    state = load_checkpoint(checkpoint) if state is None else state
    vision, rest = split_vision(state)
    if rest:
        log.info("vision-encoder conversion ignores the non-vision parts: %s",
                 ", ".join(sorted({k.split(".")[0] for k in rest})))
    cfg = joint_vit.infer_config_from_state(vision, num_frames, num_heads)
    dropped: dict[str, list[str]] = {}
    unmapped: list[str] = []
    sd = joint_vit.checkpoint_filter_fn(vision, dropped=dropped, unmapped=unmapped)
    if dropped:
        log.info("%s: dropped training-only parts by name: %s", checkpoint, _summarise(dropped))
    if unmapped:
        raise CheckpointError(f"{checkpoint}: vision keys with no place in vtr's joint_vit: {list_keys(sorted(unmapped))}")
    return save_video_encoder(cfg, sd, checkpoint, out, name, "UMT -> joint_vit", {"format": "umt"})


# --------------------------------------------------------------------------- tokenizer


def _read_tokenizer(tokenizer_dir: Path) -> Any:
    """The tokenizer of a local BERT directory (nothing is downloaded)."""
    from transformers import AutoTokenizer, BertTokenizerFast  # noqa: PLC0415

    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir} (pass a local BERT folder such as "
                                "bert-base-uncased with vocab.txt or tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # fall back to a bare vocab.txt, else explain
        if (tokenizer_dir / "vocab.txt").is_file():
            return BertTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
        raise ValueError(f"{tokenizer_dir} holds no usable tokenizer (expected tokenizer.json or vocab.txt, "
                         f"as in a bert-base-uncased folder): {exc}") from exc


# --------------------------------------------------------------------------- whole retrieval model


def convert_retrieval(checkpoint: str | Path, out: str | Path, tokenizer_dir: str | Path, fmt: str = "videomamba",
                      num_frames: int | None = None, variant: str = "videomamba", name: str | None = None, *,
                      num_heads: int | None = None, max_text_len: int | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> Path:
    """Convert a full official retrieval checkpoint (UMT_VIDEOMAMBA or UMT) into a retrieval model dir.

    Args:
        checkpoint: the official ``.pth`` (state dict under ``model``) or ``.safetensors``.
        out: model directory to write; ``retrieval.models.model_dir.load_model(out)`` returns the model.
        tokenizer_dir: local BERT folder (bert-base-uncased for the official models) whose
            tokenizer is saved with the model; its config.json supplies what the shapes cannot.
        fmt: ``"videomamba"`` (vision keys as in the VideoMamba spec) or ``"umt"`` (UMT's ViT,
            mapped onto vtr's ``joint_vit``).
        num_frames: VideoMamba: re-sample the temporal position embeddings; UMT: the clip length
            the model is built for (not stored in UMT weights; default 4, the official zero-shot
            setting).
        variant: VideoMamba only: ``"pro"`` marks VideoMambaPro weights.
        num_heads: UMT only: attention heads, when the width is not 64 per head.
        max_text_len: tokens per caption when a caller does not say (default: RetrievalModel's).
        state: the checkpoint already read with :func:`load_checkpoint`.
    """
    from . import convert_bert  # noqa: PLC0415  (transformers: imported only when needed)
    from .retrieval_model import DEFAULT_MAX_TEXT_LEN, RetrievalModel  # noqa: PLC0415
    from .text import TextEncoder  # noqa: PLC0415

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    if fmt == "umt" and variant != "videomamba":
        raise ValueError("variant applies to VideoMamba checkpoints only (UMT has one variant)")
    checkpoint, tokenizer_dir = Path(checkpoint), Path(tokenizer_dir).expanduser()
    tokenizer = _read_tokenizer(tokenizer_dir)
    state = load_checkpoint(checkpoint) if state is None else state
    if not any(k.startswith(VISION_PREFIX) for k in state) or not has_text_encoder(state):
        raise CheckpointError(f"{checkpoint} is not a full retrieval checkpoint (it needs vision_encoder.* and "
                              "text_encoder.* encoder layers); convert the vision encoder alone without a tokenizer")

    # 1. sort every key: used (vision / text / heads), dropped by name, or unknown
    dropped: dict[str, list[str]] = {}
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        reason = _drop_reason(key, _DROP_RULES)
        if reason is not None:
            dropped.setdefault(reason, []).append(key)
        elif key.startswith(VISION_PREFIX):
            vision[key[len(VISION_PREFIX):]] = value
        elif key.startswith(TEXT_PREFIX):
            text[key[len(TEXT_PREFIX):]] = value
        elif key.startswith(_HEAD_PREFIXES) or key in _HEAD_KEYS:
            heads[key] = value
        else:
            unknown.append(key)

    # 2. each tower's own mapping (training-only parts dropped there, recorded under full key names)
    tower_dropped: dict[str, list[str]] = {}
    text = convert_bert.checkpoint_filter_fn(text, dropped=tower_dropped)
    for reason, keys in tower_dropped.items():
        dropped.setdefault(reason, []).extend(TEXT_PREFIX + k for k in keys)
    if fmt == "videomamba":
        vcfg = videomamba.infer_config_from_state(vision, num_frames, variant)
        vsd = videomamba.checkpoint_filter_fn(vision, num_frames)
    else:
        vcfg = joint_vit.infer_config_from_state(vision, num_frames, num_heads)
        tower_dropped, unmapped = {}, []
        vsd = joint_vit.checkpoint_filter_fn(vision, dropped=tower_dropped, unmapped=unmapped)
        for reason, keys in tower_dropped.items():
            dropped.setdefault(reason, []).extend(VISION_PREFIX + k for k in keys)
        unknown += [VISION_PREFIX + k for k in unmapped]
    vcfg["name"] = name or checkpoint.stem
    video = build_from_config(vcfg)

    # 3. text encoder and heads
    bert_config, fusion_layer, encoder_width = convert_bert.infer_config_from_state(text, tokenizer_dir)
    if encoder_width != video.embed_dim:
        raise CheckpointError(f"{checkpoint}: the text encoder's cross-attention reads {encoder_width}-wide vision "
                              f"tokens but the vision encoder is {video.embed_dim} wide")
    if len(tokenizer) > bert_config.vocab_size:
        raise CheckpointError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the checkpoint's "
                              f"text encoder only {bert_config.vocab_size}: pass the tokenizer the model was trained "
                              "with (bert-base-uncased for the official models)")
    if "vision_proj.weight" not in heads:
        raise CheckpointError(f"{checkpoint}: missing keys: vision_proj.weight (the projection into the shared space)")
    embed_dim = int(heads["vision_proj.weight"].shape[0])
    text_encoder = TextEncoder.from_config(bert_config, fusion_layer, encoder_width)
    model = RetrievalModel(video, text_encoder, embed_dim, tokenizer, max_text_len or DEFAULT_MAX_TEXT_LEN,
                           with_mlm=False)

    # 4. strict load of everything (one error listing every problem), then save
    full = {**{f"video.{k}": v for k, v in vsd.items()}, **{f"text.{k}": v for k, v in text.items()}, **heads}
    if "temp" in full and full["temp"].dim() == 1 and full["temp"].numel() == 1:
        full["temp"] = full["temp"].reshape(())
    what = (f"{checkpoint} (as {fmt} D={vcfg['embed_dim']} depth={vcfg['depth']} + BERT "
            f"{bert_config.num_hidden_layers}x{bert_config.hidden_size} fusion from layer {fusion_layer})")
    problems = []
    if unknown:
        problems.append(f"{checkpoint}: keys that are neither part of the {fmt} retrieval model nor known "
                        f"training-only parts: {list_keys(sorted(unknown))}")
    try:
        strict_load(model, full, what)
    except ModelDirError as exc:
        problems.append(f"{exc}\n  (vtr names: video.* is the checkpoint's vision_encoder.*"
                        f"{' after the UMT key mapping' if fmt == 'umt' else ''}, text.* is "
                        "text_encoder.bert.*, the heads keep their names)")
    if problems:
        raise CheckpointError("\n".join(problems))
    if dropped:
        log.info("%s: dropped training-only parts by name: %s", checkpoint, _summarise(dropped))
    source = {"checkpoint": str(checkpoint.resolve()), "format": fmt, "variant": variant,
              "tokenizer": str(tokenizer_dir.resolve()),
              "dropped": {reason: len(keys) for reason, keys in dropped.items()}}
    return model.save(out, source=source)


def dropped_summary(out: str | Path) -> dict[str, int]:
    """What a conversion dropped, as recorded in the model directory (reason -> tensor count)."""
    from .model_dir import read_model_config  # noqa: PLC0415

    return dict(read_model_config(out).get("source", {}).get("dropped", {}))
