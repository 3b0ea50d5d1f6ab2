"""Fused CPU kernels for the selective scan and the bidirectional Mamba mixer (ctypes + C).

The kernels (``scan_kernel.c``) work in the ``[batch, L, channels]`` layout of the mixer's
``in_proj`` output and vectorise over 16 channels, keeping the d_state states of a channel block
in registers; they never materialise the ``[B, D, L, N]`` tensors the reference builds. One call
runs one or two scan directions (the second may run the sequence backwards, without a flip),
sums them, and applies the SiLU(z) gate; a second kernel does the depthwise conv + SiLU of both
branches. Each has a C backward (states recomputed per chunk of steps from checkpoints the
forward saves).

The library is compiled with the machine's C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
into a per-user cache (``$VTR_CACHE_DIR`` or ``~/.cache/vtr``), keyed by the source, the flags
and the CPU, and published with an atomic rename so concurrent processes (pytest workers,
torchrun ranks) never load a half-written library. It is linked against the OpenMP runtime torch has
loaded (``torch_openmp_library()``), so torch and the kernels share one thread pool.
"""
from __future__ import annotations

import contextlib
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
from typing import NamedTuple

import torch

from ...runtime import keep_freed_memory  # noqa: F401  (re-exported: its home before)

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("scan_kernel.c")
# no -ffast-math: the exp kernel's rounding trick needs IEEE addition (and NaNs must propagate)
_FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-Wall"]
# $VTR_KERNEL_ARCH_FLAGS overrides these (e.g. "-march=x86-64-v3" for a build other CPUs can share)
_ARCH_FLAGS = os.environ.get("VTR_KERNEL_ARCH_FLAGS", "-march=native -mprefer-vector-width=512").split()
MAX_D_STATE = 64
MAX_D_CONV = 16
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


def torch_openmp_library() -> str | None:
    """The OpenMP runtime torch has loaded into this process (path), if any.

    The kernels are linked against this very file, so the dynamic loader hands them torch's
    runtime and there is one thread pool: two runtimes would each keep threads spinning after
    their parallel regions and fight over the cores. (Linking plain ``-lgomp`` would resolve to
    the same library only when torch's copy has the soname ``libgomp.so.1``, which some wheels
    rename, e.g. ``libgomp-a34b3233.so.1``.)
    """
    for name in openmp_runtimes():
        if os.path.isfile(name):
            return name
    return None


