"""The retrieval model's action head: saved with the model, used by the classifier before
zero-shot prompts when it knows the requested labels, and by the CLI with its source named."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from retrieval.data.synthetic import ACTIONS
from retrieval.eval.actions import evaluate_actions
from retrieval.labels import item_actions
from retrieval.models.actions import ActionClassifier, label_source
from retrieval.models.model_dir import load_model

N_TEST = 12
CORPUS_SEED = 2  # the synthetic corpus of tests/eval/conftest.py


@pytest.fixture(scope="module")
def headed(tiny_model):
    model = tiny_model(with_mlm=False)
    model.set_action_head(list(ACTIONS))
    return model.eval()


@pytest.fixture(scope="module")
def headed_dir(headed, tmp_path_factory):
    return headed.save(tmp_path_factory.mktemp("model") / "headed")


def test_the_head_reads_the_clip_vector_and_survives_saving(headed, headed_dir):
    feat = torch.nn.functional.normalize(torch.randn(3, 4, 24), dim=-1)
    logits = headed.action_logits(feat)
    # per-frame features and the clip vector an index stores give the same logits
    torch.testing.assert_close(logits, headed.action_logits(headed.clip_vector(feat)))
    expected = headed.action_head(headed.clip_vector(feat) * 24 ** 0.5)
    torch.testing.assert_close(logits, expected)
    loaded = load_model(headed_dir)
    assert loaded.action_labels == list(ACTIONS)
    assert json.loads((headed_dir / "config.json").read_text())["model"]["action_labels"] == list(ACTIONS)
    torch.testing.assert_close(loaded.action_logits(feat), logits)


def test_a_model_without_a_head_loads_without_one(tiny_model, tmp_path):
    plain = tiny_model(with_mlm=False)
    loaded = load_model(plain.save(tmp_path / "plain"))
    assert loaded.action_head is None and loaded.action_labels == []
    with pytest.raises(ValueError, match="no action head"):
        loaded.action_logits(torch.zeros(1, 24))
    with pytest.raises(ValueError, match="at least 2 distinct"):
        plain.set_action_head(["growing", "growing"])


def test_auto_uses_the_head_for_its_labels_and_zero_shot_for_others(headed):
    shuffled = list(reversed(ACTIONS))
    assert label_source(headed, list(ACTIONS)) == "head"
    assert label_source(headed, shuffled) == "head"          # the same set in another order
    assert label_source(headed, None) == "head"
    other = ["jumping", "swimming", "growing"]
    assert label_source(headed, other) == "zero-shot"
    with pytest.raises(ValueError, match="not the requested set"):
        ActionClassifier(headed, other, source="head")
    zero = ActionClassifier(headed, list(ACTIONS), source="zero-shot")
    assert zero.source == "zero-shot" and zero.label_features.shape == (len(ACTIONS), 24)
    head = ActionClassifier(headed, shuffled)
    assert head.source == "head" and head.labels == list(ACTIONS)   # the head's own order


def test_head_rankings_from_clips_and_from_stored_vectors_agree(headed, corpus):
    from retrieval.data.video import Preprocess, load_clip

    classifier = ActionClassifier(headed, list(ACTIONS))
    pre = Preprocess.from_dict(headed.preprocess)
    clips = torch.stack([load_clip(p, pre) for p in corpus.paths()[:3]])
    from_clips = classifier.predict_clips(clips, top=3)
    with torch.no_grad():
        vectors = headed.clip_vector(headed.encode_video(clips)["feat"])
    from_vectors = classifier.predict(vectors, top=3)
    for a, b in zip(from_clips, from_vectors, strict=True):
        assert [label for label, _ in a] == [label for label, _ in b]
        assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-5)
    with torch.no_grad():
        probs = torch.softmax(headed.action_logits(vectors), dim=-1)
    assert from_vectors[0][0] == (ACTIONS[int(probs[0].argmax())], pytest.approx(float(probs[0].max()), abs=1e-6))


def _head_that_predicts(model, wanted: list[str], monkeypatch):
    """Make the head answer ``wanted[i]`` for the i-th clip (by feature lookup)."""
    keys = {}

    def encode_video(video, **_):
        n = video.shape[0]
        start = len(keys)
        feat = torch.nn.functional.normalize(torch.randn(n, 24), dim=-1)
        for row in range(n):
            keys[tuple(feat[row].tolist())] = wanted[start + row]
        return {"feat": feat, "tokens": torch.zeros(n, 2, 24)}

    def action_logits(feat):
        out = torch.full((feat.shape[0], len(model.action_labels)), -10.0)
        for row in range(feat.shape[0]):
            out[row, model.action_labels.index(keys[tuple(feat[row].tolist())])] = 10.0
        return out

    monkeypatch.setattr(model, "encode_video", encode_video)
    monkeypatch.setattr(model, "action_logits", action_logits)


def test_evaluation_with_the_head_and_the_any_object_top1(headed, corpus, monkeypatch):
    items = corpus.items
    two = [i for i, item in enumerate(items) if len(item_actions(item)) > 1]
    assert two, "the test corpus should hold two-object clips"
    # right on every clip, but on two-object clips name the second object's action
    wanted = [item_actions(item)[1] if i in two else item.label for i, item in enumerate(items)]
    _head_that_predicts(headed, wanted, monkeypatch)
    result = evaluate_actions(headed, corpus, "synthetic", batch_size=5)
    assert result["source"] == "head" and result["n"] == N_TEST
    assert result["top1_any"] == 100.0
    assert result["top1"] == pytest.approx(100.0 * (N_TEST - len(two)) / N_TEST)


def test_item_actions_lists_every_object_primary_first(corpus):
    for item in corpus.items:
        actions = item_actions(item)
        objects = [o["action"] for o in item.extra["attributes"]["objects"]]
        assert actions[0] == item.label and set(actions) == set(objects)
    bare = replace(corpus.items[0], extra={})
    assert item_actions(bare) == [bare.label]


def test_cli_classify_names_the_head(headed_dir, corpus):
    from app.cli import app

    videos = [str(p) for p in corpus.paths()[:2]]
    result = CliRunner().invoke(app, ["classify", "--model", str(headed_dir), *videos, "--json"])
    assert result.exit_code == 0, result.output
    assert [entry["source"] for entry in json.loads(result.stdout)] == ["head", "head"]
    zero = CliRunner().invoke(app, ["classify", "--model", str(headed_dir), videos[0], "--source", "zero-shot"])
    assert zero.exit_code == 0 and zero.stdout.rstrip().endswith("[zero-shot]")
    other = CliRunner().invoke(app, ["classify", "--model", str(headed_dir), videos[0], "--labels", "kinetics400",
                                     "--source", "head"])
    assert other.exit_code == 2 and "not the requested set" in other.stderr
