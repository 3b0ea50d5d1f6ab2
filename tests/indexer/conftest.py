"""Fixtures shared by the indexer tests."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from retrieval.data.synthetic import generate_corpus
from retrieval.models.retrieval_model import build_retrieval_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained retrieval model directory (one per test module; modules that need
    another model define their own)."""
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=24, num_fusion_layers=1)
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six tiny synthetic test clips (``test/0000.mp4`` ... ``test/0005.mp4``) to copy corpora from."""
    root = tmp_path_factory.mktemp("pool")
    generate_corpus(root, n_train=1, n_test=6, size=32, long_videos=0, progress=False)
    return root / "videos"


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


def write_annotated_corpus(root: Path) -> tuple[Path, Path]:
    """A small synthetic corpus in two folders whose annotation carries a ``source`` field, two
    moments (1 s) among whole clips: what filters and exports are tested on. Returns
    ``(videos root, annotation file)``."""
    import json

    from retrieval.data.synthetic import generate_corpus

    generate_corpus(root, n_train=4, n_test=8, size=32, long_videos=0, progress=False)
    entries = []
    for name in ("test", "train"):
        for number, entry in enumerate(json.loads((root / f"{name}.json").read_text())):
            entry.pop("attributes", None)
            entry["source"] = "archive" if name == "train" else ("news" if number % 2 else "sport")
            entry["rating"] = number
            entries.append(entry)
    for entry in entries[:2]:
        entries.append({**entry, "start": 0.0, "end": 1.0, "source": "moment"})
    ann = root / "annotated.json"
    ann.write_text(json.dumps(entries))
    return root / "videos", ann


@pytest.fixture(scope="module")
def annotated_index(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of :func:`write_annotated_corpus` (14 items) built with ``model_dir``."""
    from indexer.jobs import JobSpec, run_index_job

    videos, ann = write_annotated_corpus(tmp_path_factory.mktemp("annotated"))
    out = tmp_path_factory.mktemp("annotated-index") / "index"
    run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos, ann_file=ann), workers=0, batch_size=8,
                  progress=False)
    return out