def _build(cc: str, src: Path, out: Path, omp_lib: str | None, arch_flags: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    last_err = ""
    # link against torch's OpenMP runtime when there is one (compile with -fopenmp, link by path)
    if omp_lib:
        link = [omp_lib, f"-Wl,-rpath,{os.path.dirname(omp_lib)}", "-lm"]
    else:
        link = ["-fopenmp", "-lm"]
    compile_flags = [f for f in _FLAGS if f != "-shared"]
    try:
        # -march=native is not understood everywhere (e.g. some clang/arm builds): retry without it
        for flags in (compile_flags + arch_flags, compile_flags):
            proc = subprocess.run([cc, *flags, "-c", str(src), "-o", obj], capture_output=True, text=True)
            if proc.returncode == 0:
                proc = subprocess.run([cc, "-shared", obj, "-o", tmp, *link], capture_output=True, text=True)
            if proc.returncode == 0:
                if flags is compile_flags and arch_flags:
                    log.warning("the fused CPU kernels did not compile with %s (%s); built without them, "
                                "which may be slower", " ".join(arch_flags), (last_err.splitlines() or [""])[-1])
                os.replace(tmp, out)
                return
            last_err = proc.stderr.strip()[-2000:]
    finally:
        for f in (obj, tmp):
            if os.path.exists(f):
                os.unlink(f)
    raise KernelUnavailable(f"compiling {src.name} with {cc} failed:\n{last_err}")


P, LONG, INT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


class _Dir(ctypes.Structure):
    """Mirror of ``vtr_dir`` in scan_kernel.c."""
    _fields_ = [("u", P), ("u_bs", LONG), ("u_ls", LONG), ("u_cs", LONG),
                ("dpre", P), ("d_bs", LONG), ("d_ls", LONG), ("d_cs", LONG),
                ("dt", P), ("t_bs", LONG), ("t_ls", LONG), ("Wt", P), ("R", LONG),
                ("Bm", P), ("b_bs", LONG), ("b_ls", LONG),
                ("Cm", P), ("c_bs", LONG), ("c_ls", LONG),
                ("A", P), ("D", P), ("bias", P), ("h0", P), ("hlast", P), ("ckpt", P),
                ("reverse", INT), ("mask_diag", INT), ("elemental", INT), ("softplus", INT), ("z_bf16", INT),
                ("u_bf16", INT), ("bc_bf16", INT)]


class _Grad(ctypes.Structure):
    """Mirror of ``vtr_grad`` in scan_kernel.c."""
    _fields_ = [("du", P), ("ddpre", P), ("dB", P), ("dC", P), ("dA", P), ("dD", P), ("dbias", P),
                ("dh0", P), ("dhlast", P)]


def build_library(src: Path | None = None, arch_flags: list[str] | None = None) -> ctypes.CDLL:
    """Build (or find in the cache) the kernels compiled from ``src`` (default: this package's
    ``scan_kernel.c``) with ``arch_flags`` (default: ``$VTR_KERNEL_ARCH_FLAGS`` or
    ``-march=native``), load and bind them. Raises KernelUnavailable. A second source (e.g. an
    earlier revision of the kernel) can thus be loaded next to the one in use, for A/B timings."""
    src = _SRC if src is None else Path(src)
    arch = _ARCH_FLAGS if arch_flags is None else list(arch_flags)
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set $CC); the fused CPU kernels need one")
    omp_lib = torch_openmp_library()
    key = hashlib.sha1(src.read_bytes() + " ".join(_FLAGS + arch).encode()
                       + str(omp_lib).encode()).hexdigest()[:12]
    path = cache_dir() / f"scan_{key}_{_cpu_tag()}.so"
    if not path.exists():
        log.info("building the fused CPU selective-scan kernels -> %s (OpenMP: %s)", path,
                 omp_lib or "the compiler's")
        _build(cc, src, path, omp_lib, arch)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(str(exc)) from exc
    DP = ctypes.POINTER(_Dir)
    GP = ctypes.POINTER(_Grad)
    lib.vtr_chunk.argtypes, lib.vtr_chunk.restype = [], INT
    lib.vtr_vector_path.argtypes, lib.vtr_vector_path.restype = [], ctypes.c_char_p
    if hasattr(lib, "vtr_math"):       # absent from older sources loaded as A/B baselines
        lib.vtr_math.argtypes = [INT, INT, P, P, LONG]
    lib.vtr_scan_fwd.argtypes = [DP, INT, P, LONG, LONG, LONG, P, INT, P, LONG, LONG, LONG, INT, INT, P]
    lib.vtr_scan_bwd.argtypes = [DP, GP, INT, P, LONG, LONG, LONG, INT, INT]
    lib.vtr_gate_bwd.argtypes = [P, P, P, LONG, LONG, P, P, LONG, LONG, LONG, INT]
    lib.vtr_conv_fwd.argtypes = [P, LONG, LONG, P, P, P, P, P, P, LONG, LONG, LONG, INT, INT]
    lib.vtr_conv_fwd_bf16.argtypes = [*lib.vtr_conv_fwd.argtypes, INT]
    lib.vtr_conv_bwd.argtypes = [P, LONG, LONG, P, P, P, P, P, P, P, P, P, P, P, LONG, LONG, LONG, INT, INT]
    lib.vtr_transpose.argtypes = [P, LONG, LONG, P, LONG, LONG, LONG, INT]
    for fn in (lib.vtr_scan_fwd, lib.vtr_scan_bwd, lib.vtr_gate_bwd, lib.vtr_conv_fwd, lib.vtr_conv_fwd_bf16,
               lib.vtr_conv_bwd, lib.vtr_transpose):
        fn.restype = INT
    return lib


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
            _lib = build_library()
        except KernelUnavailable as exc:
            _lib_error = str(exc)
            raise
        return _lib


@contextlib.contextmanager
def using_library(lib: ctypes.CDLL):
    """Run the kernels of ``lib`` (from :func:`build_library`) inside the block, then restore the
    library in use before (A/B timings of two kernel builds in one process)."""
    global _lib
    with _lock:
        before, _lib = _lib, lib
    try:
        yield lib
    finally:
        with _lock:
            _lib = before


def vector_path() -> str:
    """Which vector code the kernels in use were compiled to: ``avx512``, ``avx2``, ``avx``,
    ``sse2`` or ``generic``. Raises KernelUnavailable."""
    return load_kernel().vtr_vector_path().decode()


