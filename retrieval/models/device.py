"""Where the model runs and in which precision: ``--device`` / ``--precision`` and ``run.device`` /
``run.precision`` resolve here.

Devices: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``. Asking for CUDA on
a machine without it is a user error (:class:`DeviceError`, a ``ValueError``: the CLI prints one
line and exits with status 2 before any work). The choice is logged once per process.

Precisions: ``fp32``, ``bf16``, ``fp16`` or ``auto`` = bf16 on CUDA and on CPUs that multiply bf16
natively (AVX-512 BF16 or AMX), fp32 elsewhere. Reduced precision is autocast around forward
passes: matrix products run in bf16/fp16 while what the model keeps in fp32 (VideoMamba's
residual stream and norms, the scan state and its accumulation) stays fp32.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
_logged: set[str] = set()


class DeviceError(ValueError):
    """A device or precision the user asked for does not exist here (a user error: exit status 2)."""


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a concrete :class:`torch.device`.

    Raises:
        DeviceError: an unknown spelling, CUDA asked for where there is none, or a GPU index
            beyond the machine's count.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    m = _DEVICE_RE.match(spec)
    if not m or (m.group(1) != "cuda" and m.group(2) is not None):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N; got {spec!r}")
    kind, index = m.group(1), m.group(2)
    n = cuda_device_count()
    if kind == "auto":
        dev = torch.device("cuda", torch.cuda.current_device()) if n else torch.device("cpu")
        _log_once(f"device: auto -> {dev}" + ("" if n else " (no CUDA device visible)"))
        return dev
    if kind == "cpu":
        _log_once("device: cpu")
        return torch.device("cpu")
    if n == 0:
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
        raise DeviceError(f"--device {spec}: {why}; use --device cpu or --device auto")
    i = int(index) if index is not None else torch.cuda.current_device()
    if i >= n:
        raise DeviceError(f"--device {spec}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    dev = torch.device("cuda", i)
    _log_once(f"device: {dev} ({torch.cuda.get_device_name(i)})")
    return dev


def local_rank_device(spec: str | None = "auto") -> torch.device:
    """The device of this process under ``torchrun``: with CUDA each process takes the GPU of its
    ``LOCAL_RANK`` (``cuda``/``auto``; an explicit ``cuda:N`` is kept); CPU otherwise."""
    dev = resolve_device(spec)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ and (spec or "auto").strip().lower() in ("auto", "cuda"):
        local = int(os.environ["LOCAL_RANK"])
        n = cuda_device_count()
        if local >= n:
            raise DeviceError(f"LOCAL_RANK {local} but this machine has {n} CUDA device(s): start at most {n} "
                              "processes per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    return dev


def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of /proc/cpuinfo (``flags``, ``vendor_id``, ``model name``),
    None where there is no such line or no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    return frozenset((cpuinfo_field("flags") or "").split())


@functools.lru_cache(maxsize=1)
def cpu_cache_bytes() -> int:
    """Bytes of this CPU's last-level cache as the first core sees it (sysfs), 8 MiB where unknown."""
    best = 0
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(root)
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "type")) as fh:
                if fh.read().strip() == "Instruction":
                    continue
            with open(os.path.join(root, entry, "size")) as fh:
                text = fh.read().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text or 0)
        best = max(best, size)
    return best or 8 << 20


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX-BF16).

    Without it, oneDNN emulates bf16 products through fp32 and they run slower than fp32 ones.
    ``VTR_CPU_BF16=0/1`` overrides the answer.
    """
    forced = os.environ.get("VTR_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    # no /proc/cpuinfo (not Linux): ask torch what its CPU kernels were dispatched to
    try:
        return "AMX" in torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False


CPU_MATMULS = ("auto", "onednn", "torch")
_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU vendor string of /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``, ...; empty where
    there is none)."""
    return cpuinfo_field("vendor_id") or ""


def choose_cpu_matmul(spec: str, flags: frozenset[str], vendor: str, onednn_linear: bool) -> str:
    """``"onednn"`` or ``"torch"``: who runs the large fp32 products of :func:`retrieval.models.layers.linear`.

    ``auto`` picks oneDNN's inner product on an x86 CPU with AVX-512 that is not Intel's: torch's
    fp32 products go to MKL, which runs its AVX2 code on other vendors' CPUs, while oneDNN runs its
    AVX-512 kernels there (AMD Zen 4: 1.3-1.4x on the mixer's x_proj shapes, 1.04-1.23x on a
    whole VideoMamba-Ti forward at 64 frames; docs/performance.md). On Intel CPUs MKL runs AVX-512 itself
    and on AVX2-only CPUs oneDNN is not faster everywhere, so torch keeps them.
    """
    if spec not in CPU_MATMULS:
        raise DeviceError(f"VTR_CPU_MATMUL must be one of {', '.join(CPU_MATMULS)}, got {spec!r}")
    if spec == "torch" or not onednn_linear:
        return "torch"
    if spec == "onednn":
        return "onednn"
    return "onednn" if _AVX512_CORE <= flags and vendor not in ("", "GenuineIntel") else "torch"


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fp32 inner product (``retrieval.models.layers.onednn_linear``)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _choose_here(spec: str) -> str:
    return choose_cpu_matmul(spec, cpu_flags(), cpu_vendor(), onednn_linear_available())


