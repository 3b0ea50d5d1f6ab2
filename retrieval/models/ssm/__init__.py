"""Selective scan (the S6 recurrence of Mamba) with a sequential reference and fast backends.

Shapes follow mamba-ssm's ``selective_scan_fn``: ``u, delta, z: [B, D, L]``, ``A: [D, N]``,
``B, C: [B, N, L]``, ``D, delta_bias: [D]``. For every channel d and state n::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,            out = y * silu(z)

Two keyword-only extensions (off by default, so mamba-ssm semantics are unchanged):
``initial_state`` ([B, D, N], the state before the first step) and ``mask_diag`` (read the
output from ``h_t - delta_t B_t u_t``, dropping the operator's diagonal, and read nothing at the
first step, whatever the initial state: VideoMambaPro's ``selective_scan_ref_sub``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "ref")
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, dim, length], got shape {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be [dim={d}, d_state], got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, n, L):
            raise ValueError(f"selective_scan: {name} must be [batch, d_state, length] = {(b, n, L)}, "
                             f"got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"selective_scan: {name} must be [dim={d}], got {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, d, n):
        raise ValueError(f"selective_scan: initial_state must be {(b, d, n)}, got {tuple(initial_state.shape)}")


def _prepare_delta(delta, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y, u, D, z, dtype_in):
    out = y if D is None else y + u.float() * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None, mask_diag=False):
    """Plain sequential PyTorch: one Python step per position. The semantics every backend matches."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    uf, Af, Bf, Cf = u.float(), A.float(), B.float(), C.float()
    b, d, L = uf.shape
    n = Af.shape[1]
    dA = torch.exp(delta.unsqueeze(-1) * Af[None, :, None, :])              # [b, d, L, n]
    dBu = (delta * uf).unsqueeze(-1) * Bf.transpose(1, 2).unsqueeze(1)       # [b, d, L, n]
    h = initial_state.float() if initial_state is not None else uf.new_zeros(b, d, n)
    ys = []
    for t in range(L):
        h_new = dA[:, :, t] * h + dBu[:, :, t]
        if mask_diag:   # the masked first step reads nothing (a zero state)
            read = torch.zeros_like(h_new) if t == 0 else dA[:, :, t] * h
        else:
            read = h_new
        ys.append(torch.einsum("bdn,bn->bd", read, Cf[:, :, t]))
        h = h_new
    y = torch.stack(ys, dim=2)
    out = _finish(y, uf, D, z, dtype_in)
    return (out, h) if return_last_state else out


def _cuda_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: PLC0415
    except Exception as exc:  # ImportError, or the unguarded selective_scan_cuda import
        raise RuntimeError(
            "backend='cuda' needs mamba-ssm's CUDA kernel: pip install 'vtr[cuda]' on a machine with "
            f"CUDA ({type(exc).__name__}: {exc})") from exc
    return selective_scan_fn


def scan_with_extensions(kernel, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, *, initial_state=None, mask_diag=False, chunk=256):
    """The VideoMambaPro options on top of a plain scan ``kernel`` (mamba-ssm's CUDA kernel, which
    has neither): the kernel runs from a zero state without D or gate, and the options are exact
    vectorised corrections, since the recurrence is linear in its state:

    * ``initial_state`` h0 adds ``<C_t, exp(A * S_t) h0>`` to y_t, with S_t = delta_1 + .. + delta_t
      (and ``exp(A * S_L) h0`` to the last state);
    * ``mask_diag`` reads ``h_t - delta_t B_t u_t``: y_t loses ``delta_t u_t <B_t, C_t>``, and the
      first step reads nothing (no ``h0`` term at t = 0).

    The corrections work in fp32 over ``chunk`` positions at a time ([B, D, chunk, N]).
    """
    dtype_in = u.dtype
    res = kernel(u, delta, A, B, C, None, None, delta_bias, delta_softplus, return_last_state)
    y, last = res if return_last_state else (res, None)
    if not mask_diag and initial_state is None:
        return (_finish(y.float(), u, D, z, dtype_in), last) if return_last_state else _finish(y.float(), u, D, z, dtype_in)
    dt = _prepare_delta(delta, delta_bias, delta_softplus)              # fp32 [b, d, L]
    yf = y.float()
    Bf, Cf, Af = B.float(), C.float(), A.float()
    if mask_diag:
        yf = yf - dt * u.float() * (Bf * Cf).sum(1).unsqueeze(1)
    if initial_state is not None:
        h0 = initial_state.float()                                       # [b, d, n]
        S = dt.cumsum(-1)
        parts = []
        for i in range(0, S.shape[-1], chunk):
            decay = torch.exp(S[..., i:i + chunk, None] * Af[None, :, None, :])     # [b, d, l, n]
            parts.append(torch.einsum("bdln,bdn,bnl->bdl", decay, h0, Cf[..., i:i + chunk]))
        from_h0 = torch.cat(parts, dim=-1)
        if mask_diag:   # the masked first step reads nothing, its start state included
            from_h0[..., 0] = 0
        yf = yf + from_h0
        if return_last_state:
            last = last.float() + torch.exp(S[..., -1:] * Af[None]) * h0
    out = _finish(yf, u, D, z, dtype_in)
    return (out, last) if return_last_state else out


def cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _cuda_fn()
        return True
    except RuntimeError:
        return False


def resolve_backend(backend: str, device: torch.device, extensions: bool = False) -> str:
    """Turn 'auto' into a concrete backend for tensors on ``device`` (logged once per choice)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if cuda_available():
            _log_once("selective_scan: backend 'auto' -> 'cuda' (mamba-ssm kernel" +
                      (", VideoMambaPro options as exact corrections)" if extensions else ")"))
            return "cuda"
        _log_once("selective_scan: backend 'auto' -> 'ref' on CUDA, the sequential PyTorch scan (slow; "
                  "mamba-ssm is not installed: pip install 'vtr[cuda]')")
        return "ref"
    if device.type != "cpu":  # e.g. 'meta' (shape/device checks) or other accelerators
        _log_once(f"selective_scan: backend 'auto' -> 'ref' on {device.type}")
        return "ref"
    from .cpu import kernel_available  # noqa: PLC0415

    if kernel_available():
        _log_once("selective_scan: backend 'auto' -> 'cpu' (fused C kernel)")
        return "cpu"
    _log_once("selective_scan: backend 'auto' -> 'ref' (the fused CPU kernel could not be built; see "
              "retrieval.models.ssm.cpu.load_kernel() for the compiler error)")
    return "ref"


def fused_mixer_available(d_state: int = 16, d_conv: int = 4) -> bool:
    """Whether BiMambaMixer can take its fused CPU path (kernels built, sizes supported); the
    answer is logged once per distinct outcome."""
    from .cpu import MAX_D_CONV, MAX_D_STATE, kernel_available  # noqa: PLC0415

    if not kernel_available():
        _log_once("BiMambaMixer: fused CPU kernels unavailable (see retrieval.models.ssm.cpu.load_kernel() for "
                  "the compiler error); using the torch composition with the reference scan")
        return False
    if d_state > MAX_D_STATE or d_conv > MAX_D_CONV:
        _log_once(f"BiMambaMixer: d_state {d_state} / d_conv {d_conv} beyond the fused CPU kernels' limits "
                  f"({MAX_D_STATE}/{MAX_D_CONV}); using the torch composition")
        return False
    _log_once("BiMambaMixer: fused CPU path (conv + bidirectional scan + gate kernels)")
    return True


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, mask_diag=False, backend="auto"):
    """Selective scan with a choice of implementation; same arguments and results as the reference."""
    extensions = initial_state is not None or mask_diag
    backend = resolve_backend(backend, u.device, extensions)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state, mask_diag=mask_diag)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if backend == "cuda":
        if u.device.type != "cuda":
            raise ValueError("backend='cuda' needs CUDA tensors")
        if extensions:
            return scan_with_extensions(_cuda_fn(), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        return_last_state, initial_state=initial_state, mask_diag=mask_diag)
        return _cuda_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    # backend == "cpu": the fused kernel (delta bias, softplus, D skip and the gate fused in)
    if u.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {u.device}")
    from .cpu import ScanDirection, scan_directions, to_blc  # noqa: PLC0415

    dtype_in = u.dtype
    # u, delta, z and the output stay [B, D, L] (the kernel transposes tiles); B, C ([B, N, L],
    # small) are transposed to [B, L, N] here
    direction = ScanDirection(u, delta, to_blc(B), to_blc(C), A, D=D, bias=delta_bias,
                              h0=initial_state, mask_diag=mask_diag, softplus=delta_softplus)
    out, (last,) = scan_directions([direction], z, time_major=True)
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out


__all__ = ["selective_scan", "selective_scan_ref", "scan_with_extensions", "resolve_backend", "cuda_available", "fused_mixer_available",
           "BACKENDS"]
