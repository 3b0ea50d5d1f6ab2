"""A local Hugging Face TimeSformer directory works wherever a model directory does, and converts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TimesformerConfig, TimesformerForVideoClassification
from typer.testing import CliRunner

from retrieval.data.synthetic import ACTIONS
from retrieval.data.video import Preprocess, load_clip
from retrieval.models.actions import classify_paths
from retrieval.models.model_dir import load_model, model_identity, read_model_config

N_TEST = 6
CORPUS_SEED = 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, TimesformerForVideoClassification]:
    """A tiny K-way TimeSformer saved by transformers itself, labels = the synthetic actions."""
    torch.manual_seed(0)
    config = TimesformerConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               id2label=dict(enumerate(ACTIONS)), label2id={a: i for i, a in enumerate(ACTIONS)})
    model = TimesformerForVideoClassification(config).eval()
    path = tmp_path_factory.mktemp("hf") / "timesformer-tiny"
    model.save_pretrained(path)
    return path, model


def _hf_probs(hf_model, paths, preprocess: dict) -> torch.Tensor:
    pre = Preprocess.from_dict(preprocess)
    clips = torch.stack([load_clip(p, pre) for p in paths])                     # [B, C, T, H, W]
    with torch.no_grad():
        return torch.softmax(hf_model(pixel_values=clips.transpose(1, 2)).logits, -1)


def test_hf_directory_loads_as_a_model_directory(hf_dir):
    path, hf_model = hf_dir
    cfg = read_model_config(path)
    assert cfg["kind"] == "hf_timesformer"
    assert cfg["preprocess"]["mean"] == [0.45] * 3 and cfg["preprocess"]["num_frames"] == 4
    assert model_identity(path)["weights_sha256"]
    model = load_model(path)
    assert model.id2label == list(ACTIONS)
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.classify(video), hf_model(pixel_values=video.transpose(1, 2)).logits,
                                   rtol=0, atol=1e-6)


def test_classify_with_an_hf_directory_uses_its_head(hf_dir, corpus):
    path, hf_model = hf_dir
    paths = corpus.paths()[:3]
    rankings = classify_paths(path, paths, labels="synthetic", top=len(ACTIONS), source="supervised")
    expected = _hf_probs(hf_model, paths, read_model_config(path)["preprocess"])
    for ranking, probs in zip(rankings, expected, strict=True):
        got = dict(ranking)
        assert [got[a] for a in ACTIONS] == pytest.approx(probs.tolist(), abs=1e-5)


def test_cli_classify_eval_and_index_read_an_hf_directory(hf_dir, corpus, corpus_dir, tmp_path):
    from app.cli import app

    path, _ = hf_dir
    videos = [str(p) for p in corpus.paths()[:2]]
    runner = CliRunner()
    res = runner.invoke(app, ["classify", "--model", str(path), *videos, "--top", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert [e["video"] for e in json.loads(res.stdout)] == videos
    res = runner.invoke(app, ["eval", "--model", str(path), "--dataset", "generic", "--task", "classify",
                              "--ann", str(corpus_dir / "test.json"), "--videos", str(corpus_dir / "videos")])
    assert res.exit_code == 0, res.output
    assert f"over {N_TEST} clips" in res.stdout
    res = runner.invoke(app, ["index", "--model", str(path), "--videos", str(corpus_dir / "videos"),
                              "--ann", str(corpus_dir / "test.json"), "--out", str(tmp_path / "idx"),
                              "--workers", "0", "--no-progress"])
    # read as a model directory (not "not a vtr model directory"), then refused in one line before any
    # work: an index answers text queries and a bare encoder has no text tower
    assert res.exit_code == 2, res.output
    assert "bare video encoder (hf_timesformer)" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists()


def test_convert_format_timesformer(hf_dir, tmp_path):
    from app.cli import app

    path, hf_model = hf_dir
    out = tmp_path / "converted"
    res = CliRunner().invoke(app, ["convert", "--format", "timesformer", "--checkpoint", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = read_model_config(out)
    assert cfg["kind"] == "video_encoder" and cfg["model"]["arch"] == "timesformer"
    model = load_model(out)
    assert model.id2label == list(ACTIONS)
    video = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.classify(video), hf_model(pixel_values=video.transpose(1, 2)).logits,
                                   rtol=0, atol=1e-6)
    bad = CliRunner().invoke(app, ["convert", "--format", "timesformer", "--checkpoint", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "nope" in bad.stderr
