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

Building the tower from a local BERT directory and mapping official text towers onto it is
``retrieval.models.convert_bert``; the MLM masking that feeds :class:`MLMHead` in training is
``retrieval.train.losses.mask_tokens``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, PreTrainedTokenizerBase
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)

from ..data.corpora import DEFAULT_CAPTION_CLEANING, clean_caption, is_blank_caption

TextMode = Literal["text", "fusion", "multimodal"]


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
    ``convert_bert.load_text_encoder`` to start from pretrained BERT weights.
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


# --------------------------------------------------------------------------- text preparation


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int,
    cleaning: str = DEFAULT_CAPTION_CLEANING, cleaned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and tokenise ``texts`` into ``(input_ids, attention_mask)``, both [N, L] int64.

    ``cleaning`` names the caption cleaning the model was trained with
    (:data:`retrieval.data.corpora.CAPTION_CLEANINGS`; the model directory records it).
    Sequences are truncated to ``max_len`` tokens (CLS and SEP included; the per-corpus limits
    are in the spec) and padded to the longest in the batch: padded keys are masked, so padding
    further would only cost time. A text that is blank after cleaning would encode as bare
    CLS/SEP and silently match anything, so it is an error naming its index. ``cleaned``: the
    texts were cleaned by ``cleaning`` and checked already (a search query is, once, when it is
    read); cleaning twice is not always a no-op (``"<<person>>"``).
    """
    if not texts:
        raise ValueError("tokenize needs at least one text")
    for index, text in enumerate(texts):
        if (not text.strip()) if cleaned else is_blank_caption(text, cleaning):
            raise ValueError(f"text {index} ({text!r}) is empty after cleaning")
    if not cleaned:
        texts = [clean_caption(text, cleaning) for text in texts]
    encoded = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]
