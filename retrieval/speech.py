"""What is said: recognise the speech in a video's audio (the index's ``speech`` channel) and
find spoken words despite recognition errors.

Audio: :func:`decode_audio` decodes an item's span with PyAV, resampled to 16 kHz mono 16-bit
(any rate or channel layout in). A file without an audio stream, or whose audio cannot be
decoded, gives a note on the item, never a failed job (:func:`read_speech`).

Recognition: :class:`SpeechRecognizer` runs the embedded recogniser, PocketSphinx (the
``pocketsphinx`` wheel of the ``speech`` extra ships a US-English acoustic model, the CMU
pronouncing dictionary and a language model: nothing is downloaded). It gives words with start
and end times and a posterior probability. PocketSphinx decodes on one thread, so the channel
never uses more threads than a job is given.

Scheduling: only the sound is recognised (:func:`sounding_spans`, an energy gate: silence,
near-silence and a steady hiss are skipped, quiet or noisy speech never), each stretch of sound
as an utterance of its own. An indexing job reads items through a :class:`SpeechReader`, which
recognises a file's audio once in fixed chunks and gives each item (a window of a long video)
what was said within it, so overlapping windows do not hear the same audio twice.

Each item is recognised twice: by the word recogniser (words with times, for showing and for
their pronunciations, and where its n-best list's next hypotheses differ from them,
:func:`alternative_runs`) and by a phone loop (the same acoustic model with a phone bigram: the
phones actually heard, whatever the words; a tenth of the word recogniser's cost).

Matching: plain transcripts of a small recogniser are too noisy to search by exact words
("the bridge is closed" comes out as "the bridges oh"). :class:`SpeechIndex` turns the query's
words into phones (:class:`Pronouncer`: the bundled CMU dictionary, with a letter-to-sound
fallback for words it lacks) and scores each query word by its best local alignment
(Smith-Waterman, linear gaps, vowels and confusable consonants partly matching) anywhere in an
item's phones: the phone loop's, and the pronunciations of the recognised words and of their
alternatives, the best of them (:data:`MATCH_SOURCES`; bench/channels.py compares them). An item's score is the
phone-weighted mean of its query words' normalised scores (1.0: every phone found in order);
its confidence is that less what the query scores by chance (against the item's phones
reversed, or the index's median item). The channel ranks only confident items and abstains
otherwise (:data:`MIN_SCORE`, :data:`MIN_CONFIDENCE`; lower bars for a query that says its words
are spoken, :func:`says_spoken`), so fusion lets a confident spoken match win and leaves queries
about the picture alone. All items' phones are aligned at once with
numpy (one pass per query phone), so a search over many thousands of items stays fast.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.video import file_key

logger = logging.getLogger(__name__)

#: The optional dependency group that brings the embedded recogniser.
SPEECH_EXTRA = "speech"
SPEECH_PACKAGE = "pocketsphinx"
#: The rate and layout the recognisers take.
SAMPLE_RATE = 16000
#: The speech channel ranks an item only when its match score (1.0: every query phone found in
#: order) is at least this, ...
MIN_SCORE = 0.6
#: ... its confidence (score less its chance score: the better of the same query against the
#: item's phones reversed, and the median item's score) at least this, ...
MIN_CONFIDENCE = 0.15
#: ... and it scores at least this share of the query's best item. Calibrated on espeak-ng
#: speech (bench/channels.py): true matches of spoken sentences against captions of pictures.
RELATIVE_FLOOR = 0.9
#: A query that says its words are spoken ("... a voice says the bridge is closed",
#: :func:`says_spoken`) is sure to be about speech, so a weaker match is ranked: score and
#: confidence at least these instead. Chosen on spoken corpora of other seeds than the reported
#: one (bench/channels.py ``spoken``): there, 5 of the 31 right clips ranked first scored
#: 0.55-0.6 or confidence 0.12-0.15; captions of pictures (no such word) keep the bars above.
SAID_MIN_SCORE = 0.5
SAID_MIN_CONFIDENCE = 0.12
#: A query word aligning at least this well with an item counts as heard there (for its weight).
HEARD = 0.75
#: Queries with fewer phones than this (in the words searched) are not searched in speech: two
#: short words ("red car") align well enough with any speech.
MIN_QUERY_PHONES = 7
#: Query words shorter than this many phones are not searched alone (they match everywhere).
MIN_WORD_PHONES = 3
#: How many of the word recogniser's next-best distinct hypotheses an item keeps (where they
#: differ from the best one): a misrecognised word is often right in one of them. Chosen on a
#: tuning set of espeak-ng sentences apart from the reported ones (bench/channels.py).
ALTERNATIVES = 10
#: A query word aligning in an alternative hypothesis counts this share of the same alignment in
#: the best one: the recogniser ranked it below, so where both hold a near match the best
#: hypothesis's wins. Chosen on spoken corpora of other seeds than the reported one and the
#: espeak-ng tuning sentences (bench/channels.py; docs/speech.md).
ALTERNATIVE_WEIGHT = 0.95
#: The word recogniser's search, narrower than PocketSphinx's defaults: at most 5000 active HMMs
#: a frame (not 30000) costs 0.79x the recognition time at one tuning-set sentence's loss of R@1;
#: narrower beams, topn 2 or no fwdflat pass cost more (bench/channels.py, docs/performance.md).
WORD_SEARCH: dict[str, Any] = {"maxhmmpf": 5000}
#: Audio longer than this (seconds) is recognised in its first this-many seconds only.
MAX_SPAN_S = 600.0
#: The energy gate (:func:`sounding_spans`) measures audio in blocks of this many seconds (three
#: of the recogniser's 10 ms frames).
GATE_BLOCK_S = 0.03
#: A block holds sound when its RMS (int16 units) is at least this (~-64 dBFS: digital silence,
#: dither and a codec's floor stay below; espeak-ng speech turned down 40 dB peaks at ~100) ...
GATE_MIN_RMS = 20.0
#: ... and at least this many dB over the audio's noise floor (its 10th-percentile block): a
#: steady hiss at any level is no sound, speech even 5 dB over hiss is.
GATE_OVER_FLOOR_DB = 6.0
#: Sound is recognised with this much audio either side (a word's quiet onset and tail), and two
#: sounds closer than :data:`GATE_JOIN_S` are recognised as one utterance.
GATE_MARGIN_S = 0.5
GATE_JOIN_S = 2.0
#: An utterance longer than this (seconds) is cut at its quietest block in its second half: the
#: n-best list's :data:`ALTERNATIVES` then cover as much speech as a clip's do.
MAX_UTTERANCE_S = 8.0
#: Overlapping windows of one file share its recognition (:class:`SpeechReader`): the file's audio
#: is recognised in chunks of this many seconds, each once, with :data:`CHUNK_MARGIN_S` of its
#: neighbours' audio either side so a word across a chunk's edge is heard whole (each chunk keeps
#: what has its middle inside it).
CHUNK_S = 30.0
CHUNK_MARGIN_S = 1.0
#: Chunks a :class:`SpeechReader` remembers (windows come in file order: two are in use at a time).
RECENT_CHUNKS = 8

# Smith-Waterman scores: match, vowel for vowel, other mismatch, gap
_MATCH, _NEAR, _MISMATCH, _GAP = 2.0, 0.5, -1.0, 1.0
_VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
_CONSONANTS = ("B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH", "T",
               "TH", "V", "W", "Y", "Z", "ZH")
PHONES = _VOWELS + _CONSONANTS
_PHONE_ID = {phone: number for number, phone in enumerate(PHONES)}
# consonants a recogniser confuses (voicing pairs, nasals, sibilants): scored like vowel for vowel
_NEAR_PAIRS = (("B", "P"), ("D", "T"), ("G", "K"), ("V", "F"), ("Z", "S"), ("DH", "TH"), ("ZH", "SH"),
               ("JH", "CH"), ("M", "N"), ("N", "NG"), ("S", "SH"), ("DH", "D"), ("TH", "T"), ("L", "R"))
# words a query uses to say that something is said, and function words: not searched in speech
_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is", "it", "of", "on", "or",
    "that", "the", "then", "this", "to", "was", "were", "with", "while", "voice", "voices", "says", "said",
    "saying", "say", "someone", "speaker", "speaks", "spoken", "speech", "talks", "talking", "tells", "announces",
))
_WORD = re.compile(r"[a-z']+")
_SAID = re.compile(r"\b(?:says|said|saying|say|tells|announces)\b\s+(.+)$")
# letter-to-sound fallback for words the dictionary lacks: longest spelling first
_SPELLINGS = {
    "tion": "SH AH N", "sion": "ZH AH N", "ough": "AO", "igh": "AY", "tch": "CH", "dge": "JH",
    "ch": "CH", "sh": "SH", "th": "TH", "ph": "F", "ng": "NG", "ck": "K", "qu": "K W", "wh": "W", "kn": "N",
    "ee": "IY", "ea": "IY", "oo": "UW", "ai": "EY", "ay": "EY", "ou": "AW", "ow": "OW", "oa": "OW", "oi": "OY",
    "oy": "OY", "au": "AO", "aw": "AO", "er": "ER", "ir": "ER", "ur": "ER", "ar": "AA R", "or": "AO R",
    "a": "AE", "b": "B", "c": "K", "d": "D", "e": "EH", "f": "F", "g": "G", "h": "HH", "i": "IH", "j": "JH",
    "k": "K", "l": "L", "m": "M", "n": "N", "o": "AA", "p": "P", "q": "K", "r": "R", "s": "S", "t": "T", "u": "AH",
    "v": "V", "w": "W", "x": "K S", "y": "IY", "z": "Z",
}


class SpeechUnavailable(ValueError):
    """The speech channel was asked for but its recogniser is not installed (a user error)."""


class AudioError(Exception):
    """An item's audio cannot be read: no audio stream, or a stream that does not decode."""


