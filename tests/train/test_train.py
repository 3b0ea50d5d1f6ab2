"""Training: recipes, losses, a short run, exact resume, and 2 processes == 1 process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval import load_model
from retrieval.train import loop
from retrieval.train.losses import vtc_loss
from retrieval.train.recipe import RecipeError, load_recipe

from .conftest import assert_same_parameters, kill_and_resume, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def test_recipe_errors(tmp_path, tiny_corpus):
    with pytest.raises(RecipeError, match="optim.lrr"):
        load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"optim.lrr": 1}))
    with pytest.raises(RecipeError, match=r"optim.steps: expected int"):
        load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"optim.steps": "many"}))
    with pytest.raises(RecipeError, match="unknown recipe section"):
        load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"optimizer.lr": 1}))
    with pytest.raises(RecipeError, match="data.train"):
        load_recipe(None, ["data.videos=x"])
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"data.train": str(tmp_path / "missing.json")}))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        loop.train(r)


def test_demo_recipe_parses():
    r = load_recipe(REPO / "configs" / "train" / "demo.yaml", ["optim.lr=3e-3"])
    assert r.model.video == "videomamba_demo" and r.data.cache
    assert r.optim.lr == 0.003                          # YAML 1.1 reads 3e-3 as a string


def test_vtc_positives_share_a_video():
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    v = t.clone()
    idx = torch.tensor([0, 1, 2, 3])
    aligned = vtc_loss(t, v, idx, torch.tensor(0.05))
    shuffled = vtc_loss(t, v[[1, 0, 3, 2]], idx, torch.tensor(0.05))
    assert aligned < shuffled
    # two captions of one video: both are positives of each other, so the loss ignores their order
    shared = torch.tensor([0, 0, 2, 3])
    same = vtc_loss(t, v, shared, torch.tensor(0.05))
    # each row's target spreads evenly over the columns of its video, in both directions
    target = (shared[:, None] == shared[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    sim = t @ v.t() / 0.05
    expected = -((target * sim.log_softmax(1)).sum(1).mean() + (target * sim.t().log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(same, expected)
    assert same > vtc_loss(t, v, idx, torch.tensor(0.05))   # v1 now shares row 0's target with v0


def test_short_run_writes_model_metrics_and_plot(tmp_path, tiny_corpus):
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "run"))
    final = loop.train(r)
    model = load_model(final)
    assert model.video.embed_dim == 32
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert {"vtc", "vtm", "mlm", "loss", "samples_per_s"} <= set(rows[0])
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    with pytest.raises(RecipeError, match="--resume"):
        loop.train(r)                                    # refuses to overwrite a run


def test_resume_reaches_the_same_parameters(tmp_path, tiny_corpus, monkeypatch):
    straight = load_model(loop.train(load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "a"))))

    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "b"))
    # killed in step 5, after the step-3 checkpoint
    assert_same_parameters(straight, kill_and_resume(r, monkeypatch))

    other = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "b", **{"optim.lr": 0.1}))
    with pytest.raises(RecipeError, match="another recipe"):
        loop.train(other, resume=True)


@pytest.mark.slow
def test_two_processes_follow_one_process(tmp_path, tiny_corpus):
    # reversed copies are drawn per process (each adds up to its share of its own part of the
    # batch), so they are the one recipe feature whose samples depend on the process count
    common = {"loss.vtm": 0, "loss.mlm": 0, "optim.steps": 4, "optim.grad_clip": 0, "data.reversed_share": 0}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n, out in ((1, "one"), (2, "two")):
        args = tiny_overrides(tiny_corpus, tmp_path / out, **common)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29500 + n + os.getpid() % 1000), "-m", "app.cli", "train", str(REPO / "configs/train/demo.yaml"), *args]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (one, two)


def test_frozen_text_prefix_matches_the_full_text_tower(tmp_path, tiny_corpus):
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"optim.freeze_text_layers": 3}))
    model = loop.build_model(r).eval()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("text.encoder.layer.2.") for n in frozen)
    assert not any(n.startswith(("text.encoder.layer.3.", "video.")) for n in frozen)
    prefix = loop.FrozenTextPrefix(model, 3)
    captions = ["a red circle moving left", "one small green triangle that is growing", "a red circle moving left"]
    hidden, mask = prefix(captions)
    assert len(prefix._cache) == 2                       # one entry per distinct caption
    ids, full_mask = model.tokenize(captions)
    with torch.no_grad():
        full = model.encode_text(ids, full_mask)
        cached = model.encode_text(None, mask, hidden=hidden, start_layer=3)
    torch.testing.assert_close(mask, full_mask)
    torch.testing.assert_close(cached["feat"], full["feat"], rtol=1e-5, atol=1e-5)
    too_many = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"optim.freeze_text_layers": 99}))
    with pytest.raises(RecipeError, match="freeze_text_layers"):
        loop.build_model(too_many)


def test_short_run_with_frozen_text_and_mean_pooling(tmp_path, tiny_corpus):
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "frozen", **{
        "optim.freeze_text_layers": 6, "model.text_pooling": "mean", "loss.mlm": 0, "optim.steps": 3}))
    before = loop.build_model(r).text.state_dict()
    model = load_model(loop.train(r))
    assert model.text_pooling == "mean"
    after = model.text.state_dict()
    assert torch.equal(before["encoder.layer.0.attention.self.query.weight"],
                       after["encoder.layer.0.attention.self.query.weight"])     # frozen: unchanged


def test_vtm_on_a_share_of_the_batch():
    from retrieval.models.retrieval_model import build_retrieval_model
    from retrieval.train.losses import vtm_loss

    torch.manual_seed(0)
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=16, num_fusion_layers=1).eval()
    with torch.no_grad():
        v = model.encode_video(torch.randn(4, 3, 4, 32, 32))
        t = model.encode_texts(["a red circle", "a blue square growing", "one star", "a green cross moving up"])
    idx = torch.arange(4)
    seen = []
    real = model.text.forward
    model.text.forward = lambda *a, **k: seen.append(k["hidden_states"].shape[0]) or real(*a, **k)

    def loss(pairs):
        return vtm_loss(model, v["tokens"], t["hidden"], t["mask"], t["feat"], v["feat"], idx, torch.tensor(0.07),
                        torch.Generator().manual_seed(1), pairs=pairs)

    torch.testing.assert_close(loss(0), loss(4))        # every pair either way
    assert torch.isfinite(loss(2))
    assert seen == [12, 12, 6]                          # 3 rows (positive + 2 negatives) per scored pair
    with pytest.raises(RecipeError, match="vtm_pairs"):
        load_recipe(None, ["data.train=x.json", "loss.vtm_pairs=-1"])


def test_time_reversed_samples_join_the_batch(tmp_path, tiny_corpus):
    from retrieval.data.corpora import load_corpus
    from retrieval.data.dataset import ClipTextDataset
    from retrieval.data.video import Preprocess

    corpus = load_corpus("generic", tiny_corpus / "train.json", tiny_corpus / "videos")
    pre = Preprocess.from_dict({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                "num_frames": 4})
    ds = ClipTextDataset(corpus, pre, seed=0, cache=True, progress=False)
    with_rev = [i for i in range(len(ds)) if ds.reversed_captions(i)]
    without = [i for i in range(len(ds)) if not ds.reversed_captions(i)]
    assert with_rev
    i = with_rev[0]
    video, caption, index = ds.reversed_sample(i)
    torch.testing.assert_close(video, ds[i][0].flip(1))          # the same frames, backwards
    assert caption in ds.reversed_captions(i) and index == i
    if without:
        assert ds.reversed_sample(without[0]) is None
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"data.reversed_share": 0.5}))
    ids = torch.tensor(with_rev[:2] + without[:2] if without else with_rev[:4])
    extra = loop._reversed_samples(ds, ids, [ds[int(i)] for i in ids], r, world=1)
    assert len(extra) == 2 and all(idx >= len(ds) for _, _, idx in extra)
    with pytest.raises(RecipeError, match="reversed_share"):
        load_recipe(None, ["data.train=x.json", "data.reversed_share=2"])


_SAMPLE_CHOICES = """
import json, sys
from retrieval.data.corpora import load_corpus
from retrieval.data.dataset import ClipTextDataset
from retrieval.data.video import Preprocess
root = sys.argv[1]
corpus = load_corpus("generic", root + "/train.json", root + "/videos")
pre = Preprocess.from_dict({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                            "num_frames": 4})
ds = ClipTextDataset(corpus, pre, seed=3, cache=False, progress=False)
choices = []
for epoch in (0, 1):
    ds.set_epoch(epoch)
    for i in range(len(ds)):
        video, caption, _ = ds[i]
        rev = ds.reversed_sample(i, (video, caption, i))
        choices.append([caption, float(video.sum()), rev[1] if rev else None])
