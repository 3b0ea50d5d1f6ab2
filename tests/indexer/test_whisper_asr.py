"""``--asr whisper:DIR``: a user-brought Whisper model directory recognises the speech channel.

The Whisper model is tiny and randomly initialised, made here: a small byte-level BPE tokenizer
(lower-case words, the special tokens Whisper's generation needs, the 1501 timestamp tokens), a
2-layer encoder-decoder, a feature extractor, and a generation config with alignment heads so word
times work. Its words are random but come from its vocabulary, so the phonetic matching can find
them again. The spoken clips are the synthetic corpus's spoken layer (espeak-ng, `make test`).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from indexer.engines import make_engine
from indexer.errors import JobError
from indexer.jobs import JobSpec, run_index_job
from indexer.parts import work_dir_for
from indexer.plan import Shard
from indexer.publish import publish_job
from indexer.search import Searcher
from indexer.store import open_index
from indexer.update import add_to_index
from retrieval.asr import DEFAULT_ASR, load_recognizer, parse_asr
from retrieval.data.synthetic import generate_corpus
from retrieval.models.model_dir import weights_hash
from retrieval.speech import SAMPLE_RATE, SpeechUnavailable, SpokenWord, decode_audio, read_speech
from retrieval.whisper_asr import WhisperRecognizer

WORDS = ("bridge", "closed", "meeting", "starts", "noon", "garden", "umbrella", "museum", "weather", "tomorrow")
SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")


def build_tiny_whisper(out: Path, max_length: int = 14, seed: int = 0) -> Path:
    """A randomly initialised Whisper model directory, as ``save_pretrained`` writes a real one."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    # byte-level BPE: single letters and the space marker, merged left to right into " word" tokens
    vocab = {token: n for n, token in enumerate(["!", *"abcdefghijklmnopqrstuvwxyz", "Ġ"])}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = "Ġ"
        for letter in word:
            if (piece, letter) not in merges:
                merges.append((piece, letter))
            piece += letter
            vocab.setdefault(piece, len(vocab))
    texts = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(SPECIALS[1:]))
    tokenizer.add_tokens([f"<|{n * 0.02:.2f}|>" for n in range(1501)])
    tokenizer.save_pretrained(out)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    end = ids["<|endoftext|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_target_positions=64, pad_token_id=end,
                           bos_token_id=end, eos_token_id=end, decoder_start_token_id=ids["<|startoftranscript|>"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    whole_words = {vocab["Ġ" + word] for word in WORDS}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=end, eos_token_id=end, pad_token_id=end,
        max_length=max_length, no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=False,
        alignment_heads=[[1, 0], [1, 1]],
        # a random model would say anything: only whole words of the vocabulary, and never nothing
        suppress_tokens=[n for n in range(texts) if n not in whole_words], begin_suppress_tokens=[end])
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny.en")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 3-second clips: one test clip where espeak-ng says a sentence, one test clip and one
    training clip without an audio track."""
    root = tmp_path_factory.mktemp("spoken")
    generate_corpus(root, n_train=1, n_test=2, size=32, long_videos=0, progress=False, spoken_share=0.5)
    return root


def _spoken_clip(corpus: Path) -> Path:
    entry = next(e for e in json.loads((corpus / "test.json").read_text()) if e["attributes"].get("spoken"))
    return corpus / "videos" / entry["video"]


@pytest.fixture(scope="module")
def whisper_index(model_dir: Path, corpus: Path, whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whisper-index") / "index"
    spec = JobSpec(model_dir=model_dir, out=out, videos=corpus / "videos", part_size=2,
                   channels=("visual", "speech"), asr=f"whisper:{whisper_dir}")
    summary = run_index_job(spec, workers=0, batch_size=4, progress=False)
    assert (summary.indexed, summary.failed) == (3, 0)
    return out


def test_loads_and_times_words_within_the_audio(whisper_dir: Path, corpus: Path) -> None:
    recognizer = load_recognizer(f"whisper:{whisper_dir}")
    assert isinstance(recognizer, WhisperRecognizer)
    samples = decode_audio(_spoken_clip(corpus))
    seconds = samples.size / SAMPLE_RATE
    words = recognizer.recognize(samples, offset=10.0)
    assert words and all(isinstance(word, SpokenWord) for word in words)
    for word in words:
        assert word.word in WORDS
        assert 10.0 <= word.start <= word.end <= 10.0 + seconds + 1e-6
    assert recognizer.recognize_phones(samples) == []
    assert recognizer.recognize(samples[: SAMPLE_RATE // 20]) == [], "a twentieth of a second is no speech"
    # the same record the embedded recogniser gives, so matching, hits and JSON work unchanged
    read = read_speech(recognizer, _spoken_clip(corpus))
    assert set(read) == {"words", "phones", "alternatives", "seconds", "notes"} and read["notes"] == []
    assert read["alternatives"] == [], "no n-best list from greedy decoding"
    assert [w["word"] for w in read["words"]] == [w.word for w in words]
    assert set(read["words"][0]) == {"word", "start", "end", "prob"}
    identity = recognizer.identity
    assert identity["models"]["sha256"] == weights_hash(whisper_dir / "model.safetensors")
    assert identity["model_dir"] == str(whisper_dir.resolve()) and identity["engine"].startswith("whisper")


def test_audio_longer_than_whisper_window_is_recognised_through(whisper_dir: Path, corpus: Path) -> None:
    speech = decode_audio(_spoken_clip(corpus))
    long = np.concatenate([speech] * 14)  # ~42 s: past Whisper's 30-second window
    words = WhisperRecognizer(whisper_dir).recognize(long, offset=100.0)
    assert words and all(100.0 <= w.start <= w.end <= 100.0 + long.size / SAMPLE_RATE + 1e-6 for w in words)
    assert max(w.start for w in words) > 130.0, "the second window's words come back, with their times"


def test_recognition_uses_no_more_threads_than_given(whisper_dir: Path, corpus: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        recognizer = WhisperRecognizer(whisper_dir, threads=1)
        seen: list[int] = []
        recognizer.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        assert recognizer.recognize(decode_audio(_spoken_clip(corpus)))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_index_job_records_the_recogniser_and_search_finds_its_words(whisper_index: Path,
                                                                        whisper_dir: Path) -> None:
    index = open_index(whisper_index)
    speech = index.manifest["extra"]["channels"]["speech"]
    assert speech["engine"].startswith("whisper") and speech["model_dir"] == str(whisper_dir.resolve())
    assert speech["models"]["sha256"] == weights_hash(whisper_dir / "model.safetensors")
    spoken = [item for item in index.items if item["extra"]["speech"]["words"]]
    assert len(spoken) == 1, "one clip has an audio track"
    item = spoken[0]
    for word in item["extra"]["speech"]["words"]:
        assert 0.0 <= word["start"] <= word["end"] <= item["extra"]["speech"]["seconds"] + 1e-6
    others = [item["extra"]["speech"]["notes"] for item in index.items if not item["extra"]["speech"]["words"]]
    assert others == [["no speech read: no audio stream"]] * 2
    # what the model said is found again by sound, as with the embedded recogniser's words
    said = " ".join(dict.fromkeys(word["word"] for word in item["extra"]["speech"]["words"]))
    result = CliRunner().invoke(app, ["search", f'a voice says "{said}"', "--index", str(whisper_index), "--json",
                                      "-k", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    hit = json.loads(result.output.splitlines()[0])
    assert hit["path"] == item["path"] and hit["channels"]["speech"]["rank"] == 1
    assert set(hit["speech"]["words"]) <= set(said.split()) and hit["speech"]["start"] <= hit["speech"]["end"]
    assert Searcher(whisper_index).search(f'someone says "{said}"', k=1)[0].speech["text"] == hit["speech"]["text"]


def test_shards_share_the_recogniser_and_refuse_another(model_dir: Path, corpus: Path, whisper_dir: Path,
                                                       tmp_path: Path, one_line_error) -> None:
    out = tmp_path / "index"
    mine = Path(shutil.copytree(whisper_dir, tmp_path / "whisper"))
    whisper = JobSpec(model_dir=model_dir, out=out, videos=corpus / "videos", part_size=1,
                      channels=("visual", "speech"), asr=f"whisper:{mine}")
    run_index_job(whisper, Shard(0, 2), workers=0, progress=False)
    embedded = replace(whisper, asr=DEFAULT_ASR)
    with pytest.raises(JobError, match="different job.*channels"):
        run_index_job(embedded, Shard(1, 2), workers=0, progress=False)
    # the same directory with other weights is another recogniser too
    build_tiny_whisper(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", mine / "model.safetensors")
    assert weights_hash(mine / "model.safetensors") != weights_hash(whisper_dir / "model.safetensors")
    with pytest.raises(JobError, match="different job.*channels"):
        run_index_job(whisper, Shard(1, 2), workers=0, progress=False)
    shutil.copy(whisper_dir / "model.safetensors", mine / "model.safetensors")
    refused = CliRunner().invoke(app, ["index", "--model", str(model_dir), "--videos", str(corpus / "videos"),
                                       "--out", str(out), "--channels", "visual,speech", "--part-size", "1",
                                       "--shard", "1/2", "--resume", "--workers", "0", "--device", "cpu"])
    one_line_error(refused, "different job")
    run_index_job(whisper, Shard(1, 2), workers=0, progress=False)
    publish_job(out)
    assert open_index(out).manifest["extra"]["channels"]["speech"]["model_dir"] == str(mine.resolve())


def test_index_add_recognises_new_videos_with_the_index_recogniser(model_dir: Path, corpus: Path,
                                                                  whisper_dir: Path, tmp_path: Path,
                                                                  one_line_error) -> None:
    videos = tmp_path / "videos"
    mine = Path(shutil.copytree(whisper_dir, tmp_path / "whisper"))
    spoken = _spoken_clip(corpus)
    silent = next(p for p in (corpus / "videos").rglob("*.mp4") if p != spoken)
    videos.mkdir()
    shutil.copy(silent, videos / "silent.mp4")
    run_index_job(JobSpec(model_dir=model_dir, out=tmp_path / "index", videos=videos,
                          channels=("visual", "speech"), asr=f"whisper:{mine}"), workers=0, progress=False)
    shutil.copy(spoken, videos / "spoken.mp4")
    add_to_index(tmp_path / "index", videos, workers=0, progress=False)
    reader = open_index(tmp_path / "index")
    assert reader.manifest["extra"]["channels"]["speech"]["model_dir"] == str(mine.resolve())
    added = next(item for item in reader.items if item["path"].endswith("spoken.mp4"))
    assert added["extra"]["speech"]["words"] and added["extra"]["speech"]["phones"] == []
    assert all(word["word"] in WORDS for word in added["extra"]["speech"]["words"])
    # other weights in the index's Whisper directory: new videos are not recognised by another model
    build_tiny_whisper(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", mine / "model.safetensors")
    shutil.copy(spoken, videos / "again.mp4")
    with pytest.raises(ValueError, match="now holds other weights"):
        add_to_index(tmp_path / "index", videos, workers=0, progress=False)
    refused = CliRunner().invoke(app, ["index", "add", "--index", str(tmp_path / "index"), "--videos", str(videos),
                                       "--workers", "0"])
    one_line_error(refused, "now holds other weights")
    assert len(open_index(tmp_path / "index").items) == 2


@pytest.mark.ray
def test_the_ray_engine_recognises_with_the_same_recogniser(ray_cluster, model_dir: Path, corpus: Path,
                                                           whisper_dir: Path, whisper_index: Path,
                                                           tmp_path: Path) -> None:
    spec = JobSpec(model_dir=model_dir, out=tmp_path / "index", videos=corpus / "videos", part_size=2,
                   channels=("visual", "speech"), asr=f"whisper:{whisper_dir}")
    with make_engine("ray") as engine:
        summary = run_index_job(spec, batch_size=4, progress=False, engine=engine)
    assert (summary.indexed, summary.failed) == (3, 0)

    def speech(index: Path) -> dict:
        reader = open_index(index)
        return reader.manifest["extra"]["channels"]["speech"], {
            Path(item["path"]).name: item["extra"]["speech"] for item in reader.items}

    assert speech(tmp_path / "index") == speech(whisper_index)


def test_eval_reports_the_speech_channel_with_whisper(model_dir: Path, corpus: Path, whisper_dir: Path,
                                                      tmp_path: Path, one_line_error) -> None:
    out = tmp_path / "eval"
    command = ["eval", "--model", str(model_dir), "--dataset", "generic", "--ann", str(corpus / "test.json"),
               "--videos", str(corpus / "videos"), "--channels", "visual,speech", "--out", str(out),
               "--no-progress", "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(app, [*command, "--asr", f"whisper:{whisper_dir}"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "channels.json").read_text())
    assert metrics["recognition"]["videos"] == 1 and 0.0 <= metrics["recognition"]["wer"] <= 2.0
    speech = open_index(out / "index").manifest["extra"]["channels"]["speech"]
    assert speech["model_dir"] == str(whisper_dir.resolve())
    # the index kept in OUT is reused by a second run, but never for another recogniser
    one_line_error(CliRunner().invoke(app, command), "holds speech recognised with --asr whisper:")
    without_channels = [arg for arg in command if arg not in ("--channels", "visual,speech")]
    one_line_error(CliRunner().invoke(app, [*without_channels, "--asr", "pocketsphinx"]), "use it with --channels")


def _not_whisper(tmp: Path, model_dir: Path, whisper_dir: Path) -> Path:
    return model_dir  # a vtr retrieval model directory: config.json of another kind


def _no_alignment_heads(tmp: Path, model_dir: Path, whisper_dir: Path) -> Path:
    copy = Path(shutil.copytree(whisper_dir, tmp / "no-heads"))
    config = json.loads((copy / "generation_config.json").read_text())
    del config["alignment_heads"]
    (copy / "generation_config.json").write_text(json.dumps(config))
    return copy


def _pickled_weights(tmp: Path, model_dir: Path, whisper_dir: Path) -> Path:
    copy = Path(shutil.copytree(whisper_dir, tmp / "bin"))
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    return copy


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda tmp, *_: tmp / "nowhere", "no such directory"),
    (_not_whisper, "not a Whisper model directory"),
    (_no_alignment_heads, "alignment_heads"),
    (_pickled_weights, "no safetensors weights"),
])
def test_a_bad_whisper_directory_is_one_line_before_work(make, fragment: str, model_dir: Path, corpus: Path,
                                                          whisper_dir: Path, tmp_path: Path, one_line_error) -> None:
    asr = make(tmp_path, model_dir, whisper_dir)
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "--model", str(model_dir), "--videos", str(corpus / "videos"),
                                      "--out", str(out), "--channels", "visual,speech", "--asr", f"whisper:{asr}",
                                      "--device", "cpu"])
    one_line_error(result, fragment)
    assert not out.exists() and not work_dir_for(out).exists()


@pytest.mark.parametrize(("asr", "channels", "fragment"), [
    ("vosk", "visual,speech", "unknown recogniser 'vosk'"),
    ("whisper", "visual,speech", "needs a model directory"),
    ("pocketsphinx:somewhere", "visual,speech", "takes no directory"),
    ("pocketsphinx", "visual", "leaves the speech channel out"),
])
def test_a_bad_asr_option_is_one_line_before_work(asr: str, channels: str, fragment: str, model_dir: Path,
                                                   corpus: Path, tmp_path: Path, one_line_error) -> None:
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "--model", str(model_dir), "--videos", str(corpus / "videos"),
                                      "--out", str(out), "--channels", channels, "--asr", asr, "--device", "cpu"])
    one_line_error(result, fragment)
    assert not out.exists() and not work_dir_for(out).exists()


def test_missing_packages_are_named_before_work(model_dir: Path, corpus: Path, whisper_dir: Path, tmp_path: Path,
                                                one_line_error, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(SpeechUnavailable, match="needs transformers"):
        parse_asr(f"whisper:{whisper_dir}")
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "--model", str(model_dir), "--videos", str(corpus / "videos"),
                                      "--out", str(out), "--channels", "visual,speech", "--asr",
                                      f"whisper:{whisper_dir}", "--device", "cpu"])
    one_line_error(result, "needs transformers", "pip install transformers")
    assert not out.exists()


def test_parse_asr_resolves_the_directory(whisper_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(whisper_dir.parent)
    assert parse_asr(None) == parse_asr(" PocketSphinx ") == "pocketsphinx"
    assert parse_asr(f"whisper:{whisper_dir.name}") == f"whisper:{whisper_dir.resolve()}"
    assert re.fullmatch(r"whisper:/.+", parse_asr(f"Whisper:{whisper_dir}"))