@functools.lru_cache(maxsize=1)
def _default_cpu_matmul() -> str:
    spec = os.environ.get("VTR_CPU_MATMUL", "auto").strip().lower() or "auto"
    choice = _choose_here(spec)
    if spec == "onednn" and choice != "onednn":
        log.warning("VTR_CPU_MATMUL=onednn: this torch build has no oneDNN linear; using torch's products")
    _log_once(f"CPU fp32 products of the model layers: {choice}"
              + (" (oneDNN, AVX-512)" if choice == "onednn" and spec == "auto" else ""))
    return choice


_matmul_override: list[str] = []


def cpu_matmul_backend() -> str:
    """:func:`choose_cpu_matmul` for this machine and ``$VTR_CPU_MATMUL`` (default ``auto``),
    decided once per process and logged; inside :func:`cpu_matmul` its choice."""
    return _matmul_override[-1] if _matmul_override else _default_cpu_matmul()


@contextlib.contextmanager
def cpu_matmul(spec: str) -> Iterator[str]:
    """Within the block (process-wide), :func:`cpu_matmul_backend` answers ``spec`` (``auto``,
    ``onednn`` or ``torch``) resolved for this machine instead of ``$VTR_CPU_MATMUL``: for tests and
    for benchmarks that time both in turns. Yields the resolved choice."""
    choice = _choose_here(spec)
    _matmul_override.append(choice)
    try:
        yield choice
    finally:
        _matmul_override.pop()


def resolve_precision(spec: str | None, device: torch.device | str) -> str:
    """``auto | fp32 | bf16 | fp16`` on ``device`` -> ``fp32``, ``bf16`` or ``fp16``.

    Raises:
        DeviceError: an unknown precision, or fp16 on CPU (no fp16 autocast kernels there worth
            having: use bf16).
    """
    device = torch.device(device)
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}; got {spec!r}")
    if spec == "auto":
        if device.type == "cuda":
            prec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            why = "CUDA"
        elif device.type == "cpu" and cpu_has_native_bf16():
            prec, why = "bf16", "the CPU has native bf16 (avx512_bf16/amx_bf16)"
        else:
            prec, why = "fp32", "the CPU has no native bf16 (no avx512_bf16/amx_bf16 flag)"
        _log_once(f"precision: auto -> {prec} on {device.type} ({why})")
        return prec
    if spec == "fp16" and device.type == "cpu":
        raise DeviceError("--precision fp16 is for CUDA; on CPU use bf16 (or fp32)")
    _log_once(f"precision: {spec} on {device.type}")
    return spec


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device`` (a no-op for fp32)."""
    device = torch.device(device)
    if precision == "fp32" or device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def full_precision(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in fp32 even inside autocast.

    For the small layers whose outputs are compared across clips and captions: the projections
    into the shared embedding space, the action head and the matching head. Retrieval ranks by
    differences between scores (a clip and its time-reversed twin differ by little), so bf16
    rounding in these last products reorders near-ties; in fp32 they cost nothing next to the
    towers. The towers' own matrix products still run in the autocast precision.
    """
    with no_autocast(x.device):
        return layer(x.float())


def no_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A region where autocast is off for ``device``'s kind (meta and others: the CPU's)."""
    kind = torch.device(device).type
    return torch.autocast(kind if kind in ("cpu", "cuda") else "cpu", enabled=False)


def set_runtime(model: torch.nn.Module, device: str | torch.device | None = "cpu",
                precision: str | None = "fp32") -> torch.nn.Module:
    """Move ``model`` to ``device`` and record the inference precision its callers autocast to
    (:func:`model_autocast`). Specs are resolved (``auto``); returns the model."""
    dev = resolve_device(device)
    model.to(dev)
    model.vtr_precision = resolve_precision(precision, dev)
    return model


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_precision(model: torch.nn.Module) -> str:
    return getattr(model, "vtr_precision", "fp32")


@contextlib.contextmanager
def model_autocast(model: torch.nn.Module) -> Iterator[None]:
    """Autocast to the precision recorded on ``model`` by :func:`set_runtime` (fp32: nothing)."""
    with autocast(model_device(model), model_precision(model)):
        yield


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), no autograd and autocast to the model's inference precision
    (``load_model(..., precision=)``) for the duration; the caller's mode is restored.

    Evaluating a module left in training mode would silently apply dropout, so every entry point
    here switches it, without changing what the caller sees afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), model_autocast(model):
            yield
    finally:
        model.train(was_training)


__all__ = [
    "CPU_MATMULS",
    "DEVICES",
    "PRECISIONS",
    "DeviceError",
    "autocast",
    "choose_cpu_matmul",
    "cpu_has_native_bf16",
    "cpu_matmul",
    "cpu_matmul_backend",
    "cpu_vendor",
    "evaluating",
    "full_precision",
    "local_rank_device",
    "model_autocast",
    "model_device",
    "model_precision",
    "onednn_linear_available",
    "resolve_device",
    "resolve_precision",
    "set_runtime",
]
