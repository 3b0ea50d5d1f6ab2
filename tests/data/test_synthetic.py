"""The synthetic corpus: real decodable mp4s, VindLU annotations, a held-out test split with
unambiguous captions and exact direction pairs, determinism and idempotent re-runs."""

from __future__ import annotations

import json
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from retrieval.data.synthetic import (
    ACTIONS,
    COLOURS,
    REVERSE_ACTION,
    SHAPES,
    Scene,
    generate_corpus,
    plan_corpus,
    render_job,
    render_scene,
)

REPO = Path(__file__).resolve().parents[2]
# small enough to generate in about a second, large enough to use the worker pool
PARAMS: dict[str, Any] = {
    "n_train": 40,
    "n_test": 20,
    "seed": 3,
    "size": 64,
    "num_frames": 12,
    "fps": 8,
    "long_videos": 2,
}
PLAN_ARGS = {key: value for key, value in PARAMS.items() if key != "size"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate_corpus(out, progress=False, **PARAMS)


def _load(out: Path, name: str) -> Any:
    return json.loads((out / name).read_text(encoding="utf-8"))


def _decode(path: Path) -> tuple[np.ndarray, str, str]:
    """Frames [T, H, W, 3], codec name and pixel format of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, stream.codec_context.name, stream.codec_context.format.name


def _object_sets(entries: list[dict[str, Any]]) -> list[frozenset[tuple[str, ...]]]:
    return [
        frozenset((o["colour"], o["shape"], o["size"], o["action"]) for o in e["attributes"]["objects"])
        for e in entries
    ]


def test_summary_layout_and_label_files(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, summary = corpus
    assert summary["out"] == str(out)
    assert (summary["n_train"], summary["n_test"], summary["n_long"]) == (40, 20, 2)
    assert summary["labels"] == list(ACTIONS)
    assert len(ACTIONS) >= 10 and len(COLOURS) >= 5 and len(SHAPES) >= 4
    assert (out / "labels.txt").read_text().splitlines() == list(ACTIONS)
    assert (REPO / "configs/labels/synthetic.txt").read_text().splitlines() == list(ACTIONS)
    manifest = _load(out, "corpus.json")
    assert manifest["params"] == PARAMS
    assert manifest["counts"] == {"train": 40, "test": 20, "long": 2}
    assert sorted(p.name for p in (out / "videos/train").iterdir()) == [f"{i:04d}.mp4" for i in range(40)]
    assert not list(out.rglob("*.tmp"))


def test_videos_are_h264_and_show_the_planned_scene(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    plan = plan_corpus(**PLAN_ARGS)
    for entry in _load(out, "train.json")[:10] + _load(out, "test.json")[:10]:
        frames, codec, pix_fmt = _decode(out / "videos" / entry["video"])
        assert (codec, pix_fmt) == ("h264", "yuv420p")
        assert frames.shape == (12, 64, 64, 3)
        rendered = render_job(plan.job(entry["video"]), 64).astype(np.float32)
        # lossy (yuv420p chroma, crf 18) but clearly the same pictures
        assert np.abs(frames.astype(np.float32) - rendered).mean() < 6.0
    for entry in _load(out, "long.json"):
        frames, _, _ = _decode(out / "videos" / entry["video"])
        assert frames.shape == (round(entry["duration"] * 8), 64, 64, 3)


def test_annotation_schema(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    train, test = _load(out, "train.json"), _load(out, "test.json")
    assert len(train) == 40 and len(test) == 20
    for entry in train:
        assert entry["video"].startswith("train/") and (out / "videos" / entry["video"]).is_file()
        assert isinstance(entry["caption"], list) and 2 <= len(entry["caption"]) <= 3
        assert len(set(entry["caption"])) == len(entry["caption"])
    for entry in test:
        assert entry["video"].startswith("test/") and (out / "videos" / entry["video"]).is_file()
        assert isinstance(entry["caption"], str)
    for entry in train + test:
        objects = entry["attributes"]["objects"]
        assert entry["label"] == objects[0]["action"] and entry["label"] in ACTIONS
        assert 1 <= len(objects) <= 2
        if len(objects) == 2:  # the labelled primary is the large shape, the other small and different
            assert [o["size"] for o in objects] == ["large", "small"]
            assert (objects[0]["colour"], objects[0]["shape"]) != (objects[1]["colour"], objects[1]["shape"])
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        for caption in captions:
            assert caption == caption.lower()
            for obj in objects:  # every caption names every object's colour
                assert obj["colour"] in caption
    assert any(len(e["attributes"]["objects"]) == 2 for e in train)
    assert any(len(e["attributes"]["objects"]) == 2 for e in test)


def test_reversed_captions_describe_the_clip_played_backwards(corpus: tuple[Path, dict[str, Any]]) -> None:
    from retrieval.data.synthetic import _ACTION_PHRASES

    out, _ = corpus
    train = _load(out, "train.json")
    checked = 0
    for entry in train:
        actions = [o["action"] for o in entry["attributes"]["objects"]]
        if not any(a in REVERSE_ACTION for a in actions):
            assert "caption_reversed" not in entry       # blinking / bouncing look the same backwards
            continue
        backwards = entry["caption_reversed"]
        assert len(backwards) == len(entry["caption"]) and not set(backwards) & set(entry["caption"])
        if len(actions) == 1:                            # one object: its action phrase is the reversed one
            checked += 1
            for caption in backwards:
                assert any(p in caption for p in _ACTION_PHRASES[REVERSE_ACTION[actions[0]]])
                assert not any(p in caption for p in _ACTION_PHRASES[actions[0]])
    assert checked


def test_held_out_combinations_never_appear_in_training(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    held_out = {tuple(triple) for triple in _load(out, "corpus.json")["held_out"]}
    assert held_out
    for entry in _load(out, "train.json"):
        for obj in entry["attributes"]["objects"]:
            assert (obj["colour"], obj["shape"], obj["action"]) not in held_out
    for entry in _load(out, "test.json"):
        assert any((o["colour"], o["shape"], o["action"]) in held_out for o in entry["attributes"]["objects"])


def test_test_captions_are_unambiguous(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    test = _load(out, "test.json")
    assert len({e["caption"] for e in test}) == len(test)
    # no clip's objects are a subset of another's: a caption then describes only its own clip
    for first, second in combinations(_object_sets(test), 2):
        assert not first <= second and not second <= first


def test_direction_pairs_are_exact_time_reversals(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    test = {e["video"]: e for e in _load(out, "test.json")}
    twins = {
        video: e["attributes"]["direction_twin"]
        for video, e in test.items()
        if e["attributes"]["direction_twin"]
    }
    assert len(twins) >= 0.3 * len(test)
    plan = plan_corpus(**PLAN_ARGS)
    for video, twin in twins.items():
        assert twins[twin] == video
        (obj,), (twin_obj,) = test[video]["attributes"]["objects"], test[twin]["attributes"]["objects"]
        assert REVERSE_ACTION[obj["action"]] == twin_obj["action"]
        assert {k: obj[k] for k in ("colour", "shape", "size")} == {
            k: twin_obj[k] for k in ("colour", "shape", "size")
        }
        assert test[video]["attributes"]["background"] == test[twin]["attributes"]["background"]
        frames, twin_frames = render_job(plan.job(video), 64), render_job(plan.job(twin), 64)
        assert np.array_equal(frames, twin_frames[::-1])
        assert not np.array_equal(frames, frames[::-1])  # the order really matters


def _object_tracks(scene: Scene, size: int, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame object weight [T, H, W] in 0..1, plus centroid x and y, against the bare background."""
    frames = render_scene(scene, size, num_frames).astype(np.float32)
    background = render_scene(Scene(scene.background, ()), size, 2)[0].astype(np.float32)
    weight = np.clip(np.abs(frames - background).max(axis=-1) / 60.0, 0.0, 1.0)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    mass = weight.sum(axis=(1, 2))
    safe = np.maximum(mass, 1e-6)
    return weight, (weight * xs).sum(axis=(1, 2)) / safe, (weight * ys).sum(axis=(1, 2)) / safe


_SYMMETRY_ORDER = {"triangle": 3, "square": 4, "star": 5, "cross": 4}


@pytest.mark.parametrize("action", ACTIONS)
def test_rendered_motion_matches_the_action(action: str) -> None:
    size, num_frames = 96, 12
    plan = plan_corpus(n_train=150, n_test=2, seed=5, num_frames=num_frames, long_videos=0)
    scenes = [
        job.scenes[0]
        for job in plan.jobs
        if len(job.scenes[0].objects) == 1
        and job.scenes[0].label == action
        and job.video.startswith("train/")
    ][:3]
    assert scenes, f"no single-object clip of {action!r} in the plan"
    for scene in scenes:
        weight, cx, cy = _object_tracks(scene, size, num_frames)
        area = weight.sum(axis=(1, 2))
        if action in ("moving right", "moving left"):
            step = np.diff(cx) * (1 if action == "moving right" else -1)
            assert np.all(step > 0) and step.sum() > 0.2 * size
            assert np.ptp(cy) < 1.0
        elif action in ("moving down", "moving up"):
            step = np.diff(cy) * (1 if action == "moving down" else -1)
            assert np.all(step > 0) and step.sum() > 0.2 * size
            assert np.ptp(cx) < 1.0
        elif action in ("growing", "shrinking"):
            step = np.diff(area) * (1 if action == "growing" else -1)
            assert np.all(step > 0) and max(area) > 3 * min(area)
        elif action == "blinking":
            assert min(area) == 0 and max(area) > 20
        elif action == "bouncing":
            assert cy.min() < cy[0] - 0.1 * size and abs(cy[-1] - cy[0]) < 1.0
        else:  # rotation: the n-fold complex moment turns by n times the shape's angle
            shape = scene.objects[0].shape
            ys, xs = np.mgrid[0:size, 0:size] + 0.5
            offsets = (xs[None] - cx[:, None, None]) + 1j * (ys[None] - cy[:, None, None])
            moment = (weight * offsets ** _SYMMETRY_ORDER[shape]).sum(axis=(1, 2))
            # with y pointing down, a growing argument is a clockwise turn on screen
            turn = np.angle(moment[1:] * np.conj(moment[:-1]))
            assert np.all(turn > 0) if action == "rotating clockwise" else np.all(turn < 0)
            assert np.ptp(area) < 0.15 * area.mean()


def test_same_seed_gives_same_corpus(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    plan = plan_corpus(**PLAN_ARGS)
    assert _load(out, "train.json") == plan.train
    assert _load(out, "test.json") == plan.test
    assert _load(out, "long.json") == plan.long
    again = plan_corpus(**PLAN_ARGS)
    assert again.jobs == plan.jobs
    assert np.array_equal(render_job(again.jobs[0], 64), render_job(plan.jobs[0], 64))
    other = plan_corpus(**{**PLAN_ARGS, "seed": 4})
    assert other.test != plan.test and other.held_out != plan.held_out
    # the test split depends on the seed only, not on the size of the train split
    assert plan_corpus(**{**PLAN_ARGS, "n_train": 7}).test == plan.test


def test_rerun_with_same_parameters_rewrites_nothing(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    summary = generate_corpus(out, progress=False, **PARAMS)
    assert summary["seconds"] < 1.0
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()} == before


def test_long_video_segments_tile_the_duration(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    long = _load(out, "long.json")
    assert len(long) == 2
    for entry in long:
        segments = entry["segments"]
        assert 3 <= len(segments) <= 4
        assert 12.0 <= entry["duration"] <= 16.0
        assert segments[0]["start"] == 0.0 and segments[-1]["end"] == entry["duration"]
        for previous, following in pairwise(segments):
            assert previous["end"] == following["start"]
        assert len({s["label"] for s in segments}) == len(segments)
        assert all(isinstance(s["caption"], str) and s["label"] in ACTIONS for s in segments)


def test_changed_parameters_regenerate_and_drop_stale_videos(tmp_path: Path) -> None:
    tiny = {"seed": 1, "size": 32, "num_frames": 4, "long_videos": 0, "progress": False}
    generate_corpus(tmp_path, n_train=3, n_test=2, **tiny)
    work = tmp_path / ".vtr-synthetic.work"
    work.mkdir()
    (work / "videos__train__0000.mp4.tmp-1").write_bytes(b"half a video")  # an interrupted write
    generate_corpus(tmp_path, n_train=2, n_test=2, **tiny)
    assert sorted(p.name for p in (tmp_path / "videos/train").iterdir()) == ["0000.mp4", "0001.mp4"]
    assert not work.exists()
    assert len(_load(tmp_path, "train.json")) == 2
    assert _load(tmp_path, "corpus.json")["params"]["n_train"] == 2
    # without the manifest (written last) the corpus counts as incomplete and is rebuilt
    (tmp_path / "corpus.json").unlink()
    video = tmp_path / "videos/test/0000.mp4"
    stamp = video.stat().st_mtime_ns
    generate_corpus(tmp_path, n_train=2, n_test=2, **tiny)
    assert video.stat().st_mtime_ns != stamp and (tmp_path / "corpus.json").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": 0}, "n_test"),
        ({"n_test": 100_000}, "unambiguous"),
        ({"size": 33}, "even"),
    ],
)
def test_bad_counts_are_rejected(tmp_path: Path, overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_corpus(tmp_path / "out", **{"n_train": 2, "n_test": 2, "progress": False, **overrides})
    assert not (tmp_path / "out" / "corpus.json").exists()


def test_out_dir_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "corpus"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        generate_corpus(target, n_train=2, n_test=2, progress=False)