def speech_available() -> bool:
    """Whether the embedded recogniser's package is installed (imports nothing)."""
    return importlib.util.find_spec("pocketsphinx") is not None


def require_speech() -> None:
    """Raise :class:`SpeechUnavailable`, naming the extra to install, unless the recogniser is there."""
    if not speech_available():
        raise SpeechUnavailable(f"the speech channel needs the {SPEECH_EXTRA} extra: pip install "
                                f"'vtr[{SPEECH_EXTRA}]' (or `make install`), or leave speech out of --channels")


def decode_audio(path: str | os.PathLike[str], start: float | None = None, end: float | None = None) -> np.ndarray:
    """The audio of ``path`` (or its span ``[start, end]`` seconds) as 16 kHz mono int16 samples.

    Raises:
        AudioError: the file has no audio stream, or its audio cannot be decoded.
    """
    import av  # noqa: PLC0415  (PyAV: imported with the video readers only when audio is read)

    start = max(0.0, float(start or 0.0))
    stop = start + MAX_SPAN_S if end is None else min(float(end), start + MAX_SPAN_S)
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream")
            stream = container.streams.audio[0]
            if start > 0 and stream.time_base is not None:
                container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            chunks: list[np.ndarray] = []
            first: float | None = None
            for frame in container.decode(stream):
                if frame.time is not None and first is None:
                    first = float(frame.time)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                if frame.time is not None and frame.time > stop:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001  (PyAV raises many kinds for a broken file)
        raise AudioError(f"{type(exc).__name__}: {exc}") from exc
    samples = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    offset = round((start - (first or 0.0)) * SAMPLE_RATE)
    samples = samples[max(0, offset):]
    return samples[: max(0, round((stop - start) * SAMPLE_RATE))]


