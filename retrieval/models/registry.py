"""Model registry: architecture names -> YAML config files -> modules; the named label sets beside them.

Every named model is a YAML file under ``configs/models/`` (``$VTR_CONFIG_DIR`` overrides the
root). Its ``arch`` key names a builder registered with :func:`register_arch`; the remaining keys
are the builder's keyword arguments. ``create_model(name, **overrides)`` merges overrides into the
file's values, so ``create_model("videomamba_tiny", num_frames=16)`` is one call.

Families with published sizes (joint_vit, uniformer, timesformer) build as timm does: a builder
takes ``size`` and keyword arguments and calls the module with ``dict(preset, **kwargs)``
(:func:`merge_size_preset`), so the constructor's parameters are written once.

Builder modules are imported lazily (``_ARCH_MODULES``) so that asking for VideoMamba does not
import transformers or open_clip.

The video-encoder interface every backbone follows: ``forward(video [B, C, T, H, W])`` returns
``{"tokens": [B, L, D], "pooled": [B, D] or [B, T, D]}`` and the module has ``embed_dim`` (D) and
``keep_temporal`` (whether ``pooled`` keeps frames) attributes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import yaml

_BUILDERS: dict[str, Callable[..., Any]] = {}

# arch name -> module that registers it (imported on first use)
_ARCH_MODULES = {
    "videomamba": "retrieval.models.videomamba",
    "timesformer": "retrieval.models.timesformer",
    "frame_clip": "retrieval.models.frame_clip",
    "joint_vit": "retrieval.models.joint_vit",
    "uniformer": "retrieval.models.uniformer",
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def config_root() -> Path:
    """The folder of model configs, recipes and label sets: ``$VTR_CONFIG_DIR`` when set, else the
    installed ``vtr_configs`` package (the checkout's ``configs/``, shipped in the wheel)."""
    env = os.environ.get("VTR_CONFIG_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("vtr_configs")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    return Path(__file__).resolve().parents[2] / "configs"   # a checkout that was never installed


def register_arch(name: str):
    """Decorator: ``@register_arch("videomamba") def build(**cfg) -> nn.Module``."""

    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def merge_size_preset(family: str, sizes: dict[str, dict[str, Any]], size: str | None,
                      kwargs: dict[str, Any]) -> dict[str, Any]:
    """``dict(preset, **kwargs)`` for a named ``size`` of ``sizes`` (timm's variant presets).

    A keyword argument overrides the preset's value; ``None`` for a preset key keeps the preset's
    value. ``size=None`` has no preset: then every preset key must be given.

    Raises:
        ValueError: an unknown size, or a preset key missing with ``size=None``.
    """
    if size is not None and size not in sizes:
        raise ValueError(f"unknown {family} size {size!r}; known: {', '.join(sizes)} or None")
    preset = sizes[size] if size is not None else {}
    keys = list(next(iter(sizes.values())))
    merged = dict(preset, **{k: v for k, v in kwargs.items() if not (k in keys and v is None)})
    missing = [k for k in keys if merged.get(k) is None]
    if missing:
        raise ValueError(f"{family} with size=None needs {', '.join(missing)}")
    return merged


def _builder(arch: str):
    if arch not in _BUILDERS and arch in _ARCH_MODULES:
        importlib.import_module(_ARCH_MODULES[arch])
    if arch not in _BUILDERS:
        known = sorted(set(_BUILDERS) | set(_ARCH_MODULES))
        raise UnknownModelError(f"unknown architecture {arch!r}; known: {', '.join(known)}")
    return _BUILDERS[arch]


def list_models() -> list[str]:
    """Names of every model config under ``configs/models``."""
    root = config_root() / "models"
    return sorted(p.stem for p in root.glob("*.yaml"))


def model_config(name: str) -> dict[str, Any]:
    """The config dict of a named model (``arch`` + hyper-parameters)."""
    path = config_root() / "models" / f"{name}.yaml"
    if not path.is_file():
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    with open(path) as fh:
        cfg = yaml.safe_load(fh) or {}
    if "arch" not in cfg:
        raise ValueError(f"{path}: model config has no 'arch' key")
    return cfg


def build_from_config(cfg: dict[str, Any]):
    """Build a module from a config dict with an ``arch`` key (as stored in a model directory)."""
    full = dict(cfg)
    kwargs = dict(cfg)
    arch = kwargs.pop("arch")
    kwargs.pop("name", None)
    builder = _builder(arch)
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(f"bad config for architecture {arch!r}: {exc}") from exc
    model.vtr_config = full
    return model


def create_model(name: str, **overrides):
    """Build the named model with its config values, ``overrides`` taking precedence."""
    cfg = model_config(name)
    cfg.update(overrides)
    model = build_from_config(cfg)
    model.vtr_name = name
    return model


# -- label sets: named ones ship beside the model configs (configs/labels/<name>.txt) -------------
NAMED_LABEL_SETS: tuple[str, ...] = ("kinetics400", "synthetic")


def label_sets_dir() -> Path:
    """The named label sets: ``labels/`` under :func:`config_root`."""
    return config_root() / "labels"


def load_labels(spec: str | os.PathLike[str]) -> list[str]:
    """A label list: a named set (``kinetics400``, ``synthetic``) or a text file, one label a line.

    Blank lines and surrounding whitespace are ignored.

    Raises:
        FileNotFoundError: neither a named set nor an existing file.
        ValueError: the file holds no labels, or a label twice.
    """
    name = str(spec)
    path = label_sets_dir() / f"{name}.txt" if name in NAMED_LABEL_SETS else Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"labels {name!r}: not a named set ({', '.join(NAMED_LABEL_SETS)}) "
                                f"nor a file (one label per line)")
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"label file {path} has no labels (expected one label per line)")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"label file {path} lists some labels twice: {duplicates[:5]}")
    return labels
