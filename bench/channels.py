"""The text channel's targets: OCR recall and speed, fused retrieval, indexing cost, search at scale.

Parts (``--parts``, default all):

* ``ocr``: the embedded PP-OCR reads the middle frame of synthetic clips with written text
  (:mod:`retrieval.data.written`, every font, size, position and colour it draws, some
  scrolling). ``word_recall``: share of the rendered words found in the frame's text after
  :func:`retrieval.ocr.fold` (target >= 0.9); ``ms_per_frame`` median (min, max), ``detect_ms``
  the detector's share; ``by_det_min_side``: the same for each ``--det-sides`` detector input.
* ``cost``: indexing seconds per hour of video, visual-only and visual+text, for the demo's
  encoder and VideoMamba-Ti (8 x 224 px), random weights, alternating in one process over
  ``--clips`` synthetic clips of ``--clip-seconds`` (40 % with written text): ``cost_ratio``
  (target <= 1.5), and where the text channel's time goes (reading, with the frames and boxes
  reused; sentence vectors one by one vs batched).
* ``fusion`` (``--model``: a trained model, ``--corpus``: a corpus written with
  ``vtr data synth --written``; see :func:`bench_fusion` for the defaults): indexes the test split visual-only and visual+text, alternating,
  (``index_cost_ratio``: text / visual embed seconds, target <= 1.5) and ranks every test caption
  (:mod:`indexer.channel_eval`): t2v R@1 on text-mentioning queries fused vs visual-only (target
  +25 points) and on picture-only ones (target within 1 point), and plain rank fusion over all
  items for comparison. It also compares the trigram index of folded text with a plain FTS5
  word index (unicode61 tokens, BM25) on the same OCR output: R@1 of the text channel alone.
  The semantic side (sentence vectors of the text): R@1 on text-mentioning queries of lexical
  alone vs lexical + semantic, on the captions as written (they quote the text) and on
  *paraphrased* ones (:func:`paraphrase`: every word of the quoted text swapped for a synonym,
  numbers kept), and the cosines its floor is calibrated on.
* ``scale``: fused search over 100k items (random clustered vectors, synthetic on-screen text on
  a third of them with the sentence model's vectors of it) through
  :class:`indexer.search.Searcher`, text-mentioning and picture-only queries alternating;
  ``p50_ms`` of the whole search (both query encodings, the text tower's and the sentence
  model's, included), of each encoding alone, and of the search with the encodings handed in
  (``without_encoding``: FAISS visual, FTS5, the semantic scan, fusion, hits; target: fused
  search p50 <= 15 ms), with each channel's lookup timed beside it (``lookup_p50_ms``; the rest is
  ``fusion_and_hits_p50_ms``) and the share of queries on which the semantic side ranked items.
* ``scan``: ways to scan the semantic side's sentence vectors exactly for one query (``--items``
  / 3 random unit vectors of 384 values, ``--queries`` queries, k = 100), alternating in rounds:
  FAISS ``IndexFlatIP`` at its default threads and at one, numpy's BLAS ``matrix @ vector``, and
  :meth:`indexer.channels.SemanticIndex.search` (what search runs, with its floor: a random query
  reaches none, so the scan is its whole cost); ``p50_ms`` each.

* ``speech``: espeak-ng speaks ``--sentences`` sentences (five templates over distinct nouns, five
  voices, 120-160 words a minute, white noise at 20 dB SNR on every third) with a second of
  silence around each; PocketSphinx recognises them (:func:`retrieval.speech.read_speech`). The
  same for a separate *tuning* set (other nouns, templates and noise) on which the channel's
  choices are made; both are reported (``sets``). Per set: ``wer`` of the word recogniser;
  real-time factors of the word recogniser (with its n-best list) and of the phone loop
  (``rtf_cpu``: the thread's CPU seconds per audio second, ``rtf_wall``: wall seconds; one
  thread); R@1 of each sentence quoted as a query among all of them for each way to match: FTS5
  words over the transcripts, phonetic alignment over the recognised words' pronunciations, the
  phone loop, or the better of the two (:data:`retrieval.speech.MATCH_SOURCES`), and over the
  words with 5, 10 or 20 alternative hypotheses of the n-best list; then, with the channel's
  abstention on, the share of spoken test queries it answers right (``answered_R@1``) and the
  share of picture captions of the synthetic corpus on which it stays silent
  (``picture_abstained``, should be 1.0).
* ``spoken`` (``--model``, ``--corpus``: a corpus written with ``vtr data synth --spoken``;
  without it ``--clips`` test clips, half of them spoken, generated with ``--seed``: 0 is the
  reported split, the channel's choices are made on others): indexes the test split visual-only and
  visual+speech (``index_cost_ratio``: speech / visual embed seconds, target with text <= 2) and
  ranks every caption (:mod:`indexer.channel_eval`): t2v R@1 of the speech channel alone and
  fused vs visual-only on speech-mentioning queries (target: fused >= visual + 20 points) and on
  picture-only ones (target within 1 point), and the recogniser's ``wer`` on the split.
* ``speech_cost``: what the speech channel costs to index, as the demo indexes long videos:
  ``--clips`` test clips of ``--clip-seconds`` (40 % written, ``--spoken-share`` spoken, the rest
  silent) played back to back, ``--per-video`` a video, in windows of 4 s every 2 s; the demo's
  encoder and VideoMamba-Ti (8 x 224 px), random weights, each indexing visual-only, visual+text and
  visual+text+speech alternately in one process: seconds per hour of video and ``cost_ratio``
  against visual-only (target with text and speech <= 2). Then the speech reading of the same
  windows alone, four ways (each window recognised alone, as before, or the file's chunks shared;
  with and without the energy gate): CPU seconds per hour of video, what each saves, and speech
  R@1 of the sentences among the windows (``speech_reading``).

Prints one JSON object per part and writes them (with the run's environment,
:class:`bench.record.Recorder`) to ``bench/results/channels.jsonl``.
The machine these numbers come from is shared with other work: the JSON says so (``note``).

    python bench/channels.py --parts ocr,scale
    python bench/channels.py --parts speech --append
    python bench/channels.py --parts fusion --model runs/demo/train/model --corpus runs/written
    python bench/channels.py --parts spoken --clips 40 --append
    python bench/channels.py --parts speech_cost --clips 24 --repeats 2 --append
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import faiss
import numpy as np
import torch

from app.demo import STRIDE_S, WINDOW_S
from bench.record import Recorder, add_output_argument
from indexer.channel_eval import channel_ranks, evaluate_channels
from indexer.channels import SEMANTIC_FLOOR, SEMANTIC_MARGIN, SemanticIndex, text_of
from indexer.jobs import JobSpec, run_index_job
from indexer.mapper import SENTENCE_BATCH
from indexer.plan import window_spans
from indexer.search import FUSION_POOL, GROUP_POOL_FACTOR, Searcher
from indexer.store import open_index, write_index
from retrieval.atomic import atomic_write_text
from retrieval.data.corpora import Corpus, load_corpus
from retrieval.data.spoken import espeak_available, speak
from retrieval.data.synthetic import generate_corpus, plan_corpus, render_job, write_mp4
from retrieval.data.video import video_duration
from retrieval.data.written import plan_writing
from retrieval.eval.metrics import rank_metrics
from retrieval.models.model_dir import model_identity
from retrieval.models.retrieval_model import build_retrieval_model
from retrieval.ocr import DEFAULT_EVERY_S, DET_MIN_SIDE, OcrReader, fold, read_span, sample_count
from retrieval.sentence import SentenceEncoder, pack
from retrieval.speech import (
    ALTERNATIVES,
    DEFAULT_SOURCE,
    MATCH_SOURCES,
    SAMPLE_RATE,
    SpeechIndex,
    SpeechReader,
    SpeechRecognizer,
    SpokenWord,
    alternative_runs,
    decode_audio,
    read_speech,
    recognise_samples,
    word_error_rate,
)

THREADS = 2
NOTE = "2-core machine shared with other jobs (load average > 2 during the run): times are indicative"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_ocr(clips: int, size: int, det_sides: tuple[int, ...] = (DET_MIN_SIDE,)) -> dict:
    """Word recall, time per frame and detection time of the embedded recogniser on rendered
    synthetic text, for each detector input size in ``det_sides`` (frames alternate between them)."""
    plan = plan_corpus(n_train=20, n_test=clips, seed=11, long_videos=0, written_share=1.0)
    readers = {side: OcrReader(threads=THREADS, det_min_side=side) for side in det_sides}
    stats = {side: {"found": 0, "total": 0, "exact": 0, "times": [], "detect": []} for side in det_sides}
    for reader in readers.values():
        reader.read(np.zeros((size, size, 3), np.uint8))  # warm-up
    for entry in plan.test:
        text = entry["attributes"]["written"]["text"]
        frames = render_job(plan.job(entry["video"]), size)
        frame = frames[len(frames) // 2]
        words = [fold(word) for word in text.split()]
        for side, reader in readers.items():
            got = stats[side]
            started = time.perf_counter()
            boxes = reader.detect(frame)
            got["detect"].append(time.perf_counter() - started)
            lines = reader.lines(boxes, reader.recognise(frame, boxes))
            got["times"].append(time.perf_counter() - started)
            read = fold(" ".join(line for line, _, _ in lines))
            got["found"] += sum(word in read for word in words)
            got["total"] += len(words)
            got["exact"] += fold(text) in read

    def row(side: int) -> dict:
        got = stats[side]
        return {"word_recall": round(got["found"] / got["total"], 3), "text_recall": round(got["exact"] / clips, 3),
                "ms_per_frame": round(1000 * statistics.median(got["times"]), 1),
                "ms_min": round(1000 * min(got["times"]), 1), "ms_max": round(1000 * max(got["times"]), 1),
                "detect_ms": round(1000 * statistics.median(got["detect"]), 1)}

    return {"bench": "channels", "part": "ocr", "clips": clips, "frame_px": size, "det_min_side": DET_MIN_SIDE,
            **(row(DET_MIN_SIDE) if DET_MIN_SIDE in stats else {}),
            "by_det_min_side": {str(side): row(side) for side in det_sides}, "threads": THREADS,
            "target_word_recall": 0.9, "load_avg": _load(), "note": NOTE}


class WordIndex:
    """The alternative lexical index: FTS5 word tokens (unicode61) over the lines as read, BM25."""

    def __init__(self, items: list[dict]) -> None:
        self.db = sqlite3.connect(":memory:")
        self.db.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize='unicode61 remove_diacritics 2')")
        rows = [(item["id"], " ".join(line["text"] for line in item["extra"].get("text", {}).get("lines", [])))
                for item in items]
        self.db.executemany("INSERT INTO docs(rowid, body) VALUES (?, ?)", [row for row in rows if row[1]])

    def search(self, query: str) -> list[int]:
        words = ['"' + word + '"' for word in query.lower().replace('"', " ").split() if word.isalnum()]
        if not words:
            return []
        sql = "SELECT rowid FROM docs WHERE docs MATCH ? ORDER BY bm25(docs)"
        return [row[0] for row in self.db.execute(sql, (" OR ".join(words),))]


#: Synonyms for the written layer's words (retrieval/data/written.py), for paraphrased queries.
SYNONYMS = {
    "harbor": "port", "lantern": "lamp", "meadow": "field", "summit": "peak", "falcon": "hawk",
    "orchard": "fruit grove", "canyon": "gorge", "harvest": "crop", "glacier": "ice sheet", "market": "bazaar",
    "station": "depot", "garden": "yard", "bakery": "bread shop", "museum": "gallery", "theatre": "playhouse",
    "library": "bookstore", "stadium": "arena", "forest": "woods", "river": "stream", "castle": "fortress",
    "chapter": "section", "open": "opened", "hours": "hrs", "exit": "way out", "room": "chamber",
    "sale": "discount",
}


def paraphrase(text: str) -> str:
    """``text`` with each word swapped for a synonym (numbers kept): "Harbor SALE" -> "port discount"."""
    return " ".join(SYNONYMS.get(word.lower(), word.lower()) for word in text.split())


def paraphrased(test: Corpus) -> Corpus:
    """The corpus with each text-mentioning caption quoting a paraphrase of its text."""
    items = []
    for entry in test.items:
        written = (entry.extra.get("attributes") or {}).get("written")
        if written:
            entry = replace(entry, captions=[caption.replace(written["text"], paraphrase(written["text"]))
                                             for caption in entry.captions])
        items.append(entry)
    return replace(test, items=items)


def semantic_cosines(searcher: Searcher, test: Corpus) -> dict:
    """Where the semantic floor sits: the query's best cosine to any item's text on picture-only
    queries (should stay below), and its cosine to its own video's text on text-mentioning ones,
    quoted and paraphrased (should reach it); 5/50/95th percentiles."""
    index = searcher.semantic_index
    by_path = {item["path"]: item["id"] for item in searcher.reader.items}
    quoted, para, picture = [], [], []
    for source, bucket in ((test, quoted), (paraphrased(test), para)):
        for entry in source.items:
            written = bool((entry.extra.get("attributes") or {}).get("written"))
            if source is not test and not written:
                continue
            vectors = searcher.sentence_vectors(entry.captions)
            own = by_path.get(str(source.root / entry.video))
            for vector in vectors:
                found = index.search(vector, len(index), floor=-1.0, margin=2.0)
                if written:
                    bucket.append(next((score for item, score in found if item == own), -1.0))
                elif source is test:
                    picture.append(found[0][1] if found else -1.0)

    def pct(values: list[float]) -> list[float]:
        return [round(float(np.percentile(values, q)), 3) for q in (5, 50, 95)] if values else []

    return {"floor": SEMANTIC_FLOOR, "margin": SEMANTIC_MARGIN, "picture_only_best": pct(picture),
            "quoted_own": pct(quoted), "paraphrased_own": pct(para)}


def _random_demo_model(out: Path) -> Path:
    """The demo architecture with random weights: it encodes as fast as the trained one."""
    return build_retrieval_model("videomamba_demo", embed_dim=256, num_fusion_layers=2,
                                 text_pooling="mean").save(out)


def _index(model: Path, corpus: Path, out: Path, channels: tuple[str, ...]) -> float:
    spec = JobSpec(model_dir=model, out=out, videos=corpus / "videos", ann_file=corpus / "test.json",
                   channels=channels)
    return run_index_job(spec, workers=1, progress=False, overwrite=True).embed_seconds


def _with_text_of(visual: Path, text_from: Path, out: Path) -> None:
    """``visual``'s index republished at ``out`` with the text channel (lines, sentence vectors)
    of ``text_from``, an index of the same corpus: the OCR is model-independent, so a trained
    model's fused figures need not read every frame again."""
    source, donor = open_index(visual), open_index(text_from)
    texts = {item["path"]: item["extra"]["text"] for item in donor.items}
    items = [{**item, "extra": {**item["extra"], "text": texts[item["path"]]}} for item in source.items]
    write_index(out, np.asarray(source.vectors, np.float32), items, source.manifest["model"],
                source.manifest["corpus_roots"],
                extra={**source.manifest["extra"], "channels": donor.manifest["extra"]["channels"]})


