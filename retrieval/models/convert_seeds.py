"""Conversions of the other seed families' official weights into vtr model directories.

* ``timesformer``: a local Hugging Face directory (``TimesformerModel`` or
  ``TimesformerForVideoClassification``); such a directory also loads as it is wherever a model
  directory is expected (see ``retrieval.models.model_dir.HF_KINDS``).
* ``uniformer``: Sense-X/UniFormer video checkpoints (``retrieval.models.uniformer``).
* ``vim``: hustvl/Vim image checkpoints (``retrieval.models.vim``).

Every conversion is strict: a key that is neither used nor dropped by name is an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMATS = ("timesformer", "uniformer", "vim")


def convert(fmt: str, checkpoint: str | Path, out: str | Path, *, num_frames: int | None = None,
            head_dim: int = 64, name: str | None = None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported here: {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if fmt == "timesformer":
        from .timesformer import convert_timesformer  # noqa: PLC0415

        return convert_timesformer(checkpoint, out, num_frames=num_frames, name=name)
    if fmt == "uniformer":
        from .uniformer import convert_uniformer  # noqa: PLC0415

        return convert_uniformer(checkpoint, out, num_frames=num_frames, head_dim=head_dim, name=name)
    from .vim import convert_vim  # noqa: PLC0415

    if num_frames not in (None, 1):
        raise ValueError("Vim is an image model: --num-frames does not apply")
    return convert_vim(checkpoint, out, name=name)


def describe(path: str | Path) -> str:
    """One line about a converted model directory."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    m: dict[str, Any] = cfg["model"]
    bits = [m["arch"]]
    for key in ("embed_dim", "depth", "num_frames", "img_size"):
        if key in m:
            bits.append(f"{key}={m[key]}")
    if "hf_config" in m:
        hc = m["hf_config"]
        bits.append(f"D={hc.get('hidden_size')} depth={hc.get('num_hidden_layers')} frames={hc.get('num_frames')}")
    n = m.get("num_classes") or len(m.get("id2label") or [])
    if n:
        bits.append(f"head {n} classes")
    return " ".join(str(b) for b in bits)
