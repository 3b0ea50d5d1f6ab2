"""The Ray engine builds the same index as the local engine, survives ``kill -9`` and resumes.

The Ray tests share one local 2-CPU cluster for the session (``ray_cluster`` in conftest.py);
the CLI error tests need no cluster.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app
from indexer.engines import make_engine
from indexer.jobs import JobSpec, run_index_job
from indexer.parts import WorkDir, work_dir_for
from indexer.store import open_index
from retrieval.data.synthetic import generate_corpus

REPO = Path(__file__).resolve().parents[2]
WINDOW = 4.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 short clips, one long video (several windows) and a file that is not a video."""
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, n_train=1, n_test=4, size=32, long_videos=1, progress=False)
    broken = root / "videos" / "broken"
    broken.mkdir()
    (broken / "notes.mp4").write_text("not a video\n" * 50)
    return root / "videos"


def _spec(model_dir: Path, videos: Path, out: Path, part_size: int = 3) -> JobSpec:
    return JobSpec(model_dir=model_dir, out=out, videos=videos, window=WINDOW, part_size=part_size)


@pytest.fixture(scope="module")
def local_index(model_dir: Path, videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "index"
    summary = run_index_job(_spec(model_dir, videos, out), workers=0, batch_size=2, progress=False)
    assert summary.failed == 1 and summary.indexed > 6, "the long video must give several windows"
    return out


def _contents(index: Path) -> dict:
    reader = open_index(index)
    return {
        "keys": [item["extra"]["key"] for item in reader.items],
        "moments": {item["extra"]["key"]: (item["start"], item["end"]) for item in reader.items},
        "labels": {item["extra"]["key"]: item["labels"] for item in reader.items},
        "vectors": reader.index.reconstruct_n(0, reader.index.ntotal),  # the float32 vectors (Flat)
        "failures": [(f["item"], f["reason"]) for f in reader.failures],
        "index_type": reader.manifest["index_type"],
        "counts": reader.manifest["counts"],
    }


def _assert_same(index: Path, reference: Path) -> None:
    got, want = _contents(index), _contents(reference)
    assert len(got["keys"]) == len(set(got["keys"])), "an item was indexed twice"
    assert got["keys"] == want["keys"]
    assert got["moments"] == want["moments"]
    assert got["failures"] == want["failures"] and len(want["failures"]) == 1
    assert (got["index_type"], got["counts"]) == (want["index_type"], want["counts"])
    for key in want["keys"]:
        assert [label for label, _ in got["labels"][key]] == [label for label, _ in want["labels"][key]]
        np.testing.assert_allclose([p for _, p in got["labels"][key]], [p for _, p in want["labels"][key]],
                                   atol=1e-6)
    np.testing.assert_allclose(got["vectors"], want["vectors"], atol=1e-6, rtol=0)


@pytest.mark.ray
def test_ray_engine_builds_the_same_index_as_the_local_engine(
    ray_cluster, model_dir: Path, videos: Path, local_index: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    with make_engine("ray") as engine:
        summary = run_index_job(_spec(model_dir, videos, out), batch_size=2, progress=False, engine=engine)

    assert ray_cluster.is_initialized(), "a runtime the caller started is left running"
    assert summary.published == out and summary.failed == 1
    _assert_same(out, local_index)
    assert open_index(out).failures[0]["item"] == "broken/notes.mp4"


@pytest.mark.ray
def test_ray_job_killed_mid_way_resumes_to_the_same_index(
    ray_cluster, model_dir: Path, videos: Path, local_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "index"
    parts_dir = WorkDir(work_dir_for(out)).parts_dir
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "app.cli", "index", "--engine", "ray", "--ray-address", address,
               "--model", str(model_dir), "--videos", str(videos), "--out", str(out), "--window", str(WINDOW),
               "--part-size", "1", "--batch-size", "1", "--no-progress", "--precision", "fp32",
               "--channels", "visual"]  # the library default the reference and the resume below use
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # part 0 is the broken file (committed at once, no clips); wait for one that held clips
    while len(list(parts_dir.glob("part-*.json"))) < 2:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no part was committed within five minutes"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # the driver, mid-job
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    committed = {int(path.stem.split("-")[1]) for path in parts_dir.glob("part-*.json")}
    num_parts = WorkDir(work_dir_for(out)).read_job()["num_parts"]
    assert 0 < len(committed) < num_parts, "the job must be killed mid-way"
    assert not out.exists()
    written: list[int] = []
    commit = WorkDir.commit_part

    def recording_commit(self: WorkDir, part: int, vectors: np.ndarray, manifest: dict) -> None:
        written.append(part)
        commit(self, part, vectors, manifest)

    monkeypatch.setattr(WorkDir, "commit_part", recording_commit)
    with make_engine("ray") as engine:
        summary = run_index_job(_spec(model_dir, videos, out, part_size=1), resume=True, batch_size=1,
                                progress=False, engine=engine)

    assert summary.skipped > 0 and summary.parts_written == num_parts - len(committed)
    assert sorted(written) == sorted(set(range(num_parts)) - committed), "a part was written twice or skipped"
    _assert_same(out, local_index)


@pytest.mark.ray
def test_ray_engine_reads_on_screen_text_into_the_parts(ray_cluster, model_dir: Path, videos: Path,
                                                        tmp_path: Path) -> None:
    pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra (make install installs it)")
    out = tmp_path / "index"
    spec = JobSpec(model_dir=model_dir, out=out, videos=videos, window=WINDOW, part_size=3,
                   channels=("visual", "text"))
    with make_engine("ray") as engine:
        summary = run_index_job(spec, batch_size=2, progress=False, engine=engine)
    reader = open_index(out)
    assert summary.failed == 1 and set(reader.manifest["extra"]["channels"]) == {"visual", "text"}
    for item in reader.items:
        text = item["extra"]["text"]
        assert text["frames"] >= 1 and isinstance(text["lines"], list), item["extra"]["key"]


def test_engine_errors_are_one_line_and_exit_2(
    model_dir: Path, videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    base = ["index", "--model", str(model_dir), "--videos", str(videos), "--out", str(tmp_path / "index")]

    unreachable = runner.invoke(app, [*base, "--engine", "ray", "--ray-address", "127.0.0.1:9"])
    assert unreachable.exit_code == 2
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert not work_dir_for(tmp_path / "index").exists(), "nothing may start before the cluster is reached"

    unknown = runner.invoke(app, [*base, "--engine", "spark"])
    assert unknown.exit_code == 2 and "unknown --engine 'spark'" in unknown.stderr
    local_with_ray_option = runner.invoke(app, [*base, "--ray-actors", "2"])
    assert local_with_ray_option.exit_code == 2 and "only apply to --engine ray" in local_with_ray_option.stderr

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    missing = runner.invoke(app, [*base, "--engine", "ray"])
    assert missing.exit_code == 2
    assert "pip install 'vtr[ray]'" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert not work_dir_for(tmp_path / "index").exists()
