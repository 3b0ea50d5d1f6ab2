"""Action labels for clips: zero-shot from label prompts, or a checkpoint's supervised head.

Zero-shot classification treats each label as a set of captions ("a video of a person
{label}.", ...): a label's text feature is the normalised mean of its prompts' normalised
features (a prompt ensemble, which is steadier than any single template), and a clip's class
probabilities are ``softmax(similarity / temp)`` with the model's own contrastive temperature,
the scale the similarities were trained at.

A retrieval model trained with ``loss.action`` carries an action head on its clip vector
(``action_labels``); ``source="head"`` uses it. Its input is the vector an index stores, so it
labels stored vectors as well as fresh clips. Some video encoders carry a supervised classifier
of their own (VideoMamba fine-tuned on Kinetics-400, a TimeSformer from a fine-tuned Hugging
Face checkpoint); ``source="supervised"`` uses it with its own label list. ``"auto"`` prefers a
head whose classes are the requested ones (the retrieval model's first), and falls back to
zero-shot prompts for any other label set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from retrieval.data.video import Preprocess, load_clip
from retrieval.models.device import evaluating, model_device
from retrieval.models.registry import load_labels

Source = Literal["zero-shot", "head", "supervised", "auto"]
SOURCES: tuple[str, ...] = ("auto", "head", "zero-shot", "supervised")
# (label, probability) pairs, most probable first
Ranking = list[tuple[str, float]]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a video of a person {label}.",
    "a video of {label}.",
    "a person is {label}.",
    "a clip showing {label}.",
    "{label}",
)
# the official training clamp of the contrastive temperature
_TEMP_RANGE = (0.001, 0.5)
_PROMPT_BATCH = 64


def _head_classes(encoder: torch.nn.Module) -> int | None:
    """Number of classes of the encoder's supervised head, or None when it has none."""
    if not callable(getattr(encoder, "classify", None)):
        return None
    for attribute in ("head", "classifier"):  # VideoMamba / TimeSformer
        head = getattr(encoder, attribute, None)
        if isinstance(head, torch.nn.Linear):
            return head.out_features
    return None


def _action_head_labels(model: torch.nn.Module) -> list[str]:
    """The labels of a retrieval model's action head ([] when it has none)."""
    if getattr(model, "action_head", None) is None:
        return []
    return list(getattr(model, "action_labels", []) or [])


def _same_label_set(labels: Sequence[str] | None, head: Sequence[str]) -> bool:
    return not labels or (len(labels) == len(head) and set(labels) == set(head))


def label_source(model: torch.nn.Module, labels: Sequence[str] | None, source: Source = "auto") -> str:
    """Which source an :class:`ActionClassifier` of ``model`` and ``labels`` would use
    (``"head"``, ``"zero-shot"`` or ``"supervised"``), without encoding any prompt."""
    return ActionClassifier._resolve(model, getattr(model, "video", model), labels, source)


def _can_zero_shot(model: torch.nn.Module) -> bool:
    return all(callable(getattr(model, name, None)) for name in ("encode_texts", "encode_video", "similarity"))


