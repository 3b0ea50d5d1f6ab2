"""The synthetic corpus's spoken layer: a sentence said over a clip by espeak-ng.

A clip with speech carries an AAC track in which a short sentence ("the bridge is closed") is
spoken with one of several voices, at a speed, start and background noise level drawn at random.
The clip's caption then refers to it ("... while a voice says the bridge is closed"), so the
speech channel has something to find, the evaluation can split queries into picture-only and
speech-mentioning ones, and the recogniser's word error rate can be measured against the
recorded sentence.

Everything is decided at planning time (:func:`plan_speech`, a pure function of the random
stream); :func:`speak` renders the samples when the clip is written. espeak-ng is an external
program (Debian's ``espeak-ng``, the Makefile's ``espeak`` target): :func:`espeak_available`
tells whether it is there.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Sample rate of the spoken track (what the speech channel decodes to).
SAMPLE_RATE = 16000
#: espeak-ng voices (language + variant) the layer draws from.
VOICES = ("en-us", "en-us+f2", "en-us+m3", "en", "en+f4", "en-us+m7")
_SPEEDS = (130, 145, 160)  # words per minute
_NOISE_DB = (None, 25.0, 15.0)  # signal-to-noise ratio of the background hiss; None: clean
_SUBJECTS = (
    "the bridge", "the meeting", "the train", "the museum", "the garden", "the library", "the market",
    "the river", "the concert", "the kitchen", "the office", "the harbor",
)
_STATES = (
    "is closed", "starts at noon", "is very busy", "opens on monday", "was painted red", "is far away",
    "needs more water", "is full of people", "has a new roof", "is quiet tonight",
)
_MAX_TRIES = 1_000


@dataclass(frozen=True)
class Speech:
    """A sentence said over a clip: ``voice``/``speed`` as espeak-ng takes them, ``start`` in
    seconds from the clip's start, ``snr_db`` the background noise (None: clean), ``noise_seed``
    the seed of that noise."""

    text: str
    voice: str
    speed: int
    start: float
    snr_db: float | None
    noise_seed: int

    def phrase(self) -> str:
        """How a caption refers to it."""
        return f"while a voice says {self.text}"


def plan_speech(rng: np.random.Generator, used: set[str]) -> Speech:
    """A sentence not in ``used`` (which it joins), with a voice, speed, start and noise level."""
    for _ in range(_MAX_TRIES):
        text = f"{_SUBJECTS[int(rng.integers(len(_SUBJECTS)))]} {_STATES[int(rng.integers(len(_STATES)))]}"
        if text not in used:
            break
    used.add(text)
    return Speech(text=text, voice=VOICES[int(rng.integers(len(VOICES)))],
                  speed=int(_SPEEDS[int(rng.integers(len(_SPEEDS)))]),
                  start=round(float(rng.uniform(0.1, 0.5)), 2),
                  snr_db=_NOISE_DB[int(rng.integers(len(_NOISE_DB)))], noise_seed=int(rng.integers(2**31)))


def espeak_available() -> bool:
    """Whether the espeak-ng program is on the PATH."""
    return shutil.which("espeak-ng") is not None


def speak(speech: Speech, seconds: float) -> np.ndarray:
    """``seconds`` of 16 kHz mono int16 audio with ``speech`` said from its start (cut at the end)."""
    with tempfile.TemporaryDirectory(prefix="vtr-espeak-") as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", speech.voice, "-s", str(speech.speed), "-w", str(path), speech.text],
                       check=True, capture_output=True, timeout=60)
        with wave.open(str(path)) as said:
            rate = said.getframerate()
            samples = np.frombuffer(said.readframes(said.getnframes()), np.int16).astype(np.float32)
    picks = np.arange(0, len(samples), rate / SAMPLE_RATE).astype(int)
    samples = samples[picks[picks < len(samples)]]
    out = np.zeros(round(seconds * SAMPLE_RATE), np.float32)
    at = int(speech.start * SAMPLE_RATE)
    piece = samples[: max(0, len(out) - at)]
    out[at : at + len(piece)] = piece
    if speech.snr_db is not None and len(piece):
        power = float(np.mean(piece**2)) or 1.0
        noise = np.random.default_rng(speech.noise_seed).standard_normal(len(out)).astype(np.float32)
        out += noise * np.sqrt(power / 10 ** (speech.snr_db / 10))
    return np.clip(out, -32768, 32767).astype(np.int16)