@dataclass(frozen=True)
class SpokenWord:
    """One recognised word, when it was said (seconds in the video) and how sure the recogniser is."""

    word: str
    start: float
    end: float
    prob: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SpeechRecognizer:
    """Recognises speech with PocketSphinx (US English, its bundled models).

    Raises:
        SpeechUnavailable: the package is not installed.

    Args:
        search: the word recogniser's search options (PocketSphinx's names; default
            :data:`WORD_SEARCH`; ``{}``: PocketSphinx's own defaults).
    """

    def __init__(self, search: Mapping[str, Any] | None = None) -> None:
        require_speech()
        import pocketsphinx  # noqa: PLC0415  (the speech extra: only imported when the channel runs)

        self.search = dict(WORD_SEARCH if search is None else search)
        self._decoder = pocketsphinx.Decoder(loglevel="FATAL", **self.search)
        # the phone loop: the same acoustic model with a phone bigram instead of words, for matching
        phone_lm = Path(pocketsphinx.get_model_path()) / "en-us" / "en-us-phone.lm.bin"
        self._phone_decoder = pocketsphinx.Decoder(loglevel="FATAL", allphone=str(phone_lm), lw=2.0,
                                                   beam=1e-20, pbeam=1e-20)
        self._frame_rate = int(self._decoder.config["frate"])
        self._lock = threading.Lock()  # one decoder each: items recognised one at a time
        self.threads = 1
        self.identity = {"engine": f"{SPEECH_PACKAGE} {importlib.metadata.version(SPEECH_PACKAGE)}",
                         "models": "embedded (en-us acoustic model, CMU dictionary, en-us LM, en-us phone LM)",
                         "word_search": self.search, "alternatives": ALTERNATIVES}

    def _segments(self, decoder: Any, samples: np.ndarray) -> list[Any]:
        # half a second of silence either side: the recogniser's noise floor settles before speech
        pad = np.zeros(SAMPLE_RATE // 2, np.int16)
        audio = np.concatenate([pad, np.asarray(samples, dtype=np.int16), pad])
        decoder.start_utt()
        decoder.process_raw(audio.tobytes(), full_utt=True)
        decoder.end_utt()
        return list(decoder.seg())

    def _time(self, frame: int, offset: float) -> float:
        return round(max(0.0, offset + frame / self._frame_rate - 0.5), 3)

    def recognize(self, samples: np.ndarray, offset: float = 0.0) -> list[SpokenWord]:
        """The words in 16 kHz mono int16 ``samples``; times are seconds plus ``offset``."""
        return self.recognize_nbest(samples, offset, alternatives=0)[0]

    def recognize_nbest(self, samples: np.ndarray, offset: float = 0.0, alternatives: int = ALTERNATIVES,
                        ) -> tuple[list[SpokenWord], list[list[SpokenWord]]]:
        """The best words in ``samples`` (as :meth:`recognize`) and the runs where the next
        ``alternatives`` distinct hypotheses of the n-best list differ from them
        (:func:`alternative_runs`)."""
        words, hypotheses = self.hypotheses(samples, offset, alternatives)
        return words, alternative_runs(words, hypotheses)

    def hypotheses(self, samples: np.ndarray, offset: float = 0.0, alternatives: int = ALTERNATIVES,
                   ) -> tuple[list[SpokenWord], list[tuple[str, ...]]]:
        """The best words in ``samples`` with their times, and the words of the next
        ``alternatives`` distinct hypotheses of the recogniser's n-best list (best first)."""
        if samples.size < SAMPLE_RATE // 10:
            return [], []
        with self._lock:
            segments = self._segments(self._decoder, samples)
            hypotheses: list[tuple[str, ...]] = []
            if alternatives > 0:
                seen = set()
                for hypothesis in self._decoder.nbest():
                    if hypothesis is None:  # PocketSphinx gives None for an entry without words
                        continue
                    text = tuple(filter(None, map(_base_word, hypothesis.hypstr.split())))
                    if text not in seen:
                        seen.add(text)
                        hypotheses.append(text)
                    if len(seen) > alternatives:
                        break
        words = []
        for segment in segments:
            word = _base_word(segment.word)
            if word:
                words.append(SpokenWord(word, self._time(segment.start_frame, offset),
                                        self._time(segment.end_frame + 1, offset), round(float(segment.prob), 4)))
        best = tuple(word.word for word in words)
        return words, [hypothesis for hypothesis in hypotheses if hypothesis != best][:alternatives]

    def recognize_phones(self, samples: np.ndarray, offset: float = 0.0) -> list[SpokenWord]:
        """The phones in ``samples`` (ARPAbet, silences left out), each a :class:`SpokenWord`."""
        if samples.size < SAMPLE_RATE // 10:
            return []
        with self._lock:
            segments = self._segments(self._phone_decoder, samples)
        return [SpokenWord(segment.word, self._time(segment.start_frame, offset),
                           self._time(segment.end_frame + 1, offset), round(float(segment.prob), 4))
                for segment in segments if segment.word in _PHONE_ID]


def alternative_runs(best: Sequence[SpokenWord], hypotheses: Iterable[Sequence[str]]) -> list[list[SpokenWord]]:
    """Every distinct run where one of ``hypotheses`` differs from the ``best`` words
    (:func:`differences`), in the order first found."""
    found: dict[tuple[Any, ...], list[SpokenWord]] = {}
    for hypothesis in hypotheses:
        for run in differences(best, hypothesis):
            found.setdefault((*(word.word for word in run), run[0].start), run)
    return list(found.values())


def differences(best: Sequence[SpokenWord], alternative: Sequence[str]) -> list[list[SpokenWord]]:
    """Where ``alternative`` (words) differs from ``best`` (timed words), as timed word runs.

    The two are aligned word by word (edit distance); each run of differing words becomes the
    alternative's words there, with the agreeing word either side of the run (so a query word
    that spans the edge still aligns), timed by sharing out, in proportion to their letters, the
    time from the end of the best word before the run to the start of the best word after it.
    The best words' probabilities are kept; the alternative's new words get 0.
    """
    rows, cols = len(best), len(alternative)
    cost = np.zeros((rows + 1, cols + 1), np.int64)
    cost[:, 0], cost[0, :] = np.arange(rows + 1), np.arange(cols + 1)
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1,
                             cost[i - 1, j - 1] + (best[i - 1].word != alternative[j - 1]))
    # backtrace: which alternative word sits at (or after) each best word
    pairs: list[tuple[int | None, int | None]] = []
    i, j = rows, cols
    while i or j:
        if i and j and cost[i, j] == cost[i - 1, j - 1] + (best[i - 1].word != alternative[j - 1]):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i and cost[i, j] == cost[i - 1, j] + 1:
            pairs.append((i - 1, None))
            i -= 1
        else:
            pairs.append((None, j - 1))
            j -= 1
    pairs.reverse()
    same = [b is not None and a is not None and best[b].word == alternative[a] for b, a in pairs]
    runs: list[list[SpokenWord]] = []
    at = 0
    while at < len(pairs):
        if same[at]:
            at += 1
            continue
        stop = at
        while stop < len(pairs) and not same[stop]:
            stop += 1
        before = pairs[at - 1][0] if at > 0 else None
        after = pairs[stop][0] if stop < len(pairs) else None
        replaced = [b for b, _ in pairs[at:stop] if b is not None]
        new = [alternative[a] for _, a in pairs[at:stop] if a is not None]
        at = stop
        if not new:
            continue
        if replaced:
            start, end = best[replaced[0]].start, best[replaced[-1]].end
        else:  # words the best hypothesis does not have: between its neighbours
            start = best[before].end if before is not None else (best[after].start if after is not None else 0.0)
            end = best[after].start if after is not None else start
        letters = np.cumsum([0] + [len(word) for word in new]) / max(1, sum(len(word) for word in new))
        timed = [SpokenWord(word, round(start + (end - start) * float(letters[n]), 3),
                            round(start + (end - start) * float(letters[n + 1]), 3), 0.0)
                 for n, word in enumerate(new)]
        runs.append(([best[before]] if before is not None else []) + timed
                    + ([best[after]] if after is not None else []))
    return runs


