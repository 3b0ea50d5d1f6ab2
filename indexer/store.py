"""The index directory: what ``vtr index`` writes and ``vtr search`` / ``vtr serve`` read.

Layout of an index called ``INDEX``::

    INDEX -> .INDEX.v7-<sha>    a symlink to the current version (swapped atomically); <sha> is
                                the sha256 of that version's manifest.json
    .INDEX.v7-<sha>/
        manifest.json           format version, generation, model identity, dim, metric, index
                                type, FAISS search params, counts, corpus roots, removed videos,
                                created, code version, checksums of the other files
        index.faiss             the FAISS index (inner product; see indexer.faiss_index)
        vectors.f16.npy         exact clip vectors as float16, row i = item i
                                (``np.load(path, mmap_mode="r")`` opens it without reading it)
        items.jsonl             one JSON object per item: id (= row), path, start, end,
                                captions, labels [[label, prob], ...], extra
        failures.jsonl          one JSON object per video that could not be embedded: path, reason

Publishing, and what readers see
--------------------------------
A reader must see the old index or the new one, whole, never a mix. :func:`write_index`
therefore writes every file into a private temporary sibling ``.INDEX.tmp-<pid>-<hex>``,
fsyncs the files and the directory, renames it to the next version ``.INDEX.v<N>`` (invisible
to readers: they only follow ``INDEX``), then points ``INDEX`` at it by creating a new symlink
and ``os.replace``-ing it over the old one. ``rename(2)`` of a symlink is atomic, so at every
instant ``INDEX`` resolves to one complete version. Older versions are deleted afterwards.

:func:`open_index` resolves ``INDEX`` once, opens that version's directory and then every file
*relative to the directory handle*, and maps/reads them straight away; from then on the reader
holds its own snapshot (open files survive deletion on POSIX). The only race left is a
republish that deletes the resolved version between resolution and the opens; the reader
notices (the directory handle no longer matches ``INDEX``) and starts again, a few times.

A plain directory at ``INDEX`` (copied from elsewhere, or written by hand) is still readable.
Republishing over it must first move it aside and then put the symlink in its place: in that
short window ``INDEX`` does not exist, and readers that hit it retry.

A writer that crashes leaves a ``.INDEX.tmp-<pid>-*`` directory (or a finished but unpublished
``.INDEX.v<N>``). Readers never look at either; the next :func:`write_index` deletes temporaries
whose process is gone and every version older than the one it publishes. The swap runs under
the index's exclusive lock (:mod:`indexer.locks`): a second publisher is refused, naming the
process that holds it.

The manifest records the sha256 and size of every data file (``files``), and the pointer
records the manifest's: :func:`open_index` verifies both before parsing, so a damaged file is
named instead of being searched. ``generation`` counts publishes (read and incremented under
the lock), so a long-running reader can tell that a newer version is out
(:func:`published_version_dir`, :class:`indexer.search.Searcher`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from indexer.checksums import describe_files, verify_handle
from indexer.faiss_index import (
    IVF_DATA_FILE,
    HeldSubset,
    apply_search_params,
    build_index,
    check_vectors,
    choose_index_type,
    fitting_index_type,
    read_faiss_index,
    search_index,
    search_params,
    to_cpu,
    to_gpu_if_wanted,
)
from indexer.jsonl import read_items
from indexer.locks import index_lock
from indexer.ondisk import write_float16_rows
from retrieval.atomic import fsync_path

logger = logging.getLogger(__name__)

FORMAT = "vtr-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.f16.npy"
ITEMS_FILE = "items.jsonl"
FAILURES_FILE = "failures.jsonl"
ITEM_KEYS = ("id", "path", "start", "end", "captions", "labels", "extra")
_INDEX_FILES = (MANIFEST_FILE, INDEX_FILE, VECTORS_FILE, ITEMS_FILE, FAILURES_FILE)
#: Files whose sha256 the manifest records (``manifest["files"]``) and readers verify.
_DATA_FILES = (INDEX_FILE, VECTORS_FILE, ITEMS_FILE, FAILURES_FILE)

#: How many times a reader starts over when a republish pulls its version away mid-open.
OPEN_ATTEMPTS = 5
OPEN_RETRY_DELAY_S = 0.02


class IndexModelMismatch(ValueError):
    """The index was built with other weights than the model about to query it.

    Vectors from two different models live in unrelated spaces: searching one with the other
    returns confident nonsense, so this is an error, never a warning.
    """


class _SnapshotVanished(Exception):
    """The version being opened was replaced and deleted while opening it: start over."""


# ---------------------------------------------------------------------------- writing


def code_version() -> str:
    try:
        return importlib.metadata.version("vtr")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def normalise_item(row: int, item: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(item) - set(ITEM_KEYS)
    if unknown:
        raise ValueError(f"item {row} has unknown keys {sorted(unknown)}; put them under 'extra'")
    if "path" not in item:
        raise ValueError(f"item {row} has no 'path'")
    if item.get("id", row) != row:
        raise ValueError(f"item {row} has id {item['id']}; an item's id must be its row number")
    start, end = item.get("start"), item.get("end")
    return {
        "id": row,
        "path": os.fspath(item["path"]),
        "start": None if start is None else float(start),
        "end": None if end is None else float(end),
        "captions": [str(caption) for caption in item.get("captions") or []],
        "labels": [[str(label), float(prob)] for label, prob in item.get("labels") or []],
        "extra": dict(item.get("extra") or {}),
    }


def normalise_failure(failure: Mapping[str, Any]) -> dict[str, Any]:
    if "path" not in failure or "reason" not in failure:
        raise ValueError(f"a failure record needs 'path' and 'reason', got keys {sorted(failure)}")
    return {**failure, "path": os.fspath(failure["path"]), "reason": str(failure["reason"])}


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def write_faiss(path: Path, index: faiss.Index) -> None:
    with open(path, "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        f.flush()
        os.fsync(f.fileno())


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|link|old)-(\d+)-[0-9a-f]+$")


def _version_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.v(\d+)(?:-[0-9a-f]{{64}})?$")


#: A published version's directory name carries its manifest's sha256: ``.INDEX.v7-<sha256>``.
_POINTER_DIGEST = re.compile(r"^\..+\.v\d+-([0-9a-f]{64})$")


def pointed_manifest_sha256(version_dir: str | os.PathLike[str]) -> str | None:
    """The manifest sha256 recorded by the name of a published version directory (None for a
    plain index directory, which no pointer publishes)."""
    match = _POINTER_DIGEST.match(Path(version_dir).name)
    return match.group(1) if match else None


def _versions(parent: Path, name: str) -> dict[int, Path]:
    pattern = _version_pattern(name)
    found = {}
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match:
            found[int(match.group(1))] = entry
    return found


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_dead_temporaries(parent: Path, name: str) -> None:
    """Delete what crashed writers left behind (their process no longer exists)."""
    pattern = _temp_pattern(name)
    published = os.path.lexists(parent / name)
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if not match or int(match.group(2)) == os.getpid() or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not published:
            continue  # the writer died mid-swap: this is the only complete copy, keep it
        logger.info("removing %s left by a writer that is no longer running", entry)
        _remove(entry)


def _publish(staged: Path, out: Path, manifest_sha256: str) -> Path:
    """Make ``staged`` (a complete, fsynced index directory) what ``out`` resolves to; the
    version's name records ``manifest_sha256``, the checksum of its manifest."""
    parent, name = out.parent, out.name
    legacy_dir = out.is_dir() and not out.is_symlink()
    if os.path.lexists(out) and not out.is_symlink() and not (out / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{out} exists and is not a vtr index; refusing to replace it")

    version = max(_versions(parent, name), default=0) + 1
    while True:
        target = parent / f".{name}.v{version}-{manifest_sha256}"
        try:
            os.rename(staged, target)
            break
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            version += 1
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    link = parent / f".{name}.link-{token}"
    os.symlink(target.name, link)
    aside = parent / f".{name}.old-{token}"
    if legacy_dir:
        os.rename(out, aside)  # readers retry during the instant INDEX does not exist
    os.replace(link, out)
    fsync_path(parent)

    if legacy_dir:
        _remove(aside)
    for number, old in _versions(parent, name).items():
        if number < version:
            _remove(old)
    return out


def write_index(
    out_dir: str | os.PathLike[str],
    vectors: np.ndarray,
    items: Sequence[Mapping[str, Any]],
    model_identity: Mapping[str, Any],
    corpus_roots: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    failures: Iterable[Mapping[str, Any]] = (),
    index_type: str | None = None,
    max_memory_bytes: int | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    skipped: int = 0,
    use_gpu: bool | None = None,
    removed: Iterable[str] = (),
) -> Path:
    """Build and atomically publish an index directory at ``out_dir``; return its path.

    ``vectors`` are the float32 clip vectors [n, d], norms at most 1 (:mod:`indexer.faiss_index`);
    ``items[i]`` describes row i (keys from :data:`ITEM_KEYS`, ``path`` required, ``id`` filled in). ``model_identity``
    needs ``name`` and ``weights_sha256`` (and should carry ``preprocess``): readers use it to
    refuse queries from another model. ``skipped`` counts inputs deliberately left out
    (e.g. too short), as opposed to ``failures``. The FAISS index type is chosen by
    :func:`indexer.faiss_index.choose_index_type` unless given; ``use_gpu`` as in
    :func:`indexer.faiss_index.build_index`. ``removed``: videos taken out of an earlier version
    of this index, which ``vtr index add`` leaves out. See the module docstring for how
    publishing keeps readers safe.
    """
    check_vectors(vectors)
    n, dim = vectors.shape
    if len(items) != n:
        raise ValueError(f"{len(items)} items for {n} vectors: there must be one item per vector row")
    missing = [key for key in ("name", "weights_sha256") if not model_identity.get(key)]
    if missing:
        raise ValueError(f"model_identity lacks {missing}; readers need them to detect a model mismatch")
    if isinstance(corpus_roots, (str, os.PathLike)):
        corpus_roots = [corpus_roots]
    item_rows = [normalise_item(row, item) for row, item in enumerate(items)]
    failure_rows = [normalise_failure(failure) for failure in failures]

    if index_type:
        index_type = fitting_index_type(index_type, n, dim, max_memory_bytes)
    else:
        index_type = choose_index_type(n, dim, max_memory_bytes)
    index = to_cpu(build_index(vectors, index_type=index_type, use_gpu=use_gpu))
    manifest = index_manifest(index, model_identity, dim, index_type, corpus_roots,
                              {"items": n, "failed": len(failure_rows), "skipped": int(skipped)}, extra, removed)

    def fill(staged: Path) -> dict[str, Any]:
        write_faiss(staged / INDEX_FILE, index)
        write_float16_rows(staged / VECTORS_FILE, len(vectors), vectors.shape[1], [vectors])
        write_jsonl(staged / ITEMS_FILE, item_rows)
        write_jsonl(staged / FAILURES_FILE, failure_rows)
        return manifest

    return publish_version(out_dir, fill)


def index_manifest(
    index: faiss.Index,
    model_identity: Mapping[str, Any],
    dim: int,
    index_type: str,
    corpus_roots: Iterable[str | os.PathLike[str]],
    counts: Mapping[str, int],
    extra: Mapping[str, Any] | None = None,
    removed: Iterable[str] = (),
    storage: str | None = None,
) -> dict[str, Any]:
    """The manifest of a new index version (without ``files`` and ``generation``, which
    :func:`publish_version` adds); ``storage`` is "ondisk" for lists in ``index.ivfdata``."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"preprocess": {}, **dict(model_identity)},
        "dim": dim,
        "metric": "ip",
        "index_type": index_type,
        "faiss_params": search_params(index),
    }
    if storage is not None:
        manifest["storage"] = storage
    manifest.update({
        "counts": dict(counts),
        "corpus_roots": [os.fspath(root) for root in corpus_roots],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "code_version": code_version(),
        "extra": dict(extra or {}),
        "removed": sorted(removed),
    })
    return manifest


def publish_version(out_dir: str | os.PathLike[str], fill: Callable[[Path], Mapping[str, Any]]) -> Path:
    """Publish a new version of the index at ``out_dir`` whose files ``fill(staged_dir)`` writes.

    ``fill`` writes (and fsyncs) every file but the manifest into the private staging directory
    and returns the manifest, which is written last: a directory with a manifest is a finished
    one. The version is then published atomically (see the module docstring); if ``fill`` raises,
    the staging directory is removed and the published index is untouched.
    """
    out = Path(os.path.abspath(out_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(out.parent, out.name)
    staged = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staged.mkdir()
    try:
        manifest = dict(fill(staged))
        data_files = [name for name in (*_DATA_FILES, IVF_DATA_FILE) if (staged / name).is_file()]
        manifest["files"] = describe_files(staged, data_files)
        with index_lock(out):
            # The manifest goes last: a directory with a manifest is a finished one. Its
            # generation is one more than the version it replaces, read under the lock.
            manifest["generation"] = published_generation(out) + 1
            data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
            (staged / MANIFEST_FILE).write_bytes(data)
            fsync_path(staged / MANIFEST_FILE)
            fsync_path(staged)
            return _publish(staged, out, hashlib.sha256(data).hexdigest())
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- reading


def read_published_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest published at ``path`` as it is now, unverified (None when there is none or
    it is not a JSON object): for small decisions before a full :func:`open_index`."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def published_generation(path: str | os.PathLike[str]) -> int:
    """The generation of the version published at ``path`` (0 when nothing is published, or
    for an index written before generations were recorded). Every publish counts one up."""
    generation = (read_published_manifest(path) or {}).get("generation", 0)
    return generation if isinstance(generation, int) else 0


def published_version_dir(path: str | os.PathLike[str]) -> Path:
    """The directory ``path`` resolves to now: a new one after each publish (cheap to ask)."""
    return Path(os.path.realpath(path))


@dataclass
class IndexReader:
    """One published version of an index, fully opened: safe against later republishing.

    ``vectors`` is a read-only float16 memmap; ``items[i]`` and ``vectors[i]`` describe the
    same clip, whose FAISS id is ``i``.
    """

    path: Path
    snapshot_dir: Path
    manifest: dict[str, Any]
    items: list[dict[str, Any]]
    vectors: np.ndarray
    index: faiss.Index
    failures: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.items)

    def search(
        self, query_vectors: np.ndarray, k: int = 10, candidates: int | None = None,
        subset: np.ndarray | None = None, held: HeldSubset | None = None,
    ) -> list[list[tuple[dict[str, Any], float]]]:
        """For each query ([q, d] or [d], L2-normalised) its best ``k`` (item, score) pairs; the
        score is the inner product, for a unit query the model's retrieval score.

        Approximate indexes re-score ``candidates`` hits exactly against the float16
        vectors (see :func:`indexer.faiss_index.search_index`); fewer than ``k`` pairs come
        back only when the index holds fewer than ``k`` items. ``subset`` (item ids, e.g. from
        :meth:`indexer.filters.ItemFilter.select`) restricts the search to those items before
        the top ``k`` is taken; ``held`` is that subset kept in memory by a caller that searches
        it often (:func:`indexer.faiss_index.hold_subset`).
        """
        # never allocate result arrays beyond what the index holds (k <= 0 stays an error)
        k = min(int(k), max(1, len(self.items)))
        if candidates is not None:
            candidates = min(int(candidates), max(k, len(self.items)))
        scores, ids = search_index(
            self.index, query_vectors, k, rescore_vectors=self.vectors, candidates=candidates, subset=subset,
            held=held,
        )
        return [
            [(self.items[i], float(score)) for score, i in zip(score_row, id_row) if i >= 0]
            for score_row, id_row in zip(scores, ids)
        ]


def _memmap_npy(f: BinaryIO) -> np.ndarray:
    """``np.load(mmap_mode="r")`` for an already open file (np.load only takes paths)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if fortran_order or dtype != np.float16 or len(shape) != 2:
        raise ValueError(f"expected a C-ordered float16 matrix, got {dtype} {shape} fortran={fortran_order}")
    if 0 in shape:
        return np.zeros(shape, dtype=np.float16)
    return np.memmap(f, dtype=np.float16, mode="r", shape=shape, offset=f.tell())


def _open_optional(name: str, opener: Callable[[str, int], int], stack: contextlib.ExitStack) -> BinaryIO | None:
    try:
        return stack.enter_context(open(name, "rb", opener=opener))
    except FileNotFoundError:
        return None


def _read_jsonl(f: BinaryIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in f if line.strip()]


def _moved_away(path: Path, dir_fd: int) -> bool:
    """True when ``path`` no longer resolves to the directory behind ``dir_fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    opened = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def _swap_in_progress(path: Path) -> bool:
    """A writer is between moving a plain-directory index aside and linking the new one."""
    if os.path.lexists(path):
        return True  # a symlink whose version was just deleted: resolve again
    pattern = _temp_pattern(path.name)
    return path.parent.is_dir() and any(
        (m := pattern.match(entry.name)) and m.group(1) == "old" for entry in path.parent.iterdir()
    )


def _check_consistent(
    path: Path, manifest: dict, items: list, vectors: np.ndarray, index: faiss.Index
) -> None:
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a vtr index: {path}/{MANIFEST_FILE} has format {manifest.get('format')!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has index format {manifest['format_version']}, this vtr reads up to "
            f"{FORMAT_VERSION}: upgrade vtr"
        )
    counts = {
        "manifest counts.items": manifest["counts"]["items"],
        ITEMS_FILE: len(items),
        VECTORS_FILE: vectors.shape[0],
        INDEX_FILE: index.ntotal,
    }
    if len(set(counts.values())) != 1:
        raise ValueError(f"corrupt vtr index {path}: item counts disagree {counts}")
    dims = {"manifest dim": manifest["dim"], VECTORS_FILE: vectors.shape[1], INDEX_FILE: index.d}
    if len(set(dims.values())) != 1:
        raise ValueError(f"corrupt vtr index {path}: dims disagree {dims}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"corrupt vtr index {path}: {INDEX_FILE} is not an inner-product index")
    rows = range(len(items)) if isinstance(items, list) else sorted({0, len(items) - 1} - {-1})
    for row in rows:  # a lazily read items file is checked at its ends, not parsed whole
        item = items[row]
        if item.get("id") != row:
            raise ValueError(
                f"corrupt vtr index {path}: line {row + 1} of {ITEMS_FILE} has id {item.get('id')}"
            )


_DAMAGED_REMEDY = "rebuild the index (`vtr index ... --overwrite`) or restore it from a copy"


def _read_manifest(path: Path, handle: BinaryIO) -> dict[str, Any]:
    try:
        manifest = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{MANIFEST_FILE} in {path} is damaged ({error}); {_DAMAGED_REMEDY}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST_FILE} in {path} is damaged (not a JSON object); {_DAMAGED_REMEDY}")  # noqa: TRY004
    return manifest


def _verify_files(path: Path, manifest: dict[str, Any], files: Mapping[str, BinaryIO]) -> None:
    """Check every data file against the checksum the manifest records (indexes written before
    checksums were recorded have none and are read as they are)."""
    recorded = manifest.get("files") or {}
    for name in (*_DATA_FILES, IVF_DATA_FILE):
        if name in recorded and name in files:
            verify_handle(files[name], recorded[name], name, str(path), _DAMAGED_REMEDY)


def _open_snapshot(path: Path) -> IndexReader:
    snapshot_dir = Path(os.path.realpath(path))
    try:
        dir_fd = os.open(snapshot_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        if _swap_in_progress(path):
            raise _SnapshotVanished from None
        raise FileNotFoundError(f"not a vtr index: {path} does not exist") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"not a vtr index: {path} is not a directory") from None

    def opener(name: str, flags: int) -> int:
        return os.open(name, flags, dir_fd=dir_fd)

    with contextlib.ExitStack() as stack:
        # Open everything first, relative to the one directory handle: whatever happens to
        # INDEX afterwards, these handles all belong to the same version.
        try:
            files = {name: stack.enter_context(open(name, "rb", opener=opener)) for name in _INDEX_FILES}
            ivf_data = _open_optional(IVF_DATA_FILE, opener, stack)
        except FileNotFoundError as error:
            if _moved_away(path, dir_fd):
                raise _SnapshotVanished from None
            if error.filename == MANIFEST_FILE:
                raise FileNotFoundError(f"not a vtr index: no {MANIFEST_FILE} in {path}") from None
            raise FileNotFoundError(f"corrupt vtr index {path}: missing {error.filename}") from None
        finally:
            os.close(dir_fd)
        pointed = pointed_manifest_sha256(snapshot_dir)
        if pointed is not None:
            verify_handle(files[MANIFEST_FILE], {"sha256": pointed}, MANIFEST_FILE, str(path), _DAMAGED_REMEDY)
        manifest = _read_manifest(path, files[MANIFEST_FILE])
        _verify_files(path, manifest, {**files, IVF_DATA_FILE: ivf_data} if ivf_data else files)
        vectors = _memmap_npy(files[VECTORS_FILE])
        index = read_faiss_index(files[INDEX_FILE], ivf_data)
        items = read_items(files[ITEMS_FILE])  # parsed lazily when large
        failures = _read_jsonl(files[FAILURES_FILE])
    _check_consistent(path, manifest, items, vectors, index)
    return IndexReader(path, snapshot_dir, manifest, items, vectors, index, failures)


def _check_model(path: Path, manifest: dict, expect_model: Mapping[str, Any]) -> None:
    built = manifest["model"]
    if not same_model(built, expect_model):
        raise IndexModelMismatch(
            f"index {path} was built with model {built.get('name')!r} "
            f"(weights_sha256 {built.get('weights_sha256')}) but is being queried with model "
            f"{expect_model.get('name')!r} (weights_sha256 {expect_model.get('weights_sha256')}); "
            "re-index with this model or load the model the index was built with"
        )


def same_model(built: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether ``other`` is the model an index recorded as ``built``: its weights are (the
    sha256 of the weights file is the identity, so a copy of a model folder under another name
    is the same model); the names are compared only where a digest is missing. Keys of
    ``other`` that are None are not compared."""
    if other.get("weights_sha256") is not None and built.get("weights_sha256"):
        return other["weights_sha256"] == built["weights_sha256"]
    return other.get("name") is None or other.get("name") == built.get("name")


def open_index(
    path: str | os.PathLike[str],
    expect_model: Mapping[str, Any] | None = None,
    use_gpu: bool | None = False,
) -> IndexReader:
    """Open the index published at ``path`` read-only, as one consistent version.

    ``expect_model`` (``name`` and/or ``weights_sha256``; keys that are None are not
    compared) guards against querying with another model: a difference raises
    :class:`IndexModelMismatch` naming both. The FAISS search parameters stored in the
    manifest are applied; ``use_gpu`` moves the index to GPU (False by default: search over
    a built index is fast on CPU and the GPU is often busy training).

    Raises:
        FileNotFoundError: ``path`` is missing or has no manifest ("not a vtr index: ...").
        ValueError: the files disagree with each other or the format is newer than this code.
    """
    path = Path(path)
    for attempt in range(OPEN_ATTEMPTS):
        try:
            reader = _open_snapshot(path)
            break
        except _SnapshotVanished:
            logger.debug("index %s was republished while opening it; retrying", path)
            time.sleep(OPEN_RETRY_DELAY_S * (attempt + 1))
    else:
        raise FileNotFoundError(
            f"index {path} kept being republished while opening it ({OPEN_ATTEMPTS} tries)"
        )
    if expect_model:
        _check_model(path, reader.manifest, expect_model)
    reader.index = to_gpu_if_wanted(reader.index, reader.manifest["index_type"], use_gpu)
    apply_search_params(reader.index, reader.manifest.get("faiss_params", {}))
    return reader
