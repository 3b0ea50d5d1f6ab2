"""``vtr serve``: the search page over a published index (see :mod:`app.web`)."""
from __future__ import annotations

from pathlib import Path

import typer

from app.cmd_index import parse_bytes
from app.common import device_option, friendly, precision_option, runtime


@friendly
def serve_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory (what `vtr index --out` published)"),
    model: Path | None = typer.Option(None, "--model", "-m", help="model directory (default: the one the "
                                         "index was built with)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; 0.0.0.0 makes the page and the "
                             "corpus videos reachable from other machines"),
    port: int = typer.Option(7860, "--port", help="port to listen on"),
    concurrency: int = typer.Option(4, "--concurrency", help="searches run at once; more wait in the queue"),
    labels: str | None = typer.Option(None, "--labels", help="action labels of the upload tab: synthetic, "
                                         "kinetics400 or a file (default: the set the index was labelled with)"),
    max_file_size: str = typer.Option("200mb", "--max-upload", help="largest video the upload tab accepts"),
    upload_max_pixels: int = typer.Option(4096 * 4096, "--upload-max-pixels", help="largest frame (width x "
                                          "height) of an uploaded clip, read from its container before decoding"),
    upload_max_seconds: float = typer.Option(600.0, "--upload-max-seconds", help="longest uploaded clip"),
    upload_max_frames: int = typer.Option(18_000, "--upload-max-frames", help="most frames in an uploaded clip"),
    upload_decoders: int = typer.Option(1, "--upload-decoders", help="uploaded clips decoded at once"),
    upload_space: str = typer.Option("2gb", "--upload-space", help="disk space all uploads may take together; "
                                     "each upload is deleted about a minute after it arrives or is answered"),
    device: str = device_option(), precision: str = precision_option(),
) -> None:
    """Serve the search page: text search with playable moments, and search by an uploaded clip."""
    from app.uploads import UploadLimits
    from app.web import serve  # gradio takes seconds to import

    if not 0 < port < 65536:
        raise ValueError(f"--port must be 1-65535, got {port}")
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    limits = UploadLimits(max_pixels=upload_max_pixels, max_seconds=upload_max_seconds,
                          max_frames=upload_max_frames, decoders=upload_decoders,
                          space=parse_bytes(upload_space))
    device, precision = runtime(device, precision)
    typer.echo(f"opening index {index} ...")
    serve(index, model, host=host, port=port, concurrency=concurrency, labels=labels, quiet=False,
          max_file_size=max_file_size, upload_limits=limits, device=device, precision=precision)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``vtr`` application."""
    app.command("serve")(serve_cmd)
