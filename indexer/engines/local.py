"""The local engine: decode in DataLoader worker processes, encode in this process."""

from __future__ import annotations

from typing import Any


class LocalEngine:
    """Runs :func:`indexer.jobs._embed_parts` here: the default, and what ``--shard`` workers use."""

    name = "local"

    def __enter__(self) -> LocalEngine:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def embed_parts(self, *args: Any, **kwargs: Any) -> tuple[int, int, float]:
        from indexer.jobs import _embed_parts

        return _embed_parts(*args, **kwargs)
