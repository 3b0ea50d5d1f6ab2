"""Who runs an indexing job's embed loop: this process (``local``) or a Ray cluster (``ray``).

An engine turns the parts a job still has to do into committed parts (see :mod:`indexer.jobs`
for the plan, the parts and what "committed" means). Both engines commit every part the same
way and from the driver process, so the index does not depend on the engine that built it.

An engine is a context manager: entering it acquires what it needs (the Ray engine connects
to or starts a cluster, failing with one line before any work when it cannot), leaving it
releases that again.
"""

from __future__ import annotations

from typing import Any

ENGINES = ("local", "ray")


def make_engine(name: str, **options: Any):
    """The engine called ``name`` ("local" or "ray"); ``options`` go to the Ray engine.

    Raises:
        ValueError: an unknown engine name, or options given to the local engine.
    """
    if name == "local":
        given = {key: value for key, value in options.items() if value is not None}
        if given:
            raise ValueError(f"{', '.join(sorted(given))} only apply to --engine ray")
        from indexer.engines.local import LocalEngine

        return LocalEngine()
    if name == "ray":
        from indexer.engines.ray import RayEngine

        return RayEngine(**options)
    raise ValueError(f"unknown --engine {name!r}; choose one of: {', '.join(ENGINES)}")
