"""Fixtures shared by the indexer tests."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import pytest

from indexer.jobs import JobSpec, run_index_job


@pytest.fixture(scope="session")
def pool(synthetic_corpus: Path) -> Path:
    """Tiny synthetic test clips (``test/0000.mp4`` ... ``test/0007.mp4``) to copy corpora from."""
    return synthetic_corpus / "videos"


@pytest.fixture()
def one_faiss_thread() -> Iterator[None]:
    """Tiny indexes: OpenMP threads only add contention on a shared machine (3x slower)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture()
def corpus_of(tmp_path: Path, pool: Path) -> Callable[[list[str]], Path]:
    """``corpus_of(names)``: copies those clips of the pool into ``tmp_path / "videos"`` (kept
    across calls, so a second call adds to the folder) and returns that folder."""

    def copy(names: list[str]) -> Path:
        root = tmp_path / "videos"
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(pool / name, root / name)
        return root

    return copy


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray cluster (2 CPUs) for the whole test session: starting Ray takes tens of
    seconds on a busy machine, so every Ray test shares it. Ray is the ``ray`` extra, which
    ``make install`` installs."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def write_annotated_corpus(corpus: Path, out: Path) -> Path:
    """An annotation of ``corpus``'s 4 train and 8 test clips (a :func:`synthetic_corpus`) whose
    entries carry a ``source`` field, plus two moments (1 s) among whole clips: what filters and
    exports are tested on. Written to ``out``; returns its path."""
    entries = []
    for name in ("test", "train"):
        for number, entry in enumerate(json.loads((corpus / f"{name}.json").read_text())):
            entry.pop("attributes", None)
            entry["source"] = "archive" if name == "train" else ("news" if number % 2 else "sport")
            entry["rating"] = number
            entries.append(entry)
    for entry in entries[:2]:
        entries.append({**entry, "start": 0.0, "end": 1.0, "source": "moment"})
    out.write_text(json.dumps(entries))
    return out


@pytest.fixture(scope="session")
def annotated_ann(synthetic_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`write_annotated_corpus` of the session's corpus."""
    return write_annotated_corpus(synthetic_corpus, tmp_path_factory.mktemp("annotated") / "annotated.json")


@pytest.fixture(scope="session")
def annotated_index(synthetic_corpus: Path, annotated_ann: Path, model_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of :func:`annotated_ann` (14 items) built with ``model_dir``."""
    ann = annotated_ann
    out = tmp_path_factory.mktemp("annotated-index") / "index"
    run_index_job(JobSpec(model_dir=model_dir, out=out, videos=synthetic_corpus / "videos", ann_file=ann),
                  workers=0, batch_size=8, progress=False)
    return out
