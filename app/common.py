"""Helpers shared by the CLI command modules."""
from __future__ import annotations

import errno
import functools
import os

import typer

# errors that are the user's to fix: printed without a traceback
_USER_ERRORS = (FileNotFoundError, ValueError, KeyError, NotADirectoryError, PermissionError)


def friendly(fn):
    """Turn user errors into one line on stderr and exit code 2 (``VTR_DEBUG=1`` shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as exc:
            if os.environ.get("VTR_DEBUG"):
                raise
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("VTR_DEBUG"):
                raise
            where = f" while writing {exc.filename}" if exc.filename else ""
            typer.secho(f"error: no space left on device{where}; free space and run the command again",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


# -- --device / --precision: one shared pair of options for every verb that runs a model ------
def device_option(default: str = "auto"):
    return typer.Option(default, "--device", help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")


def precision_option(default: str = "auto"):
    return typer.Option(default, "--precision", help="auto (bf16 on CUDA and on CPUs with native bf16, else "
                                                     "fp32) | fp32 | bf16 | fp16 (CUDA)")


def runtime(device: str, precision: str) -> tuple[str, str]:
    """Resolve ``--device``/``--precision`` before any work: a missing CUDA or an unknown value is
    a user error (one line, exit 2). Returns ``(device, precision)`` as concrete strings."""
    from retrieval.models.device import cpu_matmul_backend, local_rank_device, resolve_precision  # noqa: PLC0415

    dev = local_rank_device(device)  # under torchrun with CUDA: this process's LOCAL_RANK GPU
    resolved = str(dev), resolve_precision(precision, dev)
    if dev.type == "cpu":
        cpu_matmul_backend()         # a bad $VTR_CPU_MATMUL is a user error too, before any work
    return resolved
