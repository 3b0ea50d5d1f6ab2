"""Checks an index job makes before its first clip, and clear errors when a disk fills up.

* :func:`check_options` refuses every malformed option (window, stride, sizes, the FAISS index
  type, a memory budget too small for the corpus) before anything is written, so an argument
  error never leaves a work directory behind.
* :func:`check_corpus_root` refuses corpus roots such as ``/`` or the home folder: the search
  page plays the indexed files, and a root that broad invites indexing (and exposing) far more
  than a video collection.
* :func:`check_output` refuses to replace what ``--out`` already holds when it is not this
  job's index: an index of another model or corpus (unless ``overwrite``), or anything that is
  not an index at all (a directory of other files is never replaced).
* :func:`disk_full_as` turns "no space left on device" into one line that says what was kept and
  how to continue.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import faiss

from indexer.errors import JobError
from indexer.faiss_index import choose_index_type, training_points_needed

#: errno values that mean the disk (or the user's quota) is full.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_options(
    *,
    window: float | None,
    stride: float | None,
    part_size: int,
    batch_size: int,
    workers: int,
    index_type: str | None,
    max_memory_bytes: int | None,
    embed_dim: int | None,
) -> None:
    """Refuse malformed job options (one :class:`indexer.errors.JobError` naming the option)."""
    if part_size < 1:
        raise JobError(f"--part-size must be >= 1, got {part_size}")
    if batch_size < 1:
        raise JobError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise JobError(f"--workers must be >= 0, got {workers}")
    if window is not None and not (window > 0 and window < float("inf")):
        raise JobError(f"--window must be a positive number of seconds, got {window}")
    if stride is not None:
        if window is None:
            raise JobError("--stride needs --window")
        if not (stride > 0 and stride < float("inf")):
            raise JobError(f"--stride must be a positive number of seconds, got {stride}")
    if max_memory_bytes is not None and max_memory_bytes <= 0:
        raise JobError(f"--max-memory must be positive, got {max_memory_bytes} bytes")
    if index_type is not None:
        check_index_type(index_type, embed_dim)


def check_index_type(index_type: str, dim: int | None) -> None:
    """Refuse a FAISS factory string FAISS cannot build for ``dim``-wide vectors."""
    if not index_type.strip():
        raise JobError("--index-type is empty; give a FAISS factory string (Flat, HNSW32,Flat, ...) or auto")
    try:
        faiss.index_factory(dim or 64, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Error" in line or "error" in line), "")
        width = f" for {dim}-d vectors" if dim else ""
        raise JobError(
            f"--index-type {index_type!r} is not a FAISS factory string FAISS can build{width} "
            f"(e.g. Flat, HNSW32,Flat, IVF1024,PQ8x8, or auto){': ' + detail if detail else ''}"
        ) from None


def check_memory_budget(num_sources: int, dim: int | None, max_memory_bytes: int | None, index_type: str | None) -> None:
    """Refuse a memory budget that cannot hold even one item per source (known before embedding)."""
    if max_memory_bytes is None or index_type is not None or not dim:
        return
    try:
        choose_index_type(num_sources, dim, max_memory_bytes)
    except ValueError as exc:
        raise JobError(f"--max-memory is too small: {exc}") from None


def check_index_size(num_sources: int, dim: int | None, index_type: str | None, windowed: bool) -> None:
    """Refuse, before embedding, an ``--index-type`` the corpus is too small to train (e.g.
    ``IVF64,Flat`` needs 64 x 39 clips). A windowed job may yield more items than sources, so it
    is left to :func:`indexer.faiss_index.fitting_index_type`, which falls back (logged) when
    publishing."""
    if index_type is None or windowed or not dim:
        return
    needed = training_points_needed(index_type, dim)
    if num_sources < needed:
        raise JobError(
            f"--index-type {index_type} needs at least {needed} clips to train, this corpus has "
            f"{num_sources}: use --index-type auto (or Flat), or a smaller IVF list count"
        )


def check_corpus_root(videos: Path) -> None:
    """Refuse ``/``, the home folder and the folders above it as a corpus root."""
    real = Path(os.path.realpath(videos))
    home = Path(os.path.realpath(Path.home()))
    if real == Path(real.anchor) or real == home or home.is_relative_to(real):
        raise JobError(
            f"--videos {videos} is {'the file system root' if real == Path(real.anchor) else 'the home folder or above it'}: "
            "the index and the search page would cover every file below it; point --videos at the folder of videos"
        )


def _published_manifest(out: Path) -> dict[str, Any] | None:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"format": "damaged"}
    return data if isinstance(data, dict) else {"format": "damaged"}


def _differences(manifest: Mapping[str, Any], weights_sha256: str, videos_root: str, ann_file: str | None) -> list[str]:
    found = []
    built = manifest.get("model") or {}
    if built.get("weights_sha256") != weights_sha256:
        found.append(f"model {built.get('name')!r} (other weights)")
    roots = [str(root) for root in manifest.get("corpus_roots") or []]
    if roots != [videos_root]:
        found.append(f"corpus {', '.join(roots) or '?'}")
    recorded_ann = (manifest.get("extra") or {}).get("ann_file")
    if recorded_ann != ann_file:
        found.append(f"annotation file {recorded_ann or '(none: the folder)'}")
    return found


def check_output(
    out: Path,
    *,
    weights_sha256: str,
    videos_root: str,
    ann_file: str | None,
    resume: bool,
    overwrite: bool,
    has_work: bool,
) -> bool:
    """Refuse to replace what ``out`` holds unless it is this job's own index (or ``overwrite``);
    return whether ``out`` holds an index of this very model, corpus and annotation file.

    * Nothing there, or an empty directory: fine.
    * A file, or a directory that is not a vtr index: refused, even with ``overwrite`` (vtr
      never deletes a folder of other files).
    * An index of another model, corpus or annotation file: refused unless ``overwrite``.
      With ``resume`` the message says that the published index is another job's, rather than
      reporting success for work that was never done.
    """
    if not os.path.lexists(out):
        return False
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return False
    manifest = _published_manifest(out) if out.is_dir() else None
    if manifest is None or manifest.get("format") != "vtr-index":
        what = "a file" if not out.is_dir() else "a folder that is not a vtr index"
        if manifest is not None:
            what = "a damaged or foreign index (its manifest.json is not a vtr index's)"
        raise JobError(f"--out {out} is {what}; vtr does not replace it: choose another --out or remove it yourself")
    differ = _differences(manifest, weights_sha256, videos_root, ann_file)
    if not differ:
        return True
    if overwrite:
        return False
    why = "; ".join(differ)
    if resume and not has_work:
        raise JobError(
            f"--resume: the index at {out} was published by another job (built with {why}), so there is "
            "nothing of this job to resume; pass --overwrite to rebuild it with these options"
        )
    raise JobError(
        f"--out {out} holds an index built with {why}; pass --overwrite to replace it, or choose another --out"
    )


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL


@contextlib.contextmanager
def disk_full_as(message: str) -> Iterator[None]:
    """Re-raise "no space left on device" (or a full quota) as a job error saying ``message``."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise JobError(f"no space left on device: {message}") from error
