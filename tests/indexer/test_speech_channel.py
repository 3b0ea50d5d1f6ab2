"""The speech channel end to end: espeak-ng speaks sentences into videos, PocketSphinx recognises
them while a job indexes them, the index carries the words and phones, and search finds a spoken
sentence by sound although the recogniser got its words wrong.

The corpus is four 3-second videos: two with a spoken sentence, one with a silent audio track,
one without audio. espeak-ng comes from `make test` (the Makefile's espeak target).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import wave
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

import retrieval.speech
from app.cli import app
from app.web import CorpusGuard, preview_start, render_hits
from indexer.jobs import JobSpec, run_index_job
from indexer.parts import WorkDir, work_dir_for
from indexer.plan import window_spans
from indexer.query import Query
from indexer.search import Hit, Searcher
from indexer.store import open_index
from retrieval.data import synthetic
from retrieval.data.spoken import speak
from retrieval.data.synthetic import generate_corpus, plan_corpus
from retrieval.speech import (
    ALTERNATIVE_WEIGHT,
    MAX_UTTERANCE_S,
    MIN_SCORE,
    SAID_MIN_SCORE,
    SAMPLE_RATE,
    WORD_SEARCH,
    AudioError,
    Pronouncer,
    SpeechIndex,
    SpeechReader,
    SpeechRecognizer,
    SpokenWord,
    alternative_runs,
    decode_audio,
    differences,
    letter_to_sound,
    query_words,
    read_speech,
    recognise_samples,
    says_spoken,
    sounding_spans,
    word_error_rate,
)

SPOKEN = {"meeting.mp4": "the meeting starts at noon", "garden.mp4": "keep the dog away from the garden"}
SECONDS = 3.0


def _speak(text: str, path: Path) -> np.ndarray:
    """espeak-ng's speech of ``text`` as 16 kHz mono int16 samples."""
    subprocess.run(["espeak-ng", "-v", "en-us+f2", "-s", "130", "-w", str(path), text], check=True,
                   capture_output=True, timeout=60)
    with wave.open(str(path)) as spoken:
        rate, samples = spoken.getframerate(), np.frombuffer(spoken.readframes(spoken.getnframes()), np.int16)
    at = np.arange(0, len(samples), rate / SAMPLE_RATE).astype(int)
    return samples[at[at < len(samples)]]