def _base_word(token: str) -> str:
    """A recogniser token as a word: ``bridges(2)`` -> ``bridges``; silences and fillers -> ``""``."""
    if token.startswith(("<", "[", "+")):
        return ""
    return token.split("(", 1)[0]


def read_speech(recognizer: SpeechRecognizer, path: str | os.PathLike[str], start: float | None = None,
                end: float | None = None) -> dict[str, Any]:
    """The speech of a video (or its span ``[start, end]`` in seconds), recognised on its own
    (an indexing job shares the recognition of overlapping windows: :class:`SpeechReader`).

    Returns ``{"words": [SpokenWord.to_dict()...], "phones": [...], "alternatives": [[...]...],
    "seconds": audio seconds read, "notes": [...]}`` (``phones``: the phone loop's phones, each
    with ``word`` the phone; ``alternatives``: where the embedded recogniser's next-best
    hypotheses differ from ``words``, :meth:`SpeechRecognizer.recognize_nbest`); only the sound
    in it is recognised (:func:`sounding_spans`); a file without audio, or audio that cannot be
    decoded or recognised, is a note, never an exception.
    """
    try:
        samples = decode_audio(path, start, end)
    except AudioError as exc:
        return {**_nothing_heard(), "seconds": 0.0, "notes": [f"no speech read: {exc}"]}
    seconds = round(samples.size / SAMPLE_RATE, 3)
    try:
        record = recognise_samples(recognizer, samples, float(start or 0.0), sounding_spans(samples))
    except Exception as exc:  # noqa: BLE001  (one item the recogniser fails on never fails the job)
        logger.warning("speech channel: %s: %s", path, exc)
        return {**_nothing_heard(), "seconds": seconds, "notes": [f"recognition failed: {type(exc).__name__}: {exc}"]}
    notes = [] if record["words"] or record["phones"] else ["no speech"]
    return {**record, "seconds": seconds, "notes": notes}


def _nothing_heard() -> dict[str, list[Any]]:
    return {"words": [], "phones": [], "alternatives": []}


