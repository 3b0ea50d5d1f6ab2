"""Training recipes: YAML files checked against typed sections before anything runs.

A recipe has the sections ``model``, ``data``, ``loss``, ``optim`` and ``run``. Unknown keys and
values of the wrong type are errors that name the key; ``key=value`` overrides on the command
line use dotted paths (``optim.lr=1e-4``) and are parsed as YAML scalars. Every number must be
finite (YAML's ``.nan`` and ``.inf`` are refused wherever they appear) and every size within
its range, so a recipe that cannot train is refused before any data is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class RecipeError(ValueError):
    pass


@dataclass
class ModelSection:
    video: str = "videomamba_demo"            # a registered model name (configs/models)
    video_overrides: dict = field(default_factory=dict)
    text: Optional[str] = None                # local BERT directory; None = all-MiniLM-L6-v2
    num_fusion_layers: Optional[int] = 2      # new cross-attention layers on top of the text tower
    fusion_layer: Optional[int] = None        # or: turn layers k.. of the text tower into fusion layers
    embed_dim: int = 256
    max_text_len: int = 32
    init: Optional[str] = None                # start from this model directory instead
    text_dropout: Optional[float] = None      # override the text tower's dropout (0 for exact tests)
    text_pooling: str = "cls"                 # text feature: "cls" (official BERT) or "mean" (sentence towers)


@dataclass
class DataSection:
    train: str = ""                           # annotation file (VindLU JSON / JSONL / CSV)
    videos: str = ""                          # the folder its video paths are relative to
    dataset: str = "generic"                  # corpus preset (msrvtt, didemo, anet, lsmdc, msvd, generic)
    cache: bool = False                       # decode every clip and image once into memory (small corpora)
    frames_per_segment: int = 3
    reversed_share: float = 0.0               # add time-reversed copies (annotation caption_reversed) of this share of a batch
    workers: int = 0
    images: str = ""                          # image-caption pairs (VindLU JSON / JSONL / CSV): 1-frame clips
    image_root: str = ""                      # the folder their paths are relative to ("": the annotation's)
    image_batch_size: int = 0                 # global batch of image steps (0: optim.batch_size)


@dataclass
class LossSection:
    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 0.5
    uta: float = 0.0
    vtm_pairs: int = 0                        # VTM on the first n pairs of each local batch (0: all)
    mlm_prob: float = 0.5
    uta_teacher: Optional[str] = None         # open_clip checkpoint file, or a frame_clip model name / directory
    uta_teacher_arch: Optional[str] = None    # for a checkpoint file: its model config (default clip_teacher_b16)
    uta_mask_ratio: float = 0.8               # share of each frame's patches dropped (videos)
    uta_image_mask_ratio: float = 0.5         # the same for image steps (1-frame clips)
    uta_mask: str = "sample"                  # "sample" (official: multinomial over attention) or "topk"
    action: float = 0.0                       # supervised action head on the clip vector (annotation "label")
    action_labels: str = ""                   # its label set: a named set or file ("": the corpus's labels, sorted)


@dataclass
class OptimSection:
    lr: float = 3e-4
    text_lr_scale: float = 0.2                # the pretrained text tower learns slower
    weight_decay: float = 0.05
    warmup_steps: int = 20
    steps: int = 300
    batch_size: int = 32                      # global batch (split over processes)
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    freeze_text_embeddings: bool = False     # keep the (large) word-embedding table fixed: faster steps
    freeze_text_layers: int = 0              # also freeze text layers 0..k-1; their outputs are cached per caption


@dataclass
class RunSection:
    out: str = "runs/train"
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    progress: bool = True
    device: str = "auto"                      # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    precision: str = "fp32"                   # fp32 | bf16 | fp16 (CUDA, with a gradient scaler) | auto


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that determines the trajectory (not where it is written or logged)."""
        d = self.to_dict()
        d["run"] = {"seed": d["run"]["seed"], "precision": d["run"]["precision"]}
        d["data"].pop("workers")
        # the options of a part that is off cannot change the trajectory
        if not self.data.images:
            for key in ("image_root", "image_batch_size"):
                d["data"].pop(key)
        if not self.loss.uta:
            for key in ("uta_teacher_arch", "uta_image_mask_ratio", "uta_mask"):
                d["loss"].pop(key)
        if not self.loss.action:
            d["loss"].pop("action_labels")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinity anywhere in ``value`` (a loss weight of ``.nan`` trains a NaN model)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"recipe key {where} must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_finite(item, where)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    _check_finite(value, where)
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            _check_finite(number, where)
            return number
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"recipe key {where}: expected {getattr(tp, '__name__', tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _section(cls, values: dict[str, Any], name: str):
    if not isinstance(values, dict):
        raise RecipeError(f"recipe section {name!r} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"known in {name!r}: {', '.join(sorted(known))}")
    return cls(**{k: _check_type(v, hints[k], f"{name}.{k}") for k, v in values.items()})


def _apply_override(tree: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {item[:80]!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    except RecursionError:
        raise RecipeError(f"override {key.strip()[:80]!r}: the value is nested too deeply") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path} is not valid YAML ({_yaml_problem(exc)})") from None
        except UnicodeDecodeError:
            raise RecipeError(f"{path} is not a text file (a recipe is YAML)") from None
        except RecursionError:
            raise RecipeError(f"{path} is nested too deeply to be a recipe") from None
        if not isinstance(tree, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections")
    for item in overrides:
        _apply_override(tree, item)
    sections = {f.name: f.type for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    hints = typing.get_type_hints(Recipe)
    recipe = Recipe(**{name: _section(hints[name], tree.get(name, {}), name) for name in sections})
    _validate(recipe)
    return recipe


def _validate(r: Recipe) -> None:
    if not r.data.train:
        raise RecipeError("recipe key data.train (the training annotation file) is required")
    for key, least in (("model.embed_dim", 1), ("model.max_text_len", 3), ("model.num_fusion_layers", 0),
                       ("model.fusion_layer", 0), ("data.frames_per_segment", 1), ("data.workers", 0)):
        section, name = key.split(".")
        value = getattr(getattr(r, section), name)
        if value is not None and value < least:
            raise RecipeError(f"{key} must be >= {least}, got {value}")
    if r.model.text_dropout is not None and not 0 <= r.model.text_dropout < 1:
        raise RecipeError(f"model.text_dropout must be in [0, 1), got {r.model.text_dropout}")
    if not (0 < r.loss.mlm_prob <= 1 if r.loss.mlm else 0 <= r.loss.mlm_prob <= 1):
        raise RecipeError(f"loss.mlm_prob (the share of caption tokens masked) must be in (0, 1], "
                          f"got {r.loss.mlm_prob}")
    for name in ("vtc", "vtm", "mlm", "uta", "action"):
        if getattr(r.loss, name) < 0:
            raise RecipeError(f"loss.{name} must be >= 0")
    if not any(getattr(r.loss, n) for n in ("vtc", "vtm", "mlm", "uta", "action")):
        raise RecipeError("every loss weight is 0: nothing to train")
    if r.loss.action_labels and not r.loss.action:
        raise RecipeError("loss.action_labels is set but loss.action (the action head's weight) is 0")
    if r.loss.uta and not r.loss.uta_teacher:
        raise RecipeError("loss.uta > 0 needs loss.uta_teacher (a model name or directory)")
    from ..models.device import PRECISIONS  # noqa: PLC0415

    if r.run.precision not in PRECISIONS:
        raise RecipeError(f"run.precision must be one of {', '.join(PRECISIONS)}; got {r.run.precision!r}")
    if r.optim.batch_size < 2 or r.optim.steps < 1:
        raise RecipeError("optim.batch_size must be >= 2 and optim.steps >= 1")
    if not r.optim.lr > 0 or r.optim.lr == float("inf"):
        raise RecipeError(f"optim.lr must be a positive number, got {r.optim.lr}")
    if r.optim.warmup_steps < 0:
        raise RecipeError(f"optim.warmup_steps must be >= 0, got {r.optim.warmup_steps}")
    for name in ("text_lr_scale", "weight_decay", "grad_clip"):
        value = getattr(r.optim, name)
        if not value >= 0:
            raise RecipeError(f"optim.{name} must be >= 0, got {value}")
    for name in ("save_every", "log_every"):
        if getattr(r.run, name) < 1:
            raise RecipeError(f"run.{name} must be >= 1 (steps between {name.split('_')[0]}s), "
                              f"got {getattr(r.run, name)}")
    if not 0 <= r.data.reversed_share <= 1:
        raise RecipeError("data.reversed_share must be in [0, 1]")
    if r.loss.vtm_pairs < 0:
        raise RecipeError("loss.vtm_pairs must be >= 0 (0: every pair)")
    if r.optim.freeze_text_layers < 0:
        raise RecipeError("optim.freeze_text_layers must be >= 0")
    for key in ("uta_mask_ratio", "uta_image_mask_ratio"):
        if not 0 < getattr(r.loss, key) < 1:
            raise RecipeError(f"loss.{key} must be in (0, 1)")
    if r.loss.uta_mask not in ("sample", "topk"):
        raise RecipeError(f"loss.uta_mask must be 'sample' (official) or 'topk', got {r.loss.uta_mask!r}")
    if r.data.image_batch_size < 0 or r.data.image_batch_size == 1:
        raise RecipeError("data.image_batch_size must be >= 2 (0: optim.batch_size)")
    if not r.data.images and (r.data.image_root or r.data.image_batch_size):
        raise RecipeError("data.image_root / data.image_batch_size are set but data.images (the image "
                          "annotation file) is not")


def image_batch_size(r: Recipe) -> int:
    """The global batch of image steps."""
    return r.data.image_batch_size or r.optim.batch_size