def bench_fusion(model: Path | None, corpus: Path | None, repeats: int, clips: int,
                 text_from: Path | None = None) -> dict:
    """Fused vs visual-only retrieval on the written corpus, and what the text channel costs.

    Without ``model``: the demo architecture with random weights (it encodes exactly as fast as
    the trained one, so the cost ratio holds; its visual ranking is chance). Without ``corpus``:
    ``clips`` test clips, 40 % of them written. With ``text_from`` (an index of the same corpus
    with the text channel), its text is reused instead of read again and the cost is not measured."""
    with tempfile.TemporaryDirectory(prefix="vtr-bench-channels-") as scratch:
        trained = model is not None
        if model is None:
            model = _random_demo_model(Path(scratch) / "model")
        if corpus is not None:
            corpus = corpus.resolve()  # the index records absolute paths; the evaluation compares them
        else:
            corpus = Path(scratch) / "corpus"
            generate_corpus(corpus, n_train=1, n_test=clips, long_videos=0, progress=False, written_share=0.4)
        visual_s, text_s = [], []
        for _ in range(repeats if text_from is None else 1):
            visual_s.append(_index(model, corpus, Path(scratch) / "visual", ("visual",)))
            if text_from is None:
                text_s.append(_index(model, corpus, Path(scratch) / "text", ("visual", "text")))
        if text_from is not None:
            _with_text_of(Path(scratch) / "visual", text_from, Path(scratch) / "text")
        searcher = Searcher(Path(scratch) / "text", model=model)
        test = load_corpus("generic", corpus / "test.json", corpus / "videos")
        result = evaluate_channels(searcher, test)
        # the lexical alternatives on the same OCR output: text channel alone, text-mentioning queries
        ranks = channel_ranks(searcher, test)
        words = WordIndex(searcher.reader.items)
        paths = [item["path"] for item in searcher.reader.items]
        mentioning = [i for i, flag in enumerate(ranks["text_mentioning"]) if flag]
        targets = [str(test.root / entry.video) for entry in test.items for _ in entry.captions]
        word_ranks = []
        for i in mentioning:
            order = [paths[item] for item in words.search(ranks["captions"][i])]
            word_ranks.append(order.index(targets[i]) + 1 if targets[i] in order else len(paths) + 1)
        trigram_r1 = rank_metrics(np.asarray(ranks["text"])[mentioning])["R@1"]
        semantic = {}
        if searcher.semantic_index:
            semantic["cosines"] = semantic_cosines(searcher, test)
            for name, source in (("quoted", test), ("paraphrased", paraphrased(test))):
                got = evaluate_channels(searcher, source)["text_mentioning"]
                semantic[name] = {way: round(got[way]["R@1"], 1) for way in
                                  ("visual", "text", "semantic", "text_semantic", "fused_lexical", "fused")}
    by = {subset: {way: round(metrics["R@1"], 1) for way, metrics in result[subset].items()}
          for subset in ("all", "picture_only", "text_mentioning") if subset in result}
    gain = by["text_mentioning"]["fused"] - by["text_mentioning"]["visual"]
    picture_gap = by["picture_only"]["fused"] - by["picture_only"]["visual"]
    ratio = statistics.median(text_s) / statistics.median(visual_s) if text_s else None
    return {"bench": "channels", "part": "fusion", "visual_model": "trained" if trained else
            "videomamba_demo, random weights (visual ranks are chance)", "queries": result["queries"], "t2v_R@1": by,
            "R@5": {s: {w: round(m["R@5"], 1) for w, m in result[s].items()} for s in by},
            "fused_gain_text_mentioning": round(gain, 1), "fused_gap_picture_only": round(picture_gap, 1),
            "lexical_R@1_text_mentioning": {"trigram_folded": round(trigram_r1, 1),
                                            "word_unicode61": round(rank_metrics(word_ranks)["R@1"], 1)},
            "semantic_R@1_text_mentioning": semantic,
            "index_embed_s": {"visual": [round(s, 1) for s in visual_s], "visual+text": [round(s, 1) for s in text_s]},
            "index_cost_ratio": ratio and round(ratio, 2), "text_from": text_from and str(text_from), "targets": {"gain": 25, "picture_gap": 1, "cost_ratio": 1.5},
            "load_avg": _load(), "note": NOTE}


