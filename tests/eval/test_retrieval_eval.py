"""Zero-shot retrieval evaluation on a tiny synthetic corpus with a tiny random model.

The random model's rankings are arbitrary, so exact expectations come from patched models: an
ITM "oracle" whose logit is high only for ground-truth pairs, and call counters on
``encode_video`` for the embedding cache.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import retrieval.eval.retrieval as retrieval_eval

from retrieval.data.corpora import load_corpus
from retrieval.data.video import Preprocess
from retrieval.eval.retrieval import (
    EvalResult,
    embed_corpus,
    embedding_cache_key,
    encode_captions,
    evaluate_retrieval,
    storage_dtype,
)
from retrieval.models.device import evaluating
from retrieval.models.retrieval_model import RetrievalModel

N_TEST = 12
CORPUS_SEED = 0  # the synthetic corpus of tests/eval/conftest.py


def _check_ranges(result: EvalResult, n_texts: int, n_videos: int) -> None:
    for row in result.ranks["t2v"]:
        assert all(1 <= row[f"rank_{name}"] <= n_videos for name in result.score_sets)
    for row in result.ranks["v2t"]:
        assert all(1 <= row[f"rank_{name}"] <= n_texts for name in result.score_sets)
    for name in result.score_sets:
        for direction in ("t2v", "v2t"):
            m = result.metrics[name][direction]
            assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
            limit = n_videos if direction == "t2v" else n_texts
            assert 1 <= m["MdR"] <= limit and 1 <= m["MnR"] <= limit


def test_metrics_are_sane_for_every_score_set(model, corpus):
    result = evaluate_retrieval(model, corpus, rerank_k=4, dual_softmax=True, progress=False)
    assert result.score_sets == ["itm", "itc", "itc_dsl"]
    assert "NOT official" in result.metrics["itc_dsl"]["protocol"]
    info = result.metrics["info"]
    assert (info["n_texts"], info["n_videos"], info["n_failed"], info["rerank_k"]) == (N_TEST, N_TEST, 0, 4)
    assert len(result.ranks["t2v"]) == N_TEST and len(result.ranks["v2t"]) == N_TEST
    _check_ranges(result, N_TEST, N_TEST)
    itc = result.metrics["itc"]
    six = [itc[d][f"R@{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10)]
    assert itc["R@mean"] == pytest.approx(sum(six) / 6)
    # a ground truth outside its query's top 4 was not re-scored: it keeps its ITC rank
    for direction in ("t2v", "v2t"):
        for row in result.ranks[direction]:
            if row["rank_itc"] > 4:
                assert row["rank_itm"] == row["rank_itc"]
            else:
                assert row["rank_itm"] <= 4
    assert "itm (official" in result.table() and "itc_dsl (NOT official" in result.table()


@pytest.fixture
def oracle(model, corpus, monkeypatch):
    """The model with marked tokens/hidden states and an ITM head that recognises true pairs.

    encode_video writes each clip's corpus index into its first token (clips arrive in corpus
    order with workers=0); encode_texts writes the caption's ground-truth video index into its
    first hidden state; the matching head (its video, caption and pair parts) scores 10 for a
    matching pair, 0 otherwise.
    """
    gt_of = {text: video for text, video in corpus.texts()}
    encode_video, encode_texts = model.encode_video, model.encode_texts
    seen = {"clips": 0}

    def marked_video(video, **kwargs):
        out = encode_video(video, **kwargs)
        n = video.shape[0]
        out["tokens"][:, 0, 0] = torch.arange(seen["clips"], seen["clips"] + n, dtype=out["tokens"].dtype)
        seen["clips"] += n
        return out

    def marked_texts(texts, max_len=None):
        out = encode_texts(texts, max_len)
        out["hidden"][:, 0, 0] = torch.tensor([float(gt_of[t]) for t in texts])
        return out

    def match(video_state, text_state, text_mask):
        marks = video_state[:, 0, 0].repeat_interleave(text_state.shape[0] // video_state.shape[0])
        return 10.0 * (marks == text_state[:, 0, 0]).float()

    monkeypatch.setattr(model, "encode_video", marked_video)
    monkeypatch.setattr(model, "encode_texts", marked_texts)
    monkeypatch.setattr(model, "match_video_state", lambda tokens: tokens)
    monkeypatch.setattr(model, "match_text_state", lambda hidden, mask: hidden)
    monkeypatch.setattr(model, "match_score_cached", match)
    return model


def test_rerank_with_an_oracle_finds_everything_when_k_covers_the_corpus(oracle, corpus):
    result = evaluate_retrieval(oracle, corpus, rerank_k=N_TEST, progress=False)
    assert result.metrics["itm"]["t2v"]["R@1"] == 100.0
    assert result.metrics["itm"]["v2t"]["R@1"] == 100.0


def test_rerank_touches_only_the_top_k(oracle, corpus):
    k = 3
    result = evaluate_retrieval(oracle, corpus, rerank_k=k, progress=False)
    for direction in ("t2v", "v2t"):
        for row in result.ranks[direction]:
            # inside the ITC top k the oracle lifts the gt to 1; outside it sits in the -100 fill,
            # below the k re-scored candidates, and keeps its ITC rank
            expected = 1 if row["rank_itc"] <= k else row["rank_itc"]
            assert row["rank_itm"] == expected, (direction, row)
    assert any(row["rank_itc"] > k for row in result.ranks["t2v"])  # the check above bites


def test_second_run_reuses_cached_embeddings(model, corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    encode_video = model.encode_video

    def counted(video, **kwargs):
        calls["n"] += 1
        return encode_video(video, **kwargs)

    monkeypatch.setattr(model, "encode_video", counted)
    first = evaluate_retrieval(model, corpus, rerank_k=2, batch_size=4, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 3 and not first.metrics["info"]["timing"]["embeddings_cached"]
    second = evaluate_retrieval(model, corpus, rerank_k=5, batch_size=4, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 3, "the second run re-encoded clips"
    assert second.metrics["info"]["timing"]["embeddings_cached"]
    assert second.metrics["itc"] == first.metrics["itc"]
    assert second.metrics["info"]["rerank_k"] == 5
    # an ITC-only run needs no tokens and is served by the same entry
    evaluate_retrieval(model, corpus, rerank_k=0, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 3


def test_cache_key_follows_the_video_weights_only(model, corpus):
    preprocess = Preprocess.for_model(model, corpus)
    key = embedding_cache_key(model, corpus, preprocess)
    for weight, changes_key in ((model.text_proj.weight, False), (model.temp, False),
                                (model.video.temporal_pos_embedding, True), (model.vision_proj.bias, True)):
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(1.0)
        assert (embedding_cache_key(model, corpus, preprocess) != key) == changes_key, weight.shape
        with torch.no_grad():
            weight.copy_(saved)
    assert embedding_cache_key(model, corpus, preprocess) == key
    other_frames = replace(preprocess, size=preprocess.size * 2)
    assert embedding_cache_key(model, corpus, other_frames) != key


def test_fp32_runs_store_float32_intermediates_and_fp16_only_on_request(model, corpus, tmp_path):
    assert storage_dtype(model) == torch.float32 and storage_dtype(model, "fp16") == torch.float16
    clips = embed_corpus(model, corpus, batch_size=4, cache_dir=tmp_path, progress=False)
    assert clips["tokens"].dtype == np.float32 and isinstance(clips["tokens"], np.memmap)
    half = embed_corpus(model, corpus, batch_size=4, cache_dir=tmp_path, progress=False, storage="fp16")
    assert half["tokens"].dtype == np.float16 and not half["cached"], "an fp16 entry served an fp32 run"
    assert len(list(tmp_path.iterdir())) == 2
    np.testing.assert_array_equal(half["tokens"], clips["tokens"].astype(np.float16))
    with evaluating(model):
        captions = encode_captions(model, ["a red circle moves up"], 32, keep_hidden=True)
        halved = encode_captions(model, ["a red circle moves up"], 32, keep_hidden=True, storage="fp16")
    assert captions.hidden[0].dtype == torch.float32 and halved.hidden[0].dtype == torch.float16
    model.vtr_precision = "bf16"  # a reduced-precision run stores float16 unless asked otherwise
    try:
        assert storage_dtype(model) == torch.float16 and storage_dtype(model, "fp32") == torch.float32
    finally:
        del model.vtr_precision
    with pytest.raises(ValueError, match="storage must be one of"):
        storage_dtype(model, "int8")


def test_tokens_too_large_for_memory_go_to_an_unlinked_file(model, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval_eval, "_available_memory", lambda: 1000)
    monkeypatch.setattr(retrieval_eval.tempfile, "tempdir", str(tmp_path))
    clips = embed_corpus(model, corpus, batch_size=4, progress=False)
    assert isinstance(clips["tokens"], np.memmap) and clips["tokens"].dtype == np.float32
    assert list(tmp_path.iterdir()) == []  # nothing left behind, the mapping holds the data
    monkeypatch.setattr(retrieval_eval, "_available_memory", lambda: None)
    in_memory = embed_corpus(model, corpus, batch_size=4, progress=False)
    assert not isinstance(in_memory["tokens"], np.memmap)
    np.testing.assert_array_equal(np.asarray(clips["tokens"]), in_memory["tokens"])


def test_undecodable_video_is_skipped_counted_and_ranked_last(corpus_dir, model, tmp_path, caplog):
    root = tmp_path / "videos"
    shutil.copytree(corpus_dir / "videos" / "test", root / "test")
    (root / "test" / "0003.mp4").write_bytes(b"not a video at all" * 50)
    broken = load_corpus("generic", corpus_dir / "test.json", root)
    with caplog.at_level(logging.WARNING, logger="retrieval.eval.retrieval"):
        result = evaluate_retrieval(model, broken, rerank_k=N_TEST, workers=1, dual_softmax=True,
                                    progress=False)
    info = result.metrics["info"]
    assert info["n_failed"] == 1 and info["failed"] == ["test/0003.mp4"]
    assert any("0003.mp4" in record.getMessage() for record in caplog.records)
    for name in result.score_sets:
        assert result.ranks["t2v"][3][f"rank_{name}"] == N_TEST
        assert result.ranks["v2t"][3][f"rank_{name}"] == N_TEST
        # no other query finds the broken clip above its own video
        assert all(row[f"rank_{name}"] < N_TEST for i, row in enumerate(result.ranks["t2v"]) if i != 3)


def test_no_decodable_video_is_an_error_that_leaves_no_cache_entry(corpus_dir, model, tmp_path):
    entries = json.loads((corpus_dir / "test.json").read_text())[:2]
    for entry in entries:
        (tmp_path / entry["video"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry["video"]).write_bytes(b"\x00" * 100)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(entries))
    broken = load_corpus("generic", ann, tmp_path)
    with pytest.raises(ValueError, match="none of the 2 videos .* could be decoded"):
        evaluate_retrieval(model, broken, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_write_produces_metrics_ranks_and_plot(model, corpus, tmp_path):
    result = evaluate_retrieval(model, corpus, rerank_k=3, progress=False)
    out = result.write(tmp_path / "out")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"info", "itc", "itm"} <= metrics.keys()
    assert set(metrics["itm"]["t2v"]) == {"R@1", "R@5", "R@10", "R@mean", "MdR", "MnR"}
    for direction, first_columns in (("t2v", ["query", "text", "gt"]), ("v2t", ["query", "video", "gt"])):
        with (out / f"ranks_{direction}.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == N_TEST
        assert list(rows[0]) == [*first_columns, "rank_itm", "rank_itc"]
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class DualEncoderOnly(torch.nn.Module):
    """A retrieval model with no matching head: encoders and similarity only."""

    def __init__(self, inner: RetrievalModel) -> None:
        super().__init__()
        self.inner = inner

    @property
    def preprocess(self) -> dict:
        return self.inner.preprocess

    def encode_video(self, video: torch.Tensor) -> dict:
        return self.inner.encode_video(video)

    def encode_texts(self, texts: list[str], max_len: int | None = None) -> dict:
        return self.inner.encode_texts(texts, max_len)

    similarity = staticmethod(RetrievalModel.similarity)


def test_model_without_itm_head_reports_itc_only(model, corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="retrieval.eval.retrieval"):
        result = evaluate_retrieval(DualEncoderOnly(model), corpus, rerank_k=8, progress=False)
    assert result.score_sets == ["itc"] and result.metrics["info"]["rerank_k"] == 0
    assert any("re-ranking skipped" in record.getMessage() for record in caplog.records)
    assert result.metrics["itc"] == evaluate_retrieval(model, corpus, rerank_k=0, progress=False).metrics["itc"]


def test_empty_caption_is_named(model, corpus_dir, tmp_path):
    entries = json.loads((corpus_dir / "test.json").read_text())[:3]
    entries[1]["caption"] = "?!..."
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(entries))
    bad = load_corpus("generic", ann, corpus_dir / "videos")
    with pytest.raises(ValueError, match=r"caption 1 of video 'test/0001.mp4' is empty"):
        evaluate_retrieval(model, bad, progress=False)


# ---------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    return model.save(tmp_path_factory.mktemp("model") / "m")


def test_cli_eval_prints_table_and_writes_outputs(model_dir, corpus_dir, tmp_path):
    from app.cli import app

    out = tmp_path / "out"
    args = ["eval", "--model", str(model_dir), "--dataset", "generic", "--ann", str(corpus_dir / "test.json"),
            "--videos", str(corpus_dir / "videos"), "--rerank-k", "4", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "itm (official" in result.stdout and "R@1" in result.stdout
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "ranks_t2v.csv", "ranks_v2t.csv",
                                               "recall_at_k.png", "embeddings"}
    again = CliRunner().invoke(app, args[:-3] + ["--rerank-k", "2", "--out", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["info"]["timing"]["embeddings_cached"]


def test_cli_eval_classify_task(model_dir, corpus_dir):
    from app.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--dataset", "generic", "--ann",
                                      str(corpus_dir / "test.json"), "--videos", str(corpus_dir / "videos"),
                                      "--task", "classify", "--labels", "synthetic", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "top1" in result.stdout and f"over {N_TEST} clips" in result.stdout


@pytest.mark.parametrize(("change", "message"), [
    ({"--videos": "elsewhere"}, "none of the 12 videos"),
    ({"--task": "segment"}, "--task must be one of"),
    ({"--storage": "int8"}, "--storage must be one of"),
    ({"--save-scores": None}, "--save-scores needs --out"),
    ({"--dataset": "kinetics"}, "unknown dataset"),
])
def test_cli_eval_user_errors_are_one_line(model_dir, corpus_dir, tmp_path, change, message):
    from app.cli import app

    options = {"--model": str(model_dir), "--dataset": "generic", "--ann": str(corpus_dir / "test.json"),
               "--videos": str(corpus_dir / "videos")}
    options.update({key: str(tmp_path / value) if key == "--videos" else value for key, value in change.items()})
    args = [part for key, value in options.items() for part in ((key,) if value is None else (key, value))]
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