def recognise_samples(recognizer: SpeechRecognizer, samples: np.ndarray, offset: float = 0.0,
                      spans: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """What the channel stores of 16 kHz mono ``samples`` (times plus ``offset``): ``words``,
    ``phones`` and ``alternatives`` as :func:`read_speech` gives them. ``spans``: the sample
    ranges to recognise, each as an utterance of its own (default: all of ``samples`` as one;
    ``[]``: nothing). Only the embedded recogniser has an n-best list; another (Whisper) gives no
    alternatives."""
    record = _nothing_heard()
    for first, stop in [(0, samples.size)] if spans is None else spans:
        piece, at = samples[first:stop], offset + first / SAMPLE_RATE
        if isinstance(recognizer, SpeechRecognizer):
            words, alternatives = recognizer.recognize_nbest(piece, at)
        else:
            words, alternatives = recognizer.recognize(piece, at), []
        record["words"] += [word.to_dict() for word in words]
        record["phones"] += [phone.to_dict() for phone in recognizer.recognize_phones(piece, at)]
        record["alternatives"] += [[word.to_dict() for word in run] for run in alternatives]
    return record


def sounding_spans(samples: np.ndarray) -> list[tuple[int, int]]:
    """Where 16 kHz mono ``samples`` hold sound worth recognising: ``[(first, stop)]`` sample
    ranges, ``[]`` for digital silence, near-silence or a steady hiss throughout (the energy gate).

    Sound is every block of :data:`GATE_BLOCK_S` whose RMS is at least :data:`GATE_MIN_RMS` and
    :data:`GATE_OVER_FLOOR_DB` over the audio's noise floor (its 10th-percentile block); each run
    of sound is widened by :data:`GATE_MARGIN_S`, runs closer than :data:`GATE_JOIN_S` are one,
    and one longer than :data:`MAX_UTTERANCE_S` is cut at its quietest block. A clip said through
    from start to end is one span, all of it.
    """
    size = round(GATE_BLOCK_S * SAMPLE_RATE)
    blocks = samples.size // size
    if blocks == 0:
        return []
    power = np.square(samples[: blocks * size].astype(np.float64).reshape(blocks, size)).mean(axis=1)
    floor = float(np.percentile(power, 10))
    loud = np.flatnonzero((power >= GATE_MIN_RMS**2) & (power >= floor * 10 ** (GATE_OVER_FLOOR_DB / 10)))
    if loud.size == 0:
        return []
    margin, join = round(GATE_MARGIN_S / GATE_BLOCK_S), round(GATE_JOIN_S / GATE_BLOCK_S)
    breaks = np.flatnonzero(np.diff(loud) > join)
    firsts, lasts = loud[np.concatenate([[0], breaks + 1])], loud[np.concatenate([breaks, [loud.size - 1]])]
    spans: list[tuple[int, int]] = []
    longest = round(MAX_UTTERANCE_S / GATE_BLOCK_S)
    for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
        begin, end = max(0, first - margin) * size, min(samples.size, (last + 1 + margin) * size)
        while end - begin > longest * size:  # cut in the middle of the quietest block of the second half
            low = begin // size + longest // 2
            cut = (low + int(np.argmin(power[low : begin // size + longest]))) * size + size // 2
            spans.append((begin, cut))
            begin = cut
        spans.append((begin, end))
    return spans


class SpeechReader:
    """The speech channel's records of an indexing job's items, each stretch of a file's audio
    recognised once.

    Long videos are indexed in overlapping windows (the demo's: 4 s every 2 s): recognising each
    window alone would hear every second twice and cut words at every edge. A reader recognises
    a file's audio in chunks of :data:`CHUNK_S` seconds on a fixed grid, each once (with
    :data:`CHUNK_MARGIN_S` of audio either side, keeping what has its middle inside the chunk),
    only where there is sound (:func:`sounding_spans`); an item takes the words, phones and
    alternatives whose middle falls in its span, timed in the video as recognising the span
    gives them. The chunks depend on the file alone, so a window gets the same words whichever
    part, shard or resumed run reads it. Items come in file order: the last
    :data:`RECENT_CHUNKS` chunks are kept.

    Args:
        recognizer: the channel's recogniser (:func:`retrieval.asr.load_recognizer`).
        gate: recognise only the sound (default); False: every chunk whole, as one utterance
            (bench/channels.py measures what the gate saves).
    """

    def __init__(self, recognizer: Any, gate: bool = True) -> None:
        self.recognizer = recognizer
        self.gate = gate
        self.recent: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        #: work done and saved so far: chunks recognised, chunks an item took from an earlier item,
        #: seconds of audio decoded, and of those the seconds the recogniser heard (the rest: no sound)
        self.counts: dict[str, float] = {"chunks": 0, "reused_chunks": 0, "decoded_s": 0.0, "recognised_s": 0.0}

    def read(self, path: str | os.PathLike[str], start: float | None = None, end: float | None = None,
             ) -> dict[str, Any]:
        """The speech of ``path`` (or its span ``[start, end]`` seconds), as :func:`read_speech`
        gives it."""
        begin = max(0.0, float(start or 0.0))
        stop = begin + MAX_SPAN_S if end is None else min(float(end), begin + MAX_SPAN_S)
        record, notes, heard_until = _nothing_heard(), [], begin
        key = file_key(path)
        for number in range(int(begin // CHUNK_S), max(int(begin // CHUNK_S) + 1, math.ceil(stop / CHUNK_S))):
            chunk = self._chunk(path, key, number)
            if chunk["error"]:
                notes.append(chunk["error"])
                break
            heard_until = max(heard_until, chunk["audio_end"])
            for track in ("words", "phones", "alternatives"):
                record[track] += [entry for entry in chunk[track] if begin <= _middle(entry) < stop]
            if chunk["last"]:
                break
        seconds = round(max(0.0, min(stop, heard_until) - begin), 3)
        if not notes and not record["words"] and not record["phones"]:
            notes.append("no speech")
        return {**record, "seconds": seconds, "notes": notes}

    def _chunk(self, path: str | os.PathLike[str], key: tuple[Any, ...], number: int) -> dict[str, Any]:
        """Chunk ``number`` of the file: what was heard with its middle in it, where its audio
        ends, whether the file ends there, or the note of why nothing was read."""
        if (key, number) in self.recent:
            self.recent.move_to_end((key, number))
            self.counts["reused_chunks"] += 1
            return self.recent[(key, number)]
        own = (number * CHUNK_S, (number + 1) * CHUNK_S)
        first, stop = max(0.0, own[0] - CHUNK_MARGIN_S), own[1] + CHUNK_MARGIN_S
        chunk: dict[str, Any] = {**_nothing_heard(), "error": None, "audio_end": first, "last": True}
        try:
            samples = decode_audio(path, first, stop)
        except AudioError as exc:
            chunk["error"] = f"no speech read: {exc}"
        else:
            spans = sounding_spans(samples) if self.gate else [(0, samples.size)]
            self.counts["chunks"] += 1
            self.counts["decoded_s"] += samples.size / SAMPLE_RATE
            self.counts["recognised_s"] += sum(b - a for a, b in spans) / SAMPLE_RATE
            chunk["audio_end"] = first + samples.size / SAMPLE_RATE
            chunk["last"] = samples.size < round((stop - first) * SAMPLE_RATE)
            try:
                heard = recognise_samples(self.recognizer, samples, first, spans)
            except Exception as exc:  # noqa: BLE001  (one stretch the recogniser fails on never fails the job)
                logger.warning("speech channel: %s at %.0f s: %s", path, first, exc)
                chunk["error"] = f"recognition failed: {type(exc).__name__}: {exc}"
            else:
                for track, entries in heard.items():
                    chunk[track] = [entry for entry in entries if own[0] <= _middle(entry) < own[1]]
        self.recent[(key, number)] = chunk
        while len(self.recent) > RECENT_CHUNKS:
            self.recent.popitem(last=False)
        return chunk


def _middle(entry: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> float:
    """The middle of a timed word or phone, or of a run of them (an alternative)."""
    if isinstance(entry, Mapping):
        return (float(entry["start"]) + float(entry["end"])) / 2
    return (float(entry[0]["start"]) + float(entry[-1]["end"])) / 2


def item_words(item: Mapping[str, Any], track: str = "words") -> list[Any]:
    """The recognised words (``track="phones"``: phones; ``"alternatives"``: the n-best's
    differing runs of words) an index item carries (``[]`` when none)."""
    return list(((item.get("extra") or {}).get("speech") or {}).get(track) or [])


class Pronouncer:
    """Words to ARPAbet phones (no stress marks): the CMU dictionary bundled with PocketSphinx,
    and a letter-to-sound fallback for words it lacks."""

    def __init__(self, dictionary: str | os.PathLike[str] | None = None) -> None:
        self._entries: dict[str, tuple[str, ...]] = {}
        path = Path(dictionary) if dictionary is not None else _bundled_dictionary()
        if path is not None and path.is_file():
            with path.open(encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    word, _, phones = line.strip().partition(" ")
                    if word and "(" not in word:  # the first pronunciation of each word
                        self._entries[word] = tuple(phone.rstrip("012") for phone in phones.split())

    def __contains__(self, word: str) -> bool:
        return word.lower() in self._entries

    def phones(self, word: str) -> tuple[str, ...]:
        """The phones of ``word`` (lower-cased; letters only are spelled out when unknown)."""
        word = word.lower()
        if word in self._entries:
            return self._entries[word]
        return letter_to_sound(word)


def letter_to_sound(word: str) -> tuple[str, ...]:
    """A rough pronunciation from spelling alone (longest known spelling first; a final silent e dropped)."""
    letters = "".join(ch for ch in word.lower() if "a" <= ch <= "z")
    if len(letters) > 3 and letters.endswith("e") and letters[-2] not in "aeiou":
        letters = letters[:-1]
    phones: list[str] = []
    at = 0
    while at < len(letters):
        for size in (4, 3, 2, 1):
            sound = _SPELLINGS.get(letters[at : at + size])
            if sound is not None:
                if not phones or phones[-1] != sound.split()[0]:  # "ll", "ss": one phone
                    phones += sound.split()
                else:
                    phones += sound.split()[1:]
                at += size
                break
        else:
            at += 1
    return tuple(phones)


@cache
def _bundled_dictionary() -> Path | None:
    spec = importlib.util.find_spec("pocketsphinx")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "en-us" / "cmudict-en-us.dict"
    return path if path.is_file() else None


@cache
def _scores() -> np.ndarray:
    """The substitution matrix over :data:`PHONES` plus a separator (last row/column)."""
    size = len(PHONES) + 1
    table = np.full((size, size), _MISMATCH, np.float32)
    vowels = [_PHONE_ID[v] for v in _VOWELS]
    table[np.ix_(vowels, vowels)] = _NEAR
    for a, b in _NEAR_PAIRS:
        table[_PHONE_ID[a], _PHONE_ID[b]] = table[_PHONE_ID[b], _PHONE_ID[a]] = _NEAR
    np.fill_diagonal(table, _MATCH)
    table[-1, :] = table[:, -1] = -1e6  # nothing aligns across the separator between items
    return table


def query_words(query: str) -> list[str]:
    """The words of a query searched in speech: a quoted part if there is one, else what follows
    a word that says something is spoken ("... while a voice says the bridge is closed"), else
    every word; without function words and words that say that something is spoken."""
    quoted = re.findall(r"[\"“”]([^\"“”]+)[\"“”]", query)
    said = _SAID.search(query.lower())
    text = " ".join(quoted) if quoted else said.group(1) if said else query
    words = [word.strip("'") for word in _WORD.findall(text.lower())]
    return list(dict.fromkeys(word for word in words if word and word not in _STOPWORDS))


def says_spoken(query: str) -> bool:
    """Whether ``query`` says that what it searches is spoken: a word such as "says" or "said"
    before it (quotes alone do not: they may be on-screen text)."""
    return _SAID.search(query.lower()) is not None


def spoken_words(query: str | Sequence[str]) -> list[str]:
    """The words searched in speech: :func:`query_words` of a text; a sequence is those words
    already (:attr:`indexer.query.Query.spoken`)."""
    return query_words(query) if isinstance(query, str) else list(query)


@dataclass(frozen=True)
class SpeechMatch:
    """The recognised words of an item that matched a query (as recognised), when they were
    said, and the channel's confidence in the match (0..1)."""

    words: tuple[str, ...]
    start: float
    end: float
    confidence: float
    query_words: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["words"] = list(self.words)
        out["query_words"] = list(self.query_words)
        out["text"] = " ".join(self.words)
        return out


#: How :class:`SpeechIndex` matches: over the phone loop's phones, over the pronunciations of
#: the recognised words, or the better of the two per item (bench/channels.py compares them).
MATCH_SOURCES = ("phones", "words", "both")
DEFAULT_SOURCE = "both"


class _PhoneTrack:
    """Every item's phones in one flat array (items apart by a separator), each phone with its
    item, and its time span in the video."""

    def __init__(self, sequences: Sequence[tuple[int, Sequence[tuple[str, float, float]]]],
                 weights: Sequence[float] | None = None) -> None:
        phones: list[int] = []
        owner: list[int] = []
        times: list[tuple[float, float]] = []
        weight: list[float] = []
        for number, (position, sequence) in enumerate(sequences):
            worth = 1.0 if weights is None else float(weights[number])
            for phone, start, end in sequence:
                phones.append(_PHONE_ID[phone])
                owner.append(position)
                times.append((start, end))
                weight.append(worth)
            phones.append(len(PHONES))
            owner.append(-1)
            times.append((0.0, 0.0))
            weight.append(0.0)
        self.phones = np.asarray(phones, np.int64)
        self.owner = np.asarray(owner, np.int64)
        self.times = np.asarray(times, np.float64).reshape(-1, 2)
        # what an alignment ending in each sequence counts (an alternative hypothesis: less)
        self.weight = np.asarray(weight, np.float64)
        # a big offset per item keeps the running maximum of one item from reaching the next
        self.fence = np.cumsum(self.owner < 0).astype(np.float64) * 1e6
        self.positions = np.arange(self.phones.size, dtype=np.float64) * _GAP

    def align(self, query: Sequence[int], items: int) -> tuple[np.ndarray, np.ndarray]:
        """Per item, the best local alignment score of the ``query`` phones, normalised so that
        1.0 means every phone matched in order (Smith-Waterman, all items at once) and times the
        weight of the sequence it ends in, and the flat position where that best alignment ends
        (-1: the item has no phones here)."""
        table = _scores()
        best = np.zeros(self.phones.size)
        previous = np.zeros(self.phones.size)
        for phone in query:
            diagonal = np.concatenate([[0.0], previous[:-1]]) + table[phone][self.phones]
            current = np.maximum(np.maximum(diagonal, previous - _GAP), 0.0)
            # gaps in the recognised phones: a running maximum, exact for linear gaps
            shifted = current + self.positions + self.fence
            current = np.maximum(current, np.maximum.accumulate(shifted) - self.positions - self.fence)
            current[self.owner < 0] = 0.0
            best = np.maximum(best, current)
            previous = current
        best *= self.weight / (_MATCH * max(1, len(query)))
        per_item = np.zeros(items)
        ends = np.full(items, -1)
        inside = np.flatnonzero(self.owner >= 0)
        if inside.size:
            np.maximum.at(per_item, self.owner[inside], best[inside])
            winners = inside[best[inside] == per_item[self.owner[inside]]][::-1]
            ends[self.owner[winners]] = winners  # the first position reaching each item's best
        return per_item, ends


class SpeechIndex:
    """Phonetic search over the recognised speech of an index's items.

    Args:
        items: the index's item records (``id`` and ``extra["speech"]``).
        pronouncer: words to phones (default: the bundled CMU dictionary).
        source: one of :data:`MATCH_SOURCES`.
    """

    def __init__(self, items: Iterable[Mapping[str, Any]], pronouncer: Pronouncer | None = None,
                 source: str = DEFAULT_SOURCE) -> None:
        if source not in MATCH_SOURCES:
            raise ValueError(f"speech matching: unknown source {source!r}; sources are {', '.join(MATCH_SOURCES)}")
        self._pronouncer = pronouncer or Pronouncer()
        self._words: dict[int, list[dict[str, Any]]] = {}
        self._ids: list[int] = []
        from_words: list[tuple[int, list[tuple[str, float, float]]]] = []
        word_weights: list[float] = []
        from_phones: list[tuple[int, list[tuple[str, float, float]]]] = []
        for item in items:
            words, phones = item_words(item), item_words(item, "phones")
            if not words and not phones:
                continue
            position = len(self._ids)
            self._ids.append(int(item["id"]))
            self._words[int(item["id"])] = words
            # the best words, then each run where a next-best hypothesis differs: one sequence each
            for number, run in enumerate([words, *item_words(item, "alternatives")]):
                from_words.append((position, [(phone, float(w["start"]), float(w["end"]))
                                              for w in run for phone in self._pronouncer.phones(w["word"])]))
                word_weights.append(ALTERNATIVE_WEIGHT if number else 1.0)
            from_phones.append((position, [(p["word"], float(p["start"]), float(p["end"])) for p in phones]))
        chosen = ([(from_words, word_weights)] if source in ("words", "both") else []) + (
            [(from_phones, None)] if source != "words" else [])
        self._tracks = [_PhoneTrack(sequences, weights) for sequences, weights in chosen]
        # the same phones in reverse order: as many phones of the same kinds, none of the words, so
        # how well a query aligns there is how well it aligns with this item by chance
        self._chance = [_PhoneTrack([(n, sequence[::-1]) for n, sequence in sequences], weights)
                        for sequences, weights in chosen]

    def __len__(self) -> int:
        """Items that carry any recognised speech."""
        return len(self._ids)

    def scores(self, query: str | Sequence[str]
               ) -> list[tuple[int, float, float, dict[str, tuple[float, float]]]]:
        """Every item's match score and confidence for ``query`` (a text, or the words
        :func:`query_words` reads from it) with, per query word, when its
        best match was said: ``[(item id, score, confidence, {word: (start, end)})]`` (unsorted;
        ``[]``: nothing to match). ``score`` is the phone-weighted mean of the query words' best
        alignments (1.0: all found), ``confidence`` that less the same with the item's phones reversed."""
        words = [w for w in spoken_words(query) if len(self._pronouncer.phones(w)) >= MIN_WORD_PHONES]
        if not words or not self._ids:
            return []
        items = len(self._ids)
        total = np.zeros(items)
        luck = np.zeros(items)
        where: list[list[tuple[float, float]]] = [[] for _ in range(items)]
        weights = []
        for word in words:
            query = [_PHONE_ID[p] for p in self._pronouncer.phones(word)]
            aligned = [track.align(query, items) for track in self._tracks]
            best = np.max([score for score, _ in aligned], axis=0)
            chance = np.max([track.align(query, items)[0] for track in self._chance], axis=0)
            # a word heard in many items tells them apart less (BM25's idf over near-exact matches)
            found = int(np.count_nonzero(best >= HEARD))
            weight = len(query) * math.log(1.0 + (items - found + 0.5) / (found + 0.5))
            weights.append(weight)
            total += weight * best
            luck += weight * chance
            for position in range(items):
                track, (_, ends) = next((t, a) for t, a in zip(self._tracks, aligned, strict=True)
                                            if a[0][position] == best[position])
                end = int(ends[position])
                if end < 0:
                    where[position].append((-1.0, -1.0))
                    continue
                first = end  # the alignment's start: back as far as the query's length, within the sequence
                while first > end - len(query) + 1 and track.owner[first - 1] == position:
                    first -= 1
                where[position].append((float(track.times[first, 0]), float(track.times[end, 1])))
        total /= sum(weights)
        # chance: the better of the query against the item reversed, and the index's median item
        # (when there is another item to compare with)
        luck /= sum(weights)
        if items > 1:
            luck = np.maximum(luck, np.median(total))
        return [(item_id, float(total[n]), float(total[n] - luck[n]), dict(zip(words, where[n], strict=True)))
                for n, item_id in enumerate(self._ids)]

    def search(self, query: str | Sequence[str], k: int | None = None, min_score: float | None = None,
               min_confidence: float | None = None, relative_floor: float = RELATIVE_FLOOR,
               said: bool | None = None) -> list[tuple[int, float]]:
        """Items whose speech sounds like ``query``'s words, best first, as ``(item id, score)``.

        Only items with a score at least ``min_score`` and ``relative_floor`` times the best, and
        a confidence at least ``min_confidence``, are ranked; ``[]`` (the channel abstains) when
        none is, or when the query's searched words have fewer than :data:`MIN_QUERY_PHONES` phones.
        ``said``: whether the query says its words are spoken (default: :func:`says_spoken` of a
        text, False for words); the bars default to :data:`SAID_MIN_SCORE` and
        :data:`SAID_MIN_CONFIDENCE` for such a query, :data:`MIN_SCORE` and
        :data:`MIN_CONFIDENCE` otherwise.
        """
        if said is None:
            said = isinstance(query, str) and says_spoken(query)
        if min_score is None:
            min_score = SAID_MIN_SCORE if said else MIN_SCORE
        if min_confidence is None:
            min_confidence = SAID_MIN_CONFIDENCE if said else MIN_CONFIDENCE
        phones = sum(len(self._pronouncer.phones(w)) for w in spoken_words(query)
                     if len(self._pronouncer.phones(w)) >= MIN_WORD_PHONES)
        if phones < MIN_QUERY_PHONES:
            return []
        scored = [(item_id, score) for item_id, score, confidence, _ in self.scores(query)
                  if score >= min_score and confidence >= min_confidence]
        if not scored:
            return []
        best = max(score for _, score in scored)
        kept = sorted((row for row in scored if row[1] >= relative_floor * best), key=lambda row: -row[1])
        return kept[:k]

    def match(self, item_id: int, query: str | Sequence[str]) -> SpeechMatch | None:
        """The recognised words of ``item_id`` said where ``query`` matched best, with their times
        (the words around the matched phones; when the recogniser put no word there, the phones)."""
        for found, score, _, spans in self.scores(query):
            if found != int(item_id):
                continue
            spans = {word: span for word, span in spans.items() if span[0] >= 0}
            if not spans:
                return None
            start, end = min(s for s, _ in spans.values()), max(e for _, e in spans.values())
            words = [w for w in self._words[found] if w["end"] > start and w["start"] < end]
            shown = tuple(w["word"] for w in words) if words else ()
            if words:
                start, end = min(start, float(words[0]["start"])), max(end, float(words[-1]["end"]))
            return SpeechMatch(shown, round(start, 3), round(end, 3), round(score, 4), tuple(spans))
        return None


def word_error_rate(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """Word error rate: word-level edit distance over the reference's length."""
    reference, hypothesis = list(reference), list(hypothesis)
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        previous, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref != hyp))
    return row[-1] / max(1, len(reference))
