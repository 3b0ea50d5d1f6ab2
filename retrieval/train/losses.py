"""UMT-style pretraining losses: VTC, VTM, MLM (with its BERT-style token masking) and UTA
(unmasked-teacher alignment)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..models.retrieval_model import RetrievalModel


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    torch.distributed.nn's all_gather sends its incoming gradients through gloo's all-to-all,
    which reads raw memory: a permuted gradient (as einsum produces for [B, T, E] features)
    would be sent scrambled. Slicing a contiguous gradient along dim 0 keeps every piece
    contiguous.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0; gradients flow back to their owners."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather  # noqa: PLC0415

    return _ContiguousGrad.apply(torch.cat(all_gather(x), dim=0))


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def _soft_targets(idx_rows: torch.Tensor, idx_cols: torch.Tensor) -> torch.Tensor:
    pos = (idx_rows[:, None] == idx_cols[None, :]).float()
    return pos / pos.sum(1, keepdim=True)


def vtc_loss(text_feat: torch.Tensor, video_feat: torch.Tensor, idx: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss; every pair sharing a video index is a positive.

    Local rows are scored against the features of all processes (gathered with gradient), so
    the loss over N processes of batch b equals one process of batch N*b.
    """
    idx = idx.to(text_feat.device)  # gathered on the device (NCCL moves CUDA tensors only)
    t_all, v_all, idx_all = gather_with_grad(text_feat), gather_with_grad(video_feat), gather_no_grad(idx)
    s_t2v = RetrievalModel.similarity(text_feat, v_all) / temp             # [b, N*b]
    s_v2t = RetrievalModel.similarity(t_all, video_feat).t() / temp        # [b, N*b]
    tgt = _soft_targets(idx, idx_all)
    loss_t2v = -(F.log_softmax(s_t2v, dim=1) * tgt).sum(1).mean()
    loss_v2t = -(F.log_softmax(s_v2t, dim=1) * tgt).sum(1).mean()
    return (loss_t2v + loss_v2t) / 2


def vtm_loss(model: RetrievalModel, video_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
             text_feat: torch.Tensor, video_feat: torch.Tensor, idx: torch.Tensor, temp: torch.Tensor,
             generator: torch.Generator | None = None, pairs: int = 0) -> torch.Tensor:
    """Matching with one hard negative video per text and one hard negative text per video.

    ``pairs > 0`` scores only the first ``pairs`` positives (and their two negatives, still drawn
    from the whole batch): the fusion pass costs as much as the text tower, so a fast recipe can
    train the matching head on a share of each batch.
    """
    b = video_tokens.shape[0]
    # idx may stay on the host: which pairs are positives is decided there, without a device sync
    host_same = idx[:, None] == idx[None, :]
    if bool(host_same.all(1).any()):  # a text whose every candidate is a positive has no negative
        return video_tokens.new_zeros(())
    with torch.no_grad():
        sim = RetrievalModel.similarity(text_feat, video_feat) / temp      # [b texts, b videos]
        same = host_same.to(sim.device)
        w_t2v = F.softmax(sim.float(), dim=1).masked_fill(same, 0) + 1e-12
        w_v2t = F.softmax(sim.t().float(), dim=1).masked_fill(same, 0) + 1e-12
        w_t2v = w_t2v.masked_fill(same, 0)
        w_v2t = w_v2t.masked_fill(same, 0)
        neg_video = torch.multinomial(w_t2v, 1, generator=generator).squeeze(1)
        neg_text = torch.multinomial(w_v2t, 1, generator=generator).squeeze(1)
    all_video, all_hidden, all_mask = video_tokens, text_hidden, text_mask
    if 0 < pairs < b:
        video_tokens, text_hidden, text_mask = video_tokens[:pairs], text_hidden[:pairs], text_mask[:pairs]
        neg_video, neg_text, b = neg_video[:pairs], neg_text[:pairs], pairs
    v = torch.cat([video_tokens, all_video[neg_video], video_tokens], dim=0)
    th = torch.cat([text_hidden, text_hidden, all_hidden[neg_text]], dim=0)
    tm = torch.cat([text_mask, text_mask, all_mask[neg_text]], dim=0)
    fused = model.text(attention_mask=tm, mode="fusion", hidden_states=th, encoder_hidden_states=v)
    logits = model.itm_head(fused[:, 0])
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device),
                        torch.zeros(2 * b, dtype=torch.long, device=logits.device)])
    return F.cross_entropy(logits.float(), labels)


