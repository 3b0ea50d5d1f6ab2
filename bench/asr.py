"""Word error rate and speed of a speech recogniser on the synthetic corpus's spoken layer.

    python bench/asr.py --asr pocketsphinx --asr whisper:models/whisper-tiny.en [--clips 20]

Each ``--asr`` (see :mod:`retrieval.asr`) recognises the same clips: `vtr data synth --spoken`'s
espeak-ng sentences (six voices, 130-160 words a minute, clean or with hiss), read through the
channel's own audio decoder. One JSON row per recogniser: word error rate against the spoken
sentences, real-time factor (recognition seconds over audio seconds, model loading apart), the
speech channel's R@1 when each sentence is quoted as a query among all the clips (matched by sound
as the channel matches: best-scored, and answered after abstention) and the load average. The recognisers run one after the other in one process on the same
clips, so their ratio holds even where the machine is shared.

``--from-ct2 SRC --to DIR`` first writes a transformers Whisper directory (what ``--asr
whisper:DIR`` reads) from a CTranslate2 one (a faster-whisper model: ``model.bin``,
``config.json``, ``tokenizer.json``), for weights that come in that form.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from bench.record import Recorder, add_output_argument
from retrieval.asr import load_recognizer, parse_asr
from retrieval.data.synthetic import generate_corpus
from retrieval.speech import SAMPLE_RATE, SpeechIndex, decode_audio, recognise_samples, word_error_rate

THREADS = 2
LOADED = "machine shared with other jobs (load average above its 2 threads): compare rows of one run, not times"
# CTranslate2's data types (its DataType enum) as numpy types
_CT2_TYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` (format version 6) by name, aliases resolved."""
    with path.open("rb") as model:
        def number(kind: str) -> int:
            return struct.unpack("<" + kind, model.read(struct.calcsize(kind)))[0]

        def text() -> str:
            return model.read(number("H"))[:-1].decode()

        version = number("I")
        if version < 5:
            raise ValueError(f"{path}: CTranslate2 model format {version}; this reader knows 5 and later")
        text()  # the spec's name
        number("I")  # its revision
        variables = {}
        for _ in range(number("I")):
            name = text()
            rank = model.read(1)[0]
            dims = struct.unpack(f"<{rank}I", model.read(4 * rank))
            kind = _CT2_TYPES[model.read(1)[0]]
            data = np.frombuffer(model.read(number("I")), kind)
            variables[name] = data.reshape(dims) if dims else data
        for _ in range(number("I")):
            alias = text()
            variables[alias] = variables[text()]
    return variables