def kernel_math(fn: str, x: torch.Tensor, bounded: bool = False) -> torch.Tensor:
    """One of the kernels' elementwise functions on a float32 CPU tensor, as the scan computes it
    (for accuracy checks): ``"exp2"`` (the state loop's 2^x; ``bounded``: the form without the
    upper clamp, for x <= 126), ``"softplus"`` or ``"sigmoid"``."""
    names = {"exp2": 0, "softplus": 1, "sigmoid": 2}
    if fn not in names:
        raise ValueError(f"fn must be one of {sorted(names)}, got {fn!r}")
    xs = x.detach().float().contiguous()
    out = torch.empty_like(xs)
    _check(load_kernel().vtr_math(names[fn], int(bounded), xs.data_ptr(), out.data_ptr(), xs.numel()), "math")
    return out


def kernel_available() -> bool:
    try:
        load_kernel()
        return True
    except KernelUnavailable:
        return False


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process (one expected: torch's libgomp)."""
    found = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                name = line.rsplit(None, 1)[-1] if line.strip() else ""
                base = os.path.basename(name)
                if base.startswith(("libgomp", "libiomp", "libomp")):
                    found.add(name)
    except OSError:
        pass
    return sorted(found)


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 with unit stride in the last dimension (batch/position strides are passed to C)."""
    if t.dtype != torch.float32:
        t = t.float()
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _rows_or_bf16(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`_rows`, but a bf16 tensor with unit last stride is kept as it is: the kernels
    read bf16 in place (no conversion copy)."""
    if t.dtype == torch.bfloat16 and t.stride(-1) == 1:
        return t
    return _rows(t)


def _bf16_rows(t: torch.Tensor | None) -> bool:
    """Whether the forward kernel can read ``t`` as bf16 in place (unit last stride)."""
    return t is not None and t.dtype == torch.bfloat16 and t.stride(-1) == 1


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous() if t.dtype != torch.float32 or not t.is_contiguous() else t


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise KernelUnavailable(f"fused CPU kernel {what} failed (code {rc})")


class ScanDirection(NamedTuple):
    """One scan direction in the ``[B, L, E]`` layout (see ``scan_directions``).

    ``u``, ``dpre``: [B, L, E]; ``B``, ``C``: [B, L, N]; ``A``: [E, N]; ``D``, ``bias``: [E] or
    None; ``h0``: [B, E, N] or None. ``delta = softplus(dpre + bias)`` (``softplus=False``: no
    softplus). ``reverse`` runs t = L-1 .. 0; ``mask_diag`` reads y from exp(delta A) h_{t-1} (nothing at the first step);
    ``elemental`` starts from h0 = u at the direction's first step (ignored when h0 is given).
    Instead of ``dpre`` (None), ``dt`` [B, L, R] and ``dt_weight`` [E, R] (dt_proj's weight): the
    kernel computes ``dpre = dt @ dt_weight.T`` itself, so it is never written to memory.
    """
    u: torch.Tensor
    dpre: torch.Tensor | None
    B: torch.Tensor
    C: torch.Tensor
    A: torch.Tensor
    D: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    h0: torch.Tensor | None = None
    reverse: bool = False
    mask_diag: bool = False
    elemental: bool = False
    softplus: bool = True
    dt: torch.Tensor | None = None
    dt_weight: torch.Tensor | None = None


_TENSORS = 10  # u, dpre, dt, dt_weight, B, C, A, D, bias, h0 per direction
_SAVED = 11    # u, dpre, dt, Wt, B, C, At, D, bias, h0t, ckpt


def _strides(t: torch.Tensor, time_major: bool) -> tuple[int, int, int]:
    """(batch, position, channel) strides of a [B, L, E] tensor, or of a [B, E, L] one if time_major."""
    return (t.stride(0), t.stride(2), t.stride(1)) if time_major else (t.stride(0), t.stride(1), t.stride(2))


def _make_dir(u, dpre, dt, Wt, Bm, Cm, At, D, bias, h0t, hlast, ckpt, flags, time_major):
    reverse, mask_diag, elemental, softplus = flags
    d_str = _strides(dpre, time_major) if dpre is not None else (0, 0, 0)
    t_str = (dt.stride(0), dt.stride(1)) if dt is not None else (0, 0)
    return _Dir(u.data_ptr(), *_strides(u, time_major), _p(dpre), *d_str,
                _p(dt), *t_str, _p(Wt), Wt.shape[0] if Wt is not None else 0,
                Bm.data_ptr(), Bm.stride(0), Bm.stride(1), Cm.data_ptr(), Cm.stride(0), Cm.stride(1),
                At.data_ptr(), _p(D), _p(bias), _p(h0t), _p(hlast), _p(ckpt),
                int(reverse), int(mask_diag), int(elemental), int(softplus))


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flags, time_major, out_bf16, z, *flat):
        lib = load_kernel()
        ndir = len(flags)
        if time_major:
            Bt, E, L = flat[0].shape
        else:
            Bt, L, E = flat[0].shape
        N = flat[6].shape[1]
        need_grad = any(ctx.needs_input_grad)
        ctx.set_materialize_grads(False)
        nck = -(-L // lib.vtr_chunk())
        dirs = (_Dir * ndir)()
        saved = []
        hlasts = []
        for k in range(ndir):
            u, dpre, dt, W, Bm, Cm, A, D, bias, h0 = flat[k * _TENSORS:(k + 1) * _TENSORS]
            # row-major bf16 u, and bf16 dt/B/C (x_proj's output under autocast), are read in place;
            # state and accumulation stay fp32
            u16 = not time_major and _bf16_rows(u)
            bc16 = (not time_major and dt is not None and dt.shape[-1] <= MAX_D_STATE
                    and all(_bf16_rows(t) for t in (dt, Bm, Cm)))
            u = u if u16 else _rows(u)
            Bm, Cm = (Bm, Cm) if bc16 else (_rows(Bm), _rows(Cm))
            dpre = _rows(dpre) if dpre is not None else None
            dt = (dt if bc16 else _rows(dt)) if dt is not None else None
            Wt = W.detach().float().t().contiguous() if W is not None else None   # [R, E]
            At = A.detach().float().t().contiguous()                      # [N, E]
            D, bias = _vec(D), _vec(bias)
            h0t = h0.detach().float().transpose(1, 2).contiguous() if h0 is not None else None   # [B, N, E]
            hlast = u.new_empty(Bt, N, E, dtype=torch.float32)
            ckpt = u.new_empty(Bt, nck, N, E, dtype=torch.float32) if need_grad else None
            dirs[k] = _make_dir(u, dpre, dt, Wt, Bm, Cm, At, D, bias, h0t, hlast, ckpt, flags[k], time_major)
            dirs[k].u_bf16, dirs[k].bc_bf16 = int(u16), int(bc16)
            saved += [u, dpre, dt, Wt, Bm, Cm, At, D, bias, h0t, ckpt]
            hlasts.append(hlast)
        # a bf16 gate (in_proj's output under bf16 autocast) is read in place in the row-major layout
        zz = (_rows(z) if time_major else _rows_or_bf16(z)) if z is not None else None
        if zz is not None and zz.dtype == torch.bfloat16:
            for k in range(ndir):
                dirs[k].z_bf16 = 1
        out = flat[0].new_empty((Bt, E, L) if time_major else (Bt, L, E), dtype=torch.float32)
        # out_bf16: the last direction writes the gated sum in bf16 (out_proj's input under autocast);
        # with two directions the first one's fp32 output stays in `out`
        out16 = out.new_empty(Bt, L, E, dtype=torch.bfloat16) if out_bf16 and not time_major else None
        if out16 is not None and ndir == 1:
            out = out.new_empty(0)
        S = out.new_empty(Bt, L, E) if (need_grad and zz is not None) else None
        z_str = _strides(zz, time_major) if zz is not None else (0, 0, 0)
        rc = lib.vtr_scan_fwd(dirs, ndir, _p(zz), *z_str, out.data_ptr(), int(time_major), _p(S), Bt, L, E, N,
                              torch.get_num_threads(), _p(out16))
        _check(rc, "scan forward")
        if need_grad:
            ctx.save_for_backward(zz, S, *saved)
        ctx.flags, ctx.time_major, ctx.shape = flags, time_major, (Bt, L, E, N)
        return (out if out16 is None else out16, *[h.transpose(1, 2).contiguous() for h in hlasts])

    @staticmethod
    def backward(ctx, dout, *dhlasts):
        lib = load_kernel()
        flags, tm = ctx.flags, ctx.time_major
        ndir = len(flags)
        Bt, L, E, N = ctx.shape
        zz, S, *saved = ctx.saved_tensors
        nthreads = torch.get_num_threads()
        # the backward kernels are row-major ([B, L, E]): bring time-major operands over once
        rm = (lambda t: None if t is None else transpose12(t)) if tm else (lambda t: t)  # noqa: E731
        zz = rm(zz)
        if zz is not None and zz.dtype != torch.float32:  # a bf16 gate: the backward reads fp32
            zz = zz.float()
        if dout is None:
            dout = saved[0].new_zeros(Bt, L, E, dtype=torch.float32)
        else:
            dout = rm(dout.float()).contiguous()
        dz = None
        if zz is not None:
            ds, dz = torch.empty_like(dout), torch.empty_like(dout)
            _check(lib.vtr_gate_bwd(dout.data_ptr(), S.data_ptr(), zz.data_ptr(), zz.stride(0), zz.stride(1),
                                    ds.data_ptr(), dz.data_ptr(), Bt, L, E, nthreads), "gate backward")
        else:
            ds = dout
        dirs = (_Dir * ndir)()
        grads = (_Grad * ndir)()
        results = []
        for k in range(ndir):
            u, dpre, dt, Wt, Bm, Cm, At, D, bias, h0t, ckpt = saved[k * _SAVED:(k + 1) * _SAVED]
            u, dpre = _rows(rm(u)), rm(dpre)       # a bf16 u, dt, B or C: the backward reads fp32
            Bm, Cm = _rows(Bm), _rows(Cm)
            dt = _rows(dt) if dt is not None else None
            dirs[k] = _make_dir(u, dpre, dt, Wt, Bm, Cm, At, D, bias, h0t, None, ckpt, flags[k], False)
            du, ddpre = u.new_empty(Bt, L, E), u.new_empty(Bt, L, E)
            dB, dC = u.new_empty(Bt, L, N), u.new_empty(Bt, L, N)
            dAt = u.new_empty(N, E)
            dD = u.new_empty(E) if D is not None else None
            dbias = u.new_empty(E) if bias is not None else None
            dh0 = u.new_empty(Bt, N, E) if h0t is not None else None
            dhl = dhlasts[k] if k < len(dhlasts) else None
            dhl = dhl.float().transpose(1, 2).contiguous() if dhl is not None else None
            grads[k] = _Grad(du.data_ptr(), ddpre.data_ptr(), dB.data_ptr(), dC.data_ptr(), dAt.data_ptr(),
                             _p(dD), _p(dbias), _p(dh0), _p(dhl))
            back = (lambda t: t.transpose(1, 2)) if tm else (lambda t: t)  # noqa: E731
            results.append([back(du), back(ddpre) if dpre is not None else ddpre, dt, Wt, dB, dC, dAt.t(), dD,
                            dbias, dh0.transpose(1, 2) if dh0 is not None else None])
            saved[k * _SAVED] = u  # keep the row-major (and widened) copies alive until the kernel has run
            saved[k * _SAVED + 1] = dpre
            saved[k * _SAVED + 4], saved[k * _SAVED + 5] = Bm, Cm
        _check(lib.vtr_scan_bwd(dirs, grads, ndir, ds.data_ptr(), Bt, L, E, N, nthreads), "scan backward")
        out = [None, None, None, (dz.transpose(1, 2) if tm else dz) if dz is not None else None]
        for du, ddpre, dt, Wt, *rest in results:
            if dt is None:
                out += [du, ddpre, None, None, *rest]
            else:  # the fused dt projection: dpre = dt @ W.T
                g2 = ddpre.reshape(-1, E)
                d_dt = (g2 @ Wt.t()).reshape(Bt, L, -1)                       # Wt is [R, E]
                d_w = g2.t() @ dt.reshape(-1, dt.shape[-1])                   # [E, R]
                out += [du, None, d_dt, d_w, *rest]
        return tuple(out)


def _shape_error(name, t, want):
    raise ValueError(f"scan_directions: {name} must have shape {tuple(want)}, got {tuple(t.shape)}")


def _check_directions(directions, z, time_major=False):
    """Shapes and devices, checked before any pointer reaches C."""
    if directions[0].u.dim() != 3:
        raise ValueError(f"scan_directions: u must be [batch, L, channels], got {tuple(directions[0].u.shape)}")
    if time_major:
        Bt, E, L = directions[0].u.shape
    else:
        Bt, L, E = directions[0].u.shape
    seq = (Bt, E, L) if time_major else (Bt, L, E)
    if L == 0 or E == 0 or Bt == 0:
        raise ValueError(f"scan_directions: empty input {tuple(directions[0].u.shape)}")
    N = directions[0].A.shape[-1]
    for d in directions:
        if (d.dpre is None) == (d.dt is None) or (d.dt is None) != (d.dt_weight is None):
            raise ValueError("scan_directions: give either dpre or both dt and dt_weight")
        R = d.dt.shape[-1] if d.dt is not None else 0
        want = {"u": seq, "dpre": seq, "B": (Bt, L, N), "C": (Bt, L, N), "A": (E, N), "D": (E,),
                "bias": (E,), "h0": (Bt, E, N), "dt": (Bt, L, R), "dt_weight": (E, R)}
        for name, shape in want.items():
            t = getattr(d, name)
            if t is None:
                continue
            if t.device.type != "cpu":
                raise ValueError(f"scan_directions runs on CPU tensors; {name} is on {t.device}")
            if tuple(t.shape) != shape:
                _shape_error(name, t, shape)
    if z is not None:
        if z.device.type != "cpu":
            raise ValueError(f"scan_directions runs on CPU tensors; z is on {z.device}")
        if tuple(z.shape) != seq:
            _shape_error("z", z, seq)


def scan_directions(directions, z=None, time_major=False, out_dtype=torch.float32):
    """Run one or two scan directions in the [B, L, E] layout and sum them, gated by SiLU(z).

    Returns ``(out [B, L, E] fp32, [last state [B, E, N] per direction])``; differentiable in every
    tensor (z [B, L, E] may be a strided view, e.g. half of in_proj's output). With
    ``time_major=True``, u, dpre, z and out are [B, E, L] instead (mamba-ssm's layout; B and C
    stay [B, L, N]): the forward kernel moves 16x16 tiles through registers instead of the caller
    transposing whole tensors. Row-major bf16 u, dt, B, C and z are read in place (state and
    accumulation in fp32); ``out_dtype=torch.bfloat16`` (row-major) writes the output in bf16, as
    out_proj reads it under autocast, instead of an fp32 tensor to convert.
    """
    if not 1 <= len(directions) <= 2:
        raise ValueError("scan_directions takes one or two directions")
    _check_directions(directions, z, time_major)
    N = directions[0].A.shape[1]
    if N > MAX_D_STATE:
        raise KernelUnavailable(f"d_state {N} > {MAX_D_STATE} is not supported by the fused CPU kernel")
    flags = tuple((bool(d.reverse), bool(d.mask_diag), bool(d.elemental), bool(d.softplus)) for d in directions)
    flat = []
    for d in directions:
        flat += [d.u, d.dpre, d.dt, d.dt_weight, d.B, d.C, d.A, d.D, d.bias, d.h0]
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"scan_directions: out_dtype must be float32 or bfloat16, got {out_dtype}")
    out, *last = _ScanFn.apply(flags, bool(time_major), out_dtype == torch.bfloat16, z, *flat)
    return out, last


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wf, bf, wb, bb, out_bf16):
        lib = load_kernel()
        x = _rows_or_bf16(x)   # bf16 is read in place
        Bt, L, E = x.shape
        K = wf.shape[-1]
        wfT = wf.detach().float().reshape(E, K).t().contiguous()
        wbT = wb.detach().float().reshape(E, K).t().contiguous() if wb is not None else None
        bf_, bb_ = _vec(bf), _vec(bb)
        # a bf16 x may give bf16 outputs (out_bf16: what x_proj and the scan read under autocast)
        half = x.dtype == torch.bfloat16
        ydt = torch.bfloat16 if half and out_bf16 else torch.float32
        yf = x.new_empty(Bt, L, E, dtype=ydt)
        yb = x.new_empty(Bt, L, E, dtype=ydt) if wb is not None else None
        args = (x.data_ptr(), x.stride(0), x.stride(1), wfT.data_ptr(), _p(bf_), _p(wbT), _p(bb_),
                yf.data_ptr(), _p(yb), Bt, L, E, K, torch.get_num_threads())
        rc = lib.vtr_conv_fwd_bf16(*args, int(ydt == torch.bfloat16)) if half else lib.vtr_conv_fwd(*args)
        _check(rc, "conv forward")
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, wfT, bf_, wbT, bb_)
        ctx.has = (bf is not None, wb is not None, bb is not None)
        return yf, yb

    @staticmethod
    def backward(ctx, gyf, gyb):
        lib = load_kernel()
        x, wfT, bf, wbT, bb = ctx.saved_tensors
        x = _rows(x)   # a bf16 input: the backward reads fp32
        Bt, L, E = x.shape
        K = wfT.shape[0]
        gyf = gyf.float().contiguous() if gyf is not None else x.new_zeros(Bt, L, E)
        if wbT is not None:
            gyb = gyb.float().contiguous() if gyb is not None else x.new_zeros(Bt, L, E)
        dx = x.new_empty(Bt, L, E)
        dwf, dbf = x.new_empty(K, E), x.new_empty(E)
        dwb, dbb = (x.new_empty(K, E), x.new_empty(E)) if wbT is not None else (None, None)
        _check(lib.vtr_conv_bwd(x.data_ptr(), x.stride(0), x.stride(1), wfT.data_ptr(), _p(bf), _p(wbT), _p(bb),
                                gyf.data_ptr(), _p(gyb) if wbT is not None else None, dx.data_ptr(),
                                dwf.data_ptr(), dbf.data_ptr(), _p(dwb), _p(dbb), Bt, L, E, K,
                                torch.get_num_threads()), "conv backward")
        has_bf, has_wb, has_bb = ctx.has
        as_w = lambda g: g.t().reshape(E, 1, K)  # noqa: E731
        return (dx, as_w(dwf), dbf if has_bf else None, as_w(dwb) if has_wb else None,
                dbb if has_bb else None, None)


