"""vtr's library: video/text encoders, data, training and evaluation.

The names below are imported lazily so ``import retrieval`` stays cheap.
"""
from __future__ import annotations

__all__ = ["create_model", "list_models", "load_model"]


def __getattr__(name: str):
    if name in ("create_model", "list_models"):
        from .models import registry  # noqa: PLC0415

        return getattr(registry, name)
    if name == "load_model":
        from .models.model_dir import load_model  # noqa: PLC0415

        return load_model
    raise AttributeError(name)
