"""``vtr index add`` / ``vtr index remove``: only new videos are embedded, the trained index is
kept, readers see the old index until the new one is published whole, and a killed add resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from indexer.jobs import JobError, JobSpec, run_index_job, work_dir_for
from indexer.store import IndexModelMismatch, open_index, write_index
from indexer.update import _without_rows, add_to_index, remove_from_index, staging_dir_for
from retrieval.data.video import Preprocess, load_clip
from retrieval.models.model_dir import load_model

REPO = Path(__file__).resolve().parents[2]
CorpusOf = Callable[[list[str]], Path]  # the corpus_of fixture (conftest)
FIRST = ["test/0000.mp4", "test/0001.mp4", "test/0002.mp4"]
NEW = ["test/0003.mp4", "test/0004.mp4", "test/0005.mp4"]


def _build(model_dir: Path, videos: Path, out: Path) -> Path:
    run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2), workers=0, batch_size=2,
                  progress=False)
    return out


def _keys(index: Path) -> list[str]:
    return [item["extra"]["key"] for item in open_index(index).items]


def _clip_vector(model_dir: Path, path: Path) -> np.ndarray:
    model = load_model(model_dir)
    clip = load_clip(path, Preprocess.from_dict(model.preprocess))
    with torch.inference_mode():
        return model.clip_vector(model.encode_video(clip[None])["feat"])[0].numpy()


def test_add_embeds_only_new_videos_and_search_finds_them(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    before = open_index(index)
    old_vectors = np.asarray(before.vectors, np.float32).copy()
    corpus_of(NEW)

    result = CliRunner().invoke(app, ["index", "add", "--index", str(index), "--videos", str(videos),
                                      "--workers", "0", "--no-progress"])

    assert result.exit_code == 0, result.output
    assert "3 -> 6 items" in result.stdout and "3 videos already indexed" in result.stdout
    after = open_index(index)
    assert _keys(index) == FIRST + NEW, "old items keep their ids, new ones are appended"
    assert [item["id"] for item in after.items] == list(range(6))
    np.testing.assert_array_equal(np.asarray(after.vectors[:3], np.float32), old_vectors)
    assert after.manifest["counts"]["items"] == 6 and after.manifest["index_type"] == "Flat"
    assert after.manifest["extra"]["updates"][-1]["op"] == "add"
    assert not staging_dir_for(index).exists()
    for name in NEW:
        vector = _clip_vector(model_dir, videos / name)
        hits = after.search(vector, k=6)[0]
        own = [(item, score) for item, score in hits if item["extra"]["key"] == name]
        # found at the top, up to near-ties (this untrained model maps some clips close together)
        assert own and own[0][1] >= hits[0][1] - 2e-3
        np.testing.assert_allclose(np.asarray(after.vectors[own[0][0]["id"]], np.float32), vector, atol=2e-3)

    # the same as indexing all six at once
    full = _build(model_dir, videos, tmp_path / "full")
    assert _keys(full) == _keys(index)
    np.testing.assert_allclose(after.index.reconstruct_n(0, 6), open_index(full).index.reconstruct_n(0, 6),
                               atol=1e-6)
    again = add_to_index(index, videos, workers=0, progress=False)
    assert (again.added, again.after, again.skipped) == (0, 6, 6), "nothing new: nothing embedded"


def test_add_and_remove_refuse_another_model(model_dir: Path, corpus_of: CorpusOf,
                                             other_model_dir: Path, tmp_path: Path) -> None:
    videos = corpus_of(FIRST[:1])
    index = _build(model_dir, videos, tmp_path / "index")
    runner = CliRunner()

    other = str(other_model_dir)
    add = runner.invoke(app, ["index", "add", "--index", str(index), "--videos", str(videos), "--model", other])
    remove = runner.invoke(app, ["index", "remove", "--index", str(index), "--model", other, FIRST[0]])

    for result in (add, remove):
        assert result.exit_code == 2
        assert "was built with model" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _keys(index) == FIRST[:1] and not staging_dir_for(index).exists()
    with pytest.raises(IndexModelMismatch):
        add_to_index(index, videos, model_dir=other_model_dir)


def test_add_killed_mid_way_leaves_the_index_as_it_was_and_resumes(
    model_dir: Path, corpus_of: CorpusOf, tmp_path: Path
) -> None:
    videos = corpus_of(FIRST)
    index = _build(model_dir, videos, tmp_path / "index")
    version = os.path.realpath(index)
    corpus_of(NEW)
    parts_dir = work_dir_for(staging_dir_for(index) / "delta") / "parts"
    command = [sys.executable, "-m", "app.cli", "index", "add", "--index", str(index), "--videos", str(videos),
               "--part-size", "1", "--batch-size", "1", "--workers", "0", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(parts_dir.glob("part-*.json")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no part was committed within two minutes"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert 0 < len(list(parts_dir.glob("part-*.json"))) < len(NEW), "the add must be killed mid-way"

    assert os.path.realpath(index) == version and _keys(index) == FIRST, "readers still see the old index"
    with pytest.raises(JobError, match="--resume"):
        add_to_index(index, videos, workers=0, progress=False)
    summary = add_to_index(index, videos, resume=True, part_size=1, workers=0, progress=False)

    assert summary.added == len(NEW)
    assert _keys(index) == FIRST + NEW and not staging_dir_for(index).exists()


def test_remove_drops_the_videos_and_keeps_the_rest(model_dir: Path, corpus_of: CorpusOf, tmp_path: Path) -> None:
    videos = corpus_of(FIRST + NEW)
    index = _build(model_dir, videos, tmp_path / "index")
    before = open_index(index)
    runner = CliRunner()

    unknown = runner.invoke(app, ["index", "remove", "--index", str(index), "test/none.mp4"])
    assert unknown.exit_code == 2 and "not in index" in unknown.stderr
    result = runner.invoke(app, ["index", "remove", "--index", str(index), FIRST[1],
                                 str((videos / NEW[0]).resolve())])

    assert result.exit_code == 0 and "6 -> 4 items" in result.stdout, result.output
    after = open_index(index)
    kept = [key for key in _keys(before.path) if key not in (FIRST[1], NEW[0])]
    assert _keys(index) == kept == [FIRST[0], FIRST[2], NEW[1], NEW[2]]
    rows = [0, 2, 4, 5]
    np.testing.assert_array_equal(np.asarray(after.vectors, np.float32), np.asarray(before.vectors[rows], np.float32))
    hits = after.search(_clip_vector(model_dir, videos / FIRST[1]), k=4)[0]
    assert FIRST[1] not in [item["extra"]["key"] for item, _ in hits]


@pytest.mark.parametrize("index_type", ["IVF8,Flat", "IVF8,PQ4x8", "HNSW32,Flat"])
def test_removing_rows_renumbers_ids_and_keeps_the_trained_index(index_type: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [{"path": f"/v/{row}.mp4"} for row in range(600)]
    write_index(tmp_path / "index", vectors, items, {"name": "m", "weights_sha256": "x"}, "/v",
                index_type=index_type)
    reader = open_index(tmp_path / "index")
    keep = np.array([row for row in range(600) if row % 3], dtype=np.int64)

    smaller = _without_rows(reader.index, keep, index_type)

    assert smaller.ntotal == len(keep)
    ivf = faiss.try_extract_index_ivf(smaller)
    if ivf is not None:
        original = faiss.try_extract_index_ivf(reader.index)
        assert ivf.quantizer.reconstruct_n(0, ivf.nlist).tobytes() == original.quantizer.reconstruct_n(
            0, original.nlist).tobytes(), "the coarse quantizer is kept, not retrained"
        ivf.nprobe = ivf.nlist
    _, ids = smaller.search(vectors[keep], 1)
    assert (ids[:, 0] == np.arange(len(keep))).mean() > 0.95, "row r of the kept vectors must be id r"

    remove_from_index(tmp_path / "index", ["/v/0.mp4", "/v/3.mp4"])
    assert [item["path"] for item in open_index(tmp_path / "index").items][:2] == ["/v/1.mp4", "/v/2.mp4"]
    assert open_index(tmp_path / "index").index.ntotal == 598


def test_add_to_an_index_built_on_disk_keeps_its_lists_on_disk(
    model_dir: Path, corpus_of: CorpusOf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from indexer import ondisk
    from indexer.jobs import WorkDir
    from retrieval.models.model_dir import model_identity

    monkeypatch.setattr(ondisk, "ONDISK_MIN_VECTORS", 100)
    videos = corpus_of(NEW)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((400, 24)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    index = tmp_path / "index"
    work = WorkDir(work_dir_for(index))
    work.parts_dir.mkdir(parents=True)
    work.job_file.write_text(json.dumps({
        "num_parts": 2, "videos_root": str(videos.resolve()), "model": model_identity(model_dir),
        "index_type": "IVF8,PQ4x8", "max_memory_bytes": None, "model_dir": str(model_dir), "dataset": "generic",
        "ann_file": None, "window": None, "stride": None, "label_set": "synthetic"}))
    for part in range(2):
        rows = range(part * 200, part * 200 + 200)
        items = [{"path": f"old/{row}.mp4", "extra": {"key": f"old/{row}.mp4"}} for row in rows]
        work.commit_part(part, base[rows.start:rows.stop], {"part": part, "items": items, "failures": [],
                                                          "num_vectors": 200})
    from indexer.jobs import publish_job

    publish_job(index)
    assert ondisk.is_ondisk(open_index(index).index)

    summary = add_to_index(index, videos, workers=0, progress=False)

    after = open_index(index)
    assert summary.added == 3 and len(after) == after.index.ntotal == 403
    assert ondisk.is_ondisk(after.index) and after.manifest["index_type"] == "IVF8,PQ4x8"
    assert [item["extra"]["key"] for item in after.items[400:]] == NEW
    ivf = faiss.extract_index_ivf(after.index)
    lists = ivf.invlists
    stored = np.concatenate([faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
                             for number in range(ivf.nlist)])
    assert sorted(stored.tolist()) == list(range(403)), "every row is in the on-disk lists once, by its id"
    ivf.nprobe = 8
    for name in NEW:  # the random tiny model maps the three new clips almost onto one vector
        hits = after.search(_clip_vector(model_dir, videos / name), k=3)[0]
        assert {item["extra"]["key"] for item, _ in hits} == set(NEW)
    assert after.search(base[123], k=1)[0][0][0]["path"].endswith("old/123.mp4")
