"""Fixtures shared by the indexer tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest


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