#: The encoders the text channel's indexing cost is compared with: the demo's, and the main one
#: (VideoMamba-Ti, official layout, 8 frames at 224 px), both with random weights (same cost).
COST_ENCODERS = {"demo": ("videomamba_demo", 256), "videomamba_ti": ("videomamba_tiny", 512)}


def _text_breakdown(corpus: Path, seconds: float) -> dict:
    """Where the text channel's time goes on ``corpus``'s test clips: reading (decode, detect,
    recognise, with the reuse counts) and sentence vectors one text at a time vs one batch."""
    reader = OcrReader(threads=THREADS)
    sentences = SentenceEncoder()
    test = load_corpus("generic", corpus / "test.json", corpus / "videos")
    started = time.perf_counter()
    texts = [text_of(read_span(reader, test.root / entry.video)) for entry in test.items]
    read_s = time.perf_counter() - started
    texts = [text for text in texts if text]
    sentences.encode(texts[:1])  # warm-up
    started = time.perf_counter()
    for text in texts:
        sentences.encode([text])
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    sentences.encode(texts)
    batch_s = time.perf_counter() - started
    per_hour = 3600 / seconds
    return {"read_s_per_hour": round(read_s * per_hour, 1), "counts": reader.counts, "items_with_text": len(texts),
            "sentence_s_per_hour": {"one_by_one": round(single_s * per_hour, 1), "batched": round(batch_s * per_hour, 1)}}