print(json.dumps(choices))
"""


def test_sample_choices_do_not_depend_on_the_process(tiny_corpus):
    """Two processes with different string-hash seeds draw the same frames and captions (plain and
    time-reversed), so a training run is repeated exactly by another process with the same seed."""
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run([sys.executable, "-c", _SAMPLE_CHOICES, str(tiny_corpus)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout))
    assert runs[0] == runs[1]
    assert any(rev is not None for _, _, rev in runs[0])


def test_clip_cache_decodes_in_parallel_in_order_and_skips_broken_clips(tmp_path, tiny_corpus, caplog):
    import shutil

    from retrieval.data.corpora import load_corpus
    from retrieval.data.dataset import ClipTextDataset
    from retrieval.data.video import Preprocess

    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    corpus = load_corpus("generic", root / "train.json", root / "videos")
    broken = 2
    (root / "videos" / corpus.items[broken].video).write_bytes(b"not a video at all")
    pre = Preprocess.from_dict({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                "num_frames": 4})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ClipTextDataset(corpus, pre, seed=0, cache=True, progress=False)
        torch.set_num_threads(3)
        caplog.clear()
        with caplog.at_level("WARNING"):
            parallel = ClipTextDataset(corpus, pre, seed=0, cache=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(parallel._cache) == len(serial._cache) == len(corpus.items)
    for i, (a, b) in enumerate(zip(serial._cache, parallel._cache)):
        if i == broken:
            assert a is None and b is None
        else:
            assert torch.equal(a, b)                     # the same frames, in corpus order
    assert caplog.text.count("skipping unreadable training clip") == 1
    video, caption, index = parallel[broken]              # a readable neighbour stands in
    assert index == broken + 1 and video.shape[1] == 4


def test_action_targets_follow_the_label_and_reverse_with_the_clip(tiny_corpus):
    from dataclasses import replace

    from retrieval.data.corpora import load_corpus
    from retrieval.data.synthetic import ACTIONS, REVERSE_ACTION
    from retrieval.labels import item_actions
    from retrieval.train.actions import ActionTargets

    items = load_corpus("generic", tiny_corpus / "train.json", tiny_corpus / "videos").items
    # a two-object clip whose objects do different actions is trained on its label (the primary's)
    assert any(len(item_actions(item)) == 2 for item in items)
    # an annotation without a label but with its objects' actions: an equal share on each
    unlabelled = [replace(item, label=None) for item in items if len(item_actions(item)) == 2]
    everything = [*items, *unlabelled]
    targets = ActionTargets(everything, list(ACTIONS))
    n = len(everything)
    rows = targets(torch.arange(2 * n))
    torch.testing.assert_close(rows.sum(1), torch.ones(2 * n))
    for i, item in enumerate(everything):
        actions = [item.label] if item.label is not None else item_actions(item)
        want = {ACTIONS.index(a): 1 / len(actions) for a in actions}
        assert {j: round(float(p), 6) for j, p in enumerate(rows[i]) if p} == pytest.approx(want)
        back = {ACTIONS.index(REVERSE_ACTION.get(a, a)) for a in actions}
        assert {j for j, p in enumerate(rows[n + i]) if p} == back   # the reversed copy's actions
    assert len(unlabelled) and all(len([p for p in rows[len(items) + k] if p]) == 2
                                   for k in range(len(unlabelled)))


def test_action_loss_leaves_out_unlabelled_rows():
    from retrieval.train.losses import action_loss

    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [9.0, -9.0]])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    expected = -(torch.log_softmax(logits[:2], -1) * targets[:2]).sum(1).mean()
    torch.testing.assert_close(action_loss(logits, targets), expected)
    assert action_loss(logits, torch.zeros(3, 2)) == 0


def test_short_run_with_an_action_head(tmp_path, tiny_corpus):
    from retrieval.data.synthetic import ACTIONS

    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "act", **{
        "loss.action": 1.0, "loss.action_labels": "synthetic", "data.reversed_share": 0.5}))
    model = load_model(loop.train(r))
    assert model.action_labels == list(ACTIONS) and model.action_head is not None
    rows = [json.loads(x) for x in (tmp_path / "act" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["action"] > 0 for row in rows)
    # the head learns with the rest: its loss falls over a few steps at a high rate
    fit = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "fit", **{
        "loss.action": 1.0, "loss.vtc": 0.0, "loss.vtm": 0.0, "loss.mlm": 0.0, "optim.steps": 12,
        "optim.lr": 0.01, "optim.batch_size": 8}))
    loop.train(fit)
    losses = [json.loads(x)["action"] for x in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    from retrieval.data.corpora import load_corpus
    from retrieval.labels import item_actions

    items = load_corpus("generic", tiny_corpus / "train.json", tiny_corpus / "videos").items
    seen = sorted({action for item in items for action in item_actions(item)})
    assert load_model(tmp_path / "fit" / "model").action_labels == seen  # without a set: the corpus's


def test_action_recipe_errors(tmp_path, tiny_corpus):
    with pytest.raises(RecipeError, match="loss.action must be >= 0"):
        load_recipe(None, ["data.train=x.json", "loss.action=-1"])
    with pytest.raises(RecipeError, match="action_labels is set but loss.action"):
        load_recipe(None, ["data.train=x.json", "loss.action_labels=synthetic"])
    labels = tmp_path / "two.txt"
    labels.write_text("growing\nshrinking\n")
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "run", **{
        "loss.action": 1.0, "loss.action_labels": str(labels)}))
    with pytest.raises(RecipeError, match="lacks actions of the corpus"):
        loop.train(r)
    # where a run writes and how many loader workers it uses do not change the fingerprint; a part turned
    # on (the action head) or the precision does
    plain = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "run"))
    elsewhere = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "elsewhere", **{
        "data.workers": 3, "run.progress": False}))
    assert plain.fingerprint() == elsewhere.fingerprint()
    assert r.fingerprint() != plain.fingerprint()
    bf16 = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "run", **{"run.precision": "bf16"}))
    assert bf16.fingerprint() != plain.fingerprint()
