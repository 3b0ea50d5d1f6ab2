"""indexer.store: the index directory round trip, model guard, and atomic publishing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from indexer.faiss_index import search_params
from indexer.store import (
    FORMAT_VERSION,
    IndexModelMismatch,
    open_index,
    write_index,
)

MODEL = {"name": "videomamba-tiny", "weights_sha256": "ab" * 32, "preprocess": {"frames": 8, "size": 224}}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tiny indexes: one OpenMP thread


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_items(n: int) -> list[dict]:
    return [
        {
            "path": f"videos/{i:04d}.mp4",
            "start": i * 2.0,
            "end": i * 2.0 + 1.5,
            "captions": [f"clip number {i}"],
            "labels": [
                ("running", 0.6),
                ("jumping", 0.2),
                ("cooking", 0.1),
                ("diving", 0.06),
                ("golf", 0.04),
            ],
            "extra": {"shard": i % 3},
        }
        for i in range(n)
    ]


def publish(path: Path, n: int, version: int = 0) -> Path:
    return write_index(
        path,
        unit_vectors(n, seed=version),
        make_items(n),
        MODEL,
        ["/data/videos"],
        extra={"version": version},
    )


def test_round_trip_keeps_items_vectors_and_manifest(tmp_path):
    vectors = unit_vectors(40)
    failures = [{"path": "videos/broken.mp4", "reason": "decode error: moov atom not found"}]
    out = write_index(
        tmp_path / "INDEX",
        vectors,
        make_items(40),
        MODEL,
        ["/data/videos"],
        failures=failures,
        skipped=2,
        extra={"job": 7},
    )
    reader = open_index(out, expect_model=MODEL)

    assert len(reader) == 40
    assert reader.items[3] == {
        "id": 3,
        "path": "videos/0003.mp4",
        "start": 6.0,
        "end": 7.5,
        "captions": ["clip number 3"],
        "labels": [["running", 0.6], ["jumping", 0.2], ["cooking", 0.1], ["diving", 0.06], ["golf", 0.04]],
        "extra": {"shard": 0},
    }
    assert isinstance(reader.vectors, np.memmap) and reader.vectors.dtype == np.float16
    np.testing.assert_array_equal(reader.vectors, vectors.astype(np.float16))
    assert reader.failures == failures

    manifest = reader.manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model"] == MODEL
    assert manifest["dim"] == 16 and manifest["metric"] == "ip" and manifest["index_type"] == "Flat"
    assert manifest["counts"] == {"items": 40, "failed": 1, "skipped": 2}
    assert manifest["corpus_roots"] == ["/data/videos"]
    assert manifest["extra"] == {"job": 7}
    assert manifest["code_version"]
    assert datetime.fromisoformat(manifest["created"].replace("Z", "+00:00")).tzinfo is not None

    # the published files are plain formats other tools can read
    assert json.loads((out / "manifest.json").read_text()) == manifest
    np.testing.assert_array_equal(np.load(out / "vectors.f16.npy", mmap_mode="r"), reader.vectors)

    hits = reader.search(vectors[[5, 9]], k=3)
    assert [hit[0][0]["id"] for hit in hits] == [5, 9]
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-3)
    assert len(hits[0]) == 3 and hits[0][0][1] >= hits[0][1][1] >= hits[0][2][1]


def test_ivf_pq_index_round_trip_reapplies_search_params(tmp_path):
    vectors = unit_vectors(3_000, dim=32)
    out = write_index(
        tmp_path / "INDEX", vectors, make_items(3_000), MODEL, "/data", index_type="IVF64,PQ8x8"
    )
    reader = open_index(out)
    assert reader.manifest["faiss_params"] == {"nprobe": 16}
    assert reader.search(vectors[42], k=1)[0][0][0]["id"] == 42  # exact re-scoring finds itself

    # a plain copy (no publishing pointer to check its manifest against) with other parameters
    copy = tmp_path / "COPY"
    shutil.copytree(reader.snapshot_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["faiss_params"] = {"nprobe": 3}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert search_params(open_index(copy).index) == {"nprobe": 3}


def test_model_mismatch_names_both_models(tmp_path):
    out = publish(tmp_path / "INDEX", 10)
    other = {"name": "frame-vit-b16", "weights_sha256": "cd" * 32}
    with pytest.raises(IndexModelMismatch, match="videomamba-tiny") as error:
        open_index(out, expect_model=other)
    assert "frame-vit-b16" in str(error.value) and "cd" * 32 in str(error.value)
    with pytest.raises(IndexModelMismatch):
        open_index(out, expect_model={"name": MODEL["name"], "weights_sha256": "ef" * 32})
    assert len(open_index(out, expect_model={"name": MODEL["name"], "weights_sha256": None})) == 10


def test_missing_or_foreign_directories_are_not_indexes(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vtr index"):
        open_index(tmp_path / "nothing-here")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a vtr index: no manifest.json"):
        open_index(tmp_path / "plain")
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a vtr index"):
        publish(tmp_path / "plain", 5)
    assert (tmp_path / "plain" / "notes.txt").read_text() == "mine"


def test_inconsistent_files_are_rejected_on_open(tmp_path):
    out = publish(tmp_path / "INDEX", 12)
    snapshot = open_index(out).snapshot_dir
    items_path = snapshot / "items.jsonl"
    lines = items_path.read_text().splitlines(keepends=True)
    items_path.write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="items.jsonl in .* is damaged .truncated"):
        open_index(out)
    # an index written before checksums were recorded (a plain directory, no pointer) still has
    # its files cross-checked
    copy = tmp_path / "OLD"
    shutil.copytree(snapshot, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="counts disagree"):
        open_index(copy)


def test_bad_write_arguments_raise(tmp_path):
    vectors = unit_vectors(4)
    with pytest.raises(ValueError, match="one item per vector"):
        write_index(tmp_path / "a", vectors, make_items(3), MODEL, "/data")
    with pytest.raises(ValueError, match="unknown keys"):
        write_index(tmp_path / "a", vectors, [{"path": "x", "score": 1}] * 4, MODEL, "/data")
    with pytest.raises(ValueError, match="weights_sha256"):
        write_index(tmp_path / "a", vectors, make_items(4), {"name": "m"}, "/data")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def _names(folder):
    """The entries of ``folder``, published versions without the manifest digest their name carries."""
    return sorted(re.sub(r"-[0-9a-f]{64}$", "", p.name) for p in folder.iterdir())


def test_republishing_keeps_only_the_new_version_and_old_readers_work(tmp_path):
    first = open_index(publish(tmp_path / "INDEX", 30, version=1))
    second = open_index(publish(tmp_path / "INDEX", 50, version=2))
    assert _names(tmp_path) == [".INDEX.lock", ".INDEX.v2", "INDEX"]
    assert (len(first), len(second)) == (30, 50)
    # the first reader's version was deleted, but its files stay readable through its handles
    assert first.search(unit_vectors(30, seed=1)[7], k=1)[0][0][0]["id"] == 7
    assert float(first.vectors[29].astype(np.float32) @ unit_vectors(30, seed=1)[29]) == pytest.approx(
        1, abs=1e-3
    )


def test_republishing_over_a_plain_directory_index(tmp_path):
    shutil.copytree(publish(tmp_path / "built", 20, version=1), tmp_path / "INDEX")  # a copied index
    out = publish(tmp_path / "INDEX", 25, version=2)
    assert out.is_symlink()
    assert open_index(out).manifest["extra"]["version"] == 2
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_readers_see_a_whole_version_while_a_writer_republishes(tmp_path):
    """Every open_index during 12 republishes returns one complete, self-consistent version."""
    out = publish(tmp_path / "INDEX", 20, version=0)
    republishes = 12
    done = threading.Event()
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def reader(versions: list[int]) -> None:
        while not done.is_set():
            try:
                index = open_index(out)
                version = index.manifest["extra"]["version"]
                expected = 20 + 7 * version
                assert len(index.items) == index.manifest["counts"]["items"] == expected
                assert index.vectors.shape[0] == index.index.ntotal == expected
                assert index.items[-1]["id"] == expected - 1
                np.testing.assert_array_equal(
                    index.vectors[:3], unit_vectors(expected, seed=version)[:3].astype(np.float16)
                )
                versions.append(version)
            except BaseException as error:  # noqa: BLE001 - reported to the main thread
                errors.append(error)
                return

    threads = [threading.Thread(target=reader, args=(versions,)) for versions in seen]
    for thread in threads:
        thread.start()
    try:
        for version in range(1, republishes + 1):
            publish(tmp_path / "INDEX", 20 + 7 * version, version=version)
    finally:
        done.set()
        for thread in threads:
            thread.join()

    assert not errors, errors[0]
    for versions in seen:
        assert len(versions) > republishes
        assert versions == sorted(versions)  # a reader never goes back to an older version
    assert len(set(seen[0] + seen[1])) >= 2
    assert open_index(out).manifest["extra"]["version"] == republishes


def test_a_reader_whose_version_is_deleted_mid_open_retries(tmp_path, monkeypatch):
    """Deterministic version of the race: republish right after the reader resolved INDEX."""
    out = publish(tmp_path / "INDEX", 15, version=1)
    resolve = os.path.realpath
    raced: list[str] = []

    def resolve_then_republish(path, *args, **kwargs):
        resolved = resolve(path, *args, **kwargs)
        if not raced and Path(path) == out:
            raced.append(resolved)
            publish(out, 22, version=2)  # deletes the version just resolved
        return resolved

    monkeypatch.setattr(os.path, "realpath", resolve_then_republish)
    reader = open_index(out)
    assert raced and not os.path.exists(raced[0])
    assert reader.manifest["extra"]["version"] == 2 and len(reader) == 22


def test_a_crashed_writer_is_ignored_by_readers_and_cleaned_by_the_next_writer(tmp_path):
    out = publish(tmp_path / "INDEX", 15, version=1)
    crash = textwrap.dedent(
        f"""
        import os
        import numpy as np
        import indexer.store as store

        def die(*args, **kwargs):
            os._exit(3)  # killed mid-write: no cleanup, no exception handlers

        store._write_jsonl = die
        vectors = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        items = [{{"path": f"v{{i}}.mp4"}} for i in range(40)]
        store.write_index({os.fspath(tmp_path / "INDEX")!r}, vectors, items, {MODEL!r}, ["/data"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", crash], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".INDEX.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "index.faiss").exists()
    # a finished-but-unpublished version, as left by a crash between rename and symlink swap
    orphan = tmp_path / ".INDEX.v9"
    orphan.mkdir()
    (orphan / "manifest.json").write_text("{}")

    reader = open_index(out)
    assert reader.manifest["extra"]["version"] == 1 and len(reader) == 15

    publish(tmp_path / "INDEX", 22, version=3)
    assert _names(tmp_path) == [".INDEX.lock", ".INDEX.v10", "INDEX"]
    assert open_index(out).manifest["extra"]["version"] == 3