def bench_cost(clips: int, repeats: int, clip_s: float) -> dict:
    """What indexing with the text channel costs against visual-only, per hour of video, for the
    demo's encoder and VideoMamba-Ti: ``clips`` synthetic clips of ``clip_s`` seconds (40 % with
    written text), each encoder indexing visual-only and visual+text alternately in this process."""
    fps = 8
    with tempfile.TemporaryDirectory(prefix="vtr-bench-cost-") as scratch:
        corpus = Path(scratch) / "corpus"
        generate_corpus(corpus, n_train=1, n_test=clips, long_videos=0, progress=False, written_share=0.4,
                        num_frames=round(clip_s * fps), fps=fps)
        seconds = clips * round(clip_s * fps) / fps
        models = {name: build_retrieval_model(arch, embed_dim=dim, num_fusion_layers=2, text_pooling="mean")
                  .save(Path(scratch) / name) for name, (arch, dim) in COST_ENCODERS.items()}
        runs: dict[str, dict[str, list[float]]] = {name: {"visual": [], "visual+text": []} for name in models}
        loads = [_load()]
        for _ in range(repeats):
            for name, model in models.items():
                for channels in (("visual",), ("visual", "text")):
                    embed_s = _index(model, corpus, Path(scratch) / "index", channels)
                    runs[name]["+".join(channels)].append(embed_s * 3600 / seconds)
                    loads.append(_load())
        breakdown = _text_breakdown(corpus, seconds)
    per_hour = {name: {way: [round(v, 1) for v in values] for way, values in ways.items()} for name, ways in runs.items()}
    ratios = {name: round(statistics.median(ways["visual+text"]) / statistics.median(ways["visual"]), 2)
              for name, ways in runs.items()}
    # pairwise: each visual+text run over the visual-only run just before it (same load, nearly)
    pairs = {name: [round(t / v, 2) for v, t in zip(ways["visual"], ways["visual+text"], strict=True)]
             for name, ways in runs.items()}
    return {"bench": "channels", "part": "cost", "clips": clips, "clip_s": clip_s, "video_s": seconds,
            "sampling": f"one frame per {DEFAULT_EVERY_S:g} s ({sample_count(clip_s)} a clip)", "frame_px": 128,
            "encoders": {name: arch for name, (arch, _) in COST_ENCODERS.items()},
            "index_s_per_hour": per_hour, "cost_ratio": ratios, "cost_ratio_pairs": pairs,
            "text_channel": breakdown, "target_cost_ratio": 1.5, "threads": THREADS,
            "load_avg": {"min": min(loads), "max": max(loads)}, "note": NOTE}


def bench_spoken(model: Path | None, corpus: Path | None, clips: int, seed: int = 0) -> dict:
    """Speech-channel, fused and visual-only retrieval on the spoken corpus, the recogniser's WER,
    and what the speech channel costs to index. Without ``model``: the demo architecture with
    random weights (its visual ranking is chance; the speech figures do not depend on it).
    Without ``corpus``: ``clips`` test clips generated with ``seed`` (0: the reported split; the
    channel's choices are made on other seeds)."""
    with tempfile.TemporaryDirectory(prefix="vtr-bench-spoken-") as scratch:
        trained, corpus_given = model is not None, corpus is not None
        if model is None:
            model = _random_demo_model(Path(scratch) / "model")
        if corpus is not None:
            corpus = corpus.resolve()
        else:
            corpus = Path(scratch) / "corpus"
            generate_corpus(corpus, n_train=1, n_test=clips, seed=seed, long_videos=0, progress=False,
                            spoken_share=0.5)
        visual_s = _index(model, corpus, Path(scratch) / "visual", ("visual",))
        speech_s = _index(model, corpus, Path(scratch) / "speech", ("visual", "speech"))
        result = evaluate_channels(Searcher(Path(scratch) / "speech", model=model),
                                   load_corpus("generic", corpus / "test.json", corpus / "videos"))
    by = {subset: {way: round(metrics["R@1"], 1) for way, metrics in result[subset].items()}
          for subset in ("all", "picture_only", "speech_mentioning") if subset in result}
    return {"bench": "channels", "part": "spoken", "seed": None if corpus_given else seed, "visual_model": "trained" if trained else
            "videomamba_demo, random weights (visual ranks are chance)", "queries": result["queries"],
            "t2v_R@1": by, "R@5": {s: {w: round(m["R@5"], 1) for w, m in result[s].items()} for s in by},
            "fused_gain_speech_mentioning": round(by["speech_mentioning"]["fused"] - by["speech_mentioning"]["visual"], 1),
            "fused_gap_picture_only": round(by["picture_only"]["fused"] - by["picture_only"]["visual"], 1),
            "wer": round(result["recognition"]["wer"], 3), "recognised_words": result["recognition"]["reference_words"],
            "index_embed_s": {"visual": round(visual_s, 1), "visual+speech": round(speech_s, 1)},
            "index_cost_ratio": round(speech_s / visual_s, 2), "targets": {"gain": 20, "picture_gap": 1},
            "load_avg": _load(), "note": NOTE}


def _long_spoken_corpus(out: Path, clips: int, clip_s: float, per_video: int, spoken_share: float,
                        written_share: float, fps: int = 8, size: int = 128) -> tuple[float, list[dict]]:
    """Long videos made of the synthetic corpus's test clips (``clips`` of ``clip_s`` seconds,
    with its written and spoken layers) played back to back, ``per_video`` a video, each clip's
    audio its spoken sentence or silence; an annotation ``long.json`` lists the whole videos (to be
    windowed). Returns the seconds of video and, per video, when each sentence starts and its text."""
    if not espeak_available():
        raise SystemExit("the speech cost needs espeak-ng (make espeak)")
    plan = plan_corpus(n_train=1, n_test=clips, seed=0, long_videos=0, written_share=written_share,
                       spoken_share=spoken_share, num_frames=round(clip_s * fps), fps=fps)
    jobs = [job for job in plan.jobs if job.video.startswith("test/")]
    (out / "videos").mkdir(parents=True, exist_ok=True)
    entries, said = [], []
    for first in range(0, len(jobs), per_video):
        group = jobs[first : first + per_video]
        frames = np.concatenate([render_job(job, size) for job in group])
        audio = np.concatenate([speak(job.scenes[0].speech, clip_s) if job.scenes[0].speech is not None
                                else np.zeros(round(clip_s * SAMPLE_RATE), np.int16) for job in group])
        name = f"long{first // per_video:03d}.mp4"
        write_mp4(out / "videos" / name, frames, fps, audio)
        entries.append({"video": name, "caption": [entry["caption"] for entry in plan.test[first : first + per_video]]})
        said.append({"video": name, "sentences": [(n * clip_s + job.scenes[0].speech.start, job.scenes[0].speech.text)
                                                  for n, job in enumerate(group) if job.scenes[0].speech is not None]})
    atomic_write_text(out / "long.json", json.dumps(entries))
    return len(jobs) * round(clip_s * fps) / fps, said


