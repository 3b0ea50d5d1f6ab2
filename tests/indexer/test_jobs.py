"""Indexing jobs end to end on a tiny real corpus (h264 mp4s) with a tiny random model.

One uninterrupted single-worker run is the reference; every other way of building the same
index (crash + resume, ``kill -9`` + resume, two shards + merge) must give the very same items
in the same order with the same vectors, and no item twice.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from indexer.jobs import (
    JobError,
    JobSpec,
    Shard,
    WorkDir,
    item_key,
    plan_sources,
    publish_job,
    resolve_shard,
    run_index_job,
    window_spans,
    work_dir_for,
)
from indexer.store import open_index
from retrieval.data.corpora import Corpus, CorpusItem
from retrieval.data.video import Preprocess, load_clip
from retrieval.labels import load_labels
from retrieval.models.model_dir import load_model

REPO = Path(__file__).resolve().parents[2]
PART_SIZE = 3


@pytest.fixture(scope="module")
def videos(synthetic_corpus: Path) -> Path:
    """14 clips: 4 train + 8 test (3 s each) and 2 long multi-scene videos (12-16 s)."""
    return synthetic_corpus / "videos"


def _spec(model_dir: Path, videos: Path, out: Path, **changes) -> JobSpec:
    return replace(JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=PART_SIZE), **changes)


def _keys(index: Path) -> list[str]:
    return [item["extra"]["key"] for item in open_index(index).items]


@pytest.fixture(scope="module")
def reference(model_dir: Path, videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "index"
    summary = run_index_job(_spec(model_dir, videos, out), workers=0, batch_size=4, progress=False)
    assert (summary.indexed, summary.failed, summary.skipped) == (14, 0, 0)
    assert summary.published == out
    return out


def _assert_same_index(index: Path, reference: Path) -> None:
    keys = _keys(index)
    assert len(keys) == len(set(keys)), "an item was indexed twice"
    assert keys == _keys(reference)
    np.testing.assert_allclose(
        np.asarray(open_index(index).vectors, np.float32),
        np.asarray(open_index(reference).vectors, np.float32),
        atol=2e-3,
    )


# ---------------------------------------------------------------------------------- planning


def test_plan_sources_merges_duplicates_sorts_and_keeps_missing_files(tmp_path: Path) -> None:
    corpus = Corpus(
        "msrvtt",
        tmp_path,
        items=[
            CorpusItem("b.mp4", ["a dog runs"]),
            CorpusItem("a.mp4", ["a cat sits"]),
            CorpusItem("b.mp4", ["a dog is running", "a dog runs"]),
            CorpusItem("a.mp4", ["the cat jumps"], start=2.0, end=4.0),
        ],
        missing=["0_gone.mp4"],
        max_text_len=32,
        sample="middle",
        max_seconds=None,
    )

    sources = plan_sources(corpus)

    assert [(s.video, s.start, s.end) for s in sources] == [
        ("0_gone.mp4", None, None),
        ("a.mp4", None, None),
        ("a.mp4", 2.0, 4.0),
        ("b.mp4", None, None),
    ]
    assert sources[3].captions == ["a dog runs", "a dog is running"]
    assert [item_key(s.video, s.start, s.end) for s in sources][2] == "a.mp4#t=2.000,4.000"


@pytest.mark.parametrize(
    ("duration", "window", "stride", "expected"),
    [
        (16.0, 4.0, 4.0, [(0, 4), (4, 8), (8, 12), (12, 16)]),
        (14.0, 4.0, 4.0, [(0, 4), (4, 8), (8, 12), (10, 14)]),  # last window aligned to the end
        (9.0, 4.0, 2.0, [(0, 4), (2, 6), (4, 8), (5, 9)]),
        (3.0, 4.0, 4.0, [(0, 3)]),  # shorter than a window: one item
        (4.0, 4.0, 1.0, [(0, 4)]),
    ],
)
def test_window_spans(duration: float, window: float, stride: float, expected: list) -> None:
    assert window_spans(duration, window, stride) == [(float(a), float(b)) for a, b in expected]


def test_resolve_shard_from_flag_torchrun_and_slurm() -> None:
    assert resolve_shard("1/4", {}) == Shard(1, 4)
    assert resolve_shard(None, {"RANK": "2", "WORLD_SIZE": "3"}) == Shard(2, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert resolve_shard(None, slurm) == Shard(3, 4)
    assert resolve_shard(None, {}) == Shard(0, 1)
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(JobError):
            resolve_shard(bad, {})
    assert [part for part in range(7) if Shard(1, 3).owns(part)] == [1, 4]


# ---------------------------------------------------------------------------------- one worker


def test_single_worker_publishes_every_clip_with_labels(
    reference: Path, videos: Path, model_dir: Path
) -> None:
    reader = open_index(reference)
    synthetic = set(load_labels("synthetic"))

    assert sorted(
        Path(item["path"]).relative_to(videos.resolve()).as_posix() for item in reader.items
    ) == sorted(p.relative_to(videos).as_posix() for p in videos.rglob("*.mp4"))
    for item in reader.items:
        labels = item["labels"]
        assert len(labels) == 5 and {label for label, _ in labels} <= synthetic
        probs = [prob for _, prob in labels]
        assert probs == sorted(probs, reverse=True) and 0 < probs[-1] <= probs[0] <= 1
    assert reader.manifest["extra"]["model_dir"] == str(model_dir.resolve())
    assert reader.failures == []
    assert not work_dir_for(reference).exists(), "the work directory is removed once published"

    again = run_index_job(_spec(model_dir, videos, reference), resume=True, progress=False)
    assert (again.indexed, again.skipped) == (0, 14), "resuming a published job does nothing"


def _write_video(path: Path, codec: str, pix_fmt: str = "yuv420p", frames: int = 16) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, pix_fmt
        for i in range(frames):
            pixels = np.zeros((32, 32, 3), np.uint8)
            pixels[:, 2 * i : 2 * i + 6] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_bad_files_go_to_failures_and_good_ones_are_all_indexed(
    model_dir: Path, videos: Path, tmp_path: Path
) -> None:
    root = tmp_path / "mixed"
    for folder in ("good", "odd", "bad"):
        (root / folder).mkdir(parents=True)
    good = ["good/a.mp4", "good/b.mp4", "odd/vp9.webm", "odd/mpeg4.avi"]
    shutil.copy(videos / "test" / "0000.mp4", root / "good" / "a.mp4")
    shutil.copy(videos / "test" / "0001.mp4", root / "good" / "b.mp4")
    _write_video(root / "odd" / "vp9.webm", "libvpx-vp9")
    _write_video(root / "odd" / "mpeg4.avi", "mpeg4")
    (root / "bad" / "empty.mp4").write_bytes(b"")
    whole = (videos / "test" / "0002.mp4").read_bytes()
    (root / "bad" / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "bad" / "text.mp4").write_text("this is a shopping list, not a video\n" * 20)
    bad = {"bad/empty.mp4", "bad/truncated.mp4", "bad/text.mp4"}
    out = tmp_path / "index"

    summary = run_index_job(_spec(model_dir, root, out, part_size=2), workers=2, batch_size=2, progress=False)

    assert (summary.indexed, summary.failed) == (4, 3)
    reader = open_index(out)
    assert sorted(item["extra"]["key"] for item in reader.items) == sorted(good)
    failures = {Path(f["path"]).relative_to(root.resolve()).as_posix(): f["reason"] for f in reader.failures}
    assert set(failures) == bad
    assert "empty" in failures["bad/empty.mp4"]
    assert reader.manifest["counts"]["failed"] == 3


def test_windows_of_long_videos_carry_their_moment(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "windows"
    run_index_job(_spec(model_dir, videos, out, window=4.0), workers=0, batch_size=8, progress=False)
    reader = open_index(out)
    durations = {
        entry["video"]: entry["duration"] for entry in json.loads((videos.parent / "long.json").read_text())
    }

    by_video: dict[str, list[tuple[float, float]]] = {}
    for item in reader.items:
        video = Path(item["path"]).relative_to(videos.resolve()).as_posix()
        by_video.setdefault(video, []).append((item["start"], item["end"]))
    for video, duration in durations.items():
        spans = by_video[video]
        assert len(spans) == int(np.ceil(duration / 4.0))
        assert spans[0] == (0.0, 4.0) and spans[-1][1] == pytest.approx(duration, abs=0.2)
        assert all(end - start == pytest.approx(4.0) for start, end in spans)
    short = [spans for video, spans in by_video.items() if video not in durations]
    assert len(short) == 12 and all(len(spans) == 1 and spans[0][0] == 0.0 for spans in short)

    # the stored vector is the encoding of exactly that window's frames
    model = load_model(model_dir)
    row = next(
        i for i, item in enumerate(reader.items) if item["extra"]["key"] == "long/0000.mp4#t=8.000,12.000"
    )
    clip = load_clip(reader.items[row]["path"], Preprocess.from_dict(model.preprocess), window=(8.0, 12.0))
    with torch.inference_mode():
        expected = model.clip_vector(model.encode_video(clip[None])["feat"])[0].numpy()
    np.testing.assert_allclose(np.asarray(reader.vectors[row], np.float32), expected, atol=2e-3)
    same_video = [i for i, item in enumerate(reader.items) if item["path"] == reader.items[row]["path"]]
    distances = np.linalg.norm(np.asarray(reader.vectors[same_video], np.float32) - expected, axis=1)
    assert same_video[int(np.argmin(distances))] == row, "another window's vector matches better"


# ---------------------------------------------------------------------------------- interruptions


def test_crash_after_first_part_then_resume_gives_the_reference(
    model_dir: Path, videos: Path, tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "index"
    spec = _spec(model_dir, videos, out)
    commit = WorkDir.commit_part

    def crash_after_first(self: WorkDir, part: int, vectors: np.ndarray, manifest: dict) -> None:
        if any(self.parts_dir.glob("part-*.json")):
            raise RuntimeError("injected crash")
        commit(self, part, vectors, manifest)

    monkeypatch.setattr(WorkDir, "commit_part", crash_after_first)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_index_job(spec, workers=0, batch_size=2, progress=False)
    monkeypatch.undo()
    work = WorkDir(work_dir_for(out))
    assert [work.is_done(part) for part in range(5)] == [True, False, False, False, False]
    assert not out.exists()

    with pytest.raises(JobError, match="--resume"):
        run_index_job(spec, workers=0, progress=False)
    with pytest.raises(JobError, match="different job.*window"):
        run_index_job(replace(spec, window=5.0), resume=True, workers=0, progress=False)
    with pytest.raises(JobError, match="different job.*precision: job has \"fp32\", now \"bf16\""):
        run_index_job(spec, resume=True, workers=0, progress=False, precision="bf16")  # no fp32/bf16 mix
    summary = run_index_job(spec, resume=True, workers=0, batch_size=5, progress=False)

    assert (summary.skipped, summary.indexed, summary.parts_written) == (PART_SIZE, 14 - PART_SIZE, 4)
    _assert_same_index(out, reference)


def test_kill_9_mid_job_then_resume_gives_the_reference(
    model_dir: Path, videos: Path, tmp_path: Path, reference: Path
) -> None:
    out = tmp_path / "index"
    parts_dir = WorkDir(work_dir_for(out)).parts_dir
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "index",
        "--model",
        str(model_dir),
        "--videos",
        str(videos),
        "--out",
        str(out),
        "--part-size",
        "1",
        "--batch-size",
        "1",
        "--precision",  # the reference and the resume below run the library's default, fp32
        "fp32",
        "--channels",  # and its default channel set, the visual one
        "visual",
        "--workers",
        "0",
        "--no-progress",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(parts_dir.glob("part-*.json")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no part was committed within two minutes"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    committed = len(list(parts_dir.glob("part-*.json")))
    assert 0 < committed < 14, "the job must be killed mid-way"
    assert not out.exists()

    summary = run_index_job(
        _spec(model_dir, videos, out, part_size=1), resume=True, workers=0, progress=False
    )

    assert summary.skipped + summary.indexed == 14 and summary.skipped >= committed
    _assert_same_index(out, reference)


# ---------------------------------------------------------------------------------- shards


def test_two_shards_and_merge_equal_one_worker(
    model_dir: Path, videos: Path, tmp_path: Path, reference: Path
) -> None:
    out = tmp_path / "index"
    spec = _spec(model_dir, videos, out)
    first = run_index_job(spec, Shard(0, 2), workers=0, batch_size=4, progress=False)
    assert first.published is None and not out.exists()
    with pytest.raises(JobError, match="parts 1, 3"):
        publish_job(out)
    with pytest.raises(JobError, match="--resume"):
        run_index_job(spec, Shard(0, 2), workers=0, progress=False)

    second = run_index_job(spec, Shard(1, 2), workers=0, batch_size=4, progress=False)
    assert first.indexed + second.indexed == 14 and second.published is None
    merged = CliRunner().invoke(app, ["index", "merge", str(out)])
    assert merged.exit_code == 0 and f"published {out}" in merged.stdout

    _assert_same_index(out, reference)
    assert not work_dir_for(out).exists()


def test_cli_index_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    merge = runner.invoke(app, ["index", "merge", str(tmp_path / "nothing")])
    assert merge.exit_code == 2 and "no index job" in merge.stderr
    incomplete = runner.invoke(app, ["index", "--out", str(tmp_path / "index")])
    assert incomplete.exit_code == 2 and "needs --model, --videos" in incomplete.stderr
