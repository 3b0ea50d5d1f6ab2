"""The mapper of an indexing job: decoded clip batches -> clip vectors, labels and channel records.

One copy serves both engines: the local engine calls a :class:`ClipMapper` in its own process,
the Ray engine in each encoder actor. What an item gets beside its vector, its on-screen text
and its speech, comes from :class:`ChannelMapper`, called by the part committer
(:class:`indexer.parts.PartCommitter`) when the item's part is committed, so both engines store
the same records. :class:`EmbedTask` is what a job hands an engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer.channels import text_of
from indexer.errors import JobError
from indexer.plan import Part
from retrieval.asr import DEFAULT_ASR, Recognizer, load_recognizer
from retrieval.data.corpora import Corpus, CorpusItem
from retrieval.models.actions import ActionClassifier
from retrieval.models.device import model_autocast, model_device
from retrieval.models.model_dir import load_model
from retrieval.ocr import DEFAULT_EVERY_S, OcrReader, read_span
from retrieval.sentence import SentenceEncoder, pack
from retrieval.speech import SpeechReader

#: How many zero-shot action labels are stored per item.
TOP_LABELS = 5
#: On-screen texts embedded by the sentence model at once
SENTENCE_BATCH = 64


class ClipMapper:
    """One model: preprocessed clips ``[B, C, T, H, W]`` -> unit clip vectors and top-5 labels.

    Args:
        model_dir: the model directory; ``config`` its config, read once by the job.
        labels: the label set of the stored action labels.
        device, precision: where and how the towers run (:mod:`retrieval.models.device`).
    """

    def __init__(self, model_dir: str | Path, config: dict[str, Any], labels: list[str], device: str = "cpu",
                 precision: str = "fp32") -> None:
        self.model = load_model(model_dir, device, precision, config=config)
        self.classifier = ActionClassifier(self.model, labels)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    def __call__(self, clips: torch.Tensor) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
        """float32 vectors ``[B, dim]`` (the evaluation's clip vectors) and each clip's labels."""
        with torch.inference_mode(), model_autocast(self.model):
            feat = self.model.encode_video(clips.to(model_device(self.model)))["feat"]
            vectors = self.model.clip_vector(feat).float().cpu().numpy()
            predictions = self.classifier.predict(feat, top=TOP_LABELS)
        return vectors, predictions


class ChannelMapper:
    """An item -> its channel records: ``text`` (timed on-screen lines and a sentence vector of
    them) and ``speech`` (recognised words and phones), for the channels asked for.

    The recognisers load here, before any work: a bad ``--ocr`` or ``--asr`` directory fails at once.
    """

    def __init__(self, channels: Sequence[str], root: Path, ocr_dir: Path | None = None,
                 text_every_s: float = DEFAULT_EVERY_S, asr: str = DEFAULT_ASR, device: str = "cpu") -> None:
        if "visual" not in channels:
            raise JobError("--channels must include visual: an index is built around its clip vectors")
        if text_every_s <= 0:
            raise JobError(f"the text channel's sampling interval must be positive, got {text_every_s} s")
        if asr != DEFAULT_ASR and "speech" not in channels:
            raise JobError("--asr sets the speech channel's recogniser, but --channels leaves the speech channel out")
        self.root = root
        self.text_every_s = text_every_s
        self.reader = OcrReader(ocr_dir) if "text" in channels else None
        self.recognizer: Recognizer | None = load_recognizer(asr, device=device) if "speech" in channels else None
        # overlapping windows of one file share its recognition: each stretch of audio is heard once
        self.speech = SpeechReader(self.recognizer) if self.recognizer is not None else None
        self.sentences: SentenceEncoder | None = None

    @property
    def extra(self) -> bool:
        """Whether items get any channel records beside their vectors."""
        return self.reader is not None or self.recognizer is not None

    def load_sentences(self) -> None:
        """The text channel's semantic side: a sentence vector of each item's on-screen text."""
        if self.reader is not None and self.sentences is None:
            self.sentences = SentenceEncoder()

    @property
    def identity(self) -> dict[str, Any]:
        """What each channel is made by (the job record's and the manifest's ``channels``)."""
        channels: dict[str, Any] = {"visual": {}}
        if self.reader is not None:
            channels["text"] = {"every_s": self.text_every_s, **self.reader.identity}
            if self.sentences is not None:
                channels["text"]["semantic"] = self.sentences.identity
        if self.recognizer is not None:
            channels["speech"] = dict(self.recognizer.identity)
        return channels

    def __call__(self, item: CorpusItem) -> dict[str, Any]:
        """The item's channel records; the texts' sentence vectors come in :meth:`finish`."""
        records: dict[str, Any] = {}
        path = self.root / item.video
        if self.reader is not None:
            records["text"] = read_span(self.reader, path, item.start, item.end, self.text_every_s)
        if self.speech is not None:
            records["speech"] = self.speech.read(path, item.start, item.end)
        return records

    def finish(self, records: Sequence[dict[str, Any]]) -> None:
        """Add the sentence vectors to a part's texts that have lines (``records``: what
        :meth:`__call__` gave its items), :data:`SENTENCE_BATCH` at a time: a batch is several
        times cheaper than one text at a time (bench/channels.py --parts cost)."""
        if self.sentences is None:
            return
        with_lines = [record["text"] for record in records if "text" in record and record["text"]["lines"]]
        for at in range(0, len(with_lines), SENTENCE_BATCH):
            batch = with_lines[at : at + SENTENCE_BATCH]
            for text, vector in zip(batch, self.sentences.encode([text_of(text) for text in batch]), strict=True):
                text["vector"] = pack(vector)


@dataclass(frozen=True)
class EmbedTask:
    """What a job hands an engine: its pending parts and how to embed them.

    ``config`` is the model directory's config, read once per job; ``corpus`` gives the decoding
    options (frame sampling, longest video) and ``root`` the folder item paths are relative to.
    """

    parts: list[Part]
    corpus: Corpus
    root: Path
    model_dir: Path
    config: dict[str, Any]
    labels: list[str]
    device: str
    precision: str
    batch_size: int
    workers: int
    progress: bool
    description: str

    @property
    def embed_dim(self) -> int:
        return int(self.config["model"].get("embed_dim") or 0)

    def items(self) -> Corpus:
        """The parts' items, in part order, as the corpus the clip loader decodes."""
        return Corpus(self.corpus.name, self.root, [item for part in self.parts for item in part.items], [],
                      self.corpus.max_text_len, self.corpus.sample, max_seconds=None)

    def mapper(self, device: str | None = None) -> ClipMapper:
        return ClipMapper(self.model_dir, self.config, self.labels, device or self.device, self.precision)