def _speech_ways(videos: Path, said: list[dict], seconds: float) -> dict:
    """The speech channel's reading of the demo's windows of the long videos, four ways, in turn
    in this process: each window recognised alone (as before) or the file's chunks shared by its
    windows, each with and without the energy gate. Per way: recognition seconds per hour of
    video and speech R@1 of every sentence quoted ("a voice says ...") among all windows (right:
    the first window holds the sentence's first second)."""
    recognizer = SpeechRecognizer()
    windows = [(entry["video"], start, end) for entry in said
               for start, end in window_spans(video_duration(videos / entry["video"]), WINDOW_S, STRIDE_S)]
    readers = {"windows_alone": None, "windows_alone_gated": None,
               "shared_chunks": SpeechReader(recognizer, gate=False), "shared_chunks_gated": SpeechReader(recognizer)}
    out: dict[str, dict] = {}
    for way, reader in readers.items():
        started = time.process_time()
        items = []
        for number, (video, start, end) in enumerate(windows):
            path = videos / video
            if reader is not None:
                speech = reader.read(path, start, end)
            elif way == "windows_alone_gated":
                speech = read_speech(recognizer, path, start, end)
            else:  # the channel before: the window's audio recognised whole
                samples = decode_audio(path, start, end)
                speech = recognise_samples(recognizer, samples, start)
            items.append({"id": number, "extra": {"speech": speech}})
        cpu_s = time.process_time() - started
        index = SpeechIndex(items)
        right = []
        for entry in said:
            for said_at, text in entry["sentences"]:
                found = index.search(f"a voice says {text}", k=1)
                top = windows[found[0][0]] if found else None
                right.append(top is not None and top[0] == entry["video"] and top[1] <= said_at + 1.0 < top[2])
        out[way] = {"cpu_s_per_hour": round(cpu_s * 3600 / seconds, 1), "R@1_sentences": round(float(np.mean(right)), 3),
                    **({"counts": {k: round(v, 1) for k, v in reader.counts.items()}} if reader is not None else {})}
    before = out["windows_alone"]["cpu_s_per_hour"]
    return {"windows": len(windows), "sentences": sum(len(entry["sentences"]) for entry in said), "ways": out,
            "saved_vs_windows_alone": {way: round(1 - row["cpu_s_per_hour"] / before, 3) for way, row in out.items()}}


def bench_speech_cost(clips: int, repeats: int, clip_s: float, per_video: int, spoken_share: float) -> dict:
    """What indexing with the text and speech channels costs against visual-only, per hour of
    video, for the demo's encoder and VideoMamba-Ti: long videos of the corpus's test clips with
    both layers (:func:`_long_spoken_corpus`), indexed as the demo indexes long videos (windows of
    ``WINDOW_S`` every ``STRIDE_S`` seconds), each encoder indexing visual-only, visual+text and
    visual+text+speech alternately in this process; then the speech reading alone, four ways
    (:func:`_speech_ways`)."""
    with tempfile.TemporaryDirectory(prefix="vtr-bench-speech-cost-") as scratch:
        corpus = Path(scratch) / "corpus"
        seconds, said = _long_spoken_corpus(corpus, clips, clip_s, per_video, spoken_share, written_share=0.4)
        models = {name: build_retrieval_model(arch, embed_dim=dim, num_fusion_layers=2, text_pooling="mean")
                  .save(Path(scratch) / name) for name, (arch, dim) in COST_ENCODERS.items()}
        ways = (("visual",), ("visual", "text"), ("visual", "text", "speech"))
        runs: dict[str, dict[str, list[float]]] = {name: {"+".join(w): [] for w in ways} for name in models}
        loads = [_load()]
        for _ in range(repeats):
            for name, model in models.items():
                for channels in ways:
                    spec = JobSpec(model_dir=model, out=Path(scratch) / "index", videos=corpus / "videos",
                                   ann_file=corpus / "long.json", window=WINDOW_S, stride=STRIDE_S, channels=channels)
                    embed_s = run_index_job(spec, workers=1, progress=False, overwrite=True).embed_seconds
                    runs[name]["+".join(channels)].append(embed_s * 3600 / seconds)
                    loads.append(_load())
        speech = _speech_ways(corpus / "videos", said, seconds)
        loads.append(_load())
    per_hour = {name: {way: [round(v, 1) for v in values] for way, values in by.items()} for name, by in runs.items()}
    ratios = {name: {way: round(statistics.median(values) / statistics.median(by["visual"]), 2)
                     for way, values in by.items() if way != "visual"} for name, by in runs.items()}
    # pairwise: each run over the visual-only run just before it (same load, nearly)
    pairs = {name: {way: [round(v / b, 2) for b, v in zip(by["visual"], values, strict=True)]
                    for way, values in by.items() if way != "visual"} for name, by in runs.items()}
    return {"bench": "channels", "part": "speech_cost", "clips": clips, "clip_s": clip_s, "per_video": per_video,
            "video_s": seconds, "spoken_share": spoken_share, "written_share": 0.4,
            "windows": f"{WINDOW_S:g} s every {STRIDE_S:g} s (the demo's)", "frame_px": 128,
            "encoders": {name: arch for name, (arch, _) in COST_ENCODERS.items()},
            "index_s_per_hour": per_hour, "cost_ratio": ratios, "cost_ratio_pairs": pairs, "speech_reading": speech,
            "target_cost_ratio": 2.0, "threads": THREADS, "load_avg": {"min": min(loads), "max": max(loads)},
            "note": NOTE}


def _scale_items(n: int, rng: np.random.Generator, sentences: SentenceEncoder) -> tuple[list[dict], list[str]]:
    """``n`` items, a third with one or two lines of on-screen text and that text's sentence
    vector (the sentence model's, :data:`indexer.mapper.SENTENCE_BATCH` texts at a time, as the
    indexer makes them); returns them and the texts."""
    items, texts, records = [], [], []
    for i in range(n):
        extra: dict = {"key": f"v{i}.mp4"}
        if i % 3 == 0:  # the written layer's texts, made distinct by the item's number
            text = f"{plan_writing(rng, set()).text} {i}"
            texts.append(text)
            extra["text"] = {"lines": [{"text": text, "start": 1.0, "end": 3.0, "box": [], "score": 0.9}],
                             "frames": 2, "notes": []}
            records.append(extra["text"])
        items.append({"path": f"/videos/v{i}.mp4", "start": None, "end": None, "extra": extra})
    with torch.inference_mode():
        for at in range(0, len(records), SENTENCE_BATCH):
            batch = records[at : at + SENTENCE_BATCH]
            for record, vector in zip(batch, sentences.encode([text_of(record) for record in batch]), strict=True):
                record["vector"] = pack(vector)
    return items, texts


def _stages(searcher: Searcher, text: str, vector: np.ndarray, meaning: np.ndarray) -> dict[str, float]:
    """Seconds of each channel's lookup of one query as :meth:`Searcher.search` makes it (the
    same pool, its encodings given): FAISS over the clip vectors, FTS5, the semantic scan."""
    query = searcher.query(text)
    pool = max(FUSION_POOL, 10 * GROUP_POOL_FACTOR)
    version = searcher.version
    took = {}
    for name, lookup in (("visual", lambda: version.reader.search(vector, pool)),
                         ("text", lambda: version.text_index.search(query.written, pool)),
                         ("semantic", lambda: version.semantic_index.search(meaning, pool))):
        started = time.perf_counter()
        found = lookup()
        took[name] = time.perf_counter() - started
        took[f"{name}_found"] = len(found[0] if name == "visual" else found)
    return took


