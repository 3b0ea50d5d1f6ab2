"""``vtr index`` (build an index, ``vtr index merge`` to join shard workers) and ``vtr search``.

``index`` is a command group that also runs on its own: ``vtr index --model M --videos V --out I``
builds an index, ``vtr index merge I`` publishes the parts of a sharded job. The group's
options are therefore all optional at the Click level and checked here when no sub-command
is given.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer

from app.common import device_option, friendly, precision_option, runtime

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512MB"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 512M, 8G or a number of bytes")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** _SIZE_POWERS[unit.lower()])


def _index_callback(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="model directory that embeds the clips"),
    videos: Optional[Path] = typer.Option(None, "--videos", help="folder of videos (the corpus root)"),
    ann: Optional[Path] = typer.Option(None, "--ann", help="annotation file (JSON / JSONL / CSV); its video "
                                       "paths are relative to --videos"),
    dataset: str = typer.Option("generic", "--dataset", help="annotation preset: msrvtt, didemo, anet, lsmdc, "
                                "msvd, generic"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="index directory to publish"),
    window: Optional[float] = typer.Option(None, "--window", help="index long videos as windows of this many "
                                           "seconds (shorter videos stay one item)"),
    stride: Optional[float] = typer.Option(None, "--stride", help="seconds between window starts "
                                           "(default: --window, no overlap)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: this worker's share of the parts (default "
                                        "from RANK/WORLD_SIZE or the Slurm array, else 0/1)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted job, skipping done parts"),
    workers: int = typer.Option(2, "--workers", help="decoding processes (0: decode in the main process)"),
    batch_size: int = typer.Option(16, "--batch-size", help="clips per encoder call"),
    part_size: int = typer.Option(256, "--part-size", help="corpus entries per part (the unit of resume and "
                                  "sharding; keep it the same across shards and resumes)"),
    labels: str = typer.Option("synthetic", "--labels", help="action label set for the top-5 labels: "
                               "synthetic, kinetics400 or a text file with one label per line"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="memory budget of the FAISS index "
                                             "(e.g. 4G); picks a compressed index when needed"),
    index_type: str = typer.Option("auto", "--index-type", help="FAISS factory string (Flat, HNSW32,Flat, "
                                   "IVF1024,PQ32x8, ...) or auto"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an index of another model or corpus "
                                   "already at --out (never a folder that is not an index)"),
    device: str = device_option(), precision: str = precision_option(),
    engine: str = typer.Option("local", "--engine", help="local (this machine) or ray (a Ray Data pipeline on a "
                               "cluster; needs the ray extra)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="HOST:PORT of a running Ray cluster "
                                              "(default: start a local one for the job)"),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help="encoder actors, one model each "
                                             "(default: one per GPU, else one per spare CPU)"),
    ray_cpus_per_actor: Optional[float] = typer.Option(None, "--ray-cpus-per-actor", help="CPUs (torch threads) "
                                                       "per encoder actor (default 1)"),
    ray_gpus_per_actor: Optional[float] = typer.Option(None, "--ray-gpus-per-actor", help="GPUs per encoder actor "
                                                       "(default 1 on GPU clusters, else 0)"),
    channels: Optional[str] = typer.Option(None, "--channels", help="what to index: visual, text (on-screen "
                                           "text; the ocr extra), comma-separated (default: every channel "
                                           "whose package is installed)"),
    ocr: Optional[Path] = typer.Option(None, "--ocr", help="directory of local PP-OCR ONNX models for the text "
                                       "channel (default: the ones inside rapidocr-onnxruntime)"),
    text_every: float = typer.Option(2.0, "--text-every", help="text channel: read one frame every this many "
                                     "seconds of each item (at least one per item)"),
    asr: Optional[str] = typer.Option(None, "--asr", help="speech channel's recogniser: pocketsphinx (default, "
                                      "embedded) or whisper:DIR (a local Whisper model directory you bring)"),
) -> None:
    """Embed a corpus into a searchable index (resumable, shardable); `vtr index merge` joins shards.

    Top-5 action labels default to the synthetic corpus's set; use --labels for real footage.
    """
    if ctx.invoked_subcommand is not None:
        return
    ray_options = {"address": ray_address, "actors": ray_actors, "cpus_per_actor": ray_cpus_per_actor,
                   "gpus_per_actor": ray_gpus_per_actor}
    _run_index(model, videos, ann, dataset, out, window, stride, shard, resume, workers, batch_size,
               part_size, labels, max_memory, index_type, not no_progress, overwrite, device, precision, engine,
               ray_options, channels, ocr, text_every, asr)


@friendly
def _run_index(model: Optional[Path], videos: Optional[Path], ann: Optional[Path], dataset: str,
               out: Optional[Path], window: Optional[float], stride: Optional[float], shard: Optional[str],
               resume: bool, workers: int, batch_size: int, part_size: int, labels: str,
               max_memory: Optional[str], index_type: str, progress: bool, overwrite: bool = False,
               device: str = "auto", precision: str = "auto", engine: str = "local",
               ray_options: Optional[dict] = None, channels: Optional[str] = None, ocr: Optional[Path] = None,
               text_every: float = 2.0, asr: Optional[str] = None) -> None:
    from indexer.channels import parse_channels  # noqa: PLC0415
    from indexer.engines import make_engine  # noqa: PLC0415
    from indexer.jobs import JobSpec, run_index_job  # noqa: PLC0415
    from indexer.plan import resolve_shard  # noqa: PLC0415
    from retrieval.asr import choose_asr  # noqa: PLC0415

    if model is None or out is None or videos is None:
        raise ValueError("vtr index needs --model, --videos (the corpus root) and --out "
                         "(see `vtr index --help`)")
    chosen = parse_channels(channels)  # a missing extra is named here, before any work
    if ocr is not None and "text" not in chosen:
        raise ValueError("--ocr sets the text channel's recogniser, but --channels leaves the text channel out")
    asr = choose_asr(asr, chosen)  # an unknown name, a bad directory: here, before any work
    device, precision = runtime(device, precision)   # a missing CUDA fails before the model is read
    from retrieval.models.model_dir import read_model_config  # noqa: PLC0415

    kind = read_model_config(model)["kind"]  # also accepts a Hugging Face TimeSformer directory
    if kind != "retrieval":
        raise ValueError(f"{model} is a bare video encoder ({kind}): an index answers text queries, so it needs a "
                         "retrieval model directory (`vtr train`, or `vtr convert --tokenizer` of a multi-modality "
                         "checkpoint)")
    spec = JobSpec(model_dir=model, out=out, videos=videos, ann_file=ann, dataset=dataset, window=window,
                   stride=stride, part_size=part_size, labels=labels,
                   index_type=None if index_type == "auto" else index_type,
                   max_memory_bytes=parse_bytes(max_memory) if max_memory else None, channels=chosen, ocr_dir=ocr,
                   text_every_s=text_every, asr=asr)
    worker = resolve_shard(shard)
    with make_engine(engine, **(ray_options or {})) as runner:  # joins or starts a Ray cluster: fails fast
        summary = run_index_job(spec, worker, resume=resume, workers=workers, batch_size=batch_size,
                                progress=progress, overwrite=overwrite, device=device, precision=precision,
                                engine=runner)
    typer.echo(f"shard {summary.shard}: indexed {summary.indexed}, failed {summary.failed}, skipped "
               f"{summary.skipped} (already done) in {summary.seconds:.1f} s "
               f"({summary.clips_per_second:.1f} clips/s while embedding)")
    if summary.failed:
        typer.echo(f"failures are listed in the index's failures record ({out})")
    if summary.published is not None:
        typer.echo(f"published {summary.published}")
    else:
        typer.echo(f"parts are in {summary.work_dir}; run `vtr index merge {out}` once all "
                   f"{summary.shard.count} shards have finished")


@friendly
def _export_cmd(
    index: Path = typer.Argument(..., help="the published index"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write (created; see --overwrite)"),
    fmt: str = typer.Option("parquet", "--format", help="parquet (items.parquet: metadata + embedding column) "
                            "| npy (clip-retrieval layout: embeddings/*.npy + metadata/*.parquet)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the folder already at --out"),
) -> None:
    """Write every item's vector with its metadata (path, span, captions, labels, annotation
    fields, channel text) to standard files; row i is item i."""
    from indexer.export import FORMATS, check_export_out, export_index  # noqa: PLC0415

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    check_export_out(out, overwrite)
    typer.echo(f"wrote {export_index(index, out, fmt, overwrite=overwrite)}")


@friendly
def _embed_cmd(
    files: Optional[list[Path]] = typer.Argument(None, help="video files (or use --videos)"),
    model: Path = typer.Option(..., "--model", "-m", help="retrieval model directory"),
    videos: Optional[Path] = typer.Option(None, "--videos", help="folder of videos (the corpus root)"),
    ann: Optional[Path] = typer.Option(None, "--ann", help="annotation file (paths relative to --videos); its "
                                       "captions and other fields become metadata columns"),
    dataset: str = typer.Option("generic", "--dataset", help="annotation preset (as for `vtr index`)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write"),
    fmt: str = typer.Option("parquet", "--format", help="parquet | npy (as `vtr index export`)"),
    window: Optional[float] = typer.Option(None, "--window", help="embed long videos as windows of this many "
                                           "seconds"),
    stride: Optional[float] = typer.Option(None, "--stride", help="seconds between window starts"),
    workers: int = typer.Option(2, "--workers", help="decoding processes (0: decode in the main process)"),
    batch_size: int = typer.Option(16, "--batch-size", help="clips per encoder call"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the folder already at --out"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    device: str = device_option(), precision: str = precision_option(),
) -> None:
    """Embed videos without keeping an index: the vectors and metadata go to --out in the format
    `vtr index export` writes (the same embedding job as `vtr index`, then the export)."""
    from indexer.export import FORMATS, check_export_out, export_index  # noqa: PLC0415
    from indexer.jobs import JobSpec, run_index_job  # noqa: PLC0415
    from retrieval.data.corpora import CorpusItem  # noqa: PLC0415
    from retrieval.models.model_dir import read_model_config  # noqa: PLC0415

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if bool(files) == (videos is not None):
        raise ValueError("give either video files or --videos FOLDER")
    if ann is not None and videos is None:
        raise ValueError("--ann lists videos relative to --videos: pass --videos too")
    check_export_out(out, overwrite)
    select = None
    if files:
        paths = [path.resolve() for path in files]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"video not found: {path}")
        videos = Path(os.path.commonpath([path.parent for path in paths]))
        wanted = {path.relative_to(videos).as_posix() for path in paths}

        def select(sources: list[CorpusItem]) -> list[CorpusItem]:
            return [source for source in sources if source.video in wanted]

    if read_model_config(model)["kind"] != "retrieval":
        raise ValueError(f"{model} is a bare video encoder: embeddings for search need a retrieval model directory")
    device, precision = runtime(device, precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.embed-", dir=out.parent))
    try:
        spec = JobSpec(model_dir=model, out=scratch / "index", videos=videos, ann_file=ann, dataset=dataset,
                       window=window, stride=stride, index_type="Flat")
        summary = run_index_job(spec, workers=workers, batch_size=batch_size, progress=not no_progress,
                                device=device, precision=precision, select=select)
        export_index(scratch / "index", out, fmt, overwrite=overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    typer.echo(f"embedded {summary.indexed} items ({summary.failed} failed) into {out}")


@friendly
def _merge_cmd(index: Path = typer.Argument(..., help="the --out of the sharded job")) -> None:
    """Join the parts written by every shard worker into the published index."""
    from indexer.publish import publish_job  # noqa: PLC0415  (no torch: a merge stays small)

    typer.echo(f"published {publish_job(index)}")


@friendly
def _add_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="the published index to extend"),
    videos: Path = typer.Option(..., "--videos", help="folder of videos; those the index lacks are embedded"),
    ann: Optional[Path] = typer.Option(None, "--ann", help="annotation file listing the videos (paths relative "
                                       "to --videos)"),
    dataset: str = typer.Option("generic", "--dataset", help="annotation preset (as for `vtr index`)"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="model directory (default: the index's; "
                                         "another model is refused)"),
    resume: bool = typer.Option(False, "--resume", help="finish an interrupted add"),
    include_removed: bool = typer.Option(False, "--include-removed", help="also add back videos that `vtr index "
                                         "remove` took out (they are left out otherwise)"),
    workers: int = typer.Option(2, "--workers", help="decoding processes (local engine)"),
    batch_size: int = typer.Option(16, "--batch-size", help="clips per encoder call"),
    part_size: int = typer.Option(256, "--part-size", help="videos per part (the unit of resume)"),
    engine: str = typer.Option("local", "--engine", help="local or ray (as for `vtr index`)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="HOST:PORT of a running Ray cluster"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
) -> None:
    """Embed the videos an index lacks and republish it atomically (its trained quantizer is kept)."""
    from indexer.engines import make_engine  # noqa: PLC0415
    from indexer.update import add_to_index, describe  # noqa: PLC0415

    options = {"address": ray_address} if engine == "ray" or ray_address is not None else {}
    with make_engine(engine, **options) as runner:
        summary = add_to_index(index, videos, ann_file=ann, dataset=dataset, model_dir=model, resume=resume,
                               workers=workers, batch_size=batch_size, part_size=part_size,
                               progress=not no_progress, engine=runner, include_removed=include_removed)
    typer.echo(describe(summary))


@friendly
def _remove_cmd(
    paths: list[Path] = typer.Argument(..., help="videos to drop (as indexed, or relative to the corpus root)"),
    index: Path = typer.Option(..., "--index", "-i", help="the published index"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="refuse unless the index was built with "
                                         "this model"),
) -> None:
    """Drop every item of the given videos from an index and republish it atomically."""
    from indexer.update import describe, remove_from_index  # noqa: PLC0415

    typer.echo(describe(remove_from_index(index, paths, model_dir=model)))


def _format_span(start: Optional[float], end: Optional[float]) -> str:
    return "-" if start is None or end is None else f"{start:.1f}-{end:.1f}s"


@friendly
def _search_cmd(
    query: Optional[str] = typer.Argument(None, help="what to look for, in words"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="model directory (default: the one the "
                                         "index was built with)"),
    video: Optional[Path] = typer.Option(None, "--video", help="search by example: a video file instead of "
                                         "a text query"),
    k: int = typer.Option(10, "-k", help="number of hits"),
    rerank: bool = typer.Option(False, "--rerank", help="re-score the top candidates with the matching head"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per hit instead of a table"),
    device: str = device_option(), precision: str = precision_option(),
    group: bool = typer.Option(True, "--group/--no-group", help="one hit per video, its other matching "
                               "windows listed as further moments (--no-group: every matching window)"),
    paths: Optional[list[str]] = typer.Option(None, "--path", help="only items under this folder or matching "
                                              "this glob, relative to the corpus root (repeatable: any)"),
    where: Optional[list[str]] = typer.Option(None, "--where", help="only items whose annotation field has "
                                              "this value: COLUMN=VALUE or COLUMN!=VALUE (repeatable: all)"),
    min_duration: Optional[float] = typer.Option(None, "--min-duration", help="only items at least this many "
                                                 "seconds long"),
    max_duration: Optional[float] = typer.Option(None, "--max-duration", help="only items at most this many "
                                                 "seconds long"),
    channels: Optional[str] = typer.Option(None, "--channels", help="channels to search and fuse, e.g. "
                                           "visual,text (default: every channel the index has)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="per-channel fusion weights, e.g. "
                                          "visual=1,text=2 (default 1 each)"),
) -> None:
    """Search an index by text (or by an example video with --video).

    Windows of one long video are grouped into one hit (best window first, the others as further
    moments); --no-group keeps the raw list. Each hit says where its labels come from: the
    model's trained action head or zero-shot label prompts. An index with on-screen text is
    searched on every channel and the rankings fused; hits show which channels matched and the
    matched line with its time. --path, --where and the duration bounds restrict the search
    before the top k is taken.
    """
    from indexer.channels import channel_names, parse_weights  # noqa: PLC0415
    from indexer.filters import ItemFilter  # noqa: PLC0415
    from indexer.query import Query  # noqa: PLC0415
    from indexer.search import Searcher, query_cleaning  # noqa: PLC0415
    from retrieval.data.video import VideoReadError  # noqa: PLC0415

    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    if (query is None) == (video is None):
        raise ValueError("give either a text query or --video PATH")
    device, precision = runtime(device, precision)  # an unusable device is said before any path is read
    item_filter = ItemFilter.build(paths, where, min_duration, max_duration)  # malformed: refused here
    prepared = None
    if query is not None:  # cleaned and checked once, before seconds go to loading the model
        prepared = Query.parse(query, query_cleaning(index, model), where=item_filter)
        for note in prepared.notes:
            typer.echo(f"note: {note}", err=True)
    wanted = None if channels is None else channel_names(channels)
    fusion_weights = parse_weights(weights)
    searcher = Searcher(index, model=model, device=device, precision=precision)
    searcher.select(item_filter)  # an unknown column is refused before the query is embedded
    if prepared is not None:
        hits = searcher.search(prepared, k=k, rerank=rerank, group=group, channels=wanted,
                               weights=fusion_weights)
    else:
        try:
            hits = searcher.search_video(video, k=k, group=group, where=item_filter)
        except VideoReadError as exc:
            raise ValueError(str(exc)) from exc
    if as_json:
        for hit in hits:
            typer.echo(json.dumps(hit.to_dict(), ensure_ascii=False))
        return
    source = next((hit.label_source for hit in hits if hit.label_source), None)
    heading = f"top label ({source})" if source else "top label"
    typer.echo(f"{'rank':>4}  {'score':>7}  {'span':>12}  {heading:28}  path")
    for rank, hit in enumerate(hits, start=1):
        label = f"{hit.labels[0][0]} ({hit.labels[0][1]:.2f})" if hit.labels else "-"
        typer.echo(f"{rank:>4}  {hit.score:>7.3f}  {_format_span(hit.start, hit.end):>12}  {label:28}  {hit.path}")
        if hit.channels:
            matched = ", ".join(f"{name} #{info['rank']}" for name, info in hit.channels.items() if info["rank"])
            typer.echo(f"{'':>4}  {'':>7}  channels: {matched}")
        if hit.text:
            typer.echo(f"{'':>4}  {'':>7}  on screen at {hit.text['start']:.1f}s: {hit.text['snippet']}")
        if hit.speech:
            typer.echo(f"{'':>4}  {'':>7}  said at {hit.speech['start']:.1f}s: «{hit.speech['text']}»")
        if hit.moments:
            more = ", ".join(f"{_format_span(m.start, m.end)} ({m.score:.3f})" for m in hit.moments)
            typer.echo(f"{'':>4}  {'':>7}  also at {more}")


def register(app: typer.Typer) -> None:
    """Add ``index`` (with ``merge``) and ``search`` to the ``vtr`` application."""
    index_app = typer.Typer(invoke_without_command=True, no_args_is_help=True)
    index_app.callback()(_index_callback)
    index_app.command("merge")(_merge_cmd)
    index_app.command("add")(_add_cmd)
    index_app.command("remove")(_remove_cmd)
    index_app.command("export")(_export_cmd)
    app.add_typer(index_app, name="index")
    app.command("search")(_search_cmd)
    app.command("embed")(_embed_cmd)
