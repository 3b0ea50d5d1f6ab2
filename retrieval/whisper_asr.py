"""A stronger speech recogniser the user brings: a local Whisper model directory, run by transformers.

``vtr index --channels visual,speech --asr whisper:DIR`` recognises each item's speech with the
Whisper model in ``DIR`` instead of the embedded PocketSphinx. The directory is what transformers'
``save_pretrained`` writes for ``WhisperForConditionalGeneration`` (for instance a converted
``openai/whisper-base.en``): ``config.json`` (``model_type`` ``whisper``), the weights as
safetensors, ``generation_config.json`` with ``alignment_heads`` (the cross-attention heads that
time the words), ``preprocessor_config.json`` and the tokenizer files. Nothing is downloaded:
every file is read from ``DIR``; the user brings the weights.

:class:`WhisperRecognizer` has the interface of :class:`retrieval.speech.SpeechRecognizer`: it
returns :class:`retrieval.speech.SpokenWord` with start and end times (from the cross-attention
alignment, transformers' ``return_timestamps="word"``), so matching, hits, the page and JSON
work unchanged. Whisper has no phone loop: the phonetic matching runs over the pronunciations of
the recognised words. transformers reports no per-word posterior, so each word's ``prob`` is
1.0. Decoding is greedy (one beam), on the torch threads the job was given at most.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.models.model_dir import weights_hash
from retrieval.speech import SAMPLE_RATE, SpeechUnavailable, SpokenWord

#: The packages the Whisper recogniser runs on (both are dependencies of vtr itself).
WHISPER_PACKAGES = ("torch", "transformers")
#: Characters kept in a recognised word (Whisper writes punctuation and capitals).
_NOT_WORD = re.compile(r"[^a-z0-9']+")


def require_whisper() -> None:
    """Raise :class:`SpeechUnavailable` unless torch and transformers can be imported."""
    missing = [name for name in WHISPER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise SpeechUnavailable(f"--asr whisper needs {' and '.join(missing)}: pip install "
                                f"{' '.join(missing)} (or `make install`), or use --asr pocketsphinx")


def whisper_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """Check that ``model_dir`` holds a Whisper model transformers can load offline with word
    times, and return its weight files (safetensors).

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it is not a Whisper model directory, or a file word times need is missing.
    """
    root = Path(model_dir)
    where = f"--asr whisper:{model_dir}"
    if not root.exists():
        raise FileNotFoundError(f"{where}: no such directory")
    if not root.is_dir():
        raise ValueError(f"{where}: not a directory (a Whisper model directory is expected)")
    config = _read_json(root / "config.json", where)
    if config is None or config.get("model_type") != "whisper":
        raise ValueError(f"{where}: not a Whisper model directory (its config.json must say "
                         f"model_type \"whisper\", found {None if config is None else config.get('model_type')!r})")
    weights = sorted(root.glob("model*.safetensors"))
    if not weights:
        other = sorted(path.name for path in root.glob("*.bin"))
        hint = f" (it has {', '.join(other)}: save the model with safe_serialization)" if other else ""
        raise ValueError(f"{where}: no safetensors weights (model.safetensors){hint}")
    generation = _read_json(root / "generation_config.json", where) or {}
    if not generation.get("alignment_heads"):
        raise ValueError(f"{where}: generation_config.json names no alignment_heads, which word times need")
    if not (root / "preprocessor_config.json").is_file():
        raise ValueError(f"{where}: no preprocessor_config.json (the feature extractor's settings)")
    if not ((root / "tokenizer.json").is_file() or
            ((root / "vocab.json").is_file() and (root / "merges.txt").is_file())):
        raise ValueError(f"{where}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    return weights


def _read_json(path: Path, where: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: cannot read {path.name}: {exc}") from None
    return found if isinstance(found, dict) else None


class WhisperRecognizer:
    """Recognises speech with a local Whisper model directory (see the module docstring).

    Args:
        model_dir: the Whisper model directory.
        threads: the most torch threads recognition uses; default: torch's, i.e. what the job was given.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Raises:
        SpeechUnavailable: torch or transformers is not installed.
        FileNotFoundError, ValueError: ``model_dir`` is missing or not a Whisper model directory.
    """

    def __init__(self, model_dir: str | os.PathLike[str], threads: int | None = None, device: str = "cpu") -> None:
        require_whisper()
        weights = whisper_files(model_dir)
        import torch  # noqa: PLC0415  (only imported when the Whisper recogniser runs)
        from transformers import (  # noqa: PLC0415
            AutoTokenizer,
            WhisperFeatureExtractor,
            WhisperForConditionalGeneration,
            pipeline,
        )

        root = Path(model_dir).resolve()
        self._torch = torch
        self.threads = max(1, int(threads or torch.get_num_threads()))
        # eager attention: word times come from the cross-attention weights
        model = WhisperForConditionalGeneration.from_pretrained(
            root, local_files_only=True, use_safetensors=True, attn_implementation="eager")
        model.eval()
        self.model = model
        self._pipeline = pipeline("automatic-speech-recognition", model=model, device=device,
                                  tokenizer=AutoTokenizer.from_pretrained(root, local_files_only=True),
                                  feature_extractor=WhisperFeatureExtractor.from_pretrained(root, local_files_only=True))
        self._lock = threading.Lock()  # one model: items recognised one at a time
        self.identity = {"engine": f"whisper (transformers {importlib.metadata.version('transformers')})",
                         "models": {"file": ", ".join(path.name for path in weights), "sha256": weights_digest(weights)},
                         "model_dir": str(root)}

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        before = self._torch.get_num_threads()
        self._torch.set_num_threads(min(before, self.threads))
        try:
            yield
        finally:
            self._torch.set_num_threads(before)

    def recognize(self, samples: np.ndarray, offset: float = 0.0) -> list[SpokenWord]:
        """The words in 16 kHz mono int16 ``samples``; times are seconds plus ``offset``."""
        if samples.size < SAMPLE_RATE // 10:
            return []
        audio = np.asarray(samples, dtype=np.float32) / 32768.0
        duration = samples.size / SAMPLE_RATE
        with self._lock, self._threads(), self._torch.inference_mode():
            result = self._pipeline({"raw": audio, "sampling_rate": SAMPLE_RATE}, return_timestamps="word",
                                    generate_kwargs={"num_beams": 1})
        words = []
        for chunk in result.get("chunks") or []:
            start, end = chunk.get("timestamp") or (None, None)
            start = min(max(0.0, float(start or 0.0)), duration)
            end = min(max(start, float(end if end is not None else duration)), duration)
            for word in _NOT_WORD.sub(" ", str(chunk.get("text", "")).lower()).split():
                word = word.strip("'")
                if word:
                    words.append(SpokenWord(word, round(offset + start, 3), round(offset + end, 3), 1.0))
        return words

    def recognize_phones(self, samples: np.ndarray, offset: float = 0.0) -> list[SpokenWord]:
        """Whisper has no phone loop: ``[]`` (the channel matches the words' pronunciations)."""
        return []


def weights_digest(paths: list[Path]) -> str:
    """The sha256 of a model's weights: of its one file, or of several shards' names and sha256s in order."""
    if len(paths) == 1:
        return weights_hash(paths[0])
    combined = hashlib.sha256()
    for path in paths:
        combined.update(f"{path.name} {weights_hash(path)}\n".encode())
    return combined.hexdigest()
