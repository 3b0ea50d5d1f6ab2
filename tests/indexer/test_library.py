"""vtr as a library and a data source: the README's Python example runs; the Python API gives
what the CLI gives (search by text, video and vector; evaluation); exports hold every item's
vector and metadata, rebuild a FAISS index with `vtr search`'s ranking, and are written whole or
not at all; `vtr embed` writes the same files without an index; bad filters and exports are one
line and exit status 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import indexer
import retrieval
from app.cli import app
from indexer.export import NPY_METADATA, NPY_VECTORS, channel_text, export_index, read_export
from indexer.search import Searcher

REPO = Path(__file__).resolve().parents[2]
QUERY = "a small red circle moving to the left"
runner = CliRunner()


@pytest.fixture(scope="module")
def searcher(annotated_index: Path) -> Searcher:
    return Searcher(annotated_index)


def _run(*args: str):
    return runner.invoke(app, list(args))


def _cli_hits(*args: str) -> list[dict]:
    result = runner.invoke(app, ["search", *args, "--json", "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_readme_python_example_runs(annotated_index: Path, annotated_ann: Path, model_dir: Path,
                                    tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "README has no python example"
    corpus_root = Path(Searcher(annotated_index).reader.manifest["corpus_roots"][0])
    names = {"MODEL": str(model_dir), "INDEX": str(annotated_index), "VIDEO": str(corpus_root / "test/0001.mp4"),
             "VIDEOS": str(corpus_root), "ANN": str(annotated_ann),
             "EXPORT": str(tmp_path / "export")}
    code = blocks[0]
    for name, value in names.items():
        code = re.sub(rf'"{name}"', repr(value), code)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    assert namespace["hits"] and (tmp_path / "export" / "items.parquet").is_file()


def test_package_roots_name_the_api() -> None:
    assert {"load_model", "embed_texts", "embed_videos", "load_corpus", "evaluate_retrieval"} <= set(retrieval.__all__)
    assert {"Searcher", "ItemFilter", "open_index", "export_index", "read_export"} <= set(indexer.__all__)
    for module in (retrieval, indexer):
        for name in module.__all__:
            assert getattr(module, name) is not None


def test_api_search_equals_cli(searcher: Searcher, annotated_index: Path) -> None:
    for where, options in ((None, []), ("source=news", ["--where", "source=news"]),
                           ("path=train", ["--path", "train"])):
        api = [hit.to_dict() for hit in searcher.search(QUERY, k=4, group=True, where=where)]
        cli = _cli_hits(QUERY, "--index", str(annotated_index), "-k", "4", *options)
        assert [(h["item_id"], round(h["score"], 5)) for h in api] == [
            (h["item_id"], round(h["score"], 5)) for h in cli]
    video = Path(searcher.reader.items[3]["path"])
    api = searcher.search_video(video, k=3, group=True)
    cli = _cli_hits("--video", str(video), "--index", str(annotated_index), "-k", "3")
    assert [h.item_id for h in api] == [h["item_id"] for h in cli]
    # a vector from embed_texts ranks as the text query does
    vector = retrieval.embed_texts(searcher.model, [QUERY])[0]
    assert [h.item_id for h in searcher.search_vector(vector, k=5)] == [h.item_id for h in searcher.search(QUERY, k=5)]


def test_embed_videos_gives_the_indexed_vectors(searcher: Searcher) -> None:
    items = searcher.reader.items
    rows = [0, 1, 5]  # a whole clip, a 1 s moment of it, another clip
    paths = [items[row]["path"] for row in rows]
    windows = [None if items[row]["start"] is None else (items[row]["start"], items[row]["end"]) for row in rows]
    vectors = retrieval.embed_videos(searcher.model, paths, windows=windows, batch_size=2)
    stored = np.asarray(searcher.reader.vectors[rows], dtype=np.float32)
    assert vectors.shape == stored.shape
    assert np.allclose(vectors, stored, atol=2e-3)  # the index keeps float16
    with pytest.raises(FileNotFoundError, match="video not found"):
        retrieval.embed_videos(searcher.model, ["/nonexistent.mp4"])


def test_api_evaluation_equals_cli(model_dir: Path, searcher: Searcher) -> None:
    root = Path(searcher.reader.manifest["corpus_roots"][0])
    ann = root.parent / "test.json"
    model = retrieval.load_model(model_dir, device="cpu", precision="fp32")
    result = retrieval.evaluate_retrieval(model, retrieval.load_corpus("generic", ann, root), rerank_k=4,
                                          progress=False)
    cli = runner.invoke(app, ["eval", "--model", str(model_dir), "--dataset", "generic", "--ann", str(ann),
                              "--videos", str(root), "--rerank-k", "4", "--no-progress", "--device", "cpu",
                              "--precision", "fp32"])
    assert cli.exit_code == 0, cli.output
    assert result.table() in cli.stdout


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_round_trip_ranks_as_vtr_search(fmt: str, annotated_index: Path, searcher: Searcher,
                                               tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = runner.invoke(app, ["index", "export", str(annotated_index), "--out", str(out), "--format", fmt])
    assert result.exit_code == 0, result.output
    vectors, table = read_export(out)
    n = len(searcher.reader)
    assert vectors.shape == (n, searcher.reader.vectors.shape[1]) and vectors.dtype == np.float32
    assert np.array_equal(vectors, np.asarray(searcher.reader.vectors, dtype=np.float32))
    rows = table.to_pylist()
    assert [row["id"] for row in rows] == list(range(n))
    root = searcher.reader.manifest["corpus_roots"][0]
    for row, item in zip(rows, searcher.reader.items, strict=True):
        assert root + "/" + row["path"] == item["path"] and not row["path"].startswith("/")
        assert (row["start"], row["end"], row["captions"]) == (item["start"], item["end"], item["captions"])
        assert row["labels"] == [label for label, _ in item["labels"]]
        assert row["source"] == item["extra"]["meta"]["source"] and row["rating"] == item["extra"]["meta"]["rating"]
        assert row["duration"] == pytest.approx(
            item["end"] - item["start"] if item["start"] is not None else item["extra"]["duration"])
    if fmt == "npy":  # clip-retrieval's layout: an .npy of embeddings, a parquet of metadata, same order
        assert np.load(out / NPY_VECTORS).shape == vectors.shape
        assert pq.read_table(out / NPY_METADATA).num_rows == n
    # a FAISS index rebuilt from the files ranks as `vtr search --no-group` does
    rebuilt = faiss.IndexFlatIP(vectors.shape[1])
    rebuilt.add(vectors)
    query = retrieval.embed_texts(searcher.model, [QUERY])
    _, ids = rebuilt.search(query, 5)
    cli = _cli_hits(QUERY, "--index", str(annotated_index), "-k", "5", "--no-group")
    assert [rows[i]["id"] for i in ids[0]] == [hit["item_id"] for hit in cli]


def test_export_refuses_an_existing_folder_and_bad_input(annotated_index: Path, tmp_path: Path, one_line_error) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(_run("index", "export", str(annotated_index), "--out", str(out)), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    one_line_error(_run("index", "export", str(annotated_index), "--out", str(tmp_path / "x"),
                               "--format", "csv"), "--format")
    one_line_error(_run("index", "export", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")), "not a vtr index")
    result = runner.invoke(app, ["index", "export", str(annotated_index), "--out", str(out), "--overwrite"])
    assert result.exit_code == 0 and not (out / "keep.txt").exists() and (out / "items.parquet").is_file()


def test_an_export_killed_midway_leaves_nothing_that_looks_complete(annotated_index: Path, tmp_path: Path) -> None:
    """kill -9 while the export writes: --out never appears; a later export works."""
    out = tmp_path / "killed"
    script = (
        "import time, indexer.export as e\n"
        "real = e._metadata_batch\n"
        "def slow(*a, **k):\n"
        "    print('writing', flush=True); time.sleep(60); return real(*a, **k)\n"
        "e._metadata_batch = slow\n"
        f"e.export_index({str(annotated_index)!r}, {str(out)!r}, row_group_rows=4)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.")]
        assert staged, "the export writes beside --out under a temporary name"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    export_index(annotated_index, out)
    assert read_export(out)[0].shape[0] == 14


def test_search_filter_errors_are_one_line(annotated_index: Path, one_line_error) -> None:
    one_line_error(_run("search", QUERY, "--index", str(annotated_index),
                                                   "--where", "lang=en"), "unknown filter column 'lang'")
    one_line_error(_run("search", QUERY, "--index", str(annotated_index), "--path", "test/[ab"), "malformed glob")
    one_line_error(_run("search", QUERY, "--index", str(annotated_index), "--where", "source"), "COLUMN=VALUE")
    one_line_error(_run("search", QUERY, "--index", str(annotated_index), "--min-duration", "3",
                              "--max-duration", "1"), "exceeds")
    hits = _cli_hits(QUERY, "--index", str(annotated_index), "--max-duration", "1.5", "--no-group")
    assert len(hits) == 2 and all(hit["end"] - hit["start"] == 1.0 for hit in hits)


def test_vtr_embed_writes_the_export_format(model_dir: Path, searcher: Searcher, tmp_path: Path, one_line_error) -> None:
    root = Path(searcher.reader.manifest["corpus_roots"][0])
    files = [root / "test" / "0001.mp4", root / "train" / "0002.mp4"]
    out = tmp_path / "features"
    result = runner.invoke(app, ["embed", *map(str, files), "--model", str(model_dir), "--out", str(out),
                                 "--format", "npy", "--workers", "0", "--no-progress", "--device", "cpu",
                                 "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    vectors, table = read_export(out)
    assert table.column("path").to_pylist() == ["test/0001.mp4", "train/0002.mp4"]
    indexed = {item["path"]: row for row, item in enumerate(searcher.reader.items) if item["start"] is None}
    expected = np.asarray(searcher.reader.vectors[[indexed[str(path)] for path in files]], dtype=np.float32)
    assert np.allclose(vectors, expected, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no scratch index is left behind"
    one_line_error(_run("embed", *map(str, files), "--model", str(model_dir), "--out", str(out)), "--overwrite")
    one_line_error(_run("embed", str(tmp_path / "missing.mp4"), "--model", str(model_dir),
                                      "--out", str(tmp_path / "f2")), "video not found")


def test_channel_text_joins_the_exported_row() -> None:
    item = {"extra": {"text": {"lines": [{"text": "OPEN", "t": 1.0}, {"text": "24 HOURS", "t": 1.0}]}}}
    assert channel_text(item) == {"screen_text": "OPEN\n24 HOURS"}
    assert channel_text({"extra": {"key": "a.mp4"}}) == {}