def bench_scale(n: int, queries: int) -> dict:
    """p50 of a fused search at ``n`` items (visual, lexical and semantic channels), of the query
    encodings it includes, and of each channel's lookup."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="vtr-bench-scale-") as scratch:
        model = build_retrieval_model("videomamba_tiny_test", embed_dim=64, num_fusion_layers=1)
        model_dir = model.save(Path(scratch) / "model")
        centres = rng.standard_normal((1000, 64)).astype(np.float32)
        vectors = centres[rng.integers(0, 1000, n)] + 0.7 * rng.standard_normal((n, 64)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        sentences = SentenceEncoder()
        started = time.perf_counter()
        items, texts = _scale_items(n, rng, sentences)
        sentence_s = time.perf_counter() - started
        write_index(Path(scratch) / "index", vectors, items, model_identity(model_dir), "/videos",
                    extra={"model_dir": str(model_dir),
                           "channels": {"visual": {}, "text": {"every_s": 2.0, "semantic": sentences.identity}}})
        started = time.perf_counter()
        searcher = Searcher(Path(scratch) / "index")
        open_s = time.perf_counter() - started
        asks = [(f"a red circle moving left under a title that reads {texts[int(rng.integers(len(texts)))]}", True)
                if q % 2 == 0 else ("a small blue square rotating clockwise on a gray background", False)
                for q in range(queries)]
        for text, _ in asks[:10]:
            searcher.search(text, k=10)
        full, encode, meaning_s, rest, text_hits = [], [], [], [], 0
        stages: dict[str, list[float]] = {}
        fired = {True: 0, False: 0}  # queries whose semantic side ranked something, by kind
        encoder, meaning_of = searcher.model.encode_texts, searcher.sentence_vectors
        with torch.inference_mode():
            for text, mentions in asks:
                started = time.perf_counter()
                encoded = encoder([text])
                encode.append(time.perf_counter() - started)
                started = time.perf_counter()
                meaning = meaning_of([text])
                meaning_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                hits = searcher.search(text, k=10)
                full.append(time.perf_counter() - started)
                # the same search with both encodings of the query handed back at once:
                # FAISS visual, FTS5, the semantic scan, fusion, hits
                searcher.model.encode_texts = lambda texts, encoded=encoded, **_: encoded
                searcher.sentence_vectors = lambda texts, meaning=meaning: meaning
                started = time.perf_counter()
                searcher.search(text, k=10)
                rest.append(time.perf_counter() - started)
                searcher.model.encode_texts, searcher.sentence_vectors = encoder, meaning_of
                took = _stages(searcher, text, encoded["feat"].float().numpy(), meaning[0])
                for name in ("visual", "text", "semantic"):
                    stages.setdefault(name, []).append(took[name])
                fired[mentions] += took["semantic_found"] > 0
                text_hits += mentions and bool(hits[0].text) and hits[0].path == f"/videos/v{text.rsplit(' ', 1)[1]}.mp4"
    def ms(values: list[float], q: float) -> float:
        return round(1000 * float(np.quantile(values, q)), 2)

    lookups = {name: ms(values, 0.5) for name, values in stages.items()}
    mentioning = queries // 2 + queries % 2
    return {"bench": "channels", "part": "scale", "items": n, "items_with_text": math.ceil(n / 3),
            "sentence_vectors": len(searcher.semantic_index), "queries": queries,
            "p50_ms": ms(full, 0.5), "p90_ms": ms(full, 0.9), "encode_p50_ms": ms(encode, 0.5),
            "sentence_encode_p50_ms": ms(meaning_s, 0.5),
            "without_encoding_p50_ms": ms(rest, 0.5), "without_encoding_p90_ms": ms(rest, 0.9),
            "lookup_p50_ms": lookups,
            "fusion_and_hits_p50_ms": ms([r - sum(s[i] for s in stages.values()) for i, r in enumerate(rest)], 0.5),
            "semantic_fired": {"text_mentioning": round(fired[True] / mentioning, 3),
                               "picture_only": round(fired[False] / (queries - mentioning), 3)},
            "text_match_at_1": round(text_hits / mentioning, 3), "open_s": round(open_s, 1),
            "sentence_vectors_s": round(sentence_s, 1),
            "target_p50_ms": 15, "threads": THREADS, "load_avg": _load(), "note": NOTE}


def bench_scan(n: int, queries: int, k: int = 100, rounds: int = 3) -> dict:
    """p50 and p90 milliseconds of one query's exact scan over ``n`` unit sentence vectors, each
    way timed in turns over the same queries (``rounds`` times)."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, 384)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    asks = rng.standard_normal((queries, 384)).astype(np.float32)
    asks /= np.linalg.norm(asks, axis=1, keepdims=True)
    semantic = SemanticIndex({"id": i, "extra": {"text": {"vector": pack(row)}}} for i, row in enumerate(rows))
    flat = faiss.IndexFlatIP(384)
    flat.add(rows)
    threads = faiss.omp_get_max_threads()

    def faiss_one_thread(query: np.ndarray) -> object:
        faiss.omp_set_num_threads(1)
        try:
            return flat.search(query.reshape(1, -1), k)
        finally:
            faiss.omp_set_num_threads(threads)

    def blas(query: np.ndarray) -> np.ndarray:
        scores = rows @ query
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    ways = {f"faiss_flat_{threads}_threads": lambda query: flat.search(query.reshape(1, -1), k),
            "faiss_flat_1_thread": faiss_one_thread, "numpy_blas": blas,
            "semantic_index (kept)": lambda query: semantic.search(query, k)}
    took: dict[str, list[float]] = {name: [] for name in ways}
    loads = [_load()]
    for _ in range(rounds):
        for name, way in ways.items():
            for query in asks:
                started = time.perf_counter()
                way(query)
                took[name].append(time.perf_counter() - started)
        loads.append(_load())
    return {"bench": "channels", "part": "scan", "vectors": n, "dim": 384, "queries": queries, "k": k,
            "p50_ms": {name: round(1000 * float(np.quantile(v, 0.5)), 2) for name, v in took.items()},
            "p90_ms": {name: round(1000 * float(np.quantile(v, 0.9)), 2) for name, v in took.items()},
            "load_avg": {"min": min(loads), "max": max(loads)}, "note": NOTE}


_NOUNS = ("bridge", "library", "umbrella", "passport", "garden", "museum", "engineer", "hospital", "teacher",
          "elephant", "computer", "telephone", "bicycle", "mountain", "kitchen", "airport", "restaurant", "captain",
          "window", "newspaper", "doctor", "river", "camera", "festival", "chocolate", "piano", "harbor", "village",
          "battery", "volcano", "dinosaur", "orchestra", "pharmacy", "satellite", "calendar", "tomato", "blanket",
          "lighthouse", "factory", "penguin", "tractor", "magazine", "umpire", "carpet", "castle", "jacket",
          "ticket", "parrot")
_TEMPLATES = ("the {} is closed today", "please bring the {} to the office", "we found a {} near the station",
              "the {} will arrive at noon", "nobody saw the {} yesterday")
_VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-us+f4", "en")
#: The tuning set the channel's choices are made on: other nouns, other sentences, voices and
#: speeds in another order, its own noise (never the reported sentences above).
_TUNE_NOUNS = ("sandwich", "helicopter", "volunteer", "tornado", "cinema", "compass", "guitar", "raincoat",
               "lemonade", "scientist", "bakery", "ambulance", "pillow", "carousel", "engine", "saxophone",
               "monastery", "gorilla", "lantern", "balcony", "vitamin", "pyramid", "skeleton", "treasure",
               "wardrobe", "envelope", "mechanic", "sculpture", "dolphin", "grocery", "mushroom", "trumpet",
               "lobster", "chimney", "kangaroo", "necklace", "suitcase", "cathedral", "microphone", "stadium")
