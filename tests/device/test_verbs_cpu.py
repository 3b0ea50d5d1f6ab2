"""Every verb end to end with ``--device cpu`` (and a bf16 run beside fp32 where it runs a model):
the options reach the model, and bf16 inference ranks like fp32 on an untrained tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from app.web import open_searcher
from retrieval.data.synthetic import generate_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, n_train=8, n_test=6, size=32, long_videos=0, progress=False)
    return root


def _ok(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def index(corpus: Path, model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    _ok(["index", "-m", str(model_dir), "--videos", str(corpus / "videos"), "--ann", str(corpus / "test.json"),
         "--out", str(out), "--workers", "0", "--no-progress", "--device", "cpu", "--precision", "fp32"])
    return out


def test_eval_fp32_and_bf16(corpus, model_dir, tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        _ok(["eval", "-m", str(model_dir), "-d", "generic", "--ann", str(corpus / "test.json"), "--videos",
             str(corpus / "videos"), "--rerank-k", "0", "--no-progress", "--device", "cpu", "--precision", precision,
             "--out", str(out)])
        results[precision] = json.loads((out / "metrics.json").read_text())
    a, b = results["fp32"]["itc"], results["bf16"]["itc"]
    # 6 clips: one rank flip moves R@1 by 16.7 points; an untrained model's near-ties may flip one
    for key in ("t2v", "v2t"):
        assert abs(a[key]["R@5"] - b[key]["R@5"]) <= 17, (a, b)


def test_index_search_and_serve_on_cpu(index, model_dir):
    assert (index / "manifest.json").exists() or any(index.iterdir())
    hits = {}
    for precision in ("fp32", "bf16"):
        res = _ok(["search", "a red circle", "-i", str(index), "-k", "3", "--json", "--device", "cpu",
                   "--precision", precision])
        hits[precision] = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(hits["fp32"]) == len(hits["bf16"]) == 3
    assert hits["fp32"][0]["item_id"] == hits["bf16"][0]["item_id"] or \
        abs(hits["fp32"][0]["score"] - hits["fp32"][1]["score"]) < 0.02
    searcher = open_searcher(index, None, "cpu", "bf16")   # what `vtr serve --device cpu --precision bf16` opens
    assert searcher.device == torch.device("cpu") and searcher.model.vtr_precision == "bf16"


def test_classify_on_cpu(corpus, model_dir):
    video = sorted((corpus / "videos").rglob("*.mp4"))[0]
    res = _ok(["classify", str(video), "-m", str(model_dir), "--json", "--device", "cpu", "--precision", "bf16"])
    ranking = json.loads(res.stdout)[0]["labels"]
    assert len(ranking) == 5 and 0 < sum(r["prob"] for r in ranking) <= 1 + 1e-5


def test_train_on_cpu(corpus, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("")
    _ok(["train", str(recipe), f"data.train={corpus / 'train.json'}", f"data.videos={corpus / 'videos'}",
         "model.video=videomamba_tiny_test", "model.embed_dim=16", "model.num_fusion_layers=1", "data.cache=true",
         "optim.batch_size=4", "optim.steps=2", "optim.warmup_steps=1", f"run.out={out}", "run.progress=false",
         "--device", "cpu", "--precision", "bf16"])
    assert json.loads((out / "recipe.json").read_text())["run"] == {**json.loads((out / "recipe.json").read_text())["run"],
                                                                   "device": "cpu", "precision": "bf16"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