def _write_video(path: Path, audio: np.ndarray | None, rate: int = SAMPLE_RATE, layout: str = "mono",
                 fps: int = 4, seconds: float = SECONDS) -> Path:
    """A dark ``seconds``-long video with ``audio`` (int16, ``[channels, samples]`` or mono) or none."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("h264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout=layout) if audio is not None else None
        for _ in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30, np.uint8), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        if sound is not None:
            planar = audio.reshape(1, -1) if audio.ndim == 1 else audio
            chunk = 1024
            for at in range(0, planar.shape[1], chunk):
                piece = np.ascontiguousarray(planar[:, at : at + chunk].reshape(1, -1) if planar.shape[0] > 1
                                             else planar[:, at : at + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="s16", layout=layout)
                frame.rate, frame.pts = rate, at
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    return path


def _padded(samples: np.ndarray, seconds: float = SECONDS, lead: float = 0.5) -> np.ndarray:
    out = np.zeros(int(seconds * SAMPLE_RATE), np.int16)
    start = int(lead * SAMPLE_RATE)
    piece = samples[: len(out) - start]
    out[start : start + len(piece)] = piece
    return out


@pytest.fixture(scope="module")
def recognizer() -> SpeechRecognizer:
    return SpeechRecognizer()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spoken")
    for name, text in SPOKEN.items():
        _write_video(root / name, _padded(_speak(text, root / f"{name}.wav")))
        (root / f"{name}.wav").unlink()
    _write_video(root / "silent.mp4", np.zeros(int(SECONDS * SAMPLE_RATE), np.int16))
    _write_video(root / "mute.mp4", None)
    return root


@pytest.fixture(scope="module")
def speech_index(model_dir: Path, videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speech-index") / "index"
    spec = JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2, channels=("visual", "speech"))
    summary = run_index_job(spec, workers=0, batch_size=4, progress=False)
    assert (summary.indexed, summary.failed) == (4, 0)
    return out


def test_pronunciations_from_the_dictionary_and_from_spelling() -> None:
    pronouncer = Pronouncer()
    assert pronouncer.phones("bridge") == ("B", "R", "IH", "JH")
    assert "zorblax" not in pronouncer
    assert letter_to_sound("zorblax") == ("Z", "AO", "R", "B", "L", "AE", "K", "S")
    assert pronouncer.phones("Zorblax") == letter_to_sound("zorblax")
    assert letter_to_sound("shell") == ("SH", "EH", "L")


def test_query_words_prefer_a_quote_and_drop_how_it_is_said() -> None:
    assert query_words('a street while a voice says "the bridge is closed"') == ["bridge", "closed"]
    assert query_words("a voice says the bridge is closed") == ["bridge", "closed"]
    assert query_words("a green disc sinking while a voice says the bridge is closed") == ["bridge", "closed"]
    assert query_words("bridge closed") == ["bridge", "closed"]


def test_word_error_rate() -> None:
    assert word_error_rate(["the", "bridge", "is", "closed"], ["the", "bridges", "oh"]) == 0.75
    assert word_error_rate(["a"], ["a"]) == 0.0


def _item(item_id: int, words: str, start: float = 0.0) -> dict:
    spoken = [{"word": w, "start": start + n * 0.4, "end": start + n * 0.4 + 0.3, "prob": 0.5}
              for n, w in enumerate(words.split())]
    return {"id": item_id, "extra": {"speech": {"words": spoken, "phones": [], "notes": []}}}


def test_phonetic_search_finds_misrecognised_words_and_abstains_otherwise() -> None:
    items = [_item(0, "the bridges oh close"), _item(1, "welcome to the museum", start=10.0),
             _item(2, "the weather is fine today"), {"id": 3, "extra": {}}]
    index = SpeechIndex(items)
    assert len(index) == 3
    found = index.search("a voice says the bridge is closed")
    assert found[0][0] == 0 and found[0][1] > 0.7, "'bridges oh close' sounds like 'bridge is closed'"
    assert [item for item, _ in index.search("welcome to the museums")] == [1]
    match = index.match(1, "welcome to the museums")
    assert match.words == ("welcome", "to", "the", "museum") and 10.0 <= match.start < match.end <= 11.6
    # picture queries, and too little to go on, leave the channel silent
    assert index.search("a red square moving to the left on a green background") == []
    assert index.search("red car") == []
    assert index.search("the") == []
    with pytest.raises(ValueError, match="unknown source"):
        SpeechIndex(items, source="letters")


def test_a_query_that_says_its_words_are_spoken_ranks_a_weaker_match() -> None:
    assert says_spoken("a green disc sinking while a voice says the kitchen is full of people")
    assert says_spoken('someone said "hello there"') and says_spoken("the guide tells us the way")
    assert not says_spoken('a sign that reads "SALE"'), "a quote alone may be on-screen text"
    assert not says_spoken("a red square moving to the left") and not says_spoken("the kitchen is full of people")
    assert Query.parse("a voice says the kitchen is full of people").said
    assert not Query.parse("the kitchen is full of people").said
    others = [_item(n, words) for n, words in enumerate(("the weather is fine today", "we found a bottle near the station",
                                                         "please bring the ticket to the office"), start=1)]
    # "people" not heard, "kitchen" misheard: a weaker match than the channel ranks unasked
    index = SpeechIndex([_item(0, "the kitten is full of"), *others])
    said, unsaid = "a voice says the kitchen is full of people", "the kitchen is full of people"
    score = next(row[1] for row in index.scores(unsaid) if row[0] == 0)
    assert SAID_MIN_SCORE <= score < MIN_SCORE
    assert [item for item, _ in index.search(said)] == [0]
    assert index.search(unsaid) == [], "the same words, not said to be spoken: the stricter bars"
    assert [item for item, _ in index.search(query_words(said), said=True)] == [0], "words and the flag, as a Query gives them"
    assert index.search(query_words(said)) == []
    # said to be spoken, but nothing sounds like it: still silent
    assert SpeechIndex(others).search(said) == []


def test_differences_time_an_alternative_within_the_words_it_replaces() -> None:
    best = [SpokenWord(w, 1.0 + n, 1.8 + n, 0.9) for n, w in enumerate(["the", "bridges", "oh", "today"])]
    runs = differences(best, ["the", "bridge", "is", "closed", "today"])
    assert len(runs) == 1
    run = runs[0]
    assert [w.word for w in run] == ["the", "bridge", "is", "closed", "today"], "one agreeing word either side"
    assert run[0] == best[0] and run[-1] == best[3]
    new = run[1:-1]
    assert new[0].start == best[1].start and new[-1].end == best[2].end, "within the words replaced"
    assert all(a.end == b.start for a, b in itertools.pairwise(new)) and new[0].prob == 0.0
    assert differences(best, [w.word for w in best]) == []
    # words the best hypothesis lacks go between their neighbours; two separate runs stay apart
    runs = differences(best, ["the", "big", "bridges", "oh", "to", "day"])
    assert [[w.word for w in r] for r in runs] == [["the", "big", "bridges"], ["oh", "to", "day"]]
    assert runs[0][1].start == best[0].end and runs[0][1].end == best[1].start
    assert differences([], ["hello"])[0][0].word == "hello"
    # the same difference in two hypotheses is kept once, in the order first found
    runs = alternative_runs(best, [["the", "bridge", "oh", "today"], ["the", "bridge", "oh", "today"],
                                   ["the", "bridges", "oh", "to", "day"]])
    assert [[w.word for w in r] for r in runs] == [["the", "bridge", "oh"], ["oh", "to", "day"]]


def test_the_word_search_is_recorded_with_the_engine() -> None:
    channel, plain = SpeechRecognizer(), SpeechRecognizer(search={})
    assert channel.identity["word_search"] == WORD_SEARCH and plain.identity["word_search"] == {}
    assert channel.identity["alternatives"] >= 1
    with pytest.raises(KeyError, match="no_such_option"):
        SpeechRecognizer(search={"no_such_option": 1})


def test_an_alternative_hypothesis_finds_a_word_the_best_one_missed() -> None:
    items = [_item(n, words) for n, words in enumerate(("we found them in near the station",
                                                        "we found a bottle near the station",
                                                        "we found a ladder near the station"))]
    query = 'a voice says "we found a umbrella near the station"'
    assert SpeechIndex(items).search(query) == [], "nothing in the best words tells them apart"
    best = [SpokenWord(**w) for w in items[0]["extra"]["speech"]["words"]]
    items[0]["extra"]["speech"]["alternatives"] = [
        [w.to_dict() for w in run] for run in differences(best, ["we", "found", "umbrella", "near", "the", "station"])]
    index = SpeechIndex(items)
    found = index.search(query)
    assert found and found[0][0] == 0
    match = index.match(0, query)
    assert match.start >= best[1].start and match.end <= best[-1].end + 1e-9
    # matching over the phone loop alone ignores the words and their alternatives
    assert SpeechIndex(items, source="phones").search(query) == []


def test_an_alternative_counts_less_than_the_best_hypothesis() -> None:
    heard = _item(0, "the bridge is closed")
    below = _item(1, "the ridge oh today")
    best = [SpokenWord(**w) for w in below["extra"]["speech"]["words"]]
    below["extra"]["speech"]["alternatives"] = [
        [w.to_dict() for w in run] for run in differences(best, ["the", "bridge", "is", "closed", "today"])]
    others = [_item(n, words) for n, words in enumerate(("we found a bottle near the station",
                                                         "please bring the ticket to the office"), start=2)]
    index = SpeechIndex([heard, below, *others], source="words")
    query = "a voice says the bridge is closed"
    scores = {item: score for item, score, _, _ in index.scores(query)}
    assert scores[0] == pytest.approx(1.0), "every phone of both words in the best hypothesis"
    assert scores[1] == pytest.approx(ALTERNATIVE_WEIGHT), "the same words, only in an alternative"
    assert [item for item, _ in index.search(query)] == [0, 1]
    # the alternative's "bridge" still beats the best words' poorer "ridge" in the same item
    bridge = {item: score for item, score, _, _ in index.scores(["bridge"])}
    plain = {item: score for item, score, _, _ in SpeechIndex([_item(1, "the ridge oh today"), *others]).scores(["bridge"])}
    assert plain[1] < bridge[1] == pytest.approx(ALTERNATIVE_WEIGHT)
    assert index.match(1, query).start >= best[0].start


def test_decodes_any_layout_and_rate_to_16k_mono(tmp_path: Path) -> None:
    rate, seconds = 96000, 1.0
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.int16)
    with av.open(str(tmp_path / "eight.mka"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="7.1")
        for at in range(0, tone.size, 4800):
            piece = np.repeat(tone[at : at + 4800], 8).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(piece, format="s16", layout="7.1")
            frame.rate, frame.pts = rate, at
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    samples = decode_audio(tmp_path / "eight.mka")
    assert samples.dtype == np.int16 and abs(samples.size - SAMPLE_RATE * seconds) <= SAMPLE_RATE * 0.05
    assert np.abs(samples).max() > 1000
    span = decode_audio(tmp_path / "eight.mka", 0.25, 0.75)
    assert abs(span.size - SAMPLE_RATE // 2) <= SAMPLE_RATE * 0.05


def test_missing_and_broken_audio_are_notes(recognizer: SpeechRecognizer, videos: Path, tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="no audio stream"):
        decode_audio(videos / "mute.mp4")
    assert read_speech(recognizer, videos / "mute.mp4")["notes"] == ["no speech read: no audio stream"]
    broken = tmp_path / "broken.mp4"
    data = (videos / "meeting.mp4").read_bytes()
    broken.write_bytes(data[: len(data) // 3] + bytes(4096))
    result = read_speech(recognizer, broken)
    assert result["words"] == [] or result["notes"] == [], "a broken file reads partly or is a note"
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    assert read_speech(recognizer, garbage)["notes"][0].startswith("no speech read")


def _covered(spans: list[tuple[int, int]], size: int) -> np.ndarray:
    covered = np.zeros(size, bool)
    for first, stop in spans:
        covered[first:stop] = True
    return covered


def _said(clean: np.ndarray) -> np.ndarray:
    """The samples of the 10 ms frames where ``clean`` speech is within 40 dB of its loudest
    (espeak-ng's output trails off into +-1 dither after the last word)."""
    frames = clean[: clean.size // 160 * 160].astype(np.float64).reshape(-1, 160)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    return np.flatnonzero(np.repeat(rms >= rms.max() / 100, 160))


def test_the_energy_gate_skips_silence_and_steady_noise_and_keeps_quiet_speech(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    size = int(SECONDS * SAMPLE_RATE)
    assert sounding_spans(np.zeros(size, np.int16)) == [], "digital silence"
    assert sounding_spans(rng.normal(0, 4, size).astype(np.int16)) == [], "near-silence: dither, a codec's floor"
    assert sounding_spans(rng.normal(0, 2000, size).astype(np.int16)) == [], "a steady hiss, however loud"
    said = _padded(_speak("the meeting starts at noon", tmp_path / "said.wav"))
    speech = _said(said)
    power = float(np.mean(said[speech].astype(np.float64) ** 2))
    for gain in (1.0, 0.01):  # as spoken, and turned down 40 dB
        for snr_db in (None, 15.0, 5.0):
            audio = said * gain
            if snr_db is not None:
                audio = audio + rng.normal(0, gain * np.sqrt(power / 10 ** (snr_db / 10)), size)
            spans = sounding_spans(np.clip(audio, -32768, 32767).astype(np.int16))
            assert _covered(spans, size)[speech].all(), f"speech at gain {gain}, SNR {snr_db} dB is kept whole"
            assert len(spans) == 1
    # the spoken layer's 15 dB hiss clips: every sample of their sentence is recognised
    plan = plan_corpus(n_train=1, n_test=16, long_videos=0, spoken_share=1.0)
    noisy = [job.scenes[0].speech for job in plan.jobs if job.video.startswith("test/")
             and job.scenes[0].speech.snr_db == 15.0]
    assert len(noisy) >= 3
    for said_over in noisy:
        clean = _said(speak(replace(said_over, snr_db=None), SECONDS))
        for gain in (1.0, 0.01):
            audio = (speak(said_over, SECONDS) * gain).astype(np.int16)
            assert _covered(sounding_spans(audio), audio.size)[clean].all(), (said_over, gain)


def test_the_gate_recognises_only_the_sound_and_long_speech_in_utterances(recognizer: SpeechRecognizer,
                                                                          tmp_path: Path) -> None:
    said = _speak("the meeting starts at noon", tmp_path / "said.wav")
    gap = np.zeros(10 * SAMPLE_RATE, np.int16)
    audio = np.concatenate([gap[: SAMPLE_RATE], said, gap, said, gap[: SAMPLE_RATE]])
    spans = sounding_spans(audio)
    assert len(spans) == 2 and sum(b - a for a, b in spans) < 0.4 * audio.size, "10 s of silence is not heard"
    gated = recognise_samples(recognizer, audio, 5.0, spans)
    alone = [recognise_samples(recognizer, audio[a:b], 5.0 + a / SAMPLE_RATE) for a, b in spans]
    assert gated["words"] == alone[0]["words"] + alone[1]["words"], "each sound its own utterance, timed in place"
    assert gated["words"] and all(5.0 + 1.0 - 0.6 <= w["start"] for w in gated["words"])
    assert recognise_samples(recognizer, audio, 0.0, [])["words"] == []
    # speech without a pause longer than the gate's join: cut into utterances at quiet moments
    talk = np.concatenate([np.concatenate([said, np.zeros(SAMPLE_RATE // 4, np.int16)]) for _ in range(8)])
    pieces = sounding_spans(talk)
    assert len(pieces) >= 3 and _covered(pieces, talk.size)[_said(talk)].all()
    assert all(b - a <= MAX_UTTERANCE_S * SAMPLE_RATE for a, b in pieces)
    assert all(a == b for (_, a), (b, _) in itertools.pairwise(pieces)), "nothing left out between them"
    assert all(np.abs(talk[a - 240 : a + 240]).max() < np.abs(talk).max() / 4 for a, _ in pieces[1:]), \
        "cut where it is quiet"


LONG_TALK = {1.0: "the meeting starts at noon", 7.0: "keep the dog away from the garden"}


@pytest.fixture(scope="module")
def long_talk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 s: a sentence from 1 s, silence, another from 7 s (as a long video indexed in windows)."""
    root = tmp_path_factory.mktemp("talk")
    audio = np.zeros(12 * SAMPLE_RATE, np.int16)
    for at, text in LONG_TALK.items():
        said = _speak(text, root / "said.wav")
        audio[int(at * SAMPLE_RATE) : int(at * SAMPLE_RATE) + said.size] = said
    (root / "said.wav").unlink()
    (root / "videos").mkdir()
    return _write_video(root / "videos" / "talk.mp4", audio, seconds=12.0)


def _middle(token: dict) -> float:
    return (token["start"] + token["end"]) / 2


def test_overlapping_windows_recognise_the_files_audio_once(recognizer: SpeechRecognizer, long_talk: Path) -> None:
    reader = SpeechReader(recognizer)
    windows = window_spans(12.0, 4.0, 2.0)
    read = [reader.read(long_talk, start, end) for start, end in windows]
    assert reader.counts["chunks"] == 1 and reader.counts["reused_chunks"] == len(windows) - 1
    assert reader.counts["recognised_s"] < 0.7 * reader.counts["decoded_s"] <= 0.7 * 12.1, "silence is not heard"
    whole = reader.read(long_talk)
    assert abs(whole["seconds"] - 12.0) < 0.1 and whole["words"]
    for (start, end), speech in zip(windows, read, strict=True):
        assert speech["seconds"] == pytest.approx(end - start, abs=0.05)
        for track in ("words", "phones"):
            assert speech[track] == [t for t in whole[track] if start <= _middle(t) < end], "its share, times kept"
        assert speech["notes"] == ([] if speech["words"] or speech["phones"] else ["no speech"])
    # placed in time as recognising the window alone places them
    alone = read_speech(recognizer, long_talk, 0.0, 4.0)
    shared = {w["word"]: w["start"] for w in read[0]["words"]}
    common = [w for w in alone["words"] if w["word"] in shared]
    assert len(common) >= 2 and all(abs(w["start"] - shared[w["word"]]) < 0.2 for w in common), (alone, read[0])
    # and a search finds the window the sentence is said in
    index = SpeechIndex([{"id": n, "extra": {"speech": speech}} for n, speech in enumerate(read)])
    found = index.search("a voice says keep the dog away from the garden", k=1)
    assert found and windows[found[0][0]][0] >= 6.0


def test_a_window_gets_the_same_words_whoever_reads_it(recognizer: SpeechRecognizer, long_talk: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval.speech, "CHUNK_S", 5.0)  # windows across chunk edges
    windows = window_spans(12.0, 4.0, 2.0)
    in_order = SpeechReader(recognizer)
    read = [in_order.read(long_talk, start, end) for start, end in windows]
    assert in_order.counts["chunks"] == 3
    for (start, end), speech in zip(windows, read, strict=True):
        fresh = SpeechReader(recognizer).read(long_talk, start, end)  # another shard, a resumed run
        assert fresh == speech
        starts = [(w["word"], w["start"]) for w in speech["words"]]
        assert len(starts) == len(set(starts)), "a word at a chunk edge is kept by one chunk only"
        assert all(start <= _middle(w) < end for w in speech["words"] + speech["phones"])
    assert any(w["word"] in ("dog", "garden", "away") for speech in read for w in speech["words"])


def test_a_windowed_job_resumed_after_a_crash_keeps_the_speech(model_dir: Path, long_talk: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(long_talk, videos / "a.mp4")
    shutil.copy(long_talk, videos / "b.mp4")
    spec = JobSpec(model_dir=model_dir, out=tmp_path / "reference", videos=videos, window=4.0, stride=2.0,
                   part_size=1, channels=("visual", "speech"))
    run_index_job(spec, workers=0, progress=False)
    commit = WorkDir.commit_part

    def crash_after_first(self: WorkDir, part: int, vectors: np.ndarray, manifest: dict) -> None:
        if any(self.parts_dir.glob("part-*.json")):
            raise RuntimeError("injected crash")
        commit(self, part, vectors, manifest)

    resumed = replace(spec, out=tmp_path / "resumed")
    monkeypatch.setattr(WorkDir, "commit_part", crash_after_first)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_index_job(resumed, workers=0, progress=False)
    monkeypatch.undo()
    run_index_job(resumed, resume=True, workers=0, progress=False)
    reference, again = open_index(spec.out).items, open_index(resumed.out).items
    assert len(reference) == 2 * len(window_spans(12.0, 4.0, 2.0))
    assert [(i["path"], i["start"], i["extra"]["speech"]) for i in reference] == [
        (i["path"], i["start"], i["extra"]["speech"]) for i in again]
    assert sum(len(i["extra"]["speech"]["words"]) for i in reference) > 0


def test_the_index_carries_words_phones_times_and_the_channel(speech_index: Path) -> None:
    index = open_index(speech_index)
    channels = index.manifest["extra"]["channels"]
    assert set(channels) == {"visual", "speech"} and "pocketsphinx" in channels["speech"]["engine"]
    by_name = {Path(item["path"]).name: item["extra"]["speech"] for item in index.items}
    meeting = by_name["meeting.mp4"]
    assert meeting["words"] and meeting["phones"] and abs(meeting["seconds"] - SECONDS) < 0.2
    for token in meeting["words"] + meeting["phones"]:
        assert 0.0 <= token["start"] < token["end"] <= SECONDS + 0.05
    # the n-best list's other readings, each a run of words timed within the best words' span
    runs = meeting["alternatives"]
    assert runs and all(run for run in runs)
    best = [(w["word"], w["start"]) for w in meeting["words"]]
    for run in runs:
        assert [w["word"] for w in run] != [w for w, _ in best]
        assert meeting["words"][0]["start"] <= run[0]["start"] and run[-1]["end"] <= meeting["words"][-1]["end"]
        assert all(a["end"] <= b["start"] + 1e-6 for a, b in itertools.pairwise(run))
    assert by_name["mute.mp4"]["notes"] == ["no speech read: no audio stream"]
    assert by_name["silent.mp4"]["words"] == []


def test_search_finds_the_spoken_sentence_and_leaves_picture_queries_alone(speech_index: Path) -> None:
    searcher = Searcher(speech_index)
    assert searcher.channels == ("visual", "speech")
    for name, sentence in SPOKEN.items():
        hits = searcher.search(f'a dark frame while a voice says "{sentence}"', k=2)
        assert Path(hits[0].path).name == name
        assert hits[0].channels["speech"]["rank"] == 1
        assert hits[0].speech["words"] and 0.3 <= hits[0].speech["start"] < hits[0].speech["end"] <= SECONDS
    picture = searcher.search("a dark grey frame", k=4)
    assert [(h.item_id, h.score) for h in picture] == [
        (h.item_id, h.score) for h in searcher.search("a dark grey frame", k=4, channels=["visual"])]


def test_cli_json_and_table_carry_the_spoken_words(speech_index: Path) -> None:
    query = "someone says keep the dog away from the garden"
    result = CliRunner().invoke(app, ["search", query, "--index", str(speech_index), "--json", "-k", "1",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.output.splitlines()[0])
    assert Path(first["path"]).name == "garden.mp4" and first["speech"]["text"]
    assert first["speech"]["start"] < first["speech"]["end"]
    table = CliRunner().invoke(app, ["search", query, "--index", str(speech_index), "--device", "cpu"])
    assert table.exit_code == 0 and "said at" in table.output


def test_the_page_shows_the_spoken_words_and_starts_at_them(tmp_path: Path) -> None:
    video = tmp_path / "talk.mp4"
    video.write_bytes(b"")
    hit = Hit(item_id=0, path=str(video), start=0.0, end=8.0, score=0.03, labels=[], captions=[],
              channels={"visual": {"rank": 4, "score": 0.1}, "speech": {"rank": 1, "score": 0.8}},
              speech={"words": ["bridges", "oh"], "text": "bridges oh", "start": 2.5, "end": 3.1,
                      "confidence": 0.8, "query_words": ["bridge", "closed"]})
    assert preview_start(hit) == 2.5
    html = render_hits([hit], CorpusGuard([str(video)]))
    assert "said at" in html and "<mark>bridges oh</mark>" in html and "speech #1" in html


def test_cli_names_the_missing_extra_before_work(model_dir: Path, videos: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval.speech, "speech_available", lambda: False)
    out = tmp_path / "i"
    missing = CliRunner().invoke(app, ["index", "--model", str(model_dir), "--videos", str(videos), "--out", str(out),
                                       "--channels", "visual,speech"])
    assert missing.exit_code == 2 and "vtr[speech]" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not out.exists() and not work_dir_for(out).exists()



def test_export_and_the_python_api_carry_the_speech(speech_index: Path, tmp_path: Path) -> None:
    import indexer

    _, table = indexer.read_export(indexer.export_index(speech_index, tmp_path / "export"))
    spoken = dict(zip([Path(p).name for p in table.column("path").to_pylist()],
                      table.column("speech_text").to_pylist(), strict=True))
    assert spoken["meeting.mp4"] and spoken["mute.mp4"] == ""
    hit = indexer.Searcher(speech_index).search("a voice says the meeting starts at noon", k=1)[0]
    assert hit.to_dict()["speech"]["text"] == hit.speech["text"] and Path(hit.path).name == "meeting.mp4"


def test_index_add_recognises_the_new_videos_speech(model_dir: Path, videos: Path, tmp_path: Path) -> None:
    from indexer.update import add_to_index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(videos / "mute.mp4", corpus / "mute.mp4")
    shutil.copy(videos / "garden.mp4", corpus / "garden.mp4")
    index = tmp_path / "index"
    run_index_job(JobSpec(model_dir=model_dir, out=index, videos=corpus, channels=("visual", "speech")),
                  workers=0, progress=False)
    shutil.copy(videos / "meeting.mp4", corpus / "meeting.mp4")
    add_to_index(index, corpus, workers=0, progress=False)
    reader = open_index(index)
    assert set(reader.manifest["extra"]["channels"]) == {"visual", "speech"}
    added = next(item for item in reader.items if item["path"].endswith("meeting.mp4"))
    assert added["extra"]["speech"]["words"]
    hit = Searcher(index).search("a voice says the meeting starts at noon", k=1)[0]
    assert hit.path.endswith("meeting.mp4") and hit.channels["speech"]["rank"] == 1


def test_a_lone_spoken_item_is_still_found() -> None:
    index = SpeechIndex([_item(0, "the meeting starts at noon"), {"id": 1, "extra": {}}])
    assert [item for item, _ in index.search("a voice says the meeting starts at noon")] == [0]


def test_the_spoken_layer_says_what_the_caption_quotes(recognizer: SpeechRecognizer, tmp_path: Path) -> None:
    quiet = plan_corpus(n_train=2, n_test=8, long_videos=0)
    plan = plan_corpus(n_train=2, n_test=8, long_videos=0, spoken_share=0.5)
    spoken = [entry for entry in plan.test if entry["attributes"].get("spoken")]
    assert len(spoken) == 4 and plan.train == quiet.train, "the layer draws from its own random stream"
    for entry in spoken:
        assert entry["caption"].endswith(f"while a voice says {entry['attributes']['spoken']['text']}")
    generate_corpus(tmp_path, n_train=2, n_test=8, long_videos=0, progress=False, spoken_share=0.5)
    errors = []
    for entry in json.loads((tmp_path / "test.json").read_text()):
        said = entry["attributes"].get("spoken")
        heard = read_speech(recognizer, tmp_path / "videos" / entry["video"])
        if said is None:
            assert heard["notes"], "a clip without the layer has no audio track"
            continue
        errors.append(word_error_rate(said["text"].split(), [word["word"] for word in heard["words"]]))
    assert len(errors) == 4 and np.mean(errors) < 0.9, errors


def test_synth_without_espeak_warns_once_and_skips_the_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(synthetic, "espeak_available", lambda: False)
    synthetic.generate_corpus(tmp_path, n_train=1, n_test=4, long_videos=0, progress=False, spoken_share=1.0)
    assert [r.getMessage() for r in caplog.records if "espeak-ng" in r.getMessage()] != []
    assert not any(entry["attributes"].get("spoken") for entry in json.loads((tmp_path / "test.json").read_text()))


def test_eval_reports_the_speech_channel_fusion_and_wer(model_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n_train=1, n_test=6, long_videos=0, progress=False, spoken_share=0.5)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--dataset", "generic", "--ann",
                                      str(corpus / "test.json"), "--videos", str(corpus / "videos"), "--channels",
                                      "visual,speech", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "speech_mentioning" in result.output and "WER" in result.output
    metrics = json.loads((out / "channels.json").read_text())
    assert metrics["queries"] == {"all": 6, "picture_only": 3, "text_mentioning": 0, "speech_mentioning": 3}
    assert metrics["recognition"]["videos"] == 3 and 0.0 <= metrics["recognition"]["wer"] <= 1.5
    mentioning, picture = metrics["speech_mentioning"], metrics["picture_only"]
    assert {"visual", "speech", "fused"} <= mentioning.keys()
    assert mentioning["fused"]["R@1"] >= mentioning["visual"]["R@1"]
    assert picture["fused"] == picture["visual"], "no speech match on a picture caption: fusion is the visual ranking"
