"""The fused CPU selective scan: a small C kernel built on first use and called through ctypes.

The kernel (``scan_kernel.c``) keeps each channel's state in registers and never materialises
the ``[B, D, L, N]`` tensors the reference builds, which is where its speed comes from. It is
compiled with the machine's C compiler (``$CC``, else ``cc``/``gcc``) into a per-user cache
(``$VTR_CACHE_DIR`` or ``~/.cache/vtr``), keyed by the source, the flags and the CPU, and
published with an atomic rename so concurrent processes (pytest workers, torchrun ranks)
never load a half-written library.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("scan_kernel.c")
_FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC", "-shared"]
_ARCH_FLAGS = ["-march=native", "-mprefer-vector-width=512"]
_lock = threading.Lock()
_lib = None
_lib_error: str | None = None


class KernelUnavailable(RuntimeError):
    """The fused CPU kernel could not be built or loaded on this machine."""


def cache_dir() -> Path:
    root = os.environ.get("VTR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vtr")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_tag() -> str:
    # -march=native output is only valid on the CPU it was built for
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return hashlib.sha1(line.encode()).hexdigest()[:8]
    except OSError:
        pass
    return platform.machine()


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    last_err = ""
    # -march=native is not understood everywhere (e.g. some clang/arm builds): retry without it
    for flags in (_FLAGS + _ARCH_FLAGS, _FLAGS):
        cmd = [cc, *flags, str(_SRC), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, out)
            return
        last_err = proc.stderr.strip()[-2000:]
    os.unlink(tmp)
    raise KernelUnavailable(f"compiling {_SRC.name} with {cc} failed:\n{last_err}")


def load_kernel():
    """Return the ctypes library, building it if needed. Raises KernelUnavailable."""
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    if _lib_error is not None:
        raise KernelUnavailable(_lib_error)
    with _lock:
        if _lib is not None:
            return _lib
        try:
            cc = _compiler()
            if cc is None:
                raise KernelUnavailable("no C compiler found (set $CC); the fused CPU scan needs one")
            key = hashlib.sha1(_SRC.read_bytes() + " ".join(_FLAGS + _ARCH_FLAGS).encode()).hexdigest()[:12]
            path = cache_dir() / f"scan_{key}_{_cpu_tag()}.so"
            if not path.exists():
                log.info("building the fused CPU selective-scan kernel -> %s", path)
                _build(cc, path)
            lib = ctypes.CDLL(str(path))
        except (KernelUnavailable, OSError) as exc:
            _lib_error = str(exc)
            raise KernelUnavailable(_lib_error) from exc
        P, L_, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        lib.vtr_scan_fwd.argtypes = [P] * 8 + [L_, L_, L_, I, I, I]
        lib.vtr_scan_fwd.restype = I
        lib.vtr_scan_bwd.argtypes = [P] * 14 + [L_, L_, L_, I, I, I]
        lib.vtr_scan_bwd.restype = I
        _lib = lib
        return lib


def kernel_available() -> bool:
    try:
        load_kernel()
        return True
    except KernelUnavailable:
        return False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _FusedScan(torch.autograd.Function):
    """Core scan: y_t = <C_t, h_t>, h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (fp32)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, mask_diag: bool):
        lib = load_kernel()
        Bt, D, L = u.shape
        N = A.shape[1]
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        Bl = B.transpose(1, 2).contiguous()  # [Bt, L, N]: one step's state inputs are adjacent
        Cl = C.transpose(1, 2).contiguous()
        h0c = h0.contiguous() if h0 is not None else None
        y = torch.empty_like(u)
        hlast = u.new_empty(Bt, D, N)
        rc = lib.vtr_scan_fwd(u.data_ptr(), delta.data_ptr(), A.data_ptr(), Bl.data_ptr(), Cl.data_ptr(),
                              _ptr(h0c), y.data_ptr(), hlast.data_ptr(), Bt, D, L, N, int(mask_diag),
                              torch.get_num_threads())
        if rc != 0:
            raise KernelUnavailable(f"fused scan forward failed (code {rc}; d_state {N} > 64?)")
        ctx.save_for_backward(u, delta, A, Bl, Cl, h0c)
        ctx.mask_diag = bool(mask_diag)
        ctx.has_h0 = h0 is not None
        return y, hlast

    @staticmethod
    def backward(ctx, dy, dhlast):
        lib = load_kernel()
        u, delta, A, Bl, Cl, h0 = ctx.saved_tensors
        Bt, D, L = u.shape
        N = A.shape[1]
        dy = dy.contiguous().float() if dy is not None else torch.zeros_like(u)
        dhl = dhlast.contiguous().float() if dhlast is not None else None
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = torch.empty_like(A)
        dBl, dCl = torch.empty_like(Bl), torch.empty_like(Cl)
        dh0 = torch.empty_like(h0) if h0 is not None else None
        rc = lib.vtr_scan_bwd(u.data_ptr(), delta.data_ptr(), A.data_ptr(), Bl.data_ptr(), Cl.data_ptr(),
                              _ptr(h0), dy.data_ptr(), _ptr(dhl), du.data_ptr(), ddelta.data_ptr(),
                              dA.data_ptr(), dBl.data_ptr(), dCl.data_ptr(), _ptr(dh0),
                              Bt, D, L, N, int(ctx.mask_diag), torch.get_num_threads())
        if rc != 0:
            raise KernelUnavailable(f"fused scan backward failed (code {rc})")
        return du, ddelta, dA, dBl.transpose(1, 2), dCl.transpose(1, 2), dh0, None


def fused_scan(u, delta, A, B, C, h0=None, mask_diag=False):
    """fp32 core scan on CPU tensors; returns (y [Bt,D,L], last_state [Bt,D,N])."""
    return _FusedScan.apply(u, delta, A, B, C, h0, mask_diag)
