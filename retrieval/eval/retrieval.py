"""Zero-shot text-video retrieval evaluation with the official two-stage protocol.

Stage 1 (ITC) scores every caption against every clip with the model's similarity (cosine,
per-frame cosine averaged over frames; temperature 1, since it does not change a ranking).
Stage 2 (ITM) re-scores each query's top ``k`` candidates with the matching head's logit and
gives everything else ``-100``; text-to-video and video-to-text are re-ranked separately (for
a video query its top-k *captions* are re-scored). Both result sets are reported, with the
official metrics (R@1/5/10 and their mean) plus MdR / MnR. A query whose ground truth is not in
its top k keeps its ITC rank under ITM: it is below the k re-scored candidates and the others
keep their ITC order. R@K for K <= k is then exactly the official number, and MdR / MnR do not
depend on how ties within the ``-100`` fill are broken (the official code breaks them
arbitrarily; :mod:`retrieval.eval.metrics` ranks ties against the query, which would put every
such query last). Tied ITC scores count against the query too, so a collapsed model that
scores every pair the same ranks every ground truth last instead of first.

Clip embeddings are the expensive part, so :func:`embed_corpus` decodes in DataLoader worker
processes while the main process encodes, and caches its output on disk keyed by the video
weights, the clip list and the preprocessing: a second run with another ``rerank_k`` (or the
dual-softmax variant) does not decode or encode again.

Patch tokens for re-ranking (``[N, L, D]``, by far the largest output) and the caption hidden
states the matching head reads are stored at the run's precision: float32 under fp32 (so an fp32
evaluation re-ranks exactly what the model computed, as the official code does), float16 when
the run's precision is reduced or ``storage="fp16"`` asks for it (half the disk and memory; its
measured effect on the ITM scores is in docs/compatibility.md). Tokens go straight into a ``.npy``
file that is then memory-mapped when a cache directory is given, or when they would not fit in
half the available memory (a file in the temporary directory, unlinked once mapped), so a
1000-clip VideoMamba-M corpus (about 3.6 GB of float32 tokens) never has to fit in RAM. Caption
hidden states are kept per caption, trimmed to the caption's length.

Clips that cannot be decoded are skipped with a warning, listed in the result, and rank last:
a caption whose video failed counts as found at rank ``n_videos``, a failed video query at rank
``n_texts``, and no failed clip ever outranks a decoded one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from retrieval.atomic import atomic_path
from retrieval.data.corpora import DEFAULT_CAPTION_CLEANING, Corpus, is_blank_caption
from retrieval.data.loader import iter_clip_batches
from retrieval.data.video import Preprocess
from retrieval.eval import metrics as M
from retrieval.eval.rerank import FAILED_SCORE, PairScorer  # FAILED_SCORE: below the -100 re-rank fill
from retrieval.models.device import evaluating, model_device, model_precision

logger = logging.getLogger(__name__)

# Names of the score sets in metrics and rank tables, with how the table labels them.
SCORE_SETS: dict[str, str] = {
    "itm": "itm (official: ITC top-k re-ranked by ITM)",
    "itc": "itc (official: contrastive only)",
    "itc_dsl": "itc_dsl (NOT official: dual softmax)",
}
# Captions per forward of the text encoder.
_TEXT_BATCH = 64
# Captions per similarity block: per-frame scoring materialises [captions, clips, frames].
_SIMILARITY_CHUNK = 1024
# v2: patch tokens stored at the run's precision (v1 entries hold float16 tokens whatever the run)
_CACHE_FORMAT = "vtr-embeddings-v2"
# How stored intermediates are kept: "auto" follows the run's precision (fp32 runs keep float32).
STORAGE_CHOICES = ("auto", "fp32", "fp16")
# Share of the available memory an in-memory token array may take before it spills to a file.
_IN_MEMORY_SHARE = 0.5
# Weights that do not take part in encode_video (a RetrievalModel's text side): left out of the
# cache key so a text-only change keeps the cached clip embeddings.
_TEXT_SIDE_PREFIXES = ("text.", "text_proj.", "itm_head.", "mlm_head.")
_TEXT_SIDE_NAMES = ("temp",)
_RECALL_CURVE_MAX_K = 50


# ----------------------------------------------------------------------------------------------
# embedding cache


def _video_weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every weight encode_video can use."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        if name in _TEXT_SIDE_NAMES or name.startswith(_TEXT_SIDE_PREFIXES):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def storage_dtype(model: torch.nn.Module, storage: str = "auto") -> torch.dtype:
    """The dtype evaluation stores patch tokens and caption hidden states in.

    ``auto``: float32 when the model runs in fp32, float16 when its precision is reduced (bf16
    values fit float16's range at the magnitudes these features have, and numpy has no bf16).
    """
    if storage not in STORAGE_CHOICES:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_CHOICES)}; got {storage!r}")
    if storage == "auto":
        storage = "fp32" if model_precision(model) == "fp32" else "fp16"
    return torch.float32 if storage == "fp32" else torch.float16


def embedding_cache_key(model: torch.nn.Module, corpus: Corpus, preprocess: Preprocess,
                        token_dtype: torch.dtype = torch.float32) -> str:
    """Cache key: video weights + every clip (resolved path, window, file size and mtime) + pixels.

    Keying on the clips themselves rather than the annotation file's name means a re-encoded
    video, a different ``--videos`` root or a changed window all miss the cache, as they must.
    """
    clips = []
    for index, path in enumerate(corpus.paths()):
        try:
            stat = path.stat()
            signature: list[Any] = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            signature = [None, None]
        clips.append([str(path.resolve()), corpus.window(index), *signature])
    key = {"format": _CACHE_FORMAT, "weights": _video_weights_digest(model),
           "preprocess": preprocess.to_dict(), "max_seconds": corpus.max_seconds, "clips": clips}
    if model_precision(model) != "fp32":  # bf16/fp16 features are not fp32 ones
        key["precision"] = model_precision(model)
    key["tokens"] = str(token_dtype).removeprefix("torch.")
    description = json.dumps(key, sort_keys=True)
    return hashlib.sha256(description.encode()).hexdigest()[:32]


def _read_cache(entry: Path, need_tokens: bool) -> dict[str, Any] | None:
    """A finished cache entry (``meta.json`` is written last), or None if absent or insufficient."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != _CACHE_FORMAT or (need_tokens and not meta.get("has_tokens")):
        return None
    tokens = np.load(entry / "tokens.npy", mmap_mode="r") if meta["has_tokens"] else None
    return {"feat": torch.from_numpy(np.load(entry / "feat.npy")), "tokens": tokens,
            "failed": [index for index, _ in meta["failures"]],
            "failures": {index: reason for index, reason in meta["failures"]},
            "timing": meta["timing"], "cached": True}


# ----------------------------------------------------------------------------------------------
# embedding


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _TokenStore:
    """Where patch tokens go while encoding: an array in memory or a ``.npy`` on disk.

    The array is allocated at the first decoded batch, when the token shape becomes known. With
    no ``path``, an array larger than half the available memory goes to a memory-mapped file in
    the temporary directory, unlinked at once (the mapping keeps it until the array is dropped).
    """

    def __init__(self, n: int, path: Path | None, dtype: torch.dtype = torch.float32) -> None:
        self.n, self.path = n, path
        self.dtype = np.dtype(str(dtype).removeprefix("torch."))
        self.array: np.ndarray | None = None

    def _allocate(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.path is not None:
            return np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=shape)
        size = int(np.prod(shape)) * self.dtype.itemsize
        available = _available_memory()
        if available is None or size <= _IN_MEMORY_SHARE * available:
            return np.zeros(shape, dtype=self.dtype)
        handle, name = tempfile.mkstemp(prefix="vtr-tokens-", suffix=".npy")
        os.close(handle)
        logger.info("patch tokens (%.1f GB) kept in a memory-mapped temporary file", size / 1e9)
        array = np.lib.format.open_memmap(name, mode="w+", dtype=self.dtype, shape=shape)
        try:
            os.unlink(name)  # POSIX: the mapping stays valid and the space is freed with it
        except OSError:
            logger.warning("could not remove %s; delete it after the run", name)
        return array

    def put(self, indices: list[int], tokens: torch.Tensor) -> None:
        if self.array is None:
            self.array = self._allocate((self.n, *tokens.shape[1:]))
        self.array[indices] = tokens.detach().to(torch.float32).cpu().numpy().astype(self.dtype, copy=False)

    def finish(self) -> np.ndarray:
        """The filled array; on disk: flushed, closed and reopened read-only as a memmap."""
        if self.path is None:
            return self.array
        self.array.flush()
        self.array = None
        return np.load(self.path, mmap_mode="r")


def _encode_clips(model: torch.nn.Module, corpus: Corpus, preprocess: Preprocess, batch_size: int,
                  workers: int, token_store: _TokenStore | None, progress: bool
                  ) -> tuple[torch.Tensor, dict[int, str], float, float]:
    """Run the loader and the encoder: ``(feat, failures, decode seconds, encode seconds)``."""
    n = len(corpus.items)
    feat: torch.Tensor | None = None
    failures: dict[int, str] = {}
    device = model_device(model)
    decode_s = encode_s = 0.0
    bar = tqdm(total=n, desc=f"embedding {corpus.name}", unit="clip", disable=not progress)
    with evaluating(model), bar:
        batches = iter_clip_batches(corpus, preprocess, batch_size, workers)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            decode_s += time.perf_counter() - waited
            if batch is None:
                break
            for index, reason in batch.failures:
                logger.warning("skipping clip %d: %s", index, reason)
                failures[index] = reason
            if batch.clips is not None:
                encoding = time.perf_counter()
                out = model.encode_video(batch.clips.to(device))
                if feat is None:
                    feat = torch.zeros((n, *out["feat"].shape[1:]), dtype=torch.float32)
                feat[batch.indices] = out["feat"].float().cpu()
                if token_store is not None:
                    token_store.put(batch.indices, out["tokens"])
                encode_s += time.perf_counter() - encoding
            bar.update(len(batch.indices) + len(batch.failures))
    if feat is None:
        first = next(iter(failures.values()))
        raise ValueError(f"none of the {n} videos of {corpus.name!r} could be decoded (first: {first})")
    return feat, failures, decode_s, encode_s


def embed_corpus(model: torch.nn.Module, corpus: Corpus, batch_size: int = 8, workers: int = 0,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                 with_tokens: bool = True, storage: str = "auto") -> dict[str, Any]:
    """Encode every clip of ``corpus``; decoding runs in ``workers`` processes beside encoding.

    Returns a dict with
      * ``feat``: float32 ``[N, T, E]`` or ``[N, E]`` (what ``model.similarity`` takes); rows of
        failed clips are zero;
      * ``tokens``: ``np.ndarray [N, L, D]`` of patch tokens for the matching head, in
        :func:`storage_dtype` (memory-mapped from ``cache_dir`` when one is given, or from a
        temporary file when too large for memory), or None with ``with_tokens=False``;
      * ``failed``: corpus indices that could not be decoded, ``failures``: index -> reason;
      * ``timing``: ``decode_s`` (time spent waiting for decoded batches), ``encode_s``,
        ``total_s``, ``clips_per_s`` of the run that encoded; ``cached``: whether it came from
        ``cache_dir``.

    Raises:
        ValueError: no clip of the corpus could be decoded.
    """
    if not corpus.items:
        raise ValueError(f"corpus {corpus.name!r} has no videos to embed")
    preprocess = Preprocess.for_model(model, corpus)
    token_dtype = storage_dtype(model, storage)
    entry: Path | None = None
    if cache_dir is not None:
        entry = Path(cache_dir) / embedding_cache_key(model, corpus, preprocess, token_dtype)
        cached = _read_cache(entry, with_tokens)
        if cached is not None:
            logger.info("clip embeddings from cache %s", entry)
            return cached

    n = len(corpus.items)
    staging: Path | None = None
    if entry is not None:
        staging = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    token_store = _TokenStore(n, staging / "tokens.npy" if staging else None, token_dtype) if with_tokens else None
    started = time.perf_counter()
    try:
        feat, failures, decode_s, encode_s = _encode_clips(model, corpus, preprocess, batch_size, workers,
                                                           token_store, progress)
    except BaseException:
        if staging is not None:  # no half-written entry is left behind (interrupts included)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if failures:
        logger.warning("%d of %d clips could not be decoded; they rank last", len(failures), n)
    total_s = time.perf_counter() - started
    timing = {"decode_s": decode_s, "encode_s": encode_s, "total_s": total_s,
              "clips_per_s": (n - len(failures)) / total_s if total_s > 0 else 0.0}
    tokens = token_store.finish() if token_store is not None else None
    result = {"feat": feat, "tokens": tokens, "failed": sorted(failures), "failures": failures,
              "timing": timing, "cached": False}
    if staging is not None and entry is not None:
        np.save(staging / "feat.npy", feat.numpy())
        meta = {"format": _CACHE_FORMAT, "corpus": corpus.name, "n": n, "has_tokens": tokens is not None,
                "failures": sorted(failures.items()), "timing": timing}
        (staging / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(entry, ignore_errors=True)  # e.g. an older entry without tokens
        try:
            os.replace(staging, entry)
        except OSError:  # a concurrent run published the same entry first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
        if tokens is not None:  # the memmap must point at the published file
            result["tokens"] = np.load(entry / "tokens.npy", mmap_mode="r")
    return result


@dataclass
class TextEmbeddings:
    """Caption features for ITC and per-caption hidden states (unpadded, in the storage dtype) for ITM."""

    feat: torch.Tensor  # [n_texts, E]
    hidden: list[torch.Tensor] = field(default_factory=list)  # each [len_i, H]


def _check_captions(texts: Sequence[str], corpus: Corpus, gt: Sequence[int], cleaning: str) -> None:
    """An empty caption would match everything; name it rather than let the tokenizer fail vaguely."""
    for index, (text, video) in enumerate(zip(texts, gt, strict=True)):
        if is_blank_caption(text, cleaning):
            raise ValueError(f"caption {index} of video {corpus.items[video].video!r} is empty after "
                             f"cleaning: {text!r}")


def encode_captions(model: torch.nn.Module, texts: Sequence[str], max_len: int,
                    keep_hidden: bool, storage: str = "auto") -> TextEmbeddings:
    """Encode captions in batches with the corpus's token limit; model must be in eval mode.

    Hidden states are kept in :func:`storage_dtype` (float32 for an fp32 run).
    """
    dtype = storage_dtype(model, storage)
    feats: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    for start in range(0, len(texts), _TEXT_BATCH):
        out = model.encode_texts(list(texts[start:start + _TEXT_BATCH]), max_len=max_len)
        feats.append(out["feat"].float().cpu())
        if keep_hidden:
            lengths = out["mask"].sum(1).tolist()
            rows = out["hidden"].to(dtype).cpu()
            hidden.extend(row[:length].clone() for row, length in zip(rows, lengths, strict=True))
    return TextEmbeddings(torch.cat(feats), hidden)


# ----------------------------------------------------------------------------------------------
# re-ranking


def has_itm_head(model: torch.nn.Module) -> bool:
    """Whether ``model`` can score a (clip, caption) pair with a trained matching head."""
    return (callable(getattr(model, "match_score", None)) and getattr(model, "itm_head", None) is not None
            and getattr(model, "matching_trained", True))


def rerank_both(scorer: PairScorer, itc: torch.Tensor, k: int, progress: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM re-rank of each caption's top-k clips (t2v) and each clip's top-k captions (v2t).

    Both directions' pairs are scored together, each distinct pair once, grouped by clip
    (:class:`PairScorer`). Returns the t2v and v2t score matrices, both [n_texts, n_videos].
    """
    t2v = M.topk_candidates(itc, k)                  # [n_texts, k] clip indices
    v2t = M.topk_candidates(itc.t(), k)              # [n_videos, k] caption indices
    n_texts, n_videos = itc.shape
    videos = np.concatenate([t2v.reshape(-1).numpy(),
                             np.repeat(np.arange(n_videos), v2t.shape[1])])
    texts = np.concatenate([np.repeat(np.arange(n_texts), t2v.shape[1]), v2t.reshape(-1).numpy()])
    keys = videos * n_texts + texts
    unique, inverse = np.unique(keys, return_inverse=True)
    scores = scorer.score(unique // n_texts, unique % n_texts, progress=progress)[torch.from_numpy(inverse)]
    itm_t2v = M.fill_reranked(itc, t2v, scores[:t2v.numel()])
    itm_v2t = M.fill_reranked(itc.t(), v2t, scores[t2v.numel():]).t()
    return itm_t2v, itm_v2t


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResult:
    """Metrics per score set and direction, and one row per query with its rank under each set.

    ``metrics[set][direction]`` holds R@1/5/10, R@mean, MdR, MnR for ``set`` in
    :data:`SCORE_SETS` that was computed and ``direction`` in ``t2v`` / ``v2t``;
    ``metrics[set]["R@mean"]`` is the official summary (mean of the six recalls).
    ``ranks["t2v"]`` rows: ``query`` (caption index), ``text``, ``gt`` (video path),
    ``rank_<set>``; ``ranks["v2t"]`` rows: ``query`` (video index), ``video``, ``gt`` (its caption
    indices), ``rank_<set>``.
    """

    metrics: dict[str, Any]
    ranks: dict[str, list[dict[str, Any]]]
    # float32 score matrices, all [n_texts, n_videos]: "itc", and with re-ranking "itm_t2v" and
    # "itm_v2t" (the official layout: ITM logits at each query's top k, -100 elsewhere)
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def score_sets(self) -> list[str]:
        return [name for name in SCORE_SETS if name in self.metrics]

    def table(self) -> str:
        """The metrics as an aligned text table, official score sets first."""
        info = self.metrics["info"]
        title = (f"{info['dataset']}: {info['n_texts']} captions x {info['n_videos']} videos"
                 f" ({info['n_failed']} undecodable, {info['n_missing']} missing)")
        if info["rerank_k"]:
            title += f", ITM re-rank of the top {info['rerank_k']}"
        header = (f"{'scores':46s} {'dir':4s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'R@mean':>7s} "
                  f"{'MdR':>6s} {'MnR':>8s}")
        lines = [title, header, "-" * len(header)]
        for name in self.score_sets:
            for direction in ("t2v", "v2t"):
                m = self.metrics[name][direction]
                label = SCORE_SETS[name] if direction == "t2v" else ""
                lines.append(f"{label:46s} {direction:4s} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} "
                             f"{m['R@mean']:7.1f} {m['MdR']:6.1f} {m['MnR']:8.1f}")
        lines.append("mean of the six recalls: " + ", ".join(
            f"{name} {self.metrics[name]['R@mean']:.1f}" for name in self.score_sets))
        return "\n".join(lines)

    def write(self, out_dir: str | os.PathLike[str]) -> Path:
        """metrics.json, ranks_t2v.csv, ranks_v2t.csv and recall_at_k.png under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        for direction, subject in (("t2v", "text"), ("v2t", "video")):
            columns = ["query", subject, "gt", *(f"rank_{name}" for name in self.score_sets)]
            with (out / f"ranks_{direction}.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.ranks[direction])
        self._plot_recall(out / "recall_at_k.png")
        return out

    def write_scores(self, out_dir: str | os.PathLike[str]) -> Path:
        """``scores.npz`` under ``out_dir``: :attr:`scores` (float32 [n_texts, n_videos] each)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "scores.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **self.scores)
        return out / "scores.npz"

    def _plot_recall(self, path: Path) -> None:
        """Recall@K for K = 1..50 per score set, t2v and v2t side by side."""
        from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: no global backend state)

        figure = Figure(figsize=(10, 4), layout="constrained")
        axes = figure.subplots(1, 2, sharey=True)
        for ax, direction in zip(axes, ("t2v", "v2t"), strict=True):
            rows = self.ranks[direction]
            ks = np.arange(1, min(_RECALL_CURVE_MAX_K, self._candidates(direction)) + 1)
            for name in self.score_sets:
                ranks = np.array([row[f"rank_{name}"] for row in rows])
                ax.plot(ks, [100.0 * np.mean(ranks <= k) for k in ks], marker=".", label=name)
            ax.set_title(f"{direction} ({len(rows)} queries)")
            ax.set_xlabel("K")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("recall@K (%)")
        axes[0].legend()
        figure.savefig(path, dpi=100)

    def _candidates(self, direction: str) -> int:
        info = self.metrics["info"]
        return info["n_videos"] if direction == "t2v" else info["n_texts"]


def _set_metrics(t2v_ranks: np.ndarray, v2t_ranks: np.ndarray) -> dict[str, Any]:
    t2v, v2t = M.rank_metrics(t2v_ranks), M.rank_metrics(v2t_ranks)
    six = [d[f"R@{k}"] for d in (t2v, v2t) for k in (1, 5, 10)]
    return {"t2v": t2v, "v2t": v2t, "R@mean": float(np.mean(six))}


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate_retrieval(model: torch.nn.Module, corpus: Corpus, rerank_k: int = 128, batch_size: int = 8,
                       workers: int = 0, cache_dir: str | os.PathLike[str] | None = None,
                       dual_softmax: bool = False, progress: bool = True, storage: str = "auto") -> EvalResult:
    """Zero-shot t2v and v2t retrieval of ``corpus``'s captions and clips (official protocol).

    ``rerank_k`` = 0 reports ITC only; so does a model without a matching head (with a warning).
    ``dual_softmax`` adds the ``itc_dsl`` set, which is not part of the official protocol.
    ``storage`` (:data:`STORAGE_CHOICES`) sets how patch tokens and caption hidden states are
    kept between encoding and re-ranking (:func:`storage_dtype`). ``scores_out``: a directory
    that receives the score matrices (:func:`save_scores`).

    Raises:
        ValueError: a caption is empty after cleaning, the corpus has no captions, or no clip
            could be decoded.
    """
    if rerank_k < 0:
        raise ValueError(f"rerank_k must be >= 0, got {rerank_k}")
    uncaptioned = [item.video for item in corpus.items if not item.captions]
    if uncaptioned:
        raise ValueError(f"retrieval needs a caption for every video; {len(uncaptioned)} have none "
                         f"(first: {uncaptioned[0]}); pass an annotation file")
    pairs = corpus.texts()
    texts = [text for text, _ in pairs]
    gt = np.array([video for _, video in pairs], dtype=np.int64)
    _check_captions(texts, corpus, gt.tolist(), getattr(model, "text_cleaning", DEFAULT_CAPTION_CLEANING))
    rerank = rerank_k > 0 and has_itm_head(model)
    if rerank_k > 0 and not rerank:
        logger.warning("%s has no trained matching (ITM) head (trained with loss.vtm = 0?): re-ranking "
                       "skipped, ITC results only", type(model).__name__)
    started = time.perf_counter()

    clips = embed_corpus(model, corpus, batch_size, workers, cache_dir, progress, with_tokens=rerank,
                         storage=storage)
    failed = clips["failed"]
    n_texts, n_videos = len(texts), len(corpus.items)
    timing: dict[str, Any] = {f"embed_{key}": value for key, value in clips["timing"].items()}
    timing["embeddings_cached"] = clips["cached"]

    with evaluating(model):
        text_started = time.perf_counter()
        captions = encode_captions(model, texts, corpus.max_text_len, keep_hidden=rerank, storage=storage)
        itc = torch.cat([model.similarity(chunk, clips["feat"]).cpu()
                         for chunk in captions.feat.split(_SIMILARITY_CHUNK)])
        itc[:, failed] = FAILED_SCORE
        timing["text_s"] = time.perf_counter() - text_started

        scored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {"itc": (itc, itc)}
        if dual_softmax:
            dsl_t2v, dsl_v2t = M.dual_softmax(itc, direction="t2v"), M.dual_softmax(itc, direction="v2t")
            dsl_t2v[:, failed] = FAILED_SCORE
            dsl_v2t[:, failed] = FAILED_SCORE
            scored["itc_dsl"] = (dsl_t2v, dsl_v2t)
        if rerank:
            rerank_started = time.perf_counter()
            scorer = PairScorer(model, clips["tokens"], captions.hidden, set(failed))
            itm_t2v, itm_v2t = rerank_both(scorer, itc, rerank_k, progress)
            scored["itm"] = (itm_t2v, itm_v2t)
            timing["rerank_s"] = time.perf_counter() - rerank_started
    timing["total_s"] = time.perf_counter() - started

    # failed clips rank last in both directions, whatever the score matrix says about them
    gt_failed = np.isin(gt, failed)
    ranks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (t2v_scores, v2t_scores) in scored.items():
        t2v_ranks, v2t_ranks = M.ranks_t2v(t2v_scores, gt), M.ranks_v2t(v2t_scores, gt)
        t2v_ranks[gt_failed] = n_videos
        v2t_ranks[failed] = n_texts
        ranks[name] = (t2v_ranks, v2t_ranks)
    if "itm" in ranks:
        # a ground truth outside the re-ranked top k sits below all k candidates, and the rest keep
        # their ITC order: its rank is its ITC rank, not wherever ties in the -100 fill put it
        ranks["itm"] = tuple(np.where(itc_ranks > rerank_k, itc_ranks, itm_ranks)
                             for itc_ranks, itm_ranks in zip(ranks["itc"], ranks["itm"], strict=True))

    info = {"dataset": corpus.name, "n_texts": n_texts, "n_videos": n_videos, "n_failed": len(failed),
            "failed": [corpus.items[i].video for i in failed], "n_missing": len(corpus.missing),
            "rerank_k": min(rerank_k, n_videos) if rerank else 0, "timing": timing}
    metrics: dict[str, Any] = {"info": info}
    for name, protocol in SCORE_SETS.items():
        if name in ranks:
            metrics[name] = {**_set_metrics(*ranks[name]), "protocol": protocol}
    scores = {"itc": itc.numpy()}
    if "itm" in scored:
        scores["itm_t2v"], scores["itm_v2t"] = (matrix.numpy() for matrix in scored["itm"])
    return EvalResult(metrics, _rank_rows(corpus, texts, gt, ranks), scores)


def _rank_rows(corpus: Corpus, texts: list[str], gt: np.ndarray,
               ranks: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, list[dict[str, Any]]]:
    names = [name for name in SCORE_SETS if name in ranks]
    captions_of: dict[int, list[int]] = {}
    for text_index, video in enumerate(gt.tolist()):
        captions_of.setdefault(video, []).append(text_index)
    t2v = [{"query": i, "text": text, "gt": corpus.items[gt[i]].video,
            **{f"rank_{name}": int(ranks[name][0][i]) for name in names}} for i, text in enumerate(texts)]
    v2t = [{"query": v, "video": item.video, "gt": " ".join(map(str, captions_of[v])),
            **{f"rank_{name}": int(ranks[name][1][v]) for name in names}} for v, item in enumerate(corpus.items)]
    return {"t2v": t2v, "v2t": v2t}

