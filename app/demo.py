"""``vtr demo``: from a fresh machine to a search page, with nothing downloaded.

Steps, each reused when its output already exists (a second run only serves):

1. the synthetic corpus (``WORKDIR/corpus``), and a few clips with written titles or a spoken
   sentence (``WORKDIR/corpus/channels``, :data:`CHANNEL_CLIPS`) for the text and speech channels;
2. the demo model, trained with ``configs/train/demo.yaml`` (``WORKDIR/train/model``; an
   interrupted training resumes from its checkpoint);
3. an index of the test split, the channel clips and the long multi-scene videos cut into
   windows, so queries land on moments (``WORKDIR/index``), with every channel whose package is
   installed: what is seen, written on screen (``ocr`` extra) and said (``speech`` extra);
4. evaluation on the held-out test split: retrieval metrics (ITC, and ITM re-ranked when the
   matching head is trained) and action top-1 of the model's action head, with zero-shot prompt
   labels beside it for comparison (``WORKDIR/eval``);
5. the search page.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import typer

from retrieval.models.registry import config_root

log = logging.getLogger(__name__)

WINDOW_S, STRIDE_S = 4.0, 2.0
#: Clips beside the test split that show a title, sign or caption (half) or have a sentence said
#: over them (half): the channels' material. They are indexed but not evaluated, so the test
#: split the demo's guards are calibrated on stays exactly as it was.
CHANNEL_CLIPS = 8


def _step(title: str) -> None:
    typer.secho(f"==> {title}", fg=typer.colors.CYAN, bold=True)


def build_corpus(workdir: Path) -> Path:
    from retrieval.data.synthetic import generate_corpus  # noqa: PLC0415

    out = workdir / "corpus"
    summary = generate_corpus(out, n_train=600, n_test=100, seed=0, size=128, long_videos=4)
    typer.echo(f"    {summary['n_train']} train / {summary['n_test']} test / {summary['n_long']} long clips "
               f"({summary['seconds']:.1f} s)")
    return out


def build_channel_clips(corpus: Path) -> Path:
    """The written and spoken clips (:data:`CHANNEL_CLIPS`, their own seed) under ``corpus/channels``."""
    from retrieval.data.synthetic import generate_corpus  # noqa: PLC0415

    out = corpus / "channels"
    summary = generate_corpus(out, n_train=1, n_test=CHANNEL_CLIPS, seed=1, size=128, long_videos=0,
                              progress=False, written_share=0.5, spoken_share=0.5)
    entries = json.loads((out / "test.json").read_text())
    written = sum("written" in entry["attributes"] for entry in entries)
    spoken = sum("spoken" in entry["attributes"] for entry in entries)
    typer.echo(f"    {summary['n_test']} clips for the channels: {written} with on-screen text, {spoken} spoken")
    return out


def train_model(workdir: Path, corpus: Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    from retrieval.train.loop import train  # noqa: PLC0415
    from retrieval.train.recipe import load_recipe  # noqa: PLC0415

    run = workdir / "train"
    final = run / "model"
    if (final / "config.json").is_file():
        typer.echo(f"    reusing {final}")
        return final
    recipe = load_recipe(config_root() / "train" / "demo.yaml",
                         [f"data.train={corpus / 'train.json'}", f"data.videos={corpus / 'videos'}",
                          f"run.out={run}", *overrides])
    t0 = time.perf_counter()
    final = train(recipe, resume=(run / "checkpoint").exists())
    typer.echo(f"    trained in {time.perf_counter() - t0:.0f} s -> {final}")
    return final


def index_annotation(corpus: Path) -> Path:
    """One annotation file for the index: the test clips, the channel clips (when built) and the
    long videos (whole, to be windowed); paths relative to ``corpus``."""
    items = [{**entry, "video": f"videos/{entry['video']}"} for entry in json.loads((corpus / "test.json").read_text())]
    channel_file = corpus / "channels" / "test.json"
    if channel_file.is_file():
        items += [{**entry, "video": f"channels/videos/{entry['video']}"}
                  for entry in json.loads(channel_file.read_text())]
    long_file = corpus / "long.json"
    if long_file.is_file():
        for entry in json.loads(long_file.read_text()):
            items.append({"video": f"videos/{entry['video']}", "caption": [s["caption"] for s in entry["segments"]]})
    path = corpus / "index.json"
    path.write_text(json.dumps(items, indent=1))
    return path


def demo_channels() -> tuple[str, ...]:
    """``visual``, and ``text`` and ``speech`` where their packages are installed."""
    from indexer.channels import parse_channels  # noqa: PLC0415
    from retrieval.speech import speech_available  # noqa: PLC0415

    return parse_channels(None) + (("speech",) if speech_available() else ())


def build_index(workdir: Path, corpus: Path, model: Path, channels: tuple[str, ...] = ("visual",)) -> Path:
    from indexer.jobs import JobSpec, run_index_job, work_dir_for  # noqa: PLC0415

    out = workdir / "index"
    if (out / "manifest.json").is_file():
        typer.echo(f"    reusing {out}")
        return out
    spec = JobSpec(model_dir=model, out=out, videos=corpus, ann_file=index_annotation(corpus),
                   window=WINDOW_S, stride=STRIDE_S, labels="synthetic", channels=channels)
    summary = run_index_job(spec, resume=work_dir_for(out).exists(), workers=1)
    typer.echo(f"    {summary.indexed} items indexed, {summary.failed} failed "
               f"({summary.clips_per_second:.1f} clips/s, channels: {', '.join(channels)}) -> {out}")
    return out


def channel_queries(corpus: Path) -> list[str]:
    """Queries to try on the page that only the text and speech channels can answer."""
    channel_file = corpus / "channels" / "test.json"
    if not channel_file.is_file():
        return []
    queries = []
    for entry in json.loads(channel_file.read_text()):
        attributes = entry["attributes"]
        if "written" in attributes:
            queries.append(f'a title that reads "{attributes["written"]["text"]}"')
        if "spoken" in attributes:
            queries.append(f'a voice says "{attributes["spoken"]["text"]}"')
    written = [q for q in queries if q.startswith("a title")][:1]
    spoken = [q for q in queries if q.startswith("a voice")][:1]
    return written + spoken


def evaluate(workdir: Path, corpus: Path, model_dir: Path) -> dict:
    from retrieval.data.corpora import load_corpus  # noqa: PLC0415
    from retrieval.eval.actions import evaluate_actions  # noqa: PLC0415
    from retrieval.eval.retrieval import evaluate_retrieval  # noqa: PLC0415
    from retrieval.labels import load_labels  # noqa: PLC0415
    from retrieval.models.model_dir import load_model  # noqa: PLC0415

    out = workdir / "eval"
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        typer.echo(f"    reusing {out}/metrics.json")
        return metrics
    model = load_model(model_dir)
    test = load_corpus("generic", corpus / "test.json", corpus / "videos")
    result = evaluate_retrieval(model, test, rerank_k=16, cache_dir=out / "embeddings")
    labels = load_labels("synthetic")
    actions = evaluate_actions(model, test, labels, cache_dir=out / "embeddings")
    result.metrics["actions"] = actions
    if actions["source"] != "zero-shot":  # the prompt labels too, for comparison
        result.metrics["actions_zero_shot"] = evaluate_actions(model, test, labels, source="zero-shot",
                                                               cache_dir=out / "embeddings")
    result.write(out)
    typer.echo(result.table())
    for key in ("actions", "actions_zero_shot"):
        if key in result.metrics:
            a = result.metrics[key]
            typer.echo(f"    action labels ({a['source']}): top-1 {a['top1']:.1f}%  top-5 {a['top5']:.1f}%  "
                       f"top-1 counting either object of two-object clips {a['top1_any']:.1f}%")
    return result.metrics


def run_demo(workdir: Path, serve: bool = True, host: str = "127.0.0.1", port: int = 7860) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _step("1/5 synthetic corpus")
    corpus = build_corpus(workdir)
    channels = demo_channels()
    if len(channels) > 1:
        build_channel_clips(corpus)
    _step("2/5 training the demo model (tiny VideoMamba + MiniLM)")
    model = train_model(workdir, corpus)
    _step("3/5 indexing the test split and the long videos (4 s windows)")
    index = build_index(workdir, corpus, model, channels)
    for query in channel_queries(corpus):
        typer.echo(f"    try: {query}")
    _step("4/5 evaluation on the held-out test split")
    metrics = evaluate(workdir, corpus, model)
    elapsed = time.perf_counter() - t0
    typer.echo(f"demo built in {elapsed:.0f} s under {workdir}")
    if serve:
        _step("5/5 search page")
        from app.web import serve as serve_page  # noqa: PLC0415

        serve_page(index, model, host=host, port=port)
    return {"workdir": str(workdir), "seconds": elapsed, "metrics": metrics, "index": str(index),
            "model": str(model)}