def conv_silu(x, weight, bias, weight_b=None, bias_b=None, out_dtype=torch.float32):
    """SiLU(depthwise conv) in the [B, L, E] layout: causal with (weight, bias) and, if given,
    anti-causal with (weight_b, bias_b) (= the causal conv of the reversed sequence, read back
    in place). weight: [E, 1, K] as in nn.Conv1d(groups=E). Returns (y_f, y_b or None), fp32, or
    bf16 when x is bf16 and ``out_dtype`` is bf16 (rounded once from the fp32 result)."""
    if x.dim() != 3 or x.device.type != "cpu":
        raise ValueError(f"conv_silu: x must be a CPU tensor [batch, L, channels], got {tuple(x.shape)} on {x.device}")
    E = x.shape[-1]
    for name, t, shape in (("weight", weight, (E, 1, weight.shape[-1])), ("bias", bias, (E,)),
                           ("weight_b", weight_b, (E, 1, weight.shape[-1])), ("bias_b", bias_b, (E,))):
        if t is not None and (tuple(t.shape) != shape or t.device.type != "cpu"):
            raise ValueError(f"conv_silu: {name} must be a CPU tensor of shape {shape}, got {tuple(t.shape)} on {t.device}")
    K = weight.shape[-1]
    if K > MAX_D_CONV:
        raise KernelUnavailable(f"d_conv {K} > {MAX_D_CONV} is not supported by the fused CPU kernel")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"conv_silu: out_dtype must be float32 or bfloat16, got {out_dtype}")
    return _ConvFn.apply(x, weight, bias, weight_b, bias_b, out_dtype == torch.bfloat16)


# -- layout change for selective_scan(backend="cpu") ([B, D, L] <-> the kernels' [B, L, D]) ----------

def transpose12(x: torch.Tensor) -> torch.Tensor:
    """``x.transpose(1, 2).contiguous()`` for a [B, X, Y] fp32 CPU tensor, by 16x16 register tiles
    (several times faster than torch's strided copy); other inputs go through torch."""
    if x.dim() != 3 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(2) != 1 or x.numel() == 0:
        return x.transpose(1, 2).contiguous()
    Bt, X, Y = x.shape
    out = x.new_empty(Bt, Y, X)
    _check(load_kernel().vtr_transpose(x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), Bt, X, Y,
                                       torch.get_num_threads()), "transpose")
    return out


class _Transpose12(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return transpose12(x)

    @staticmethod
    def backward(ctx, g):
        return transpose12(g)


def to_blc(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, D, L] -> contiguous fp32 [B, L, D], differentiable."""
    if x is None:
        return None
    return _Transpose12.apply(x.float())