def ct2_to_transformers(source: Path, out: Path) -> Path:
    """Write the CTranslate2 Whisper model in ``source`` as a transformers model directory."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    ct2 = read_ct2(source / "model.bin")
    settings = json.loads((source / "config.json").read_text())
    tokenizer = WhisperTokenizer(tokenizer_file=str(source / "tokenizer.json"))
    vocab, width = ct2["decoder/embeddings/weight"].shape
    heads = int(ct2["encoder/num_heads"][0])
    layers = {part: 1 + max(int(found.group(1)) for name in ct2 if (found := re.match(rf"{part}/layer_(\d+)/", name)))
              for part in ("encoder", "decoder")}
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (
        "<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>")}
    end = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=ct2["encoder/conv1/weight"].shape[1], d_model=width,
        encoder_layers=layers["encoder"], decoder_layers=layers["decoder"], encoder_attention_heads=heads,
        decoder_attention_heads=int(ct2["decoder/num_heads"][0]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=end, bos_token_id=end, eos_token_id=end, decoder_start_token_id=ids["<|startoftranscript|>"])
    state: dict[str, np.ndarray] = {}

    def linear(ours: str, theirs: str, bias: bool = True) -> None:
        state[f"{ours}.weight"] = ct2[f"{theirs}/weight"]
        if bias:
            state[f"{ours}.bias"] = ct2[f"{theirs}/bias"]

    def norm(ours: str, theirs: str) -> None:
        state[f"{ours}.weight"], state[f"{ours}.bias"] = ct2[f"{theirs}/gamma"], ct2[f"{theirs}/beta"]

    def split(ours: str, theirs: str, names: tuple[str, ...]) -> None:
        """A fused projection (q, k, v or k, v) into its parts; keys have no bias in Whisper."""
        for name, weight, bias in zip(names, np.split(ct2[f"{theirs}/weight"], len(names)),
                                      np.split(ct2[f"{theirs}/bias"], len(names)), strict=True):
            state[f"{ours}.{name}_proj.weight"] = weight
            if name != "k":
                state[f"{ours}.{name}_proj.bias"] = bias

    for part in ("encoder", "decoder"):
        state[f"model.{part}.embed_positions.weight"] = ct2[f"{part}/position_encodings/encodings"]
        norm(f"model.{part}.layer_norm", f"{part}/layer_norm")
        for n in range(layers[part]):
            ours, theirs = f"model.{part}.layers.{n}", f"{part}/layer_{n}"
            split(f"{ours}.self_attn", f"{theirs}/self_attention/linear_0", ("q", "k", "v"))
            linear(f"{ours}.self_attn.out_proj", f"{theirs}/self_attention/linear_1")
            norm(f"{ours}.self_attn_layer_norm", f"{theirs}/self_attention/layer_norm")
            linear(f"{ours}.fc1", f"{theirs}/ffn/linear_0")
            linear(f"{ours}.fc2", f"{theirs}/ffn/linear_1")
            norm(f"{ours}.final_layer_norm", f"{theirs}/ffn/layer_norm")
            if part == "decoder":
                linear(f"{ours}.encoder_attn.q_proj", f"{theirs}/attention/linear_0")
                split(f"{ours}.encoder_attn", f"{theirs}/attention/linear_1", ("k", "v"))
                linear(f"{ours}.encoder_attn.out_proj", f"{theirs}/attention/linear_2")
                norm(f"{ours}.encoder_attn_layer_norm", f"{theirs}/attention/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(
        {name: torch.from_numpy(np.array(value, np.float32)) for name, value in state.items()}, strict=False)
    if unexpected or set(missing) != {"proj_out.weight"}:  # the output projection is the tied embedding
        raise ValueError(f"{source}: cannot map the CTranslate2 model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=end, eos_token_id=end, pad_token_id=end,
        max_length=config.max_target_positions, no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"], is_multilingual=vocab >= 51865,
        alignment_heads=settings["alignment_heads"], suppress_tokens=settings["suppress_ids"],
        begin_suppress_tokens=settings["suppress_ids_begin"], max_initial_timestamp_index=50)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    return out


def bench_asr(asr: str, clips: list[tuple[Path, str]]) -> dict:
    """One recogniser over ``clips`` (video, sentence said): WER and real-time factor."""
    started = time.perf_counter()
    recognizer = load_recognizer(asr)
    load_s = time.perf_counter() - started
    errors = words = 0.0
    audio_s = busy_s = 0.0
    loads, items = [], []
    for n, (path, said) in enumerate(clips):
        samples = decode_audio(path)
        started = time.perf_counter()
        speech = recognise_samples(recognizer, samples)  # as the channel does: no phones from Whisper
        busy_s += time.perf_counter() - started
        audio_s += samples.size / SAMPLE_RATE
        errors += word_error_rate(said.split(), [word["word"] for word in speech["words"]]) * len(said.split())
        words += len(said.split())
        loads.append(_load())
        items.append({"id": n, "extra": {"speech": speech}})
    # each sentence quoted as a query among all the clips, matched as the channel matches (by sound)
    index = SpeechIndex(items)
    queries = [f'a voice says "{said}"' for _, said in clips]
    best = [max(index.scores(query), key=lambda row: row[1])[0] for query in queries]
    answered = [index.search(query)[:1] for query in queries]
    return {"bench": "asr", "asr": asr, "engine": recognizer.identity["engine"], "clips": len(clips),
            "audio_s": round(audio_s, 1), "wer": round(errors / words, 3), "rtf": round(busy_s / audio_s, 3),
            "speech_r1_ranked": round(float(np.mean([b == n for n, b in enumerate(best)])), 3),
            "speech_r1_with_abstention": round(float(np.mean([a == [n] for n, a in enumerate(
                [[item for item, _ in found] for found in answered])])), 3),
            "load_s": round(load_s, 2), "threads": torch.get_num_threads(), "load_avg_max": max(loads),
            **({"note": LOADED} if max(loads) > THREADS else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asr", action="append", help="a recogniser (repeatable): pocketsphinx, whisper:DIR")
    parser.add_argument("--clips", type=int, default=20, help="spoken clips of the synthetic corpus")
    parser.add_argument("--from-ct2", type=Path, help="a CTranslate2 Whisper directory to convert first")
    parser.add_argument("--to", type=Path, help="where --from-ct2 writes the transformers directory")
    add_output_argument(parser, "asr")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args.from_ct2 is not None:
        if args.to is None:
            parser.error("--from-ct2 needs --to DIR")
        ct2_to_transformers(args.from_ct2, args.to)
    chosen = [parse_asr(asr) for asr in args.asr or ["pocketsphinx"]]  # bad names fail before the corpus
    results = Recorder(args.output, append=args.append)
    with tempfile.TemporaryDirectory(prefix="vtr-bench-asr-") as scratch:
        generate_corpus(scratch, n_train=1, n_test=args.clips, size=32, long_videos=0, progress=False,
                        spoken_share=1.0)
        entries = json.loads((Path(scratch) / "test.json").read_text())
        clips = [(Path(scratch) / "videos" / entry["video"], entry["attributes"]["spoken"]["text"])
                 for entry in entries if entry["attributes"].get("spoken")]
        for asr in chosen:
            results.add(bench_asr(asr, clips))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
