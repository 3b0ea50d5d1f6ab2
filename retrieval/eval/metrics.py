"""Retrieval and classification metrics.

Conventions, used by every function here:

* A similarity matrix is always ``sim[n_texts, n_videos]``; ``gt_video_of_text[i]`` is the
  index of text ``i``'s ground-truth video. Several texts may share a video (MSVD).
* Ranks are 1-based. A query's rank is ``1 + (number of wrong candidates scoring at least as
  high as the ground truth)``: ties are resolved against the query, as if every tied wrong
  candidate were sorted first. A collapsed model that gives every candidate the same score
  therefore ranks each ground truth last (R@1 = 0, below chance), never first; an
  optimistic rule would score it R@1 = 100. The rule is deterministic (the official code
  breaks ties by ``argsort`` order, i.e. arbitrarily) and never better than any tie-breaking
  order; with float scores ties are rare except among the ``-100`` fill of :func:`rerank_topk`.
* Recall values are percentages (0-100).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence

RERANK_FILL = -100.0  # score of candidates outside the re-ranked top k (official protocol)


def _as_numpy(values: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.float() if values.is_floating_point() else values
        values = values.numpy()
    return np.asarray(values, dtype=dtype)


def _checked_inputs(sim: ArrayLike, gt_video_of_text: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_numpy(sim, np.float64)
    gt = _as_numpy(gt_video_of_text, np.int64)
    if scores.ndim != 2:
        raise ValueError(f"sim must be [n_texts, n_videos], got shape {scores.shape}")
    if gt.shape != (scores.shape[0],):
        raise ValueError(f"gt_video_of_text must have one entry per text ({scores.shape[0]}), got {gt.shape}")
    if gt.size and (gt.min() < 0 or gt.max() >= scores.shape[1]):
        raise ValueError(f"gt_video_of_text holds indices outside [0, {scores.shape[1]})")
    if np.isnan(scores).any():
        raise ValueError("sim contains NaN")
    return scores, gt


def ranks_t2v(sim: ArrayLike, gt_video_of_text: ArrayLike) -> np.ndarray:
    """1-based rank of each text's ground-truth video among all videos; shape ``[n_texts]``."""
    scores, gt = _checked_inputs(sim, gt_video_of_text)
    gt_scores = scores[np.arange(len(gt)), gt]
    # every candidate at or above the ground truth's score, the ground truth itself included
    return (scores >= gt_scores[:, None]).sum(axis=1)


def ranks_v2t(sim: ArrayLike, gt_video_of_text: ArrayLike) -> np.ndarray:
    """1-based rank of each video's best-ranked caption among all texts; shape ``[n_videos]``.

    A video with several captions counts as found at the rank of its highest-ranked one (the
    MSVD rule). Since rank falls as score rises, that is the rank of its highest-scoring caption;
    only *wrong* captions tied with it count against it (a tie among its own captions still
    finds the video at the first of them).

    Raises:
        ValueError: some video has no caption, so its v2t rank is undefined.
    """
    scores, gt = _checked_inputs(sim, gt_video_of_text)
    n_videos = scores.shape[1]
    uncaptioned = np.flatnonzero(np.bincount(gt, minlength=n_videos) == 0)
    if uncaptioned.size:
        raise ValueError(f"videos without any caption have no v2t rank: indices {uncaptioned[:10].tolist()}")
    best_caption_score = np.full(n_videos, -np.inf)
    np.maximum.at(best_caption_score, gt, scores[np.arange(len(gt)), gt])
    at_or_above = scores >= best_caption_score[None, :]
    at_or_above[np.arange(len(gt)), gt] = False  # the video's own captions are not competitors
    return 1 + at_or_above.sum(axis=0)