_TUNE_TEMPLATES = ("the {} was broken last week", "can you find the {} for me", "my brother bought a new {}",
                   "there is a {} behind the house", "the {} looked very old")
#: n-best depths compared (the channel keeps :data:`retrieval.speech.ALTERNATIVES`).
_DEPTHS = (0, 5, 10, 20)


def _spoken(text: str, voice: str, speed: int, noise_snr_db: float | None, rng: np.random.Generator,
            scratch: Path) -> np.ndarray:
    """espeak-ng's ``text`` at 16 kHz with a second of silence either side (and white noise)."""
    path = scratch / "spoken.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True, timeout=60)
    with wave.open(str(path)) as spoken:
        rate = spoken.getframerate()
        samples = np.frombuffer(spoken.readframes(spoken.getnframes()), np.int16).astype(np.float64)
    samples = np.interp(np.arange(0, len(samples), rate / SAMPLE_RATE), np.arange(len(samples)), samples)
    audio = np.concatenate([np.zeros(SAMPLE_RATE), samples, np.zeros(SAMPLE_RATE)])
    if noise_snr_db is not None:
        power = float(np.mean(samples ** 2))
        audio += rng.normal(0.0, math.sqrt(power / 10 ** (noise_snr_db / 10)), audio.size)
    return np.clip(audio, -32768, 32767).astype(np.int16)


def _speech_set(name: str, sentences: int) -> list[tuple[str, str, int, float | None]]:
    """The ``test`` (reported) or ``tune`` sentences: (text, voice, words a minute, noise SNR dB)."""
    if name == "test":
        return [(_TEMPLATES[n % len(_TEMPLATES)].format(_NOUNS[n % len(_NOUNS)]), _VOICES[n % len(_VOICES)],
                 120 + 10 * (n % 5), 20.0 if n % 3 == 2 else None) for n in range(sentences)]
    return [(_TUNE_TEMPLATES[n % len(_TUNE_TEMPLATES)].format(_TUNE_NOUNS[n % len(_TUNE_NOUNS)]),
             _VOICES[(n + 2) % len(_VOICES)], 125 + 10 * (n % 4), 20.0 if n % 3 == 1 else None)
            for n in range(sentences)]


