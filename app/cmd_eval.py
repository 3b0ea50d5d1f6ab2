"""``vtr eval`` (zero-shot retrieval or action accuracy on a corpus) and ``vtr classify`` (labels
for video files)."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from app.common import device_option, friendly, precision_option, runtime

_TASKS = ("retrieval", "classify")
_SOURCES = ("auto", "head", "zero-shot", "supervised")


def _check_choice(value: str, allowed: tuple[str, ...], option: str) -> None:
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")


def eval_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="model directory"),
    dataset: str = typer.Option(..., "--dataset", "-d",
                                help="msrvtt | didemo | anet | lsmdc | msvd | generic (sets caption rules, "
                                     "text length, sampling)"),
    ann: Path = typer.Option(..., "--ann", help="annotation file (VindLU JSON, JSON lines or CSV)"),
    videos: Path = typer.Option(..., "--videos", help="folder the annotation's video paths are relative to"),
    rerank_k: int = typer.Option(128, "--rerank-k", help="ITM re-rank of each query's top k (0: ITC only)"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="clips per encoder batch"),
    workers: int = typer.Option(0, "--workers", "-j", help="decoding processes beside the encoder"),
    out: Path | None = typer.Option(None, "--out", "-o",
                                       help="write metrics.json, per-query ranks and the recall plot here"),
    cache_dir: Path | None = typer.Option(None, "--cache-dir",
                                             help="clip embedding cache (default: OUT/embeddings when --out "
                                                  "is given)"),
    dual_softmax: bool = typer.Option(False, "--dual-softmax",
                                      help="also report dual-softmax ITC (not the official protocol)"),
    task: str = typer.Option("retrieval", "--task", help="retrieval | classify (accuracy of item labels)"),
    labels: str = typer.Option("synthetic", "--labels", help="for --task classify: kinetics400 | synthetic | FILE"),
    source: str = typer.Option("auto", "--source", help="for --task classify: auto | head | zero-shot | "
                               "supervised"),
    storage: str = typer.Option("auto", "--storage",
                                help="auto | fp32 | fp16: how patch tokens and caption states wait for the "
                                     "re-rank (auto: fp32 unless --precision is reduced)"),
    save_scores: bool = typer.Option(False, "--save-scores",
                                     help="also write OUT/scores.npz: the ITC and re-ranked score matrices"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
    device: str = device_option(), precision: str = precision_option(),
    channels: str | None = typer.Option(None, "--channels", help="index the corpus with these channels (e.g. "
                                        "visual,text) and report t2v R@1/5/10 per channel and fused, on all, "
                                        "picture-only and text-mentioning queries"),
    weights: str | None = typer.Option(None, "--weights", help="with --channels: fusion weights, e.g. "
                                       "visual=1,text=2"),
    asr: str | None = typer.Option(None, "--asr", help="with --channels ...,speech: the recogniser, pocketsphinx "
                                   "(default) or whisper:DIR (a local Whisper model directory)"),
) -> None:
    """Zero-shot evaluation on a corpus: t2v/v2t retrieval (ITC + ITM re-rank) or action accuracy."""
    from retrieval.data.corpora import load_corpus  # noqa: PLC0415
    from retrieval.eval.retrieval import STORAGE_CHOICES, evaluate_retrieval  # noqa: PLC0415
    from retrieval.models.model_dir import load_model  # noqa: PLC0415

    _check_choice(task, _TASKS, "--task")
    _check_choice(source, _SOURCES, "--source")
    _check_choice(storage, STORAGE_CHOICES, "--storage")
    if asr is not None and channels is None:
        raise ValueError("--asr sets the speech channel's recogniser: use it with --channels ...,speech")
    if save_scores and (out is None or task != "retrieval"):
        raise ValueError("--save-scores needs --out and --task retrieval")
    device, precision = runtime(device, precision)
    corpus = load_corpus(dataset, ann, videos)
    if channels is not None:
        _eval_channels(model, dataset, ann, videos, corpus, channels, weights, out, workers, batch_size, progress,
                       device, precision, asr)
        return
    net = load_model(model, device, precision)
    if cache_dir is None and out is not None:
        cache_dir = out / "embeddings"
    if task == "classify":
        from retrieval.eval.actions import evaluate_actions  # noqa: PLC0415

        result = evaluate_actions(net, corpus, labels, source=source, batch_size=batch_size, workers=workers,
                                  cache_dir=cache_dir, progress=progress)
        typer.echo(f"{corpus.name} actions ({result['source']}): top1 {result['top1']:.1f}  "
                   f"top5 {result['top5']:.1f}  top1 (any object) {result['top1_any']:.1f}  over {result['n']} clips ({result['failed']} undecodable, "
                   f"{result['unlabelled']} unlabelled)")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            typer.echo(f"wrote {out / 'metrics.json'}")
        return

    if not callable(getattr(net, "encode_texts", None)):
        raise ValueError(f"{model} holds a bare video encoder (no text tower): retrieval needs a retrieval "
                         "model directory (`vtr train` or `vtr convert` of a multi-modality checkpoint)")
    result = evaluate_retrieval(net, corpus, rerank_k=rerank_k, batch_size=batch_size, workers=workers,
                                cache_dir=cache_dir, dual_softmax=dual_softmax, progress=progress, storage=storage)
    typer.echo(result.table())
    if out is not None:
        typer.echo(f"wrote {result.write(out)}")
    if save_scores:
        typer.echo(f"wrote {result.write_scores(out)}")


def _eval_channels(model: Path, dataset: str, ann: Path, videos: Path, corpus, channels: str, weights: str | None,
                   out: Path | None, workers: int, batch_size: int, progress: bool, device: str,
                   precision: str, asr: str | None = None) -> None:
    """``vtr eval --channels``: index the corpus with the channels (kept in OUT/index, so a second
    run reuses it), then rank every caption per channel and fused."""
    import tempfile  # noqa: PLC0415

    from indexer.channel_eval import evaluate_channels, format_table  # noqa: PLC0415
    from indexer.channels import channel_options, parse_channels, parse_weights  # noqa: PLC0415
    from indexer.jobs import JobSpec, run_index_job, work_dir_for  # noqa: PLC0415
    from indexer.search import Searcher  # noqa: PLC0415
    from indexer.store import read_published_manifest  # noqa: PLC0415
    from retrieval.asr import choose_asr  # noqa: PLC0415

    chosen = parse_channels(channels)
    fusion_weights = parse_weights(weights)
    asr = choose_asr(asr, chosen)
    with tempfile.TemporaryDirectory(prefix="vtr-eval-") as scratch:
        index = (out if out is not None else Path(scratch)) / "index"
        # a second run reuses OUT/index: never one whose speech another recogniser made
        built = channel_options(read_published_manifest(index) or {}).get("asr")
        if "speech" in chosen and built not in (None, asr):
            raise ValueError(f"{index} holds speech recognised with --asr {built}, not {asr}: evaluate into "
                             "another --out, or delete it")
        spec = JobSpec(model_dir=model, out=index, videos=videos, ann_file=ann, dataset=dataset, channels=chosen,
                       asr=asr)
        run_index_job(spec, resume=work_dir_for(index).exists() or index.exists(), workers=workers,
                      batch_size=batch_size, progress=progress, device=device, precision=precision)
        result = evaluate_channels(Searcher(index, model=model, device=device, precision=precision), corpus,
                                   fusion_weights)
    typer.echo(format_table(result))
    if out is not None:
        (out / "channels.json").write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {out / 'channels.json'}")


def classify_cmd(
    videos: list[Path] = typer.Argument(..., help="video files"),
    model: Path = typer.Option(..., "--model", "-m", help="model directory"),
    labels: str = typer.Option("synthetic", "--labels", help="kinetics400 | synthetic | FILE (one label a line)"),
    top: int = typer.Option(5, "--top", help="labels shown per video"),
    source: str = typer.Option("auto", "--source", help="auto (the model's action head when it knows these "
                               "labels, else zero-shot) | head | zero-shot (label prompts) | supervised "
                               "(the video encoder's own head)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON list on stdout"),
    device: str = device_option(), precision: str = precision_option(),
) -> None:
    """Top action labels for each video: the model's trained action head, or zero-shot from label prompts."""
    from retrieval.data.video import VideoReadError  # noqa: PLC0415
    from retrieval.labels import load_labels  # noqa: PLC0415
    from retrieval.models.actions import classify_paths, label_source  # noqa: PLC0415
    from retrieval.models.model_dir import load_model  # noqa: PLC0415

    _check_choice(source, _SOURCES, "--source")
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    device, precision = runtime(device, precision)
    names = load_labels(labels)
    for path in videos:
        if not path.is_file():
            raise FileNotFoundError(f"video not found: {path}")
    net = load_model(model, device, precision)
    used = label_source(net, names, source)
    try:
        rankings = classify_paths(net, videos, labels=names, top=top, source=source)
    except VideoReadError as exc:
        raise ValueError(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps([{"video": str(path), "source": used,
                                "labels": [{"label": label, "prob": round(prob, 6)} for label, prob in ranking]}
                               for path, ranking in zip(videos, rankings, strict=True)], indent=2))
        return
    for path, ranking in zip(videos, rankings, strict=True):
        typer.echo(f"{path}: " + ", ".join(f"{label} ({prob:.2f})" for label, prob in ranking) + f"  [{used}]")


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``classify`` to the ``vtr`` app."""
    app.command("eval")(friendly(eval_cmd))
    app.command("classify")(friendly(classify_cmd))
