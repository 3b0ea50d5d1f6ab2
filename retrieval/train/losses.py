"""UMT-style pretraining losses: VTC, VTM, MLM and UTA (unmasked-teacher alignment)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.dual import RetrievalModel
from ..models.text import SpecialTokenIds, mask_tokens


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
    with torch.no_grad():
        sim = RetrievalModel.similarity(text_feat, video_feat) / temp      # [b texts, b videos]
        same = idx[:, None] == idx[None, :]
        w_t2v = F.softmax(sim.float(), dim=1).masked_fill(same, 0) + 1e-12
        w_v2t = F.softmax(sim.t().float(), dim=1).masked_fill(same, 0) + 1e-12
        w_t2v = w_t2v.masked_fill(same, 0)
        w_v2t = w_v2t.masked_fill(same, 0)
        if (w_t2v.sum(1) == 0).any():  # a batch where every pair is a positive has no negative
            return video_tokens.new_zeros(())
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
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
    return F.cross_entropy(logits.float(), labels)


def action_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets ``[B, C]`` (rows summing to 1); rows without a label
    (all zero) are left out. Zero when no row has one."""
    labelled = targets.sum(1) > 0
    if not labelled.any():
        return logits.new_zeros(())
    logp = F.log_softmax(logits[labelled].float(), dim=-1)
    return -(logp * targets[labelled].to(logp)).sum(1).mean()


def mlm_loss(model: RetrievalModel, input_ids: torch.Tensor, text_mask: torch.Tensor, video_tokens: torch.Tensor,
             special: SpecialTokenIds, mask_prob: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    if model.mlm_head is None:
        raise ValueError("the MLM loss needs a model built with_mlm=True")
    masked, labels = mask_tokens(input_ids, special, model.text.config.vocab_size, mask_prob, generator)
    if (labels == -100).all():
        return video_tokens.new_zeros(())
    hidden = model.text(masked, text_mask, mode="multimodal", encoder_hidden_states=video_tokens)
    picked = labels != -100  # the vocabulary projection is the costly part: only where it is scored
    logits = model.mlm_head(hidden[picked])
    return F.cross_entropy(logits.float(), labels[picked])


def teacher_guided_mask(affinity: torch.Tensor, keep_per_frame: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per frame, keep ``keep_per_frame`` tokens drawn without replacement by the teacher's
    cls-to-patch attention (``affinity`` [B, T, N]); returns the drop mask [B, T*N] (True = drop)."""
    b, t, n = affinity.shape
    probs = F.softmax(affinity.float(), dim=-1).reshape(b * t, n)
    keep = torch.multinomial(probs, keep_per_frame, replacement=False, generator=generator)
    mask = torch.ones(b * t, n, dtype=torch.bool, device=affinity.device)
    mask.scatter_(1, keep, False)
    return mask.reshape(b, t * n)


def uta_loss(student_distill: torch.Tensor, teacher_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean(2 - 2 cos) between the student's visible tokens and the teacher's at the same places.

    ``student_distill`` [B, V, Dt] (visible tokens, in order); ``teacher_tokens`` [B, T*N, Dt];
    ``mask`` [B, T*N] with V False entries per row.
    """
    b, _, d = teacher_tokens.shape
    target = teacher_tokens[~mask].reshape(b, -1, d)
    if target.shape != student_distill.shape:
        raise ValueError(f"UTA: teacher tokens at visible places {tuple(target.shape)} do not match the "
                         f"student's {tuple(student_distill.shape)} (is the teacher's width the student's "
                         "clip_output_dim?)")
    cos = (F.normalize(student_distill.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)
    return (2 - 2 * cos).mean()
