"""Which recogniser makes the speech channel: ``--asr pocketsphinx`` (the default, embedded in the
``speech`` extra) or ``--asr whisper:DIR`` (a local Whisper model directory the user brings,
:mod:`retrieval.whisper_asr`).

:func:`parse_asr` checks a choice before any work (an unknown name, a missing or foreign
directory, missing packages: one line each); :func:`load_recognizer` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.speech import SpeechRecognizer, SpokenWord, require_speech
from retrieval.whisper_asr import WhisperRecognizer, require_whisper, weights_digest, whisper_files

#: The recognisers ``--asr`` names (``whisper`` takes a directory: ``whisper:DIR``).
ASR_NAMES = ("pocketsphinx", "whisper")
DEFAULT_ASR = "pocketsphinx"


class Recognizer(Protocol):
    """What the speech channel needs of a recogniser (:func:`retrieval.speech.read_speech`)."""

    #: what made the channel (engine, models and their hashes), recorded in the job and the manifest
    identity: dict[str, Any]
    threads: int

    def recognize(self, samples: np.ndarray, offset: float = 0.0) -> list[SpokenWord]: ...

    def recognize_phones(self, samples: np.ndarray, offset: float = 0.0) -> list[SpokenWord]: ...


def parse_asr(text: str | None) -> str:
    """``"whisper:models/base.en"`` -> ``"whisper:/abs/models/base.en"``; ``None`` -> the default.

    Raises:
        ValueError: an unknown name, ``whisper`` without a directory, or a directory that is not a
            Whisper model; SpeechUnavailable (a ValueError) when the recogniser's packages are missing.
        FileNotFoundError: the directory does not exist.
    """
    text = (text or DEFAULT_ASR).strip()
    name, _, argument = text.partition(":")
    name = name.strip().lower()
    if name not in ASR_NAMES:
        raise ValueError(f"--asr: unknown recogniser {name!r}; recognisers are pocketsphinx and whisper:DIR "
                         "(a local Whisper model directory)")
    if name == "pocketsphinx":
        if argument:
            raise ValueError(f"--asr pocketsphinx takes no directory (got {text!r}): its models are in its wheel")
        require_speech()
        return name
    if not argument.strip():
        raise ValueError("--asr whisper needs a model directory: --asr whisper:DIR")
    require_whisper()
    whisper_files(argument.strip())
    return f"whisper:{Path(argument.strip()).resolve()}"


def choose_asr(asr: str | None, channels: tuple[str, ...]) -> str:
    """The checked ``--asr`` of a command that indexes ``channels`` (see :func:`parse_asr`): the
    default when the speech channel is not among them.

    Raises:
        ValueError: ``asr`` is given but ``channels`` leave the speech channel out, or :func:`parse_asr` refuses it.
    """
    if "speech" not in channels:
        if asr is not None:
            raise ValueError("--asr sets the speech channel's recogniser, but --channels leaves the speech channel out")
        return DEFAULT_ASR
    return parse_asr(asr)


def load_recognizer(asr: str | None = None, device: str = "cpu") -> Recognizer:
    """The recogniser ``asr`` names (see :func:`parse_asr`), loaded; Whisper runs on ``device``."""
    chosen = parse_asr(asr)
    if chosen == "pocketsphinx":
        return SpeechRecognizer()
    return WhisperRecognizer(chosen.partition(":")[2], device=device)


def asr_of(identity: dict[str, Any]) -> str:
    """The ``--asr`` value that made a speech channel, from the identity its index records."""
    return f"whisper:{identity['model_dir']}" if identity.get("model_dir") else DEFAULT_ASR


def check_recorded(identity: dict[str, Any]) -> None:
    """Check that the recogniser an index records (its ``extra.channels.speech``) is still what its
    directory holds, before new items are recognised with it (``vtr index add``).

    Raises:
        FileNotFoundError, ValueError: the directory is gone, or holds other weights now.
    """
    if not identity.get("model_dir"):
        return  # the embedded recogniser: its models are its package's
    recorded = (identity.get("models") or {}).get("sha256")
    found = weights_digest(whisper_files(identity["model_dir"]))
    if found != recorded:
        raise ValueError(f"the index's speech was recognised by the Whisper model in {identity['model_dir']} "
                         f"(weights sha256 {str(recorded)[:12]}...), which now holds other weights ({found[:12]}...): "
                         "restore them, or build a new index")
