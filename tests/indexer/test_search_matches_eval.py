"""``vtr search`` ranks clips exactly as ``vtr eval`` does, for a model with one feature per frame.

The model keeps per-frame features (``keep_temporal``, the official retrieval layout): evaluation
scores a clip by the mean over frames of the per-frame cosine, and the index must store a vector
whose inner product with the text vector is that same score. The untrained tiny model's frames
would be nearly parallel, which hides the difference between the two, so its temporal position
table and projection are redrawn larger: frames then disagree and renormalising the stored
vector would reorder clips (checked, so the test can tell the two apart).

Every command runs in fp32: "exactly" holds for one precision. Under bf16 (``auto`` on CPUs with
native bf16) a clip's features depend on the batch it was encoded in by bf16 rounding, and indexing
and evaluation batch clips differently.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from app.cli import app
from indexer.store import open_index
from retrieval.data.corpora import load_corpus
from retrieval.data.synthetic import generate_corpus
from retrieval.eval.metrics import ranks_t2v
from retrieval.eval.retrieval import embed_corpus
from retrieval.models.model_dir import load_model

N_TEST = 10


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, n_train=2, n_test=N_TEST, size=32, long_videos=0, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model()
    assert model.keep_temporal
    with torch.no_grad():
        model.video.temporal_pos_embedding.normal_(0.0, 1.0)
        model.vision_proj.weight.normal_(0.0, 3.0)
        model.vision_proj.bias.zero_()
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def index(corpus_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    _invoke(["index", "--model", str(model_dir), "--videos", str(corpus_dir / "videos"), "--ann",
             str(corpus_dir / "test.json"), "--out", str(out), "--workers", "0", "--no-progress",
             "--precision", "fp32"])
    return out


@pytest.fixture(scope="module")
def eval_ranks(corpus_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("eval")
    _invoke(["eval", "--model", str(model_dir), "--dataset", "generic", "--ann", str(corpus_dir / "test.json"),
             "--videos", str(corpus_dir / "videos"), "--rerank-k", "0", "--out", str(out), "--no-progress",
             "--precision", "fp32"])
    with (out / "ranks_t2v.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_search_order_equals_eval_ranks(index: Path, corpus_dir: Path, eval_ranks: list[dict]) -> None:
    assert len(eval_ranks) >= N_TEST
    videos = (corpus_dir / "videos").resolve()
    ranks = []
    for row in eval_ranks:
        lines = _invoke(["search", "--index", str(index), row["text"], "-k", str(N_TEST), "--json",
                         "--precision", "fp32"])
        hits = [json.loads(line) for line in lines.strip().splitlines()]
        order = [Path(hit["path"]).resolve().relative_to(videos).as_posix() for hit in hits]
        assert sorted(order) == sorted({r["gt"] for r in eval_ranks})  # every clip, once
        scores = [hit["score"] for hit in hits]
        assert scores == sorted(scores, reverse=True)
        ranks.append(order.index(row["gt"]) + 1)
    assert ranks == [int(row["rank_itc"]) for row in eval_ranks]
    assert len(set(ranks)) > 1, "every caption at one rank: the check would not tell orders apart"


def test_index_scores_are_the_eval_scores_and_renormalising_would_reorder(
    index: Path, corpus_dir: Path, model_dir: Path
) -> None:
    model = load_model(model_dir).eval()
    corpus = load_corpus("generic", corpus_dir / "test.json", corpus_dir / "videos")
    texts, gt = zip(*corpus.texts(), strict=True)
    with torch.inference_mode():
        frames = embed_corpus(model, corpus, batch_size=4, workers=0, cache_dir=None, progress=False)["feat"]
        text_feat = model.encode_texts(list(texts), corpus.max_text_len)["feat"]
        eval_scores = model.similarity(text_feat, frames)                    # mean per-frame cosine
    assert frames.dim() == 3 and frames.shape[1] > 1

    reader = open_index(index)
    row_of = {Path(item["path"]).resolve(): row for row, item in enumerate(reader.items)}
    rows = [row_of[(corpus_dir / "videos" / item.video).resolve()] for item in corpus.items]
    stored = torch.from_numpy(np.asarray(reader.vectors, np.float32)[rows])
    # float16 storage: scores agree to its precision, and the stored norms are below 1
    torch.testing.assert_close(text_feat @ stored.t(), eval_scores, atol=2e-3, rtol=0)
    norms = stored.norm(dim=-1)
    assert (norms <= 1.0 + 1e-3).all() and norms.min() < 0.9
    # FAISS's own top hit for each caption is the eval matrix's argmax
    hits = reader.search(text_feat.numpy(), k=1)
    top = [corpus.items[rows.index(row_of[Path(h[0][0]["path"]).resolve()])].video for h in hits]
    assert top == [corpus.items[i].video for i in eval_scores.argmax(1).tolist()]

    # the old layout, normalize(mean of frames), ranks some caption's clip elsewhere
    renormalised = F.normalize(frames.mean(1), dim=-1)
    gt = np.asarray(gt)
    assert not np.array_equal(ranks_t2v(text_feat @ renormalised.t(), gt), ranks_t2v(eval_scores, gt))