def action_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets ``[B, C]`` (rows summing to 1); rows without a label
    (all zero) are left out. Zero when no row has one."""
    labelled = targets.sum(1) > 0
    if not labelled.any():
        return logits.new_zeros(())
    logp = F.log_softmax(logits[labelled].float(), dim=-1)
    return -(logp * targets[labelled].to(logp)).sum(1).mean()


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


def mlm_loss(model: RetrievalModel, input_ids: torch.Tensor, text_mask: torch.Tensor, video_tokens: torch.Tensor,
             special: SpecialTokenIds, mask_prob: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    if model.mlm_head is None:
        raise ValueError("the MLM loss needs a model built with_mlm=True")
    # the masking is drawn on the host ids (the tokenizer's; the same draw on every device), so the
    # positions scored are known without a device sync
    masked, labels = mask_tokens(input_ids.cpu(), special, model.text.config.vocab_size, mask_prob, generator)
    if (labels == -100).all():
        return video_tokens.new_zeros(())
    device = video_tokens.device
    hidden = model.text(masked.to(device), text_mask.to(device), mode="multimodal",
                        encoder_hidden_states=video_tokens)
    picked = labels != -100  # the vocabulary projection is the costly part: only where it is scored
    rows = picked.flatten().nonzero().squeeze(1)   # host positions: no data-dependent shape on the device
    logits = model.mlm_head(hidden.flatten(0, 1)[rows.to(device)])
    return F.cross_entropy(logits.float(), labels.flatten()[rows].to(device))


def visible_per_frame(n: int, mask_ratio: float) -> int:
    """Patches a frame of ``n`` keeps visible at ``mask_ratio``: ``n - int(n * ratio)``, as the
    official code counts (40 of 196 at 0.8, 98 of 196 at 0.5)."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    return n - int(n * mask_ratio)


def teacher_guided_mask(attention: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                        mode: str = "sample") -> torch.Tensor:
    """The student's drop mask ``[B, T*N]`` (True = dropped) from the teacher's attention ``[B, T, N]``.

    Per frame, ``visible_per_frame(N, mask_ratio)`` patches stay visible. ``mode="sample"`` (the
    official rule) draws them with ``torch.multinomial`` without replacement, with probabilities
    proportional to the cls query's attention (the weights as they are, not renormalised:
    multinomial only needs them non-negative); ``"topk"`` keeps the most-attended ones, a
    deterministic choice for tests. The cls slot is not part of the mask: it is always visible.
    """
    if mode not in ("sample", "topk"):
        raise ValueError(f"UTA mask mode must be 'sample' (official) or 'topk', got {mode!r}")
    b, t, n = attention.shape
    keep_n = visible_per_frame(n, mask_ratio)
    weights = attention.float().reshape(b * t, n)
    if mode == "topk":
        keep = weights.topk(keep_n, dim=-1).indices
    else:
        keep = torch.multinomial(weights.clamp_min(0), keep_n, replacement=False, generator=generator)
    mask = torch.ones(b * t, n, dtype=torch.bool, device=attention.device)
    mask.scatter_(1, keep, False)
    return mask.reshape(b, t * n)


def visible_targets(targets: torch.Tensor, mask: torch.Tensor, visible: int | None = None) -> torch.Tensor:
    """The teacher's targets ``[K, B, L, D]`` at the student's visible places.

    ``mask`` is the patch mask ``[B, T*N]`` with ``visible`` False entries per row (counted from
    the mask when not given; giving it keeps the shapes known without reading the mask, so no
    device sync). With ``L = 1 + T*N`` (a cls target first) the cls slot is always kept. Returns
    ``[K, B, V, D]`` in sequence order.
    """
    k, b, length, d = targets.shape
    if visible is None:
        visible = int((~mask[0]).sum())
    if length == mask.shape[1] + 1:
        mask = torch.cat([mask.new_zeros(b, 1), mask], dim=1)
        visible += 1
    elif length != mask.shape[1]:
        raise ValueError(f"UTA: the teacher gives {length} targets per sample but the mask covers "
                         f"{mask.shape[1]} patches (do the teacher's and the student's patch grids agree?)")
    # a stable sort puts the kept (False) places first, in sequence order
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, :visible]
    return targets.gather(2, order[None, :, :, None].expand(k, -1, -1, d))


def uta_loss(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of ``2 - 2 cos`` over every aligned token (cls included where present) and layer.

    ``student`` and ``targets`` are ``[K, B, V, D]`` (or ``[B, V, D]``), token for token; both are
    L2-normalised here, so the inputs may be raw decoder outputs.
    """
    if student.shape != targets.shape:
        raise ValueError(f"UTA: the student's aligned tokens {tuple(student.shape)} do not match the teacher's "
                         f"{tuple(targets.shape)} (is the student's clip_output_dim the teacher's width?)")
    cos = (F.normalize(student.float(), dim=-1) * F.normalize(targets.float(), dim=-1)).sum(-1)
    return (2 - 2 * cos).mean()
