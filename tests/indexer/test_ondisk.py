"""Index builds bounded in memory: IVF lists built part by part, merged on disk, served mmapped."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from indexer import ondisk
from indexer.faiss_index import IVF_DATA_FILE, build_index, search_index
from indexer.parts import WorkDir, work_dir_for
from indexer.publish import publish_job
from indexer.store import open_index, write_index
from indexer.update import remove_from_index

DIM = 32
INDEX_TYPE = "IVF32,PQ8x8"


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, 64, n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _job(tmp_path, vectors: np.ndarray, part_rows: int, index_type: str | None = INDEX_TYPE):
    """A finished job's work directory whose parts hold ``vectors`` (one failure in part 0)."""
    out = tmp_path / "index"
    work = WorkDir(work_dir_for(out))
    work.parts_dir.mkdir(parents=True)
    num_parts = -(-len(vectors) // part_rows)
    job = {"num_parts": num_parts, "videos_root": "/corpus", "model": {"name": "m", "weights_sha256": "ab"},
           "index_type": index_type, "max_memory_bytes": None, "model_dir": "/model", "dataset": "generic",
           "ann_file": None, "window": None, "stride": None, "label_set": "synthetic",
           "channels": {"visual": {}}, "removed": []}
    work.job_file.write_text(json.dumps(job))
    for part in range(num_parts):
        rows = range(part * part_rows, min(len(vectors), (part + 1) * part_rows))
        items = [{"path": f"v{row:05d}.mp4", "start": None, "end": None, "captions": [], "labels": [["a", 0.5]],
                  "extra": {"key": f"v{row:05d}.mp4"}} for row in rows]
        failures = [{"path": "broken.mp4", "item": "broken.mp4", "reason": "cannot decode"}] if part == 0 else []
        work.commit_part(part, vectors[rows.start:rows.stop], {"part": part, "items": items, "failures": failures,
                                                              "num_vectors": len(items)})
    return out


def _recall_at_10(reader, vectors: np.ndarray, queries: np.ndarray) -> float:
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    _, ids = search_index(reader.index, queries, 10, rescore_vectors=reader.vectors)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ids, strict=True)]))


def test_large_job_is_built_on_disk_and_served_memory_mapped(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ondisk, "ONDISK_MIN_VECTORS", 5000)
    monkeypatch.setattr(ondisk, "BLOCK_ROWS", 1500)  # several blocks to merge
    vectors = _clustered(6000)
    out = _job(tmp_path, vectors, part_rows=700)
    concat = np.concatenate  # the on-disk path must never join all vectors in one array

    def no_full_concat(arrays, *args, **kwargs):
        joined = concat(arrays, *args, **kwargs)
        assert len(joined) < len(vectors), "all vectors were joined in memory"
        return joined

    monkeypatch.setattr(np, "concatenate", no_full_concat)
    publish_job(out)
    monkeypatch.undo()

    reader = open_index(out)
    assert os.path.isfile(os.path.join(reader.snapshot_dir, IVF_DATA_FILE)) and ondisk.is_ondisk(reader.index)
    assert not work_dir_for(out).exists() and not any(reader.snapshot_dir.glob(".blocks*"))
    assert reader.manifest["index_type"] == INDEX_TYPE and reader.manifest["storage"] == "ondisk"
    assert reader.manifest["counts"] == {"items": 6000, "failed": 1, "skipped": 0}
    assert [item["id"] for item in reader.items] == list(range(6000))
    assert reader.items[4321]["path"] == "/corpus/v04321.mp4" and reader.failures[0]["path"] == "/corpus/broken.mp4"
    np.testing.assert_array_equal(np.asarray(reader.vectors), vectors.astype(np.float16))

    queries = _clustered(200, seed=1)
    in_ram = build_index(vectors, index_type=INDEX_TYPE)
    in_ram_recall = _recall_at_10(type("R", (), {"index": in_ram, "vectors": vectors.astype(np.float16)}), vectors,
                                  queries)
    recall = _recall_at_10(reader, vectors, queries)
    assert recall >= 0.9 and recall >= in_ram_recall - 0.03, (recall, in_ram_recall)


def test_readers_keep_their_version_and_remove_keeps_lists_on_disk(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ondisk, "ONDISK_MIN_VECTORS", 3000)
    vectors = _clustered(4000, seed=2)
    out = _job(tmp_path, vectors, part_rows=1000)
    publish_job(out)
    old = open_index(out)
    queries = vectors[[5, 1500, 3999]]

    remove_from_index(out, ["/corpus/v00005.mp4", "v00006.mp4"])

    assert not old.snapshot_dir.exists(), "the old version is deleted once replaced"
    hits = old.search(queries, k=1)  # ... yet its reader still answers from the files it mapped
    assert [hit[0][0]["path"] for hit in hits] == ["/corpus/v00005.mp4", "/corpus/v01500.mp4", "/corpus/v03999.mp4"]
    new = open_index(out)
    assert ondisk.is_ondisk(new.index) and len(new) == 3998 and new.index.ntotal == 3998
    assert [hit[0][0]["path"] for hit in new.search(queries[1:], k=1)] == ["/corpus/v01500.mp4", "/corpus/v03999.mp4"]
    assert "/corpus/v00005.mp4" not in [item["path"] for item, _ in new.search(queries[0], k=10)[0]]
    assert _recall_at_10(new, np.asarray(new.vectors, np.float32), _clustered(100, seed=3)) >= 0.9


def test_large_items_files_are_read_lazily_and_read_the_same(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer import jsonl

    vectors = _clustered(50)
    items = [{"path": f"/v/{row}.mp4", "captions": [f"caption {row} é"], "labels": [["a", 0.25]]} for row in range(50)]
    write_index(tmp_path / "index", vectors, items, {"name": "m", "weights_sha256": "x"}, "/v")
    eager = open_index(tmp_path / "index").items
    monkeypatch.setattr(jsonl, "LAZY_MIN_BYTES", 0)

    lazy = open_index(tmp_path / "index").items

    assert isinstance(lazy, jsonl.JsonLines) and isinstance(eager, list)
    assert len(lazy) == 50 and list(lazy) == eager
    assert lazy[-1] == eager[-1] and lazy[3:6] == eager[3:6] and lazy[7]["captions"] == ["caption 7 é"]
    with pytest.raises(IndexError):
        lazy[50]
    hits = open_index(tmp_path / "index").search(vectors[17], k=1)[0]
    assert hits[0][0]["path"] == "/v/17.mp4"
