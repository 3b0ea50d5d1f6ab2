"""The model directory: ``config.json`` + ``model.safetensors`` (+ tokenizer files).

``config.json`` holds ``{"format": "vtr-model", "version": 1, "kind": ..., "model": {arch config},
"preprocess": {...}, "source": {...}}``. ``kind`` says which loader rebuilds the module:
``"video_encoder"`` (a registered backbone) here; later kinds register themselves with
:func:`register_kind`. Nothing is unpickled: weights come from safetensors only.

Tied weights (the MLM decoder shares the word embeddings) are stored once: safetensors'
``save_model`` drops the other names of a shared tensor and ``load_model`` fills them through the
module's own tie, so a loaded model trains with the tie intact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from ..atomic import atomic_path, move_into, staging_dir
from ..data.corpora import DEFAULT_CAPTION_CLEANING
from .registry import build_from_config

FORMAT = "vtr-model"
VERSION = 1
_KINDS: dict[str, Callable[[Path, dict], Any]] = {}
_KIND_MODULES = {"retrieval": ("retrieval.models.retrieval_model",), "hf_timesformer": ("retrieval.models.timesformer",)}
# Hugging Face model directories that load as they are (config.json "model_type" -> vtr kind)
HF_KINDS = {"timesformer": "hf_timesformer"}
#: The files a saved Hugging Face tokenizer may consist of (replaced together with the weights).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class ModelDirError(ValueError):
    pass


class CheckpointError(ValueError):
    """An official or foreign checkpoint that does not map onto a vtr model (raised by the models'
    ``checkpoint_filter_fn`` / ``infer_config_from_state`` and by ``retrieval.models.convert``)."""


def register_kind(kind: str):
    def deco(fn):
        _KINDS[kind] = fn
        return fn

    return deco


def _raise_mismatch(what: str, missing: list[str], unexpected: list[str], bad_shape: list[str]) -> None:
    if missing or unexpected or bad_shape:
        lines = [f"{what}: the weights do not match the architecture"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title} keys: {shown}")
        raise ModelDirError("\n".join(lines))


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                allowed_missing: tuple[str, ...] = ()) -> None:
    """load_state_dict that fails loudly: every missing/unexpected key and shape mismatch listed."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(allowed_missing)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in state if k in own and state[k].shape != own[k].shape]
    _raise_mismatch(what, missing, unexpected, bad_shape)
    module.load_state_dict(state, strict=False)


def weights_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model_dir(module: torch.nn.Module, out: str | Path, kind: str, model_cfg: dict[str, Any],
                   preprocess: dict[str, Any], source: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None,
                   extra_files: Callable[[Path], Any] | None = None) -> Path:
    """Write config.json + model.safetensors (weights first, config last: config marks it complete),
    and the files ``extra_files(folder)`` writes into a folder (a tokenizer's), stale copies of
    :data:`TOKENIZER_FILES` it no longer writes removed.

    Every file is written whole under a temporary name before any replaces a previous model's,
    so a full disk (``OSError(ENOSPC)``) leaves the previous model, tokenizer included, as it was:
    the new files then switch in by renames (extra files, weights, config)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"format": FORMAT, "version": VERSION, "kind": kind, "model": model_cfg,
           "preprocess": preprocess, "source": source or {}}
    if extra:
        cfg.update(extra)
    with contextlib.ExitStack() as stack:
        staged = stack.enter_context(staging_dir(out)) if extra_files is not None else None
        if staged is not None:
            extra_files(staged)
        # leaving the blocks renames the weights first, then the config
        config = stack.enter_context(atomic_path(out / "config.json"))
        weights = stack.enter_context(atomic_path(out / "model.safetensors"))
        save_safetensors_model(module, str(weights), force_contiguous=True)  # a tied weight is stored once, under one of its names
        config.write_text(json.dumps(cfg, indent=2, sort_keys=False))
        if staged is not None:
            written = move_into(staged, out)
            for stale in set(TOKENIZER_FILES) - set(written):
                (out / stale).unlink(missing_ok=True)
    return out


def check_model_out(out: str | Path, overwrite: bool = False) -> None:
    """Refuse to write a model directory over one that exists (unless ``overwrite``), or into a
    file or a non-empty folder of other files (checked before any work)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelDirError(f"{out} is a file, not a model directory; choose another output path")
    names = {entry.name for entry in out.iterdir()}
    if names & {"config.json", "model.safetensors"}:
        if overwrite:
            return
        raise ModelDirError(f"{out} already holds a model (config.json / model.safetensors); pass --overwrite "
                            "to replace its weights, or choose another output directory")
    if names and not overwrite:
        raise ModelDirError(f"{out} is a non-empty folder that is not a model directory; choose another output "
                            "directory (or pass --overwrite to write the model files beside its contents)")