class ActionClassifier:
    """Ranks labels for clips, zero-shot (prompt ensembles) or with the encoder's supervised head.

    Args:
        model: a RetrievalModel (zero-shot, or the supervised head of its ``video`` encoder) or a
            bare video encoder with a head.
        labels: the label names. Zero-shot needs them; the supervised head uses the checkpoint's
            ``id2label`` when it has one, else these (their count must match the head).
        prompts: templates with ``{label}``; each label's feature averages all of them.
        source: ``"zero-shot"``, ``"head"`` (the retrieval model's action head),
            ``"supervised"`` (the video encoder's own head), or ``"auto"``: the action head when
            ``labels`` is absent or its label set; else the encoder's head when it exists and
            ``labels`` is absent or has its class count (or there is no text tower); otherwise
            zero-shot.
    """

    def __init__(self, model: torch.nn.Module, labels: Sequence[str] | None = None,
                 prompts: Sequence[str] = DEFAULT_PROMPTS, source: Source = "auto") -> None:
        self.model = model
        self.encoder = getattr(model, "video", model)
        self.source = self._resolve(model, self.encoder, labels, source)
        self._label_feat: torch.Tensor | None = None
        if self.source == "head":
            self.labels = _action_head_labels(model)
        elif self.source == "supervised":
            self.labels = self._supervised_labels(labels)
        else:
            self.labels = list(labels)
            self.prompts = list(prompts)
            if not self.prompts or any("{label}" not in prompt for prompt in self.prompts):
                raise ValueError(f"every prompt must contain '{{label}}', got {self.prompts}")
            self._label_feat = self._encode_labels()
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("the label list has duplicates")

    @staticmethod
    def _resolve(model: torch.nn.Module, encoder: torch.nn.Module, labels: Sequence[str] | None,
                 source: Source) -> str:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        head = _action_head_labels(model)
        if source == "head":
            if not head:
                raise ValueError("this model has no action head (a recipe with loss.action > 0 trains one); "
                                 "use zero-shot labels")
            if not _same_label_set(labels, head):
                raise ValueError(f"the action head knows {len(head)} labels ({', '.join(head[:4])}, ...), not "
                                 "the requested set; use zero-shot labels for other label sets")
            return "head"
        if source == "auto" and head and _same_label_set(labels, head):
            return "head"
        classes = _head_classes(encoder)
        zero_shot = _can_zero_shot(model)
        if source == "supervised" and classes is None:
            raise ValueError(f"{type(encoder).__name__} has no supervised classification head")
        if source == "zero-shot":
            if not zero_shot:
                raise ValueError("zero-shot labels need a retrieval model with a text tower; this is a "
                                 f"bare {type(model).__name__}")
            if not labels:
                raise ValueError("zero-shot classification needs a label list")
        if source != "auto":
            return source
        if classes is not None and (not zero_shot or not labels or len(labels) == classes):
            return "supervised"
        if not zero_shot:
            raise ValueError(f"{type(model).__name__} has neither a supervised head nor a text tower "
                             "to classify with")
        if not labels:
            raise ValueError("zero-shot classification needs a label list")
        return "zero-shot"

    def _supervised_labels(self, labels: Sequence[str] | None) -> list[str]:
        classes = _head_classes(self.encoder)
        own = list(getattr(self.encoder, "id2label", None) or [])
        if len(own) == classes:
            return own
        if labels and len(labels) == classes:
            return list(labels)
        given = f"; the given labels have {len(labels)}" if labels else ""
        raise ValueError(f"the supervised head has {classes} classes but no label names{given}; "
                         f"pass a label file with {classes} lines")

    # -- zero-shot ----------------------------------------------------------------------------
    def _encode_labels(self) -> torch.Tensor:
        """Each label's feature: normalised mean of its prompts' normalised text features."""
        texts = [prompt.format(label=label) for label in self.labels for prompt in self.prompts]
        max_len = getattr(self.model, "max_text_len", None)
        chunks = []
        with evaluating(self.model):
            for start in range(0, len(texts), _PROMPT_BATCH):
                chunks.append(self.model.encode_texts(texts[start:start + _PROMPT_BATCH], max_len=max_len)["feat"])
        feats = F.normalize(torch.cat(chunks).float(), dim=-1)
        per_label = feats.view(len(self.labels), len(self.prompts), -1).mean(1)
        return F.normalize(per_label, dim=-1)

    @property
    def label_features(self) -> torch.Tensor:
        """``[n_labels, E]`` zero-shot label features (computed once, at construction)."""
        if self._label_feat is None:
            raise ValueError("label features exist for zero-shot classification only")
        return self._label_feat

    @property
    def temperature(self) -> float:
        """The model's contrastive temperature, clamped to the official training range."""
        temp = getattr(self.model, "temp", 1.0)
        temp = float(temp.detach()) if isinstance(temp, torch.Tensor) else float(temp)
        return min(max(temp, _TEMP_RANGE[0]), _TEMP_RANGE[1])

    def probabilities_from_features(self, video_feat: torch.Tensor) -> torch.Tensor:
        """``[B, n_labels]`` probabilities from clip features ``[B, T, E]`` or clip vectors ``[B, E]``
        (zero-shot, or the action head)."""
        if self.source == "head":
            with torch.no_grad():
                return torch.softmax(self.model.action_logits(video_feat).float(), dim=-1).cpu()
        if self.source == "supervised":
            raise ValueError("the video encoder's own head needs clips, not features; use probabilities()")
        label_feat = self.label_features.to(video_feat.device, video_feat.dtype)
        with torch.no_grad():
            sim = self.model.similarity(label_feat, video_feat).t()
        return torch.softmax(sim / self.temperature, dim=-1).cpu()

    # -- rankings -----------------------------------------------------------------------------
    def probabilities(self, videos: torch.Tensor) -> torch.Tensor:
        """``[B, n_labels]`` class probabilities for normalised clips ``[B, C, T, H, W]``."""
        with evaluating(self.model):
            videos = videos.to(model_device(self.model))
            if self.source == "supervised":
                return torch.softmax(self.encoder.classify(videos).float(), dim=-1).cpu()
            return self.probabilities_from_features(self.model.encode_video(videos)["feat"])

    def rank(self, probs: torch.Tensor, top: int = 5) -> list[Ranking]:
        """The ``top`` most probable labels of each row, most probable first."""
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        values, indices = probs.topk(min(top, len(self.labels)), dim=-1)
        return [[(self.labels[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
                for row_p, row_i in zip(values, indices, strict=True)]

    def predict(self, video_feat: torch.Tensor, top: int = 5) -> list[Ranking]:
        """Top labels from clip features (e.g. an index's stored vectors), zero-shot or the head."""
        return self.rank(self.probabilities_from_features(video_feat), top)

    def predict_clips(self, videos: torch.Tensor, top: int = 5) -> list[Ranking]:
        """Top labels for normalised clips ``[B, C, T, H, W]`` with this classifier's source."""
        return self.rank(self.probabilities(videos), top)


def _model_from(model_dir_or_model: str | os.PathLike[str] | torch.nn.Module, device: str = "cpu",
                precision: str = "fp32") -> torch.nn.Module:
    if isinstance(model_dir_or_model, torch.nn.Module):
        return model_dir_or_model
    from retrieval.models.model_dir import load_model  # noqa: PLC0415

    return load_model(model_dir_or_model, device, precision)


def classify_paths(model_dir_or_model: str | os.PathLike[str] | torch.nn.Module,
                   paths: Sequence[str | os.PathLike[str]], labels: str | Sequence[str] | None = "synthetic",
                   top: int = 5, source: Source = "auto", batch_size: int = 8, device: str = "cpu",
                   precision: str = "fp32") -> list[Ranking]:
    """Top labels for each video file (in order), as ``[(label, probability), ...]`` per video.

    ``labels`` is a label-set spec for :func:`load_labels` or the list itself.

    Raises:
        VideoReadError: a video cannot be read (the error names it).
    """
    model = _model_from(model_dir_or_model, device, precision)
    names = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels
    classifier = ActionClassifier(model, names, source=source)
    preprocess = Preprocess.for_model(model)
    rankings: list[Ranking] = []
    for start in range(0, len(paths), batch_size):
        clips = torch.stack([load_clip(path, preprocess) for path in paths[start:start + batch_size]])
        rankings.extend(classifier.predict_clips(clips, top))
    return rankings


__all__ = ["DEFAULT_PROMPTS", "SOURCES", "ActionClassifier", "Ranking", "Source", "classify_paths", "label_source"]
