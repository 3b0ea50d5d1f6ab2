"""The ``vtr`` command line.

Every verb is a thin face over the library: argument checking and messages live here, the work
in ``retrieval`` / ``indexer``. Errors a user can fix (a missing file, an unknown model name, a
checkpoint of another architecture) print one clear line and exit with status 2, no traceback;
``VTR_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from app.common import device_option, friendly, precision_option, runtime

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="vtr: video-text retrieval with VideoMamba and friends.")



def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details")) -> None:
    _setup_logging(verbose)


@app.command("models")
@friendly
def models_cmd() -> None:
    """List the model architectures (configs/models/*.yaml)."""
    from retrieval.models.registry import list_models, model_config  # noqa: PLC0415

    for name in list_models():
        cfg = model_config(name)
        dims = ", ".join(f"{k}={cfg[k]}" for k in ("embed_dim", "depth", "num_frames", "img_size") if k in cfg)
        typer.echo(f"{name:28s} {cfg['arch']:12s} {dims}")


@app.command("convert")
@friendly
def convert_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="official checkpoint file (.pth/.safetensors)"),
    out: Path = typer.Option(..., "--out", "-o", help="model directory to write"),
    fmt: str = typer.Option("videomamba", "--format",
                            help="checkpoint family: videomamba | umt | timesformer (a Hugging Face directory) "
                                 "| uniformer | vim"),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="local BERT folder (e.g. bert-base-uncased) whose tokenizer goes with a full "
                                  "retrieval checkpoint; checkpoints carry none"),
    vision_only: bool = typer.Option(False, "--vision-only", help="keep only the vision encoder of a full checkpoint"),
    num_frames: Optional[int] = typer.Option(
        None, help="videomamba: re-sample temporal position embeddings; umt: clip length (default 4)"),
    variant: str = typer.Option("videomamba", help="videomamba | pro (VideoMambaPro weights; its v1/v2 layout is "
                                                   "read from the keys)"),
    head_dim: int = typer.Option(64, "--head-dim", help="uniformer: channels per attention head (not in the "
                                                        "weights; 64 in every published model)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the model directory already at --out"),
) -> None:
    """Convert official weights into a vtr model directory (strict: every key accounted for).

    A full retrieval checkpoint (vision + text encoder + heads) with --tokenizer becomes a whole
    retrieval model (`vtr eval --model OUT`); otherwise the vision encoder alone is converted.
    """
    from retrieval.models import convert as conv  # noqa: PLC0415
    from retrieval.models import convert_timesformer_uniformer_vim as encoders  # noqa: PLC0415
    from retrieval.models.model_dir import check_model_out  # noqa: PLC0415

    check_model_out(out, overwrite)
    if fmt in encoders.FORMATS:
        if tokenizer is not None or vision_only or variant != "videomamba":
            raise ValueError(f"--format {fmt} converts a video encoder: it takes no --tokenizer, --vision-only "
                             "or --variant")
        path = encoders.convert(fmt, checkpoint, out, num_frames=num_frames, head_dim=head_dim)
        typer.echo(f"wrote {path}: {encoders.describe(path)}")
        return
    if fmt not in conv.FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; supported: {', '.join(conv.FORMATS)}")
    if vision_only and tokenizer is not None:
        raise ValueError("--vision-only keeps no text encoder, so it takes no --tokenizer; pass one of the two")
    state = conv.load_checkpoint(checkpoint)  # read once, handed to the converter
    has_text = conv.has_text_encoder(state)
    if has_text and tokenizer is None and not vision_only:
        raise ValueError(f"{checkpoint} holds a whole retrieval model (text_encoder.* beside vision_encoder.*) but "
                         "checkpoints carry no tokenizer: pass --tokenizer DIR (a local bert-base-uncased folder) "
                         "to convert all of it, or --vision-only to keep just the vision encoder")
    if tokenizer is not None and not has_text:
        raise ValueError(f"{checkpoint} holds no text encoder (text_encoder.*), so --tokenizer has nothing to go "
                         "with: drop --tokenizer to convert the vision encoder alone")

    if tokenizer is not None:
        path = conv.convert_retrieval(checkpoint, out, tokenizer, fmt=fmt, num_frames=num_frames, variant=variant,
                                      state=state)
        cfg = json.loads((path / "config.json").read_text())
        v, t = cfg["model"]["video"], cfg["model"]["text"]
        bert = t["bert_config"]
        dropped = ", ".join(f"{reason} ({n})" for reason, n in cfg["source"].get("dropped", {}).items()) or "nothing"
        typer.echo(f"wrote {path}: retrieval model; vision {v['arch']} D={v['embed_dim']} depth={v['depth']} "
                   f"frames={v['num_frames']} img={v['img_size']}; text BERT {bert['num_hidden_layers']} layers "
                   f"x {bert['hidden_size']} (fusion from layer {t['fusion_layer']}); embed {cfg['model']['embed_dim']}; "
                   f"dropped by name: {dropped}")
        return
    if fmt == "umt":
        if variant != "videomamba":
            raise ValueError("--variant applies to VideoMamba checkpoints only")
        path = conv.convert_umt_vision(checkpoint, out, num_frames=num_frames, state=state)
    else:
        path = conv.convert_videomamba(checkpoint, out, num_frames=num_frames, variant=variant, state=state)
    cfg = json.loads((path / "config.json").read_text())
    m = cfg["model"]
    pro = (f" VideoMambaPro bimamba {m['bimamba_layout']} (scan input {m['scan_input']}, masked backward "
           f"{m['mask_backward']})") if variant == "pro" else ""
    typer.echo(f"wrote {path}: {m['arch']} D={m['embed_dim']} depth={m['depth']} frames={m['num_frames']} "
               f"img={m['img_size']}{pro}")


@app.command("info")
@friendly
def info_cmd(model: Path = typer.Argument(..., help="model directory")) -> None:
    """Show a model directory's configuration and parameter count."""
    from retrieval.models.model_dir import load_model, read_model_config  # noqa: PLC0415

    cfg = read_model_config(model)
    net = load_model(model)
    n = sum(p.numel() for p in net.parameters())
    typer.echo(json.dumps({"kind": cfg["kind"], "model": cfg["model"], "preprocess": cfg["preprocess"],
                           "parameters": n}, indent=2))


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly
def train_cmd(ctx: typer.Context,
              recipe: Path = typer.Argument(..., help="training recipe (YAML), e.g. configs/train/demo.yaml"),
              resume: bool = typer.Option(False, "--resume", help="continue from run.out/checkpoint"),
              device: Optional[str] = device_option(None), precision: Optional[str] = precision_option(None)) -> None:
    """Train a retrieval model (VTC + VTM + MLM [+ UTA]); key=value arguments override the recipe.

    Many processes: torchrun --nproc_per_node N -m app.cli train RECIPE
    """
    from retrieval.train.loop import train  # noqa: PLC0415
    from retrieval.train.recipe import load_recipe  # noqa: PLC0415

    # --device/--precision override the recipe's run.device/run.precision
    extra = [f"run.{k}={v}" for k, v in (("device", device), ("precision", precision)) if v is not None]
    r = load_recipe(recipe, [*ctx.args, *extra])
    runtime(r.run.device, r.run.precision)  # a missing CUDA fails here, before the corpus is read
    final = train(r, resume=resume)
    typer.echo(f"model written to {final}")


data_app = typer.Typer(help="datasets: the built-in synthetic corpus")
app.add_typer(data_app, name="data")


@data_app.command("synth")
@friendly
def synth_cmd(out: Path = typer.Option(..., "--out", "-o", help="corpus directory"),
              n_train: int = typer.Option(600, "--n-train"), n_test: int = typer.Option(100, "--n-test"),
              seed: int = typer.Option(0, "--seed"), size: int = typer.Option(128, help="frame size in pixels (a multiple of 32 keeps decord on its fast path)"),
              long_videos: int = typer.Option(4, "--long", help="long multi-scene videos for moment search"),
              written: float = typer.Option(0.0, "--written", help="share of test clips showing a title, sign or "
                                            "caption that their caption mentions (for the text channel)"),
              spoken: float = typer.Option(0.0, "--spoken", help="share of test clips over which espeak-ng says a "
                                           "sentence that their caption mentions (for the speech channel)")) -> None:
    """Write the procedural moving-shapes corpus (mp4 + VindLU JSON + labels)."""
    from retrieval.data.synthetic import generate_corpus  # noqa: PLC0415

    summary = generate_corpus(out, n_train=n_train, n_test=n_test, seed=seed, size=size, long_videos=long_videos,
                              written_share=written, spoken_share=spoken)
    typer.echo(f"{summary['n_train']} train / {summary['n_test']} test / {summary['n_long']} long clips in "
               f"{summary['out']} ({summary['seconds']:.1f} s)")


@app.command("demo")
@friendly
def demo_cmd(workdir: Path = typer.Option(Path("runs/demo"), help="where the demo keeps its files"),
             no_serve: bool = typer.Option(False, "--no-serve", help="stop after evaluation"),
             host: str = typer.Option("127.0.0.1", help="address the page binds to"),
             port: int = typer.Option(7860, help="port of the page")) -> None:
    """Synthetic corpus -> train the demo model -> index -> evaluate -> search page (no downloads)."""
    from app.demo import run_demo  # noqa: PLC0415

    run_demo(workdir, serve=not no_serve, host=host, port=port)


# command groups defined in their own modules; each has register(app)
_COMMAND_MODULES = ("app.cmd_index", "app.cmd_eval", "app.cmd_serve")
for _mod in _COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def main() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from retrieval.runtime import apply_cli_defaults  # noqa: PLC0415

    apply_cli_defaults()
    app(prog_name="vtr")


if __name__ == "__main__":
    sys.exit(main())
