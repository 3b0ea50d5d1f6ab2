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

Every key must be accounted for: a key that is neither used nor dropped by name (the rules in
``_DROP_RULES``, all training-only parts, logged) is an error that lists it, and so is every
slot of the built model the checkpoint does not fill. The official code only logs mismatches,
which users see as 0 % retrieval accuracy; here they stop the conversion.
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

from .model_dir import ModelDirError, save_model_dir, strict_load
from .registry import build_from_config
from .videomamba import resize_temporal_pos

log = logging.getLogger(__name__)

# containers the official training scripts save the state dict under
_WRAPPERS = ("model", "module", "state_dict", "model_state")
# parts of a full retrieval checkpoint that are not the vision encoder (handled by the
# retrieval-model converter, or training-only and dropped by name)
VISION_PREFIX = "vision_encoder."
TEXT_PREFIX = "text_encoder."
# aliases used by other official VideoMamba folders (video_sm: norm_f, K400 head)
_ALIASES = {"norm_f.weight": "norm.weight"}
# the heads of the official retrieval models, named as in RetrievalModel
_HEAD_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.")
_HEAD_KEYS = frozenset({"temp"})
FORMATS = ("videomamba", "umt")

# Training-only parts of full checkpoints, dropped by name (full official key -> reason). Anything
# not matched here and not used is an error. The text rules cover both official namings:
# pretraining checkpoints (BertForMaskedLM: ``text_encoder.bert.*`` + ``text_encoder.cls.*``) and
# fine-tuned ones (BertModel: ``text_encoder.*``).
_DROP_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("CLIP teacher (UTA distillation)", re.compile(r"^(clip_teacher|teacher)\.")),
    ("MLM head", re.compile(r"^text_encoder\.cls\.")),
    ("BERT pooler (NSP)", re.compile(r"^text_encoder\.(bert\.)?pooler\.")),
    ("BERT id buffers", re.compile(r"^text_encoder\.(bert\.)?embeddings\.(position_ids|token_type_ids)$")),
)
# UMT-only: the student's distillation heads (joint_vit has no UTA decoder)
_UMT_CLIP_DECODER = ("UMT distillation decoder", re.compile(r"^vision_encoder\.clip_decoder\."))


class CheckpointError(ValueError):
    pass


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


def _list_keys(keys: list[str]) -> str:
    return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")


# --------------------------------------------------------------------------- VideoMamba vision


