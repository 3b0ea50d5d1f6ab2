"""``vtr demo``: from a fresh machine to a search page, with nothing downloaded.

Steps, each reused when its output already exists (a second run only serves):

1. the synthetic corpus (``WORKDIR/corpus``);
2. the demo model, trained with ``configs/train/demo.yaml`` (``WORKDIR/train/model``; an
   interrupted training resumes from its checkpoint);
3. an index of the test split plus the long multi-scene videos cut into windows, so queries
   land on moments (``WORKDIR/index``);
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


def _step(title: str) -> None:
    typer.secho(f"==> {title}", fg=typer.colors.CYAN, bold=True)


def build_corpus(workdir: Path) -> Path:
    from retrieval.data.synthetic import generate_corpus  # noqa: PLC0415

    out = workdir / "corpus"
    summary = generate_corpus(out, n_train=600, n_test=100, seed=0, size=128, long_videos=4)
    typer.echo(f"    {summary['n_train']} train / {summary['n_test']} test / {summary['n_long']} long clips "
               f"({summary['seconds']:.1f} s)")
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
    """One annotation file for the index: the test clips and the long videos (whole, to be windowed)."""
    items = json.loads((corpus / "test.json").read_text())
    long_file = corpus / "long.json"
    if long_file.is_file():
        for entry in json.loads(long_file.read_text()):
            items.append({"video": entry["video"], "caption": [s["caption"] for s in entry["segments"]]})
    path = corpus / "index.json"
    path.write_text(json.dumps(items, indent=1))
    return path


def build_index(workdir: Path, corpus: Path, model: Path) -> Path:
    from indexer.jobs import JobSpec, run_index_job  # noqa: PLC0415
    from indexer.parts import work_dir_for  # noqa: PLC0415

    out = workdir / "index"
    if (out / "manifest.json").is_file():
        typer.echo(f"    reusing {out}")
        return out
    spec = JobSpec(model_dir=model, out=out, videos=corpus / "videos", ann_file=index_annotation(corpus),
                   window=WINDOW_S, stride=STRIDE_S, labels="synthetic")
    summary = run_index_job(spec, resume=work_dir_for(out).exists(), workers=1)
    typer.echo(f"    {summary.indexed} items indexed, {summary.failed} failed "
               f"({summary.clips_per_second:.1f} clips/s) -> {out}")
    return out


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
    _step("2/5 training the demo model (tiny VideoMamba + MiniLM)")
    model = train_model(workdir, corpus)
    _step("3/5 indexing the test split and the long videos (4 s windows)")
    index = build_index(workdir, corpus, model)
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
