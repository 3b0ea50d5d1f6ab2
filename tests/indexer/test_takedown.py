"""Takedowns stay down and damaged records are refused: index updates as transactions on the
latest version, tombstones, readers that follow new versions, checksummed JSON records, early
option checks, odd file names and model identity by weights digest."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app
from indexer import jobs, update
from indexer.jobs import JobError, JobSpec, Shard, WorkDir, publish_job, run_index_job, work_dir_for
from indexer.locks import lock_path
from indexer.search import Searcher
from indexer.store import open_index, published_generation
from indexer.update import add_to_index, remove_from_index, staging_dir_for
from retrieval.data.video import Preprocess, load_clip
from retrieval.models.model_dir import load_model

REPO = Path(__file__).resolve().parents[2]
CorpusOf = Callable[[list[str]], Path]  # the corpus_of fixture (conftest)
FIRST = ["test/0000.mp4", "test/0001.mp4", "test/0002.mp4"]
NEW = ["test/0003.mp4", "test/0004.mp4"]


def _build(model_dir: Path, videos: Path, out: Path, **options: Any) -> Path:
    run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2, **options), workers=0,
                  batch_size=2, progress=False)
    return out


def _keys(index: Path) -> list[str]:
    return [item["extra"]["key"] for item in open_index(index).items]


def _one_line_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


class _RemoveWhileEmbedding:
    """An engine that runs ``vtr index remove`` while the add is embedding, then embeds."""

    def __init__(self, index: Path, video: str) -> None:
        self.index, self.video = index, video

    def embed_parts(self, *args: Any, **kwargs: Any) -> tuple[int, int, float]:
        remove_from_index(self.index, [self.video])
        return jobs._embed_parts(*args, **kwargs)


# ---------------------------------------------------------------------------------- 1. takedowns


def test_a_remove_during_an_add_stays_removed(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    corpus_of(NEW)

    summary = add_to_index(index, videos, workers=0, progress=False, engine=_RemoveWhileEmbedding(index, FIRST[1]))

    assert summary.added == 2
    assert _keys(index) == [FIRST[0], FIRST[2], *NEW], "both updates are kept"
    assert open_index(index).manifest["removed"] == [str(videos.resolve() / FIRST[1])]
    assert not staging_dir_for(index).exists()


def test_add_does_not_bring_removed_videos_back_unless_asked(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    runner = CliRunner()
    result = runner.invoke(app, ["index", "remove", "--index", str(index), FIRST[0], FIRST[2]])
    assert result.exit_code == 0, result.output
    corpus_of(NEW[:1])

    result = runner.invoke(app, ["index", "add", "--index", str(index), "--videos", str(videos), "--workers", "0",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2 removed earlier and left out" in result.output
    assert _keys(index) == [FIRST[1], NEW[0]]

    again = add_to_index(index, videos, workers=0, progress=False, include_removed=True)
    assert (again.added, again.withheld) == (2, 0)
    assert sorted(_keys(index)) == sorted([*FIRST, NEW[0]])
    assert open_index(index).manifest["removed"] == [], "added back: no longer a tombstone"


def test_rebuilding_the_index_in_place_keeps_its_removals(model_dir: Path, corpus_of: CorpusOf,
                                                           tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    remove_from_index(index, [FIRST[0]])
    command = ["index", "--model", str(model_dir), "--videos", str(videos), "--out", str(index), "--workers", "0",
               "--no-progress"]
    result = CliRunner().invoke(app, command)  # the same job again: a refresh
    assert result.exit_code == 0, result.output
    assert _keys(index) == FIRST[1:]
    assert open_index(index).manifest["removed"] == [str(videos.resolve() / FIRST[0])]
    add_to_index(index, videos, workers=0, progress=False)
    assert _keys(index) == FIRST[1:], "still removed after the rebuild"


def test_a_searcher_switches_to_the_new_version_and_never_finds_a_removed_clip(
    model_dir: Path, corpus_of: CorpusOf, tmp_path: Path
) -> None:
    videos = corpus_of([*FIRST, *NEW])
    index = _build(model_dir, videos, tmp_path / "index")
    searcher = Searcher(index)
    generation = searcher.reader.manifest["generation"]
    model = load_model(model_dir)
    clip = load_clip(videos / FIRST[1], Preprocess.from_dict(model.preprocess))
    assert searcher.search_clip(clip, k=1)[0].path == str(videos.resolve() / FIRST[1])

    remove_from_index(index, [FIRST[1]])

    hits = searcher.search_clip(clip, k=10)
    assert searcher.reader.manifest["generation"] == generation + 1 == published_generation(index)
    assert len(hits) == 4 and str(videos.resolve() / FIRST[1]) not in {hit.path for hit in hits}
    assert all(FIRST[1] not in hit.path for hit in searcher.search("a red circle", k=10))
    assert searcher.stats()["items"] == 4


def test_a_damaged_new_version_keeps_the_searcher_on_the_old_one(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    searcher = Searcher(index)
    remove_from_index(index, [FIRST[0]])
    manifest = Path(os.path.realpath(index)) / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"items": 2', b'"items": 3'))
    assert not searcher.refresh()
    assert len(searcher.reader) == 3 and searcher.refresh() is False  # the damaged one is not retried


# ---------------------------------------------------------------------------------- 3. checksums


def test_a_flipped_digit_in_a_part_record_is_refused_on_merge(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of([*FIRST, *NEW])
    out = tmp_path / "index"
    for shard in (Shard(0, 2), Shard(1, 2)):
        run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2), shard, workers=0,
                      progress=False)
    part = WorkDir(work_dir_for(out)).manifest_path(1)  # holds 0002 and 0003
    text = part.read_text()
    assert '"test/0002.mp4"' in text
    part.write_text(text.replace('"test/0002.mp4"', '"test/0003.mp4"', 1))

    with pytest.raises(JobError, match=r"part-000001.json is damaged .*sha256"):
        publish_job(out)
    _one_line_error(CliRunner().invoke(app, ["index", "merge", str(out)]), "part-000001.json", "damaged")
    assert not os.path.lexists(out), "nothing was published from a damaged part"


def test_a_damaged_job_record_is_refused(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    out = tmp_path / "index"
    run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2), Shard(0, 2), workers=0,
                  progress=False)
    job = WorkDir(work_dir_for(out)).job_file
    job.write_text(job.read_text().replace(str(videos.resolve()), str(videos.resolve()) + "x", 1))
    with pytest.raises(JobError, match=r"job.json is damaged"):
        publish_job(out)


def test_a_damaged_published_manifest_is_refused_on_open_and_add(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    target = os.readlink(index)
    manifest = index.parent / target / "manifest.json"
    assert target.endswith(hashlib.sha256(manifest.read_bytes()).hexdigest())
    text = manifest.read_text()
    manifest.write_text(re.sub(r'"dim": (\d+)', lambda m: f'"dim": {int(m.group(1)) + 1}', text, count=1))

    with pytest.raises(ValueError, match=r"manifest.json in .* is damaged"):
        open_index(index)
    _one_line_error(CliRunner().invoke(app, ["index", "add", "--index", str(index), "--videos", str(videos)]),
                    "manifest.json", "damaged")
    assert not staging_dir_for(index).exists()


# ---------------------------------------------------------------------------------- 7. index type


def test_an_index_type_too_large_for_the_corpus_is_refused_before_embedding(
    model_dir: Path, corpus_of: CorpusOf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = corpus_of(FIRST)

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("embedded before refusing")

    monkeypatch.setattr(jobs, "_embed_parts", never)
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "--model", str(model_dir), "--videos", str(videos), "--out", str(out),
                                      "--index-type", "IVF64,Flat", "--workers", "0", "--no-progress"])
    _one_line_error(result, "IVF64,Flat", "needs at least 2496 clips", "has 3")
    assert not work_dir_for(out).exists() and not os.path.lexists(out)


def test_a_windowed_job_falls_back_to_an_index_type_it_can_train(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    videos = corpus_of(FIRST)
    with caplog.at_level("WARNING"):
        index = _build(model_dir, videos, tmp_path / "index", window=100.0, index_type="IVF64,Flat")
    assert open_index(index).manifest["index_type"] == "Flat"
    assert "IVF64,Flat needs at least 2496 vectors" in caplog.text


# ---------------------------------------------------------------------------------- 8. add's options


def test_an_add_option_error_leaves_nothing_behind(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST[:1])
    index = _build(model_dir, videos, tmp_path / "index")
    corpus_of(NEW[:1])
    runner = CliRunner()
    for option in (["--batch-size", "0"], ["--workers", "-1"], ["--part-size", "0"]):
        result = runner.invoke(app, ["index", "add", "--index", str(index), "--videos", str(videos), *option])
        _one_line_error(result, option[0])
        assert not staging_dir_for(index).exists()
    added = add_to_index(index, videos, workers=0, progress=False)  # the next add is not blocked
    assert added.added == 1


def test_an_add_of_the_file_system_root_is_refused_before_walking_it(
    model_dir: Path, corpus_of: CorpusOf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = corpus_of(FIRST[:1])
    index = _build(model_dir, videos, tmp_path / "index")

    def walked(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("walked the folder before refusing it")

    monkeypatch.setattr(update, "load_corpus", walked)
    result = CliRunner().invoke(app, ["index", "add", "--index", str(index), "--videos", "/"])
    _one_line_error(result, "--videos / is the file system root")
    assert not staging_dir_for(index).exists()


# ---------------------------------------------------------------------------------- 9. smaller


def test_a_file_name_that_is_not_utf8_is_recorded_and_the_rest_indexed(model_dir: Path, corpus_of: CorpusOf,
                                                                       tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    odd = os.fsencode(videos / "test") + b"/\xff\xfe.mp4"
    os.rename(videos / FIRST[1], odd)
    index = _build(model_dir, videos, tmp_path / "index")
    reader = open_index(index)
    assert [item["extra"]["key"] for item in reader.items] == [FIRST[0], FIRST[2]]
    assert len(reader.failures) == 1
    assert reader.failures[0]["path"].endswith("test/\\xff\\xfe.mp4")
    assert "not valid UTF-8" in reader.failures[0]["reason"]
    again = add_to_index(index, videos, workers=0, progress=False)
    assert (again.added, again.failed) == (0, 0), "the recorded name is not retried"


def test_a_renamed_copy_of_the_model_is_the_same_model(model_dir: Path, corpus_of: CorpusOf,
                                                       other_model_dir: Path, tmp_path: Path) -> None:
    videos = corpus_of(FIRST[:1])
    index = _build(model_dir, videos, tmp_path / "index")
    copy = tmp_path / "renamed-copy"
    shutil.copytree(model_dir, copy)
    result = CliRunner().invoke(app, ["search", "a red circle", "--index", str(index), "--model", str(copy),
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert FIRST[0] in result.output
    result = CliRunner().invoke(app, ["search", "a red circle", "--index", str(index), "--model",
                                      str(other_model_dir)])
    _one_line_error(result, "was built with model")
    assert np.isfinite(open_index(index).vectors).all()


def test_a_ray_worker_exits_once_its_driver_is_killed() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver_code = ("import json, time\nfrom indexer.engines.reaper import driver_identity\n"
                   "print(json.dumps(driver_identity()), flush=True)\ntime.sleep(600)")
    worker_code = ("import json, sys, time\nfrom indexer.engines.ray import exit_with_driver\n"
                   "exit_with_driver(json.loads(sys.argv[1]))\ntime.sleep(600)")
    driver = subprocess.Popen([sys.executable, "-c", driver_code], stdout=subprocess.PIPE, text=True, env=env)
    worker = None
    try:
        identity = driver.stdout.readline()
        worker = subprocess.Popen([sys.executable, "-c", worker_code, identity], env=env, start_new_session=True)
        time.sleep(2.5)
        assert worker.poll() is None, "the worker must run while its driver does"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        assert worker.wait(timeout=20) == 1, "the worker outlived its killed driver"
    finally:
        for process in (driver, worker):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie no longer does)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_what_a_killed_driver_started_is_killed_after_it() -> None:
    """A local Ray cluster's agents run in their own sessions, children of the raylet, itself
    the driver's child: modelled by a child that starts a grandchild in a new session."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    grandchild_code = "import subprocess, sys, time\n" \
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n" \
        "print(p.pid, flush=True)\ntime.sleep(600)"
    driver_code = ("import subprocess, sys, time\nfrom indexer.engines.reaper import start_reaper\n"
                   "start_reaper()\n"
                   "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE, text=True)\n"
                   "print(child.pid, child.stdout.readline().strip(), flush=True)\ntime.sleep(600)")
    driver = subprocess.Popen([sys.executable, "-c", driver_code, grandchild_code], stdout=subprocess.PIPE, text=True,
                              env=env)
    started: list[int] = []
    try:
        started = [int(pid) for pid in driver.stdout.readline().split()]
        assert len(started) == 2 and all(_running(pid) for pid in started)
        time.sleep(3)  # the watcher looks once a second
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_running(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in started), "a process the driver started outlived it"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in started:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_second_add_and_a_remove_that_cannot_get_the_lock_are_refused_in_one_line(
    model_dir: Path, corpus_of: CorpusOf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    holder_code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                   "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)")
    monkeypatch.setattr(update, "PUBLISH_WAIT_S", 0.5)
    runner = CliRunner()
    for held, command in ((lock_path(staging_dir_for(index)), ["index", "add", "--index", str(index), "--videos",
                                                               str(videos)]),
                          (lock_path(index), ["index", "remove", "--index", str(index), FIRST[0]])):
        holder = subprocess.Popen([sys.executable, "-c", holder_code, str(held)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            _one_line_error(runner.invoke(app, command), "is in use by process")
        finally:
            holder.kill()
            holder.wait()
    assert _keys(index) == FIRST and not staging_dir_for(index).exists()
