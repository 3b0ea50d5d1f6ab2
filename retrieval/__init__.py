"""vtr's library: video/text encoders, data, training and evaluation.

The stable names (see README, "Python API"); imported lazily so ``import retrieval`` stays cheap:

* ``load_model(dir, device, precision)``: a model directory (trained, converted or the demo's);
* ``embed_texts(model, texts)`` / ``embed_videos(model, paths, windows)``: the vectors search
  compares (:mod:`retrieval.embed`);
* ``load_corpus(dataset, ann, videos)`` and ``evaluate_retrieval(model, corpus)``: what
  ``vtr eval`` reports;
* ``create_model`` / ``list_models``: architectures by name.
"""
from __future__ import annotations

from retrieval.lazy import lazy_attributes

_EXPORTS = {
    "create_model": "retrieval.models.registry",
    "list_models": "retrieval.models.registry",
    "load_model": "retrieval.models.model_dir",
    "embed_texts": "retrieval.embed",
    "embed_videos": "retrieval.embed",
    "load_corpus": "retrieval.data.corpora",
    "evaluate_retrieval": "retrieval.eval.retrieval",
}
__all__ = ["create_model", "embed_texts", "embed_videos", "evaluate_retrieval", "list_models", "load_corpus", "load_model"]
__getattr__ = lazy_attributes(__name__, _EXPORTS)
