"""Scoring many (video, caption) pairs with the matching head, sharing what pairs have in common.

The official re-rank scores each caption against its top-k videos (t2v) and each video against
its top-k captions (v2t): for MSRVTT-1k at k = 128, 128,000 pairs per direction over only 1,000
videos and 1,000 captions. Scored pair by pair (:meth:`RetrievalModel.match_score`), each pass
projects the video's ~1,600 tokens to the cross-attention keys and values again: most of the
work. :class:`PairScorer` instead

* groups the pairs by video and computes each video's keys and values once per fusion layer
  (``match_video_state``), then scores all of that video's captions in one batch, their query
  rows folded into one attention call against the shared keys;
* runs the caption-only part (the first fusion layer's self-attention) once per caption
  (``match_text_state``);
* scores the union of the t2v and v2t pairs once (a pair in both directions is one pass);
* in the last fusion layer, computes only the CLS row the matching head reads;
* batches a video's captions in order of length, so a chunk pads little.

The result equals ``match_score`` pair by pair up to float rounding (``tests/eval/test_rerank.py``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

# Score of a pair whose clip could not be decoded (see retrieval.eval.retrieval.FAILED_SCORE).
FAILED_SCORE = -1.0e4
# Captions per forward against one video (bounds the MLP's [pairs x tokens x 4H] activations).
PAIR_CHUNK = 128
# Captions per forward of the caption-only part.
_TEXT_CHUNK = 256


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-caption rows [len_i, H] to one float32 batch plus its attention mask."""
    longest = max(row.shape[0] for row in rows)
    hidden = torch.zeros((len(rows), longest, rows[0].shape[1]), dtype=torch.float32)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        hidden[i, :row.shape[0]] = row.float()
        mask[i, :row.shape[0]] = 1
    return hidden, mask


class PairScorer:
    """Matching-head logits for (video, caption) index pairs; the model must be in eval mode.

    ``tokens``: ``[n_videos, Lv, D]`` patch tokens (any array or tensor, e.g. a float32 or float16 memmap);
    ``text_hidden``: per caption, its text-mode output trimmed to its length ``[len_i, H]``;
    ``failed``: video indices that could not be decoded (their pairs score ``FAILED_SCORE``).
    """

    def __init__(self, model: torch.nn.Module, tokens: np.ndarray | torch.Tensor,
                 text_hidden: Sequence[torch.Tensor], failed: set[int] | None = None,
                 chunk: int = PAIR_CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.tokens, self.text_hidden = model, tokens, text_hidden
        self.failed = failed or set()
        self.chunk = chunk
        self.device = next(model.parameters()).device
        self._text_state: dict[int, torch.Tensor] = {}

    def _video_tokens(self, video: int) -> torch.Tensor:
        row = self.tokens[video]
        row = row if isinstance(row, torch.Tensor) else torch.from_numpy(np.array(row))
        return row[None].to(self.device, torch.float32)

    def _prepare_texts(self, texts: Sequence[int]) -> None:
        """The caption-only part for every caption in ``texts`` not done yet, kept trimmed."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_state]
        for start in range(0, len(todo), _TEXT_CHUNK):
            batch = todo[start:start + _TEXT_CHUNK]
            hidden, mask = pad_rows([self.text_hidden[t] for t in batch])
            state = self.model.match_text_state(hidden.to(self.device), mask.to(self.device))
            for row, t in zip(state, batch, strict=True):
                self._text_state[t] = row[:self.text_hidden[t].shape[0]]

    def score(self, videos: Sequence[int] | np.ndarray, texts: Sequence[int] | np.ndarray,
              progress: bool = False) -> torch.Tensor:
        """Logits [P] (float32, CPU) of the pairs ``(videos[i], texts[i])``.

        Each distinct video is encoded into keys and values once, whatever the order of the pairs.
        """
        videos = np.asarray(videos, dtype=np.int64).reshape(-1)
        texts = np.asarray(texts, dtype=np.int64).reshape(-1)
        if videos.shape != texts.shape:
            raise ValueError(f"{videos.shape[0]} videos but {texts.shape[0]} captions: pairs need one of each")
        scores = torch.full((videos.shape[0],), FAILED_SCORE, dtype=torch.float32)
        order = np.argsort(videos, kind="stable")
        starts = np.flatnonzero(np.r_[True, videos[order][1:] != videos[order][:-1]]) if len(order) else []
        bounds = list(zip(starts, [*starts[1:], len(order)]))
        self._prepare_texts(texts[[i for i in order if int(videos[i]) not in self.failed]].tolist())
        for lo, hi in tqdm(bounds, desc="ITM re-rank", unit="video", disable=not progress):
            video = int(videos[order[lo]])
            if video in self.failed:
                continue
            state = self.model.match_video_state(self._video_tokens(video))
            rows = order[lo:hi]
            # captions of similar length share a chunk: less padding to compute
            rows = rows[np.argsort([self.text_hidden[int(texts[i])].shape[0] for i in rows], kind="stable")]
            for start in range(0, len(rows), self.chunk):
                part = rows[start:start + self.chunk]
                text_state, mask = pad_rows([self._text_state[int(texts[i])] for i in part])
                logits = self.model.match_score_cached(state, text_state.to(self.device), mask.to(self.device))
                scores[torch.from_numpy(part)] = logits.float().cpu()
        return scores


def match_scores_reference(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor,
                           text_hidden: Sequence[torch.Tensor], videos: Sequence[int], texts: Sequence[int],
                           batch: int = 32) -> torch.Tensor:
    """The straightforward computation: ``match_score`` on batches of ``batch`` pairs, nothing shared.

    Kept as the reference the fast path is tested and benchmarked against.
    """
    scores = []
    device = next(model.parameters()).device
    for start in range(0, len(videos), batch):
        vs, ts = list(videos[start:start + batch]), list(texts[start:start + batch])
        clip = torch.stack([torch.as_tensor(np.array(tokens[v])).float() for v in vs]).to(device)  # fp32 before stack: CPU autocast refuses fp16
        hidden, mask = pad_rows([text_hidden[t] for t in ts])
        scores.append(model.match_score(clip, hidden.to(device), mask.to(device)).float().cpu())
    return torch.cat(scores)