def infer_videomamba_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture hyper-parameters from the shapes of a VideoMamba vision state dict."""
    need = ("patch_embed.proj.weight", "pos_embed", "temporal_pos_embedding", "layers.0.mixer.A_log")
    absent = [k for k in need if k not in sd]
    if absent:
        hint = "; it looks like UMT's ViT: use --format umt" if "encoder.patch_embed.proj.weight" in sd else ""
        raise CheckpointError("not a VideoMamba vision encoder: missing " + ", ".join(absent)
                              + f" (first keys seen: {', '.join(list(sd)[:5])}){hint}")
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


def bimamba_layout_of(sd: dict[str, torch.Tensor]) -> str:
    """"v2" when the backward branch has its own conv1d_b/x_proj_b/dt_proj_b/D_b (VideoMamba, Vim,
    VideoMambaPro v2), "v1" when only A_b_log is separate (VideoMambaPro's masked model)."""
    mixer = "layers.0.mixer."
    if f"{mixer}conv1d_b.weight" in sd:
        return "v2"
    if f"{mixer}A_b_log" in sd:
        return "v1"
    raise CheckpointError(f"not a bidirectional Mamba: {mixer}A_b_log is missing")


def pro_config(layout: str) -> dict[str, Any]:
    """What VideoMambaPro's code computes for weights of one layout (hotfinda/VideoMambaPro,
    mamba_simple.py + selective_scan_interface.py): the scan, the D skip and the start state read
    in_proj's x before the conv; both directions start from their first input; the masked
    backward scan belongs to the v1 layout only (``bimamba_inner_ref``)."""
    return {"bimamba_layout": layout, "scan_input": "raw", "elemental_residual": True,
            "mask_backward": layout == "v1"}


def _videomamba_vision(vision: dict[str, torch.Tensor], num_frames: int | None,
                       variant: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(builder config, state dict in vtr naming) of an official VideoMamba vision state dict.

    The distillation head ``clip_decoder`` is kept: vtr's VideoMamba has the same module (UTA).
    """
    vision = {_ALIASES.get(k, k): v for k, v in vision.items()}
    if variant not in ("videomamba", "pro"):
        raise ValueError(f"variant must be 'videomamba' or 'pro', got {variant!r}")
    cfg = infer_videomamba_config(vision)
    layout = bimamba_layout_of(vision)
    if variant == "pro":
        cfg.update(pro_config(layout))
    elif layout != "v2":
        raise CheckpointError("these weights share conv1d/x_proj/dt_proj between the two scan directions "
                              "(bimamba v1): that is VideoMambaPro's masked model; convert with --variant pro")
    if num_frames and num_frames != cfg["num_frames"]:
        vision["temporal_pos_embedding"] = resize_temporal_pos(vision["temporal_pos_embedding"], num_frames)
        cfg["num_frames"] = num_frames
    return cfg, vision


def _save_video_encoder(cfg: dict[str, Any], sd: dict[str, torch.Tensor], checkpoint: str | Path, out: str | Path,
                        name: str | None, arch_label: str, source: dict[str, Any]) -> Path:
    """Build ``cfg``, load ``sd`` strictly (a mismatch is a :class:`CheckpointError`), save a model dir."""
    cfg["name"] = name or Path(checkpoint).stem
    model = build_from_config(cfg)
    try:
        strict_load(model, sd, f"{checkpoint} (as {arch_label} D={cfg['embed_dim']} depth={cfg['depth']})")
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
    cfg, vision = _videomamba_vision(vision, num_frames, variant)
    return _save_video_encoder(cfg, vision, checkpoint, out, name, cfg["arch"],
                               {"format": "videomamba", "variant": variant})


# --------------------------------------------------------------------------- UMT vision (joint ViT)

# UMT's frame count is not stored in its weights (its position table is computed, not learned);
# the official zero-shot retrieval evaluation of UMT-B/16 and UMT-L/16 uses 4 frames.
UMT_DEFAULT_FRAMES = 4
UMT_IMG_SIZE = 224
# UMT (OpenGVLab/unmasked_teacher, multi_modality/models/backbones/vit/vit.py, the model under
# ``vision_encoder.``) -> vtr joint_vit. q_bias/v_bias are handled in _umt_vision.
_UMT_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^encoder\.patch_embed\.proj\.(weight|bias)$"), r"patch_embed.\1"),
    (re.compile(r"^encoder\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"),
     r"blocks.\1.\2.\3"),
    (re.compile(r"^encoder\.blocks\.(\d+)\.attn\.qkv\.weight$"), r"blocks.\1.attn.qkv.weight"),
    (re.compile(r"^encoder\.norm\.(weight|bias)$"), r"norm.\1"),
    (re.compile(r"^pool_norm\.(weight|bias)$"), r"pool_norm.\1"),
)
_UMT_QV_BIAS = re.compile(r"^encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$")


def umt_key_mapping() -> list[tuple[str, str]]:
    """The UMT -> joint_vit key mapping as (UMT pattern, joint_vit name) pairs, for documentation."""
    rows = [(p.pattern, r) for p, r in _UMT_RENAMES]
    rows.append((_UMT_QV_BIAS.pattern, r"blocks.\1.attn.qkv.bias = cat(q_bias, 0, v_bias)"))
    return rows


def _umt_vision(vision: dict[str, torch.Tensor], num_frames: int | None, num_heads: int | None,
                img_size: int = UMT_IMG_SIZE) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """(joint_vit config, state dict in joint_vit naming, keys left unmapped) of a UMT ViT.

    Facts used (UMT's ``PretrainVisionTransformer``): Conv3d patch embedding with kernel
    ``(tubelet, p, p)``; no cls token; a fixed sinusoidal table over all ``T'·N`` positions
    (not in the checkpoint); pre-norm blocks with LayerNorm eps 1e-6, ``qkv`` without bias plus
    separate ``q_bias``/``v_bias`` (the key bias is zero), GELU MLP; final ``encoder.norm``;
    ``pool_norm`` over the per-frame mean of the patch tokens (``keep_temporal`` for retrieval).
    """
    if "encoder.patch_embed.proj.weight" not in vision:
        raise CheckpointError("not a UMT vision encoder: missing encoder.patch_embed.proj.weight "
                              f"(first keys seen: {', '.join(list(vision)[:5])}); "
                              "for VideoMamba checkpoints use --format videomamba")
    w = vision["encoder.patch_embed.proj.weight"]
    if w.dim() != 5:
        raise CheckpointError(f"encoder.patch_embed.proj.weight has shape {tuple(w.shape)}; UMT uses a Conv3d "
                              "[D, 3, tubelet, p, p]")
    dim, in_chans, tubelet, patch, _ = (int(s) for s in w.shape)
    if in_chans != 3:
        raise CheckpointError(f"UMT patch embedding reads {in_chans} channels; vtr's joint_vit reads RGB (3)")
    blocks = sorted({int(m.group(1)) for k in vision if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))})
    if not blocks:
        raise CheckpointError("not a UMT vision encoder: no encoder.blocks.* keys")
    fc1 = vision.get("encoder.blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError("UMT vision encoder: missing encoder.blocks.0.mlp.fc1.weight")
    if num_heads is None:
        if dim % 64:
            raise CheckpointError(f"UMT width {dim} is not a multiple of 64, so the number of attention heads "
                                  "(not stored in the weights) cannot be assumed; pass num_heads")
        num_heads = dim // 64  # UMT-B: 768/12, UMT-L: 1024/16 (head width 64)
    frames = num_frames or UMT_DEFAULT_FRAMES
    if frames % tubelet:
        raise CheckpointError(f"num_frames {frames} is not a multiple of the checkpoint's tubelet size {tubelet}")
    cfg: dict[str, Any] = {
        "arch": "joint_vit", "size": None, "embed_dim": dim, "depth": blocks[-1] + 1, "num_heads": num_heads,
        "mlp_ratio": int(fc1.shape[0]) / dim, "patch_size": patch, "tubelet_size": tubelet,
        "num_frames": frames, "img_size": img_size, "pool": "avg", "cls_token": False, "pos_embed": "sincos",
        "keep_temporal": True, "pool_norm": "pool_norm.weight" in vision,
    }
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    qv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in vision.items():
        if m := _UMT_QV_BIAS.match(key):
            qv.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        for pattern, repl in _UMT_RENAMES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unmapped.append(key)
    for i, parts in sorted(qv.items()):
        if set(parts) != {"q", "v"}:
            lack = "v_bias" if "q" in parts else "q_bias"
            raise CheckpointError(f"UMT vision encoder: encoder.blocks.{i}.attn.{lack} is missing "
                                  "(q_bias and v_bias come in pairs)")
        q, v = parts["q"], parts["v"]
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return cfg, out, unmapped


def convert_umt_vision(checkpoint: str | Path, out: str | Path, num_frames: int | None = None,
                       name: str | None = None, *, num_heads: int | None = None,
                       state: dict[str, torch.Tensor] | None = None) -> Path:
    """Convert the vision encoder of an official UMT checkpoint (full or vision-only) to a joint_vit
    model dir. The distillation decoder (``clip_decoder.*``) and non-vision parts are dropped and
    logged; everything else must map (see :func:`umt_key_mapping`)."""
    state = load_checkpoint(checkpoint) if state is None else state
    vision, rest = split_vision(state)
    if rest:
        log.info("vision-encoder conversion ignores the non-vision parts: %s",
                 ", ".join(sorted({k.split(".")[0] for k in rest})))
    decoder = [k for k in vision if k.startswith("clip_decoder.")]
    if decoder:
        log.info("dropped the UMT distillation decoder: %d tensors (clip_decoder.*)", len(decoder))
    cfg, sd, unmapped = _umt_vision({k: v for k, v in vision.items() if k not in set(decoder)}, num_frames, num_heads)
    if unmapped:
        raise CheckpointError(f"{checkpoint}: vision keys with no place in vtr's joint_vit: {_list_keys(sorted(unmapped))}")
    return _save_video_encoder(cfg, sd, checkpoint, out, name, "UMT -> joint_vit", {"format": "umt"})


# --------------------------------------------------------------------------- text tower


def _text_state(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``text_encoder.*`` keys (prefix already stripped) -> TextEncoder naming."""
    from .text import _to_encoder_key  # noqa: PLC0415

    return {_to_encoder_key(k): v for k, v in text.items()}


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


def infer_bert_config(text: dict[str, torch.Tensor], tokenizer_dir: Path | None = None) -> tuple[Any, int, int]:
    """(BertConfig, fusion_layer, encoder_width) of a text state dict in TextEncoder naming.

    Sizes come from the tensor shapes; what shapes cannot tell (attention heads, activation,
    LayerNorm eps, dropout) comes from ``tokenizer_dir/config.json`` when it is a BERT config,
    else BERT's defaults with 64-wide heads. ``fusion_layer`` is the first layer with
    cross-attention; ``encoder_width`` the width its key projection reads (the vision width).
    """
    from transformers import BertConfig  # noqa: PLC0415

    need = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "encoder.layer.0.intermediate.dense.weight")
    absent = [k for k in need if k not in text]
    if absent:
        raise CheckpointError("the text encoder is incomplete: missing " + ", ".join(f"text_encoder.bert.{k}" for k in absent))
    vocab, hidden = (int(s) for s in text["embeddings.word_embeddings.weight"].shape)
    layers = sorted({int(m.group(1)) for k in text if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    cross = sorted({int(m.group(1)) for k in text if (m := re.match(r"encoder\.layer\.(\d+)\.crossattention\.", k))})
    if not cross:
        raise CheckpointError("the text encoder has no cross-attention (crossattention.*) layers, so it cannot "
                              "score video-text matches; is this a retrieval checkpoint?")
    fusion_layer = cross[0]
    width_key = f"encoder.layer.{fusion_layer}.crossattention.self.key.weight"
    if width_key not in text:
        raise CheckpointError(f"the text encoder is incomplete: missing text_encoder.bert.{width_key}")
    shapes = {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers[-1] + 1,
        "max_position_embeddings": int(text["embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(text["embeddings.token_type_embeddings.weight"].shape[0]),
        "intermediate_size": int(text["encoder.layer.0.intermediate.dense.weight"].shape[0]),
    }
    config_file = tokenizer_dir / "config.json" if tokenizer_dir is not None else None
    if config_file is not None and config_file.is_file():
        import json  # noqa: PLC0415

        raw = json.loads(config_file.read_text())
        if raw.get("model_type") not in (None, "bert"):
            raise ValueError(f"{config_file} has model_type {raw.get('model_type')!r}; the official text encoder "
                             "is BERT: pass a BERT folder such as bert-base-uncased")
        config = BertConfig.from_dict(raw)
        differ = {k: (getattr(config, k), v) for k, v in shapes.items() if getattr(config, k) != v}
        if differ:
            log.info("%s describes another size than the checkpoint; the checkpoint's shapes win: %s", config_file,
                     ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items()))
        for k, v in shapes.items():
            setattr(config, k, v)
    else:
        if hidden % 64:
            raise CheckpointError(f"text width {hidden} is not a multiple of 64 and no config.json gives the number "
                                  f"of attention heads; put the BERT config.json in the tokenizer directory")
        config = BertConfig(**shapes, num_attention_heads=hidden // 64)
        log.info("no BERT config.json beside the tokenizer: BERT defaults with %d attention heads",
                 config.num_attention_heads)
    if hidden % config.num_attention_heads:
        raise CheckpointError(f"text width {hidden} is not divisible by {config.num_attention_heads} attention heads "
                              f"({config_file}); fix num_attention_heads there")
    return config, fusion_layer, int(text[width_key].shape[1])


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
    from .retrieval_model import DEFAULT_MAX_TEXT_LEN, RetrievalModel  # noqa: PLC0415
    from .text import TextEncoder, droppable_keys  # noqa: PLC0415

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
    rules = _DROP_RULES + ((_UMT_CLIP_DECODER,) if fmt == "umt" else ())
    dropped: dict[str, list[str]] = {}
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        reason = _drop_reason(key, rules)
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
    text = _text_state(text)
    for key in droppable_keys(list(text)):  # anything TextEncoder itself declares droppable
        dropped.setdefault("BERT pretraining extras", []).append(TEXT_PREFIX + key)
        del text[key]

    # 2. vision encoder
    if fmt == "videomamba":
        vcfg, vsd = _videomamba_vision(vision, num_frames, variant)
    else:
        vcfg, vsd, unmapped = _umt_vision(vision, num_frames, num_heads)
        unknown += [VISION_PREFIX + k for k in unmapped]
    vcfg["name"] = name or checkpoint.stem
    video = build_from_config(vcfg)

    # 3. text encoder and heads
    bert_config, fusion_layer, encoder_width = infer_bert_config(text, tokenizer_dir)
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
                        f"training-only parts: {_list_keys(sorted(unknown))}")
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