def read_model_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg_path = path / "config.json"
    if not path.is_dir() or not cfg_path.is_file():
        raise ModelDirError(f"{path} is not a vtr model directory (expected config.json + model.safetensors; "
                            "make one with `vtr convert` or `vtr train`)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT and cfg.get("model_type") in HF_KINDS:
        return _hf_model_config(path, cfg)
    if cfg.get("format") != FORMAT:
        raise ModelDirError(f"{cfg_path} is not a vtr model config (format {cfg.get('format')!r}); "
                            "Hugging Face or official checkpoints must be converted with `vtr convert` first")
    return cfg


def _hf_model_config(path: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """A vtr config for a local Hugging Face directory that loads as it is (see ``HF_KINDS``): the
    kind's loader reads the directory itself; preprocessing is the family's (TimeSformer: frames at
    the config's size, mean 0.45 / std 0.225 as its official pipeline)."""
    kind = HF_KINDS[hf["model_type"]]
    if not any((path / f).is_file() for f in _HF_WEIGHTS):
        raise ModelDirError(f"{path}: a Hugging Face {hf['model_type']} directory without weights "
                            f"({' or '.join(_HF_WEIGHTS)})")
    size, frames = int(hf.get("image_size", 224)), int(hf.get("num_frames", 8))
    preprocess = {"size": size, "num_frames": frames, "mean": [0.45] * 3, "std": [0.225] * 3,
                  "interpolation": "bilinear"}
    return {"format": FORMAT, "version": VERSION, "kind": kind,
            "model": {"arch": hf["model_type"], "name": path.resolve().name, "hf_dir": str(path)},
            "preprocess": preprocess, "source": {"hf_dir": str(path.resolve())}}


def weights_file(path: str | Path) -> Path:
    """The weights file of a model directory (a Hugging Face one may hold pytorch_model.bin)."""
    path = Path(path)
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise ModelDirError(f"{path}: model.safetensors is missing")


def _shared_names(module: torch.nn.Module) -> dict[str, set[str]]:
    """Each state-dict name of ``module`` -> every name sharing its storage (itself included)."""
    groups: dict[tuple, set[str]] = {}
    for name, tensor in module.state_dict().items():
        if tensor.device.type != "meta" and tensor.untyped_storage().data_ptr() != 0:
            groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), set()).add(name)
    return {name: group for group in groups.values() for name in group}


def load_weights_into(module: torch.nn.Module, path: str | Path, what: str | None = None) -> None:
    """Load a model directory's weights into ``module``, strictly.

    The file's names and shapes (its header) are checked against the module first, so a mismatch
    is a :class:`ModelDirError` listing every missing/unexpected key and wrong shape (as
    :func:`strict_load`); a name the file lacks is fine when the module ties it to one the file
    holds. The weights are then read with safetensors' ``load_model``, which fills tied weights
    through the module's own tie.
    """
    f = Path(path) / "model.safetensors"
    what = what or str(path)
    if not f.is_file():
        raise ModelDirError(f"{path}: model.safetensors is missing")
    if f.stat().st_size == 0:
        raise ModelDirError(f"{f} is empty (0 bytes); copy the model directory again or re-create it "
                            "with `vtr convert` / `vtr train`")
    damaged = (f"{f} is damaged or truncated ({{}}); copy the model directory again or re-create it "
               "with `vtr convert` / `vtr train`")
    try:
        with safe_open(str(f), framework="pt") as fh:
            names = fh.keys()  # a safe_open handle: keys() is its only listing
            stored = {name: tuple(fh.get_slice(name).get_shape()) for name in names}
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own SafetensorError for bad files)
        raise ModelDirError(damaged.format(f"{type(exc).__name__}: {exc}")) from None
    own = module.state_dict()
    shared = _shared_names(module)
    missing = [k for k in own if k not in stored
               and not any(other in stored for other in shared.get(k, ()))]
    unexpected = [k for k in stored if k not in own]
    bad_shape = [f"{k}: checkpoint {stored[k]} vs model {tuple(own[k].shape)}"
                 for k in stored if k in own and stored[k] != tuple(own[k].shape)]
    _raise_mismatch(what, missing, unexpected, bad_shape)
    try:
        load_safetensors_model(module, str(f), strict=True)
    except SafetensorError as exc:
        raise ModelDirError(damaged.format(f"{type(exc).__name__}: {exc}")) from None
    except RuntimeError as exc:  # a name the check above let through is not filled after all
        raise ModelDirError(f"{what}: the weights do not match the architecture: {exc}") from None


def text_cleaning_of(cfg: dict[str, Any]) -> str:
    """The caption cleaning a model's ``config.json`` (as :func:`read_model_config` reads it) names
    for its text tower (the default for directories written before the setting existed)."""
    return cfg.get("model", {}).get("text_cleaning", DEFAULT_CAPTION_CLEANING)


def model_identity(path: str | Path) -> dict[str, Any]:
    """What an index records about the model that built it."""
    cfg = read_model_config(path)
    identity = {"name": cfg.get("model", {}).get("name") or Path(path).resolve().name,
                "kind": cfg["kind"],
                "weights_sha256": weights_hash(weights_file(path)),
                "preprocess": cfg.get("preprocess", {})}
    if cfg["kind"] == "retrieval":  # text vectors depend on how queries and captions are cleaned
        identity["text_cleaning"] = text_cleaning_of(cfg)
    return identity


@register_kind("video_encoder")
def _load_video_encoder(path: Path, cfg: dict[str, Any]):
    model = build_from_config(cfg["model"])
    load_weights_into(model, path)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32"):
    """Load any vtr model directory; returns the module in eval mode on ``device`` (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``), its inference precision (``auto``, ``fp32``, ``bf16``, ``fp16``) recorded
    for the callers' autocast (:func:`retrieval.models.device.model_autocast`)."""
    from .device import resolve_device, resolve_precision  # noqa: PLC0415

    dev = resolve_device(device)  # a missing CUDA fails here, before the weights are read
    prec = resolve_precision(precision, dev)
    path = Path(path)
    cfg = read_model_config(path)
    kind = cfg.get("kind")
    if kind not in _KINDS:
        import importlib  # noqa: PLC0415

        # kinds defined in other modules register when those are imported
        for mod in _KIND_MODULES.get(kind, ()):
            importlib.import_module(mod)
    if kind not in _KINDS:
        raise ModelDirError(f"{path}: unknown model kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    model = _KINDS[kind](path, cfg)
    model.vtr_dir = str(path)
    model.vtr_precision = prec
    return model.to(dev).eval()