def rank_metrics(ranks: ArrayLike) -> dict[str, float]:
    """R@1/5/10 (percent), their mean ``R@mean``, median rank ``MdR`` and mean rank ``MnR``."""
    values = _as_numpy(ranks, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-d array, got shape {values.shape}")
    recalls = {f"R@{k}": float(100.0 * np.mean(values <= k)) for k in (1, 5, 10)}
    return {
        **recalls,
        "R@mean": float(np.mean(list(recalls.values()))),
        "MdR": float(np.median(values)),
        "MnR": float(np.mean(values)),
    }


def t2v_metrics(sim: ArrayLike, gt_video_of_text: ArrayLike) -> dict[str, float]:
    """Text-to-video retrieval metrics; every text is one query."""
    return rank_metrics(ranks_t2v(sim, gt_video_of_text))


def v2t_metrics(sim: ArrayLike, gt_video_of_text: ArrayLike) -> dict[str, float]:
    """Video-to-text retrieval metrics; every video is one query, found by its best caption."""
    return rank_metrics(ranks_v2t(sim, gt_video_of_text))


def dual_softmax(sim: torch.Tensor, temp: float = 100.0, direction: str = "t2v") -> torch.Tensor:
    """Dual-softmax (DSL) re-weighting of a ``[n_texts, n_videos]`` similarity matrix.

    NOT part of the official protocol: DSL (Cheng et al., 2021) multiplies each score by a
    softmax prior computed over the *other* queries, so a query's result depends on the whole
    test set. Report DSL numbers separately and labelled.

    For ``"t2v"`` the prior normalises each video's column over texts (``dim=0``); for
    ``"v2t"`` it normalises each text's row over videos (``dim=1``). The returned matrix keeps
    the ``[n_texts, n_videos]`` layout, so it feeds :func:`t2v_metrics` / :func:`v2t_metrics`.
    """
    if direction not in ("t2v", "v2t"):
        raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}")
    scores = torch.as_tensor(sim, dtype=torch.float32)
    prior = torch.softmax(scores * temp, dim=0 if direction == "t2v" else 1)
    return scores * prior


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percentage of samples whose label is among the top k classes, as ``{"top1": ..., ...}``.

    Same tie rule as the retrieval ranks: the label counts as within the top k when fewer than
    k other classes score at least as high (a constant classifier scores 0, not 100).
    """
    scores = _as_numpy(logits, np.float64)
    targets = _as_numpy(labels, np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"expected logits [n, c] and labels [n], got {scores.shape} and {targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"labels outside [0, {scores.shape[1]})")
    label_scores = scores[np.arange(len(targets)), targets]
    ranks = (scores >= label_scores[:, None]).sum(axis=1)
    return {f"top{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}


def rerank_topk(
    itc: torch.Tensor,
    k: int,
    score_fn: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Re-score each query's top ``k`` candidates by ITC with ``score_fn``; the rest get -100.

    This is the official evaluation's second stage (``k_test = 128``): the expensive matching
    head only sees each row's top ``k``, and ``-100`` keeps everything else below them (ITM
    logits are far above it in practice). ``itc`` is ``[n_queries, n_candidates]``; for v2t
    pass the transposed matrix. ``score_fn(query_index, candidate_indices [k])`` returns ``[k]``
    scores in the same order.
    """
    candidates = topk_candidates(itc, k)
    rescored = []
    for query in range(candidates.shape[0]):
        new_scores = torch.as_tensor(score_fn(query, candidates[query])).detach().float().cpu()
        if new_scores.shape != (candidates.shape[1],):
            raise ValueError(
                f"score_fn returned shape {tuple(new_scores.shape)} for query {query}, "
                f"expected ({candidates.shape[1]},)"
            )
        rescored.append(new_scores)
    return fill_reranked(itc, candidates, torch.stack(rescored) if rescored else candidates.float())


def topk_candidates(itc: torch.Tensor, k: int) -> torch.Tensor:
    """Each query's top ``min(k, n_candidates)`` candidates by ITC: [n_queries, k] indices."""
    scores = torch.as_tensor(itc)
    if scores.ndim != 2:
        raise ValueError(f"itc must be [n_queries, n_candidates], got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def fill_reranked(itc: torch.Tensor, candidates: torch.Tensor, new_scores: torch.Tensor) -> torch.Tensor:
    """The re-ranked matrix: ``new_scores`` [n_queries, k] at ``candidates``, -100 elsewhere."""
    reranked = torch.full(torch.as_tensor(itc).shape, RERANK_FILL, dtype=torch.float32)
    reranked.scatter_(1, candidates, torch.as_tensor(new_scores).float().reshape(candidates.shape))
    return reranked
