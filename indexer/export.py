"""Embeddings out: an index's vectors and item metadata as files other tools read.

Two layouts, same rows in the same order (row i = item i of the index):

* ``parquet``: ``items.parquet``, one row per item with its metadata and its vector in an
  ``embedding`` column (fixed-size list of float32), written in row groups of
  :data:`ROW_GROUP_ROWS` so memory stays bounded whatever the index's size.
* ``npy`` (clip-retrieval's layout, which autofaiss and its readers take):
  ``embeddings/video_emb_0.npy`` (float32 ``[n, dim]``) and ``metadata/metadata_0.parquet``.

Metadata columns: ``id``, ``path`` (relative to the corpus root), ``start``, ``end``,
``duration`` (seconds; null when unknown), ``captions`` (list of strings), ``labels`` and
``label_probs`` (the top action labels, most probable first), one column per annotation field
the corpus carried (``source``, ...), and ``screen_text`` (the on-screen text lines, one per
line) when the index has a text channel (:func:`channel_text`). ``export.json`` describes the export: model, dim, rows,
format, columns.

The export is written into a private temporary sibling of ``--out`` and renamed into place when
complete, so an interrupted export (even ``kill -9``) never leaves a directory that looks
finished; an existing ``--out`` is replaced only with ``overwrite``.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.filters import item_duration, item_meta, relative_path
from indexer.store import open_index
from retrieval.atomic import fsync_path, temp_name

FORMATS = ("parquet", "npy")
#: Rows per Parquet row group (and per chunk read from the index): 8192 x 512 float32 is 16 MB,
#: which keeps a whole export near 300 MB resident.
ROW_GROUP_ROWS = 8_192
ITEMS_FILE = "items.parquet"
NPY_VECTORS = Path("embeddings") / "video_emb_0.npy"
NPY_METADATA = Path("metadata") / "metadata_0.parquet"
DESCRIPTION_FILE = "export.json"
#: Exported column of each channel that carries words (``extra[<channel>]`` of an item).
CHANNEL_COLUMNS = {"text": "screen_text", "speech": "speech_text"}


def channel_text(item: Mapping[str, Any]) -> dict[str, str | None]:
    """The words of each channel an item carries, one string per channel (on-screen lines joined
    by newlines, recognised words by spaces): the one place where channel text joins an item's
    exported metadata."""
    extra = item.get("extra") or {}
    out: dict[str, str | None] = {}
    for channel, column in CHANNEL_COLUMNS.items():
        if channel in extra:
            # the records indexer.channels.item_lines and retrieval.speech.item_words read; not
            # imported, as they would bring torch into an export that otherwise stays small
            record = extra[channel] or {}
            if channel == "speech":
                out[column] = " ".join(str(word.get("word", "")) for word in record.get("words") or [])
            else:
                out[column] = "\n".join(str(line.get("text", "")) for line in record.get("lines") or [])
    return out


def _meta_types(items: Sequence[Mapping[str, Any]]) -> tuple[dict[str, pa.DataType], list[str]]:
    """Annotation columns with their Arrow types (all-numeric -> float64, else string), and the
    channel text columns present."""
    numeric: dict[str, bool] = {}
    channels: dict[str, None] = {}
    for item in items:
        for key, value in item_meta(item).items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            numeric[key] = numeric.get(key, True) and (is_number or value is None)
        channels.update(dict.fromkeys(channel_text(item)))
    return {key: pa.float64() if num else pa.string() for key, num in numeric.items()}, list(channels)


_BASE_FIELDS = [
    pa.field("id", pa.int64()),
    pa.field("path", pa.string()),
    pa.field("start", pa.float64()),
    pa.field("end", pa.float64()),
    pa.field("duration", pa.float64()),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("label_probs", pa.list_(pa.float32())),
]


def _dictionary_columns(fields: Sequence[pa.Field]) -> list[str]:
    """Columns worth dictionary-encoding: strings repeat (folders, sources, labels); vectors do
    not, and a dictionary over them would cost memory for nothing."""
    return [f.name for f in fields if f.type in (pa.string(), pa.list_(pa.string()))]


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _metadata_batch(items: Sequence[Mapping[str, Any]], roots: Sequence[str], schema: pa.Schema,
                    meta: Mapping[str, pa.DataType], channels: Sequence[str]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {field.name: [] for field in schema}
    for item in items:
        columns["id"].append(int(item["id"]))
        columns["path"].append(relative_path(os.fspath(item["path"]), roots))
        columns["start"].append(item.get("start"))
        columns["end"].append(item.get("end"))
        columns["duration"].append(item_duration(item))
        columns["captions"].append(list(item.get("captions") or []))
        labels = item.get("labels") or []
        columns["labels"].append([str(label) for label, _ in labels])
        columns["label_probs"].append([float(prob) for _, prob in labels])
        values = item_meta(item)
        for key, kind in meta.items():
            value = values.get(key)
            columns[key].append(value if kind == pa.float64() else _as_text(value))
        texts = channel_text(item)
        for name in channels:
            columns[name].append(texts.get(name))
    return columns


def _chunks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _vector_rows(vectors: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` as float32, then the memory-mapped pages they came from are dropped
    from this process (a mapped file's pages count as its memory until unmapped or released,
    so a streamed export of a 1 GB vector file would otherwise end at 1 GB resident)."""
    block = np.array(vectors[start:stop], dtype=np.float32)
    mapping = vectors.base if isinstance(vectors, np.memmap) else None
    if isinstance(mapping, mmap.mmap) and stop > start:
        offset = vectors.offset % mmap.ALLOCATIONGRANULARITY + start * vectors.strides[0]  # within the mapping
        first = offset - offset % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):  # only a hint: pages are re-read if needed
            mapping.madvise(mmap.MADV_DONTNEED, first, offset + (stop - start) * vectors.strides[0] - first)
    return block


