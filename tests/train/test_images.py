"""Images as 1-frame videos: annotation loading, the dataset, the interleaving schedule, and
short training runs that mix image and video steps (finite losses, exact resume)."""
import json
import logging
import math

import pytest
import torch
from PIL import Image

from retrieval import load_model
from retrieval.data.corpora import load_image_captions
from retrieval.data.dataset import ImageTextDataset
from retrieval.data.video import ImageReadError, Preprocess, read_image
from retrieval.train import loop
from retrieval.train.batch_plan import IMAGE, VIDEO, epoch_plan, step_source
from retrieval.train.recipe import RecipeError, load_recipe

from .conftest import assert_same_parameters, kill_and_resume, tiny_overrides, uta_overrides

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
PRE = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", num_frames=4)


def write_images(root, n=8, extra=()):
    """``n`` small PNG/JPEG images of coloured squares (odd sizes: they must be resized) and
    their VindLU image annotation ``images.json``; ``extra`` entries are appended as given."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    entries = []
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % len(COLOURS)]
        im = Image.new("RGB", (40 + i, 24 + 2 * i), (255, 255, 255))
        im.paste(rgb, (4, 4, 20 + i, 18))
        path = f"img/{i:02d}.{'png' if i % 2 else 'jpg'}"
        im.save(root / path)
        entries.append({"image": path, "caption": [f"a {name} square", f"one {name} box on white"]
                        if i % 2 else f"a {name} square"})
    entries += list(extra)
    (root / "images.json").write_text(json.dumps(entries))
    return root / "images.json"


# -- schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_video", "n_image"), [(4, 2), (7, 3), (1, 5), (10, 0), (0, 3)])
def test_schedule_interleaves_every_batch_once_per_epoch(n_video, n_image):
    for epoch in range(3):
        plan = epoch_plan(n_video, n_image, 5, epoch)
        assert len(plan) == n_video + n_image
        assert [j for s, j in plan if s == VIDEO] == list(range(n_video))   # every batch once, in order
        assert [j for s, j in plan if s == IMAGE] == list(range(n_image))
        epoch_plan.cache_clear()
        assert epoch_plan(n_video, n_image, 5, epoch) == plan    # pure in (seed, epoch)
    per_epoch = n_video + n_image
    for step in range(3 * per_epoch):
        epoch, source, j = step_source(step, n_video, n_image, 5)
        assert epoch == step // per_epoch
        assert (source, j) == epoch_plan(n_video, n_image, 5, epoch)[step % per_epoch]
    if n_image == 0:                                                          # no images: the old plain order
        assert [step_source(s, n_video, 0, 5)[2] for s in range(n_video)] == list(range(n_video))


def test_schedule_order_varies_with_epoch_and_seed():
    orders = {tuple(s for s, _ in epoch_plan(20, 10, seed, epoch)) for seed in (0, 1) for epoch in range(3)}
    assert len(orders) == 6
    with pytest.raises(ValueError, match="needs batches"):
        epoch_plan(0, 0, 0, 0)


# -- data ---------------------------------------------------------------------------------------
def test_image_dataset_shapes_and_determinism(tmp_path):
    ann = write_images(tmp_path)
    pairs = load_image_captions(ann)                                         # root: the annotation's folder
    assert pairs.root == tmp_path and len(pairs.items) == 8
    frames = read_image(tmp_path / pairs.items[3].video)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 24 + 6, 40 + 3, 3)
    ds = ImageTextDataset(pairs, PRE, seed=3, progress=False)
    cached = ImageTextDataset(pairs, PRE, seed=3, cache=True, progress=False)
    video, caption, index = ds[3]
    assert video.shape == (3, 1, 32, 32) and video.dtype == torch.float32 and index == 3
    torch.testing.assert_close(video, PRE(frames))                           # resized like frames
    assert caption in pairs.items[3].captions
    for i in range(len(ds)):
        a, b = ds[i], cached[i]
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert a[1:] == b[1:] == ds[i][1:]                                   # same epoch: same caption
    picks = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        picks.add(ds[1][1])
    assert picks == set(pairs.items[1].captions)                             # drawn per (seed, epoch, index)


def test_image_annotation_errors_and_unreadable_images(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_image_captions(tmp_path / "nope.json")
    ann = write_images(tmp_path / "a", n=4, extra=[{"image": "img/gone.png", "caption": "lost"},
                                                   {"image": "img/bad.png", "caption": "broken"}])
    (tmp_path / "a" / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with caplog.at_level(logging.WARNING):
        pairs = load_image_captions(ann)
        assert "1 of 6 images" in caplog.text and "gone.png" in caplog.text  # missing: skipped
        assert [it.video for it in pairs.items][-1] == "img/bad.png"
        with pytest.raises(ImageReadError, match="bad.png"):
            read_image(tmp_path / "a" / "img" / "bad.png")
        for cache in (False, True):
            caplog.clear()
            ds = ImageTextDataset(pairs, PRE, cache=cache, progress=False)
            video, caption, index = ds[4]                                     # corrupt: the next readable one
            assert index == 0 and caption == "a red square" and video.shape == (3, 1, 32, 32)
            ds[4]
            assert caplog.text.count("skipping unreadable training image") == 1   # warned once
    with pytest.raises(ValueError, match="entry 0 has no 'image'"):
        (tmp_path / "b.json").write_text(json.dumps([{"video": "x.mp4", "caption": "c"}]))
        load_image_captions(tmp_path / "b.json")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"")
    (tmp_path / "c" / "y.jpg").write_text("text, not an image")
    (tmp_path / "c" / "ann.jsonl").write_text('{"image": "x.jpg", "caption": "a"}\n'
                                              '{"image": "y.jpg", "caption": "b"}\n')
    all_bad = load_image_captions(tmp_path / "c" / "ann.jsonl")
    for cache in (False, True):
        with pytest.raises(ValueError, match="none of the 2 training images"):
            ImageTextDataset(all_bad, PRE, cache=cache, progress=False)
    with pytest.raises(FileNotFoundError, match="none of the 1 images"):
        (tmp_path / "d.csv").write_text("image,caption\nmissing.png,a cat\n")
        load_image_captions(tmp_path / "d.csv", image_root=tmp_path / "a")


def test_recipe_image_keys(tmp_path, tiny_corpus):
    with pytest.raises(RecipeError, match="data.images"):
        load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"data.image_batch_size": 4}))
    with pytest.raises(RecipeError, match="image_batch_size must be >= 2"):
        load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"data.images": "x.json",
                                                                    "data.image_batch_size": 1}))
    plain = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path))
    with_images = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"data.images": "x.json"}))
    assert plain.fingerprint() != with_images.fingerprint()
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path, **{"data.images": str(tmp_path / "no.json")}))
    with pytest.raises(FileNotFoundError, match="no.json"):
        loop.train(r)


def test_encoders_built_for_a_fixed_frame_count_are_refused(tmp_path, tiny_corpus):
    ann = write_images(tmp_path / "imgs", n=4)
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "run", **{
        "data.images": str(ann), "model.video": "joint_vit_tiny_test", "loss.mlm": 0}))
    with pytest.raises(RecipeError, match="1-frame input.*4 frames"):
        loop.train(r)


# -- training -----------------------------------------------------------------------------------
def image_run(corpus, images, out, **extra):
    # 16 clips / 4 = 4 video batches and 8 images / 4 = 2 image batches: 6 steps per epoch; the text
    # tower's own layers frozen (what is tested here is the data side; it halves a step)
    return load_recipe(None, tiny_overrides(corpus, out, **{"data.images": str(images),
                                                            "optim.freeze_text_layers": 6, **extra}))


def test_training_mixes_image_and_video_steps(tmp_path, tiny_corpus, clip_teacher_file):
    ann = write_images(tmp_path / "imgs")
    r = image_run(tiny_corpus, ann, tmp_path / "run", **{
        "optim.steps": 6, **uta_overrides(clip_teacher_file), "run.save_every": 100})
    load_model(loop.train(r))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == [step_source(s, 4, 2, 0)[1] for s in range(6)]
    assert sum(row["source"] == "image" for row in rows) == 2                # 2 image batches per epoch
    for row in rows:
        assert {"vtc", "vtm", "mlm", "uta", "loss"} <= set(row)
        assert all(math.isfinite(row[k]) for k in ("vtc", "vtm", "mlm", "uta", "loss")), row
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0          # one curve per source


def test_resume_with_images_reaches_the_same_parameters(tmp_path, tiny_corpus, monkeypatch):
    ann = write_images(tmp_path / "imgs", n=6)
    # 4 video + 3 image batches per epoch (seed 0: v v i i i v v): image steps on both sides of the step-3
    # checkpoint; VTC only, what is tested is the data order
    extra = {"data.image_batch_size": 2, "optim.steps": 5, "loss.mlm": 0, "loss.vtm": 0}
    monkeypatch.setattr(loop, "plot_losses", lambda *a: None)                # 1.5 s a run, tested above
    straight = load_model(loop.train(image_run(tiny_corpus, ann, tmp_path / "a", **extra)))
    assert {json.loads(x)["source"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()} == {
        "video", "image"}
    r = image_run(tiny_corpus, ann, tmp_path / "b", **extra)
    # killed in step 5, after the step-3 checkpoint
    assert_same_parameters(straight, kill_and_resume(r, monkeypatch))
