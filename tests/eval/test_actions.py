"""Action labels: label sets, prompt-ensemble features, rankings, supervised heads, accuracy, CLI."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from retrieval.data.synthetic import ACTIONS
from retrieval.eval.actions import evaluate_actions
from retrieval.labels import load_labels
from retrieval.models.actions import ActionClassifier, classify_paths
from retrieval.models.registry import create_model

N_TEST = 12
CORPUS_SEED = 1  # the synthetic corpus of tests/eval/conftest.py


# ------------------------------------------------------------------------------------ labels


def test_named_label_sets():
    kinetics = load_labels("kinetics400")
    assert len(kinetics) == 400 == len(set(kinetics))
    assert (kinetics[0], kinetics[399]) == ("abseiling", "zumba")
    assert kinetics == sorted(kinetics, key=str.lower)  # the standard ids are alphabetical order
    assert load_labels("synthetic") == list(ACTIONS)


def test_label_file_ignores_blank_lines(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\n  jumping \n\nswimming\n\n")
    assert load_labels(str(path)) == ["jumping", "swimming"]


@pytest.mark.parametrize(("content", "error", "message"), [
    ("\n \n", ValueError, "has no labels"),
    ("a\nb\na\n", ValueError, "twice"),
    (None, FileNotFoundError, "not a named set"),
])
def test_label_file_errors(tmp_path, content, error, message):
    path = tmp_path / "labels.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        load_labels(path)


# -------------------------------------------------------------------------------- zero-shot


def test_label_feature_is_the_normalised_mean_of_normalised_prompt_features(model):
    prompts = ("a clip of {label}.", "{label}")
    classifier = ActionClassifier(model, ["growing", "moving left", "blinking"], prompts=prompts)
    assert classifier.source == "zero-shot"
    with torch.no_grad():
        for row, label in enumerate(classifier.labels):
            feats = model.encode_texts([p.format(label=label) for p in prompts])["feat"]
            expected = F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1)
            torch.testing.assert_close(classifier.label_features[row], expected, rtol=1e-5, atol=1e-5)


def test_predict_ranks_labels_by_softmax_of_similarity_over_temperature(model):
    labels = list(ACTIONS)
    classifier = ActionClassifier(model, labels)
    # per-frame features [B, T, E]: clip 0 is label 3's feature on every frame, clip 1 label 7's
    video_feat = classifier.label_features[[3, 7]].unsqueeze(1).repeat(1, 4, 1)
    rankings = classifier.predict(video_feat, top=4)
    assert [len(r) for r in rankings] == [4, 4]
    assert rankings[0][0][0] == labels[3] and rankings[1][0][0] == labels[7]
    for ranking in rankings:
        probs = [p for _, p in ranking]
        assert probs == sorted(probs, reverse=True)
    sim = classifier.label_features @ classifier.label_features[3]
    expected = torch.softmax(sim / model.temp.item(), dim=0)
    full = dict(classifier.predict(video_feat, top=100)[0])
    assert len(full) == len(labels) and sum(full.values()) == pytest.approx(1.0, abs=1e-5)
    assert [full[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-6)


def test_predict_clips_matches_predict_on_encoded_features(model):
    classifier = ActionClassifier(model, list(ACTIONS))
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        feat = model.encode_video(clips)["feat"]
    by_clip, by_feat = classifier.predict_clips(clips, top=3), classifier.predict(feat, top=3)
    assert [[label for label, _ in r] for r in by_clip] == [[label for label, _ in r] for r in by_feat]


def test_prompts_must_contain_the_label_slot(model):
    with pytest.raises(ValueError, match="{label}"):
        ActionClassifier(model, ["jumping"], prompts=("a video",))


# ------------------------------------------------------------------------------- supervised


def test_supervised_head_of_a_bare_encoder():
    encoder = create_model("videomamba_tiny_test", num_classes=3).eval()
    classifier = ActionClassifier(encoder, ["sit", "stand", "walk"])
    assert classifier.source == "supervised" and classifier.labels == ["sit", "stand", "walk"]
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(encoder.classify(clips), dim=-1)
    rankings = classifier.predict_clips(clips, top=3)
    for ranking, probs in zip(rankings, expected, strict=True):
        assert [p for _, p in ranking] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-6)
    with pytest.raises(ValueError, match="3 classes but no label names"):
        ActionClassifier(encoder, ["sit", "stand"])
    with pytest.raises(ValueError, match="text tower"):
        ActionClassifier(encoder, ["sit", "stand", "walk"], source="zero-shot")


def test_auto_prefers_the_head_only_for_its_own_classes(tiny_model):
    model = tiny_model(with_mlm=False, video_overrides={"num_classes": 3}).eval()
    assert ActionClassifier(model, ["a", "b", "c"]).source == "supervised"
    assert ActionClassifier(model, list(ACTIONS)).source == "zero-shot"
    assert ActionClassifier(model, ["a", "b", "c"], source="zero-shot").source == "zero-shot"


# ------------------------------------------------------------------------------- evaluation


def _aligned_encoder(model, classifier, labels_in_order, monkeypatch):
    """encode_video returns, clip by clip in corpus order, the feature of the clip's true label."""
    queue = [classifier.labels.index(label) for label in labels_in_order]

    def aligned(video, **kwargs):
        n = video.shape[0]
        rows = [queue.pop(0) for _ in range(n)]
        feat = classifier.label_features[rows].unsqueeze(1).repeat(1, 4, 1)
        return {"feat": feat, "tokens": torch.zeros(n, 16, 32)}

    monkeypatch.setattr(model, "encode_video", aligned)


