"""Fixtures shared by the indexer tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from retrieval.models.retrieval_model import build_retrieval_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained retrieval model directory (one per test module; modules that need
    another model define their own)."""
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=24, num_fusion_layers=1)
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


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
