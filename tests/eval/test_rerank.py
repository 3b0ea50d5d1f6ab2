"""The shared-work re-ranker equals the straightforward matching head pass, pair by pair."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig

from retrieval.eval import metrics as M
from retrieval.eval.rerank import FAILED_SCORE, PairScorer, match_scores_reference
from retrieval.eval.retrieval import rerank_both
from retrieval.models.retrieval_model import RetrievalModel
from retrieval.models.text import TextEncoder

HIDDEN, VISION, N_VIDEOS, N_TEXTS, TOKENS = 48, 40, 7, 9, 33


class _VideoWidth(nn.Module):
    """Only the width of the vision tokens matters to the matching head."""

    embed_dim = VISION


def matching_model(fusion_layers: int) -> RetrievalModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=1 + fusion_layers,
                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=32)
    text = TextEncoder.from_config(config, fusion_layer=1, encoder_width=VISION)
    model = RetrievalModel(_VideoWidth(), text, embed_dim=16).eval()
    with torch.no_grad():  # a head that separates pairs, not BERT's near-zero init
        model.itm_head.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(N_VIDEOS, TOKENS, VISION, generator=generator).half()  # stored like the eval's
    lengths = [3, 7, 5, 7, 2, 6, 7, 4, 1]
    hidden = [torch.randn(n, HIDDEN, generator=generator).half() for n in lengths]
    return tokens, hidden


@pytest.mark.parametrize("fusion_layers", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_pair_scorer_equals_match_score(data, fusion_layers: int, chunk: int) -> None:
    tokens, hidden = data
    model = matching_model(fusion_layers)
    rng = np.random.default_rng(fusion_layers)
    videos = rng.integers(0, N_VIDEOS, 40)  # unsorted, repeated, padded captions of mixed lengths
    texts = rng.integers(0, N_TEXTS, 40)
    with torch.inference_mode():
        fast = PairScorer(model, tokens.numpy(), hidden, chunk=chunk).score(videos, texts)
        reference = match_scores_reference(model, tokens.numpy(), hidden, videos, texts, batch=6)
    assert fast.shape == (40,)
    assert reference.std() > 0.1  # the pairs really score differently
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)


def test_both_paths_run_under_bf16_autocast_and_track_fp32(data) -> None:
    """``vtr eval --precision bf16`` scores pairs inside CPU bf16 autocast, from float16 tokens."""
    tokens, hidden = data
    model = matching_model(2)
    rng = np.random.default_rng(5)
    videos, texts = rng.integers(0, N_VIDEOS, 24), rng.integers(0, N_TEXTS, 24)
    with torch.inference_mode():
        exact = match_scores_reference(model, tokens.numpy(), hidden, videos, texts, batch=6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = PairScorer(model, tokens.numpy(), hidden).score(videos, texts)
            reference = match_scores_reference(model, tokens.numpy(), hidden, videos, texts, batch=6)
    assert fast.dtype == reference.dtype == torch.float32
    assert not torch.equal(fast, exact)                  # bf16 really ran
    for scores in (fast, reference):
        torch.testing.assert_close(scores, exact, rtol=0, atol=0.05 * float(exact.abs().max()))


def test_several_videos_per_call_equal_match_score(data) -> None:
    """G videos' states against G blocks of caption rows (the search path: one row per video)."""
    tokens, hidden = data
    model = matching_model(3)
    text_hidden = torch.stack([h.float() for h in hidden if h.shape[0] == 7][:1])  # [1, 7, H]
    mask = torch.ones(1, 7, dtype=torch.long)
    clips = tokens[:5].float()
    with torch.inference_mode():
        expected = model.match_score(clips, text_hidden.expand(5, -1, -1), mask.expand(5, -1))
        state = model.match_text_state(text_hidden, mask)
        fast = model.match_score_cached(model.match_video_state(clips), state.expand(5, -1, -1), mask.expand(5, -1))
        # two captions per video
        pairs = model.match_score_cached(model.match_video_state(clips[:2]), state.expand(4, -1, -1),
                                         mask.expand(4, -1))
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pairs, expected[[0, 0, 1, 1]], rtol=0, atol=1e-5)


def test_vision_mask_is_honoured() -> None:
    model = matching_model(2)
    clips = torch.randn(3, TOKENS, VISION)
    keep = torch.rand(3, TOKENS) > 0.4
    hidden, mask = torch.randn(3, 5, HIDDEN), torch.ones(3, 5, dtype=torch.long)
    with torch.inference_mode():
        fused = model.text(attention_mask=mask, mode="fusion", hidden_states=hidden,
                           encoder_hidden_states=clips, encoder_attention_mask=keep.long())
        cls = model.text.fusion_cls(model.text.fusion_text_part(hidden, mask), mask,
                                    model.text.fusion_context(clips), vision_keep=keep)
    torch.testing.assert_close(cls, fused[:, 0], rtol=0, atol=1e-5)


def test_failed_videos_score_failed_and_are_never_encoded(data) -> None:
    tokens, hidden = data
    model = matching_model(2)
    seen = []
    encode = model.match_video_state
    model.match_video_state = lambda t: seen.append(t.shape[0]) or encode(t)
    with torch.inference_mode():
        scores = PairScorer(model, tokens, hidden, failed={2}).score([2, 0, 2, 0, 1], [0, 1, 2, 3, 4])
    assert scores[0] == FAILED_SCORE and scores[2] == FAILED_SCORE
    assert (scores[[1, 3, 4]] > FAILED_SCORE).all()
    assert len(seen) == 2  # videos 0 and 1, each once although video 0 has two captions


def test_rerank_both_scores_each_pair_once_and_matches_rerank_topk(data) -> None:
    tokens, hidden = data
    model = matching_model(3)
    itc = torch.randn(N_TEXTS, N_VIDEOS, generator=torch.Generator().manual_seed(3))
    k = 3
    scorer = PairScorer(model, tokens, hidden)
    calls = []
    score = scorer.score
    scorer.score = lambda v, t, progress=False: calls.append(len(v)) or score(v, t)
    with torch.inference_mode():
        t2v, v2t = rerank_both(scorer, itc, k)
        one = lambda v, t: match_scores_reference(model, tokens, hidden, [v], [t])[0]
        expect_t2v = M.rerank_topk(itc, k, lambda q, c: torch.stack([one(int(v), q) for v in c]))
        expect_v2t = M.rerank_topk(itc.t(), k, lambda q, c: torch.stack([one(q, int(t)) for t in c])).t()
    torch.testing.assert_close(t2v, expect_t2v, rtol=0, atol=1e-5)
    torch.testing.assert_close(v2t, expect_v2t, rtol=0, atol=1e-5)
    t2v_pairs = {(int(v), q) for q, row in enumerate(M.topk_candidates(itc, k)) for v in row}
    v2t_pairs = {(q, int(t)) for q, row in enumerate(M.topk_candidates(itc.t(), k)) for t in row}
    assert calls == [len(t2v_pairs | v2t_pairs)] and len(t2v_pairs | v2t_pairs) < (N_TEXTS + N_VIDEOS) * k