def _write_npy_header(f, n: int, dim: int) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (n, dim)}
    np.lib.format.write_array_header_1_0(f, header)


def check_export_out(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """``out`` as a path an export may write: refused when it exists (unless ``overwrite``) or is
    a file."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not an export folder; choose another --out")
    return out


def export_index(index: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "parquet",
                 overwrite: bool = False, row_group_rows: int = ROW_GROUP_ROWS) -> Path:
    """Write every item's vector and metadata of the index at ``index`` to the folder ``out``.

    Raises:
        ValueError: ``out`` exists and ``overwrite`` is False; unknown ``fmt``.
        FileNotFoundError / ValueError: ``index`` is not a readable vtr index.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    out = check_export_out(out, overwrite)
    reader = open_index(index)
    manifest = reader.manifest
    roots = manifest.get("corpus_roots") or []
    items, vectors = reader.items, reader.vectors
    n, dim = vectors.shape
    meta, channels = _meta_types(items)
    clash = sorted(set(meta) & {f.name for f in _BASE_FIELDS} | set(meta) & {"embedding", *channels})
    if clash:
        raise ValueError(f"annotation fields {clash} clash with exported columns; rename them in the annotation")
    fields = [*_BASE_FIELDS, *(pa.field(key, kind) for key, kind in meta.items()),
              *(pa.field(name, pa.string()) for name in channels)]
    metadata_schema = pa.schema(fields)
    embedding = pa.field("embedding", pa.list_(pa.float32(), dim))
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = temp_name(out)
    staged.mkdir()
    try:
        if fmt == "parquet":
            files = [ITEMS_FILE]
            schema = metadata_schema.append(embedding)
            with pq.ParquetWriter(staged / ITEMS_FILE, schema, use_dictionary=_dictionary_columns(fields)) as writer:
                for start, stop in _chunks(n, row_group_rows):
                    columns = _metadata_batch(items[start:stop], roots, metadata_schema, meta, channels)
                    block = _vector_rows(vectors, start, stop)
                    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)
                    writer.write_table(pa.table(columns, schema=schema), row_group_size=row_group_rows)
        else:
            files = [NPY_VECTORS.as_posix(), NPY_METADATA.as_posix()]
            (staged / NPY_VECTORS).parent.mkdir()
            (staged / NPY_METADATA).parent.mkdir()
            with open(staged / NPY_VECTORS, "wb") as f, \
                    pq.ParquetWriter(staged / NPY_METADATA, metadata_schema,
                                     use_dictionary=_dictionary_columns(fields)) as writer:
                _write_npy_header(f, n, dim)
                for start, stop in _chunks(n, row_group_rows):
                    f.write(_vector_rows(vectors, start, stop).tobytes())
                    columns = _metadata_batch(items[start:stop], roots, metadata_schema, meta, channels)
                    writer.write_table(pa.table(columns, schema=metadata_schema), row_group_size=row_group_rows)
        description = {"format": fmt, "rows": n, "dim": dim, "files": files,
                       "columns": [f.name for f in fields] + (["embedding"] if fmt == "parquet" else []),
                       "model": manifest.get("model", {}).get("name"),
                       "weights_sha256": manifest.get("model", {}).get("weights_sha256"),
                       "index": os.fspath(Path(index).resolve()), "corpus_roots": roots,
                       "vectors": "clip vectors (inner product with a unit text vector = the retrieval score)"}
        (staged / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        for name in (*files, DESCRIPTION_FILE):
            fsync_path(staged / name)
        fsync_path(staged)
        if out.exists():
            aside = temp_name(out)
            os.rename(out, aside)
            os.rename(staged, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(staged, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


def read_export(out: str | os.PathLike[str]) -> tuple[np.ndarray, pa.Table]:
    """``(vectors float32 [n, dim], metadata table)`` of an export, in row order (either layout)."""
    out = Path(out)
    description = json.loads((out / DESCRIPTION_FILE).read_text(encoding="utf-8"))
    if description["format"] == "npy":
        return np.load(out / NPY_VECTORS), pq.read_table(out / NPY_METADATA)
    table = pq.read_table(out / ITEMS_FILE)
    column = table.column("embedding").combine_chunks()
    vectors = column.values.to_numpy().reshape(len(table), description["dim"])
    return vectors, table.drop_columns(["embedding"])