def test_evaluate_actions_with_label_aligned_features_is_perfect(model, corpus, monkeypatch):
    labels = list(ACTIONS)
    classifier = ActionClassifier(model, labels)
    _aligned_encoder(model, classifier, [item.label for item in corpus.items], monkeypatch)
    result = evaluate_actions(model, corpus, labels, batch_size=5)
    assert result == {"top1": 100.0, "top5": 100.0, "top1_any": 100.0, "n": N_TEST, "failed": 0,
                      "unlabelled": 0, "source": "zero-shot"}


def test_evaluate_actions_skips_unlabelled_items(model, corpus, monkeypatch):
    items = [replace(item, label=None) if i % 3 == 0 else item for i, item in enumerate(corpus.items)]
    partly = replace(corpus, items=items)
    labels = list(ACTIONS)
    classifier = ActionClassifier(model, labels)
    _aligned_encoder(model, classifier, [item.label for item in items if item.label], monkeypatch)
    result = evaluate_actions(model, partly, labels)
    assert (result["n"], result["unlabelled"], result["top1"]) == (N_TEST - 4, 4, 100.0)


def test_evaluate_actions_with_a_supervised_head(corpus):
    encoder = create_model("videomamba_tiny_test", num_classes=len(ACTIONS)).eval()
    result = evaluate_actions(encoder, corpus, "synthetic", batch_size=5)
    assert result["source"] == "supervised" and result["n"] == N_TEST
    assert 0 <= result["top1"] <= result["top5"] <= 100


def test_evaluate_actions_errors(model, corpus):
    unlabelled = replace(corpus, items=[replace(item, label=None) for item in corpus.items])
    with pytest.raises(ValueError, match="no item .* has a 'label'"):
        evaluate_actions(model, unlabelled, "synthetic")
    with pytest.raises(ValueError, match="not in the label list"):
        evaluate_actions(model, corpus, ["jumping", "swimming"])


# --------------------------------------------------------------------------- paths and CLI


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    return model.save(tmp_path_factory.mktemp("model") / "m")


def test_classify_paths_from_a_model_directory(model, model_dir, corpus):
    paths = corpus.paths()[:3]
    rankings = classify_paths(model_dir, paths, labels="synthetic", top=3)
    assert len(rankings) == 3 and all(len(r) == 3 for r in rankings)
    assert all(label in ACTIONS for r in rankings for label, _ in r)
    # the same as the in-memory model (the directory round trip keeps the weights)
    again = classify_paths(model, paths, labels=list(ACTIONS), top=3)
    for a, b in zip(rankings, again, strict=True):
        assert [label for label, _ in a] == [label for label, _ in b]
        assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-5)


def test_cli_classify_json_and_errors(model_dir, corpus, tmp_path):
    from app.cli import app

    videos = [str(p) for p in corpus.paths()[:2]]
    result = CliRunner().invoke(app, ["classify", "--model", str(model_dir), *videos, "--top", "2", "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert [entry["video"] for entry in parsed] == videos
    assert all(len(entry["labels"]) == 2 for entry in parsed)

    plain = CliRunner().invoke(app, ["classify", "--model", str(model_dir), videos[0], "--top", "1"])
    assert plain.exit_code == 0 and plain.stdout.startswith(f"{videos[0]}: ")
    assert plain.stdout.rstrip().endswith("[zero-shot]")  # this model has no action head

    missing = CliRunner().invoke(app, ["classify", "--model", str(model_dir), str(tmp_path / "nope.mp4")])
    assert missing.exit_code == 2 and "nope.mp4" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    no_labels = CliRunner().invoke(app, ["classify", "--model", str(model_dir), videos[0], "--labels", "k700"])
    assert no_labels.exit_code == 2 and "not a named set" in no_labels.stderr