def _recognise_set(recognizer: SpeechRecognizer, name: str, sentences: int, scratch: Path) -> dict:
    """Speak and recognise one set; the best words, the n-best's hypotheses (as deep as the
    deepest compared), the phone loop's phones, their CPU and wall seconds."""
    rng = np.random.default_rng(5 if name == "test" else 77)
    spoken = _speech_set(name, sentences)
    items, errors, words, audio_s = [], 0.0, 0, 0.0
    cpu = {"words": 0.0, "phone_loop": 0.0}
    wall = {"words": 0.0, "phone_loop": 0.0}
    for n, (text, voice, speed, snr) in enumerate(spoken):
        samples = _spoken(text, voice, speed, snr, rng, scratch)
        if n == 0 and name == "test":  # through the channel's own reader (a file, PyAV), as an index job reads it
            path = scratch / "first.wav"
            with wave.open(str(path), "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(SAMPLE_RATE)
                out.writeframes(samples.tobytes())
            assert read_speech(recognizer, path)["seconds"] > 0
        started, ticked = time.perf_counter(), time.thread_time()
        heard, hypotheses = recognizer.hypotheses(samples, alternatives=max(_DEPTHS))
        cpu["words"] += time.thread_time() - ticked
        wall["words"] += time.perf_counter() - started
        started, ticked = time.perf_counter(), time.thread_time()
        phones = recognizer.recognize_phones(samples)
        cpu["phone_loop"] += time.thread_time() - ticked
        wall["phone_loop"] += time.perf_counter() - started
        audio_s += samples.size / SAMPLE_RATE
        items.append({"id": n, "hypotheses": [list(h) for h in hypotheses], "extra": {"speech": {
            "words": [w.to_dict() for w in heard], "phones": [p.to_dict() for p in phones]}}})
        errors += word_error_rate(text.split(), [w.word for w in heard]) * len(text.split())
        words += len(text.split())
    return {"texts": [text for text, *_ in spoken], "items": items, "audio_s": audio_s, "cpu_s": cpu,
            "wall_s": wall, "errors": errors, "words": words, "load_avg": _load()}


def _alternating_cost(recognizers: dict[str, SpeechRecognizer], sentences: int) -> dict:
    """The word recognisers' CPU seconds per audio second, decoding the same test sentences in
    turn (the order flipped every sentence), so the shared machine's load hits them alike."""
    rng = np.random.default_rng(5)
    seconds = dict.fromkeys(recognizers, 0.0)
    audio_s = 0.0
    with tempfile.TemporaryDirectory(prefix="vtr-bench-speech-") as scratch:
        for n, (text, voice, speed, snr) in enumerate(_speech_set("test", sentences)):
            samples = _spoken(text, voice, speed, snr, rng, Path(scratch))
            audio_s += samples.size / SAMPLE_RATE
            for name in list(recognizers)[:: 1 if n % 2 else -1]:
                ticked = time.thread_time()
                recognizers[name].hypotheses(samples, alternatives=ALTERNATIVES)
                seconds[name] += time.thread_time() - ticked
    rtf = {name: round(value / audio_s, 3) for name, value in seconds.items()}
    first, *others = recognizers
    return {"sentences": sentences, "rtf_cpu_words": rtf,
            "ratio": {name: round(seconds[name] / seconds[first], 3) for name in others}, "load_avg": _load()}


def bench_speech(sentences: int, keep: Path | None = None, defaults: bool = False) -> dict:
    """Recognition error and speed, and each matching way's R@1, on espeak-ng sentences: the
    reported ``test`` set and the ``tune`` set the channel's choices were made on.
    ``keep``: a JSON file that keeps the recognised items (and their timing) between runs, so
    that matching can be compared again without recognising again. ``defaults``: the word
    recogniser searches with PocketSphinx's own defaults instead of the channel's
    (:data:`retrieval.speech.WORD_SEARCH`); either way the two are timed against each other
    (``alternating``)."""
    if keep is not None and keep.is_file():
        saved = json.loads(keep.read_text())
        if saved.get("sentences") == sentences and "sets" in saved and saved.get("defaults") == defaults:
            return _speech_rows(saved)
    channel, plain = SpeechRecognizer(), SpeechRecognizer(search={})
    recognizer = plain if defaults else channel
    with tempfile.TemporaryDirectory(prefix="vtr-bench-speech-") as scratch:
        saved = {"sentences": sentences, "engine": recognizer.identity, "defaults": defaults,
                 "sets": {name: _recognise_set(recognizer, name, sentences, Path(scratch)) for name in ("test", "tune")}}
    saved["alternating"] = _alternating_cost({"channel": channel, "pocketsphinx_defaults": plain}, min(10, sentences))
    if keep is not None:
        atomic_write_text(keep, json.dumps(saved), durable=False)
    return _speech_rows(saved)


def _with_alternatives(items: list[dict], depth: int) -> list[dict]:
    """The items as the channel stores them, keeping ``depth`` alternative hypotheses."""
    out = []
    for item in items:
        speech = dict(item["extra"]["speech"])
        best = [SpokenWord(**word) for word in speech["words"]]
        speech["alternatives"] = [[w.to_dict() for w in run]
                                  for run in alternative_runs(best, item["hypotheses"][:depth])]
        out.append({"id": item["id"], "extra": {"speech": speech}})
    return out


def _r1(index: SpeechIndex, queries: list[str]) -> float:
    return sum(max(index.scores(q), key=lambda row: row[1])[0] == n for n, q in enumerate(queries)) / len(queries)


def _set_rows(recognised: dict) -> dict:
    """One set's WER, real-time factors and R@1 of each way to match."""
    texts, audio_s = recognised["texts"], recognised["audio_s"]
    queries = [f'a voice says "{text}"' for text in texts]
    best_only = _with_alternatives(recognised["items"], 0)
    transcripts = WordIndex([{"id": item["id"], "extra": {"text": {"lines": [
        {"text": " ".join(w["word"] for w in item["extra"]["speech"]["words"])}]}}} for item in best_only])
    ways = {"words_fts5": sum(bool(found) and found[0] == n for n, found in
                              enumerate(transcripts.search(text) for text in texts)) / len(texts)}
    for source in MATCH_SOURCES:
        ways[f"phonetic_{source}"] = _r1(SpeechIndex(best_only, source=source), queries)
    for depth in _DEPTHS[1:]:
        items = _with_alternatives(recognised["items"], depth)
        for source in ("words", "both"):
            ways[f"phonetic_{source}+nbest{depth}"] = _r1(SpeechIndex(items, source=source), queries)
    cpu, wall = recognised["cpu_s"], recognised["wall_s"]
    return {"sentences": len(texts), "audio_s": round(audio_s, 1), "wer": round(recognised["errors"] / recognised["words"], 3),
            "rtf_cpu": {part: round(seconds / audio_s, 3) for part, seconds in cpu.items()}
            | {"both": round(sum(cpu.values()) / audio_s, 3)},
            "rtf_wall": {part: round(seconds / audio_s, 3) for part, seconds in wall.items()}
            | {"both": round(sum(wall.values()) / audio_s, 3)},
            "R@1_spoken_quoted": {way: round(value, 3) for way, value in ways.items()},
            "load_avg_while_recognising": recognised["load_avg"]}


def _speech_rows(saved: dict) -> dict:
    sets = saved["sets"]
    texts, items = sets["test"]["texts"], _with_alternatives(sets["test"]["items"], ALTERNATIVES)
    queries = [f'a voice says "{text}"' for text in texts]
    index = SpeechIndex(items)
    answered = [index.search(q)[:1] for q in queries]
    pictures = [entry["caption"] for entry in plan_corpus(n_train=1, n_test=60, seed=3, long_videos=0).test]
    silent = sum(not index.search(caption) for caption in pictures) / len(pictures)
    default = f"phonetic_{DEFAULT_SOURCE}+nbest{ALTERNATIVES}"
    rows = {name: _set_rows(recognised) for name, recognised in sets.items()}
    return {"bench": "channels", "part": "speech", "engine": saved.get("engine"), "default": default,
            "R@1_default": {name: row["R@1_spoken_quoted"][default] for name, row in rows.items()},
            "wer": {name: row["wer"] for name, row in rows.items()},
            "rtf_cpu_both": {name: row["rtf_cpu"]["both"] for name, row in rows.items()},
            "sets": rows, "alternating": saved.get("alternating"),
            "answered_R@1": round(sum(bool(a) and a[0][0] == n for n, a in enumerate(answered)) / len(texts), 3),
            "answered_share": round(sum(bool(a) for a in answered) / len(texts), 3),
            "picture_abstained": round(silent, 3), "picture_queries": len(pictures),
            "targets": {"R@1": 0.6, "rtf": 0.3}, "threads": 1, "load_avg": _load(),
            "note": NOTE + "; rtf_cpu: the recognising thread's CPU seconds per audio second, less "
                           "sensitive to other jobs than rtf_wall"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ocr,scale", help="ocr, cost, fusion, scale, scan, speech, spoken, "
                        "speech_cost "
                        "(comma-separated)")
    parser.add_argument("--clips", type=int, default=40, help="ocr: rendered clips; fusion: test clips when no "
                        "--corpus is given")
    parser.add_argument("--size", type=int, default=128, help="ocr: frame size (the synthetic corpus's default)")
    parser.add_argument("--det-sides", default=f"{DET_MIN_SIDE},320", help="ocr: detector input sizes to compare "
                        "(the short side smaller frames are upscaled to; the channel's default first)")
    parser.add_argument("--model", type=Path, help="fusion: a trained model directory (default: the demo "
                        "architecture with random weights)")
    parser.add_argument("--corpus", type=Path, help="fusion: a corpus from `vtr data synth --written`")
    parser.add_argument("--text-from", type=Path, help="fusion: reuse the on-screen text of this index of the "
                        "same corpus (built with the text channel) instead of reading it again")
    parser.add_argument("--repeats", type=int, default=2, help="fusion: indexing runs per channel set")
    parser.add_argument("--clip-seconds", type=float, default=4.0, help="cost: length of each clip (4 s: two "
                        "frames read at the default sampling)")
    parser.add_argument("--per-video", type=int, default=6, help="speech_cost: test clips played back to back "
                        "in each long video")
    parser.add_argument("--spoken-share", type=float, default=0.5, help="speech_cost: share of the clips with a "
                        "sentence said over them (the others are silent)")
    parser.add_argument("--items", type=int, default=100_000, help="scale, scan: index size (scan: a third "
                        "of it, the items with text)")
    parser.add_argument("--queries", type=int, default=200, help="scale: timed queries")
    parser.add_argument("--seed", type=int, default=0, help="spoken: the generated corpus's seed (0: the reported "
                        "split; tune on others)")
    parser.add_argument("--sentences", type=int, default=40, help="speech: spoken sentences")
    parser.add_argument("--speech-defaults", action="store_true", help="speech: the word recogniser searches "
                        "with PocketSphinx's defaults instead of the channel's narrower search")
    parser.add_argument("--keep-speech", type=Path, help="speech: keep the recognised sentences in this JSON "
                        "file and reuse them on the next run (to compare matching only)")
    add_output_argument(parser, "channels")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    results = Recorder(args.output, append=args.append)
    for part in parts:
        if part == "ocr":
            results.add(bench_ocr(args.clips, args.size, tuple(int(x) for x in args.det_sides.split(","))))
        elif part == "fusion":
            results.add(bench_fusion(args.model, args.corpus, args.repeats, args.clips, args.text_from))
        elif part == "cost":
            results.add(bench_cost(args.clips, args.repeats, args.clip_seconds))
        elif part == "scale":
            results.add(bench_scale(args.items, args.queries))
        elif part == "speech_cost":
            results.add(bench_speech_cost(args.clips, args.repeats, args.clip_seconds, args.per_video,
                                          args.spoken_share))
        elif part == "scan":
            results.add(bench_scan(math.ceil(args.items / 3), args.queries))
        elif part == "spoken":
            results.add(bench_spoken(args.model, args.corpus, args.clips, args.seed))
        elif part == "speech":
            results.add(bench_speech(args.sentences, args.keep_speech, args.speech_defaults))
        else:
            parser.error(f"unknown part {part!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
