"""Retrieval and classification metrics against hand-worked examples.

Each expected rank is worked out in a comment beside its matrix: rank = 1 + number of wrong
candidates scoring at least as high as the ground truth (ties count against the query).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval.eval.metrics import (
    dual_softmax,
    rank_metrics,
    ranks_t2v,
    ranks_v2t,
    rerank_topk,
    t2v_metrics,
    topk_accuracy,
    v2t_metrics,
)


def test_t2v_ranks_on_a_small_matrix() -> None:
    sim = np.array(
        [
            [0.9, 0.1, 0.3, 0.2],  # text 0, gt video 0 (0.9): nothing higher -> rank 1
            [0.5, 0.4, 0.6, 0.7],  # text 1, gt video 1 (0.4): 0.5, 0.6, 0.7 higher -> rank 4
            [0.2, 0.8, 0.1, 0.3],  # text 2, gt video 2 (0.1): 0.2, 0.8, 0.3 higher -> rank 4
        ]
    )
    assert ranks_t2v(sim, [0, 1, 2]).tolist() == [1, 4, 4]
    # torch input gives the same answer
    assert ranks_t2v(torch.tensor(sim), torch.tensor([0, 1, 2])).tolist() == [1, 4, 4]


def test_t2v_metrics_recall_median_and_mean_rank() -> None:
    # every row scores video j as 12 - j, so a text whose gt is video j has rank j + 1
    sim = np.tile(np.arange(12, 0, -1, dtype=float), (4, 1))
    gt = [0, 2, 6, 11]  # ranks 1, 3, 7, 12
    assert ranks_t2v(sim, gt).tolist() == [1, 3, 7, 12]
    metrics = t2v_metrics(sim, gt)
    # R@1: 1 of 4; R@5: ranks 1, 3; R@10: ranks 1, 3, 7
    assert metrics["R@1"] == pytest.approx(25.0)
    assert metrics["R@5"] == pytest.approx(50.0)
    assert metrics["R@10"] == pytest.approx(75.0)
    assert metrics["R@mean"] == pytest.approx(50.0)
    assert metrics["MdR"] == pytest.approx(5.0)  # median of 1, 3, 7, 12
    assert metrics["MnR"] == pytest.approx(5.75)  # 23 / 4


def test_ties_count_against_the_query() -> None:
    sim = np.array(
        [
            [0.5, 0.5, 0.2],  # gt 1 ties video 0 at 0.5: the tie counts against it -> rank 2
            [0.7, 0.5, 0.5],  # gt 2 ties video 1 and 0.7 is higher -> rank 3
        ]
    )
    assert ranks_t2v(sim, [1, 2]).tolist() == [2, 3]


@pytest.mark.parametrize("n", [1, 5, 40])
def test_a_collapsed_model_scores_no_better_than_chance_in_both_directions(n: int) -> None:
    sim = np.full((n, n), 0.3)  # every text scores every video the same
    gt = np.arange(n)
    assert ranks_t2v(sim, gt).tolist() == [n] * n
    assert ranks_v2t(sim, gt).tolist() == [n] * n
    chance_r1 = 100.0 / n
    for metrics in (t2v_metrics(sim, gt), v2t_metrics(sim, gt)):
        assert metrics["R@1"] <= chance_r1
        assert metrics["MdR"] == n
    # with a single candidate the only answer is right, tie or not
    if n == 1:
        assert t2v_metrics(sim, gt)["R@1"] == 100.0


def test_a_collapsed_model_with_several_captions_per_video() -> None:
    # 3 videos, 2 captions each (MSVD layout), all scores equal
    sim = torch.zeros(6, 3)
    gt = [0, 0, 1, 1, 2, 2]
    # t2v: the gt ties the 2 wrong videos -> rank 3 for every caption
    assert ranks_t2v(sim, gt).tolist() == [3] * 6
    # v2t: the video's own 2 captions tie each other (found at the first of them), the 4 wrong
    # captions tie it too and count against it -> rank 1 + 4 = 5
    assert ranks_v2t(sim, gt).tolist() == [5] * 3
    assert t2v_metrics(sim, gt)["R@1"] == 0.0
    assert v2t_metrics(sim, gt)["R@1"] == 0.0


def test_tied_ranks_are_the_worst_any_sort_order_could_give() -> None:
    # coarse scores make many ties; the official code's argsort puts tied candidates in some
    # order: our rank must equal the worst such order (gt placed after every tied wrong candidate)
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 3, size=(30, 12)).astype(float)
    gt = rng.integers(0, 12, size=30)
    gt[:12] = np.arange(12)  # every video has a caption
    worst_t2v = []
    for i, g in enumerate(gt):
        order = sorted(range(12), key=lambda v: (-sim[i, v], v == g))  # gt last among ties
        worst_t2v.append(order.index(g) + 1)
    assert ranks_t2v(sim, gt).tolist() == worst_t2v
    worst_v2t = []
    for v in range(12):
        order = sorted(range(30), key=lambda t: (-sim[t, v], gt[t] == v))
        worst_v2t.append(1 + next(pos for pos, t in enumerate(order) if gt[t] == v))
    assert ranks_v2t(sim, gt).tolist() == worst_v2t
    # and no order is worse: a random tie-break (stable argsort of a shuffled column) is never
    # ranked above ours
    for _ in range(5):
        perm = rng.permutation(12)
        for i, g in enumerate(gt):
            order = perm[np.argsort(-sim[i, perm], kind="stable")].tolist()
            assert order.index(g) + 1 <= worst_t2v[i]


def test_v2t_uses_the_best_of_several_captions() -> None:
    # texts 0, 1 describe video 0; texts 2, 3 describe video 1 (the MSVD case)
    sim = np.array(
        [
            [0.2, 0.9],
            [0.8, 0.1],
            [0.3, 0.4],
            [0.5, 0.6],
        ]
    )
    gt = [0, 0, 1, 1]
    # video 0's column 0.2 0.8 0.3 0.5: caption t1 (0.8) has nothing higher -> rank 1
    #   (caption t0 alone would be rank 4)
    # video 1's column 0.9 0.1 0.4 0.6: t3 (0.6) has only 0.9 above -> rank 2; t2 (0.4) would be 3
    assert ranks_v2t(sim, gt).tolist() == [1, 2]
    metrics = v2t_metrics(sim, gt)
    assert metrics["R@1"] == pytest.approx(50.0)
    assert metrics["R@5"] == pytest.approx(100.0)
    assert metrics["MdR"] == pytest.approx(1.5)
    assert metrics["MnR"] == pytest.approx(1.5)
    # t2v on the same matrix: t0 loses to video 1 (0.9 > 0.2) -> 2; the others win -> 1
    assert ranks_t2v(sim, gt).tolist() == [2, 1, 1, 1]


def test_v2t_ties_and_uncaptioned_videos() -> None:
    sim = np.array(
        [
            [0.5, 0.1],  # text 0 describes video 1
            [0.5, 0.3],  # text 1 describes video 0: ties wrong text 0 in column 0 -> rank 2
        ]
    )
    # video 1's column 0.1 0.3: its caption t0 (0.1) has t1 (0.3) above -> rank 2
    assert ranks_v2t(sim, [1, 0]).tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"without any caption.*\[1\]"):
        ranks_v2t(sim, [0, 0])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one entry per text"):
        ranks_t2v(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        ranks_t2v(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        ranks_t2v(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(ValueError, match="non-empty"):
        rank_metrics([])


def test_dual_softmax_fixes_a_hub_video() -> None:
    # video 0 is a "hub": text 0 (gt video 1) scores it highest, so plain ranking misses
    sim = torch.tensor([[0.90, 0.80], [0.95, 0.50]])
    gt = [1, 0]
    assert ranks_t2v(sim, gt).tolist() == [2, 1]
    revised = dual_softmax(sim, temp=100.0)
    # column 0's prior over texts: softmax(90, 95) -> text 0 gets 1 / (1 + e^5)
    assert revised[0, 0].item() == pytest.approx(0.90 / (1 + math.exp(5)), rel=1e-5)
    # column 1's prior: softmax(80, 50) -> text 0 gets 1 / (1 + e^-30), i.e. ~1
    assert revised[0, 1].item() == pytest.approx(0.80 / (1 + math.exp(-30)), rel=1e-5)
    assert ranks_t2v(revised, gt).tolist() == [1, 1]
    # v2t normalises each text's row over videos instead
    row_prior = dual_softmax(sim, temp=100.0, direction="v2t")
    assert row_prior[1, 1].item() == pytest.approx(0.50 / (1 + math.exp(45)), rel=1e-5)
    with pytest.raises(ValueError, match="direction"):
        dual_softmax(sim, direction="both")


def test_topk_accuracy() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.3],  # label 1 scores highest -> rank 1
            [0.4, 0.3, 0.2, 0.1],  # label 3 scores lowest -> rank 4
            [0.2, 0.2, 0.9, 0.0],  # label 0 ties class 1 (counts against it), class 2 above -> rank 3
        ]
    )
    accuracy = topk_accuracy(logits, torch.tensor([1, 3, 0]), ks=(1, 2, 3, 5))
    assert accuracy == pytest.approx({"top1": 100 / 3, "top2": 100 / 3, "top3": 200 / 3, "top5": 100.0})
    # a constant classifier is wrong at top-1, not right
    assert topk_accuracy(torch.zeros(4, 10), torch.arange(4), ks=(1,)) == {"top1": 0.0}


def test_rerank_topk_rescored_only_the_top_k() -> None:
    itc = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2],  # top 2 by ITC: candidates 1, 2
            [0.8, 0.1, 0.3, 0.7],  # top 2 by ITC: candidates 0, 3
        ]
    )
    calls: list[tuple[int, list[int]]] = []

    def fake_matching_head(query: int, candidates: torch.Tensor) -> torch.Tensor:
        calls.append((query, sorted(candidates.tolist())))
        return 10.0 * (query + 1) + candidates.float()

    reranked = rerank_topk(itc, 2, fake_matching_head)
    assert calls == [(0, [1, 2]), (1, [0, 3])]
    expected = torch.tensor([[-100.0, 11.0, 12.0, -100.0], [20.0, -100.0, -100.0, 23.0]])
    torch.testing.assert_close(reranked, expected)
    # a ground truth outside the top k ties the -100 fill and so ranks below all of it
    # (retrieval.evaluate gives such a query its ITC rank instead)
    assert ranks_t2v(reranked, [0, 0]).tolist() == [4, 2]


def test_rerank_topk_clips_k_and_checks_score_shape() -> None:
    itc = torch.tensor([[0.3, 0.1, 0.2]])
    everything = rerank_topk(itc, 128, lambda query, candidates: -candidates.float())
    torch.testing.assert_close(everything, torch.tensor([[-0.0, -1.0, -2.0]]))
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        rerank_topk(itc, 2, lambda query, candidates: torch.zeros(3))
