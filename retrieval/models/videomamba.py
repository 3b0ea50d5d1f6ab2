"""VideoMamba and VideoMambaPro video encoders (bidirectional selective state-space blocks).

Parameter names and shapes follow the official multi-modality VideoMamba vision encoder
(``PretrainVideoMamba`` in OpenGVLab/VideoMamba ``video_mm``), so its checkpoints load strictly
(the key mapping is :func:`checkpoint_filter_fn` below, the architecture read from the shapes
:func:`infer_config_from_state`; ``retrieval.models.convert`` calls both). The layout, from the spec in ``shared/specs``:

* tokens: Conv3d (1, p, p) patches per frame; cls + spatial ``pos_embed`` per frame; the
  ``temporal_pos_embedding`` on patch tokens only; sequence = [cls, frame-major patches].
* blocks: fp32 residual stream, ``residual += drop_path(h); h = mixer(RMSNorm(residual))``.
* mixer ("bimamba v2"): shared ``in_proj``/``out_proj``; per direction its own depthwise
  causal conv, ``x_proj``, ``dt_proj``, ``A_log``, ``D``; the backward branch runs on the
  reversed sequence; outputs summed (not averaged), each gated by SiLU(z).
* final: ``RMSNorm(residual + h)``; pooled = ``pool_norm(cls + mean(patches))``, per frame
  with ``keep_temporal`` (``patch_pool="max"`` takes the max over patches instead: not official).
* ``stem_channels`` (not official, off by default): a convolutional stem before the patch
  projection, one 3x3 stride-2 conv + GELU per entry, spanning ``stem_kernel_t`` frames
  (odd; 1 = per frame). The projection then covers the rest of each patch, so the token grid,
  the sequence and every other parameter stay as they are. A stem that spans frames sees motion
  before the first Mamba block does (the demo model's direction of movement comes from it).
* ``tubelet_size`` (default 1, as the official model): the projection spans that many frames, so
  there is one token per patch per tubelet (UMT's ViT and VideoMAE call it the same). The
  sequence, the temporal positions and the per-frame pooled features shrink by that factor; the
  teacher alignment (UTA), which pairs tokens with a per-frame teacher, needs 1.

VideoMambaPro (arXiv 2406.19006) is two options of the same mixer: ``mask_backward`` drops the
diagonal of the backward scan operator (the token's own contribution is counted once, by the
forward branch), and ``elemental_residual`` starts each direction's state from its first input
instead of zero.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .device import cpu_cache_bytes
from .layers import IMAGENET_MEAN, IMAGENET_STD, DropPath, Linear
from .model_dir import CheckpointError
from .registry import register_arch
from .ssm import fused_mixer_available, selective_scan
from .ssm.cpu import ScanDirection, conv_silu, scan_directions

# how far position embeddings may be stretched before the input is refused
MAX_TEMPORAL_STRETCH = 8
MAX_SPATIAL_STRETCH = 4


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Normalised in fp32, returned in ``x``'s dtype or ``dtype`` (a block under autocast asks
        for the autocast dtype: its in_proj reads that, so it is rounded once, here)."""
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(dtype or x.dtype)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives products on ``t``'s device, or None where autocast is off (or,
    like the meta device, has no autocast at all)."""
    kind = t.device.type
    if not torch.amp.is_autocast_available(kind):
        return None
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _product_input(t: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``t`` as ``linear`` should read it: under autocast as it is (autocast casts what it must,
    and a bf16 tensor stays bf16), otherwise in the weight's dtype."""
    return t if _autocast_dtype(t) is not None else t.to(linear.weight.dtype)


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` to add to the fp32 residual stream: a bf16/fp16 mixer output (autocast) as it is (the
    add widens it by type promotion, without a converted copy first), anything else as fp32."""
    return t if t.dtype in (torch.bfloat16, torch.float16) else t.float()


def _plain(module: nn.Module, cls: type) -> bool:
    """Exactly ``cls`` with no hooks, so a fused kernel may use its weights without calling it."""
    return (type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
            and not getattr(module, "_backward_hooks", None))


BIMAMBA_LAYOUTS = ("v2", "v1")
SCAN_INPUTS = ("conv", "raw")


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer with the VideoMambaPro options.

    ``layout`` (the parameters of the backward branch, mamba-ssm's ``bimamba_type``):

    * ``"v2"`` (VideoMamba, Vim, VideoMambaPro "v2"): the backward branch has its own
      ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log`` and ``D_b`` and runs on the reversed
      sequence (its conv is causal there, i.e. anti-causal in place);
    * ``"v1"`` (VideoMambaPro's masked path): both branches share ``conv1d``, ``x_proj``,
      ``dt_proj`` and ``D``; only ``A_b_log`` is separate. The backward branch reads the forward
      branch's conv output, delta, B and C from the end.

    ``scan_input``: what the scan integrates (its u, the D skip and the elemental start state):
    ``"conv"`` = SiLU(conv(x)) as in mamba-ssm and VideoMamba, ``"raw"`` = in_proj's x before the
    conv, as VideoMambaPro's code does (the conv output then only feeds x_proj: delta, B, C).
    ``mask_backward``: the backward branch reads C_s (h_s - delta_s B_s u_s) at reversed position
    s >= 1 and nothing at s = 0 (the token's own term is counted once, by the forward branch).
    ``elemental_residual``: each direction's state starts at h_{-1} = u_0 (its first input,
    broadcast over the state dimension) instead of zero. The SiLU(z) gate multiplies the sum of
    the directions, which goes through ``out_proj`` (halved first with ``divide_out``, as Vim's
    ``if_divide_out``).

    Two implementations of one function (same parameters and state-dict keys): on CPU with
    ``scan_backend`` "auto"/"cpu", fused C kernels in in_proj's [B, L, E] layout (conv + SiLU of
    both branches in one pass; dt_proj, both scan directions, D skip, softplus and the SiLU(z) gate
    in another, the backward branch run from the end instead of flipped); otherwise (``"ref"``,
    CUDA tensors, or no C compiler) the torch composition around ``selective_scan``.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, gate: bool = True, mask_backward: bool = False,
                 elemental_residual: bool = False, scan_backend: str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 layout: str = "v2", scan_input: str = "conv", divide_out: bool = False):
        super().__init__()
        if layout not in BIMAMBA_LAYOUTS:
            raise ValueError(f"layout must be one of {BIMAMBA_LAYOUTS}, got {layout!r}")
        if scan_input not in SCAN_INPUTS:
            raise ValueError(f"scan_input must be one of {SCAN_INPUTS}, got {scan_input!r}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.gate, self.mask_backward, self.elemental_residual = gate, mask_backward, elemental_residual
        self.layout, self.scan_input, self.divide_out = layout, scan_input, divide_out
        self.scan_backend = scan_backend
        E, N, R = self.d_inner, d_state, self.dt_rank
        # Linear: nn.Linear whose large fp32 CPU inference products may run on oneDNN (layers.linear)
        self.in_proj = Linear(d_model, 2 * E if gate else E, bias=False)
        for sfx in ("", "_b"):
            A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
            setattr(self, f"A{sfx}_log", nn.Parameter(torch.log(A)))
            if sfx and layout == "v1":
                continue
            setattr(self, f"conv1d{sfx}", nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=True))
            setattr(self, f"x_proj{sfx}", Linear(E, R + 2 * N, bias=False))
            dt_proj = nn.Linear(R, E, bias=True)
            self._init_dt(dt_proj, dt_min, dt_max, dt_init_floor)
            setattr(self, f"dt_proj{sfx}", dt_proj)
            setattr(self, f"D{sfx}", nn.Parameter(torch.ones(E)))
        self.out_proj = Linear(E, d_model, bias=False)

    def _init_dt(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
        std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():  # bias = softplus^-1(dt), so softplus(bias) starts in [dt_min, dt_max]
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True

    def _params(self, backward: bool) -> str:
        """Suffix of the conv / x_proj / dt_proj / D a branch uses ("_b" only for v2's backward)."""
        return "_b" if backward and self.layout == "v2" else ""

    def _branch(self, x: torch.Tensor, xc: torch.Tensor, z: torch.Tensor | None, backward: bool) -> torch.Tensor:
        """One direction on a sequence already in its scan order: x (in_proj) and xc = SiLU(conv(x))
        [B, E, L]."""
        p = self._params(backward)
        x_proj, dt_proj = getattr(self, f"x_proj{p}"), getattr(self, f"dt_proj{p}")
        A = -torch.exp((self.A_b_log if backward else self.A_log).float())
        dbc = x_proj(xc.transpose(1, 2))                                # [B, L, R+2N]
        dt, Bm, Cm = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)              # [B, E, L], bias added in the scan
        u = x if self.scan_input == "raw" else xc
        h0 = None
        if self.elemental_residual:
            h0 = u[..., 0].float().unsqueeze(-1).expand(-1, -1, self.d_state)
        return selective_scan(u, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), getattr(self, f"D{p}").float(),
                              z, dt_proj.bias.float(), delta_softplus=True, initial_state=h0,
                              mask_diag=backward and self.mask_backward, backend=self.scan_backend)

    def _forward_composed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pure-torch composition around selective_scan: the reference path ("ref"), CUDA tensors
        (mamba-ssm's kernel), and CPUs where the fused kernels cannot be built."""
        xz = self.in_proj(hidden).transpose(1, 2)                       # [B, (2)E, L]
        if self.gate:
            x, z = xz.chunk(2, dim=1)
        else:
            x, z = xz, None
        L = x.shape[-1]
        xc = F.silu(self.conv1d(x)[..., :L])
        y_f = self._branch(x, xc, z, backward=False)
        xr = x.flip(-1)
        # v2: the backward conv runs on the reversed sequence; v1: the forward conv's output, reversed
        xc_b = F.silu(self.conv1d_b(xr)[..., :L]) if self.layout == "v2" else xc.flip(-1)
        y_b = self._branch(xr, xc_b, None if z is None else z.flip(-1), backward=True)
        y = y_f + y_b.flip(-1)
        if self.divide_out:  # Vim: the mean of the two directions
            y = y * 0.5
        return self.out_proj(y.transpose(1, 2).to(hidden.dtype))

    def _forward_fused(self, hidden: torch.Tensor) -> torch.Tensor:
        """CPU: fused kernels in in_proj's [B, L, E] layout, no transposes or flips. The conv of
        both branches is one kernel (the backward branch's is anti-causal); one scan kernel runs
        the forward direction, then the backward one from the end, sums them and applies the
        gate; dt_proj's rank-R product is computed inside the scan kernel. in_proj, x_proj and
        out_proj stay matmuls."""
        E, R, N = self.d_inner, self.dt_rank, self.d_state
        xz = self.in_proj(hidden)                                       # [B, L, (2)E]
        if xz.dtype not in (torch.float32, torch.bfloat16):   # the kernels read fp32 or bf16 in place
            xz = xz.float()
        x, z = (xz[..., :E], xz[..., E:]) if self.gate else (xz, None)
        # bf16 (autocast): the conv writes bf16, which x_proj and the scan read as they are; the
        # scan reads x_proj's bf16 dt/B/C in place and writes out_proj's bf16 input (state and
        # accumulation fp32): no conversion pass between in_proj and out_proj
        act = xz.dtype
        if self.layout == "v2":
            xc_f, xc_b = conv_silu(x, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight, self.conv1d_b.bias,
                                   out_dtype=act)
        else:  # v1: one conv; the backward direction reads its output (and x_proj's) from the end
            xc_f, _ = conv_silu(x, self.conv1d.weight, self.conv1d.bias, out_dtype=act)
            xc_b = xc_f
        dirs, dbc_f = [], None
        for backward, xc in ((False, xc_f), (True, xc_b)):
            p = self._params(backward)
            x_proj, dt_proj = getattr(self, f"x_proj{p}"), getattr(self, f"dt_proj{p}")
            if backward and self.layout == "v1":
                dbc = dbc_f
            else:
                dbc = x_proj(_product_input(xc, x_proj))                 # [B, L, R+2N]
                if dbc.dtype not in (torch.float32, torch.bfloat16):
                    dbc = dbc.float()
            dbc_f = dbc
            A = -torch.exp((self.A_b_log if backward else self.A_log).float())
            u = x if self.scan_input == "raw" else xc
            # dt_proj (rank R -> E) runs inside the scan kernel with its weight, its bias is the
            # delta bias (as in _branch and mamba-ssm: the module itself is never called)
            dirs.append(ScanDirection(u, None, dbc[..., R:R + N], dbc[..., R + N:], A,
                                      D=getattr(self, f"D{p}").float(), bias=dt_proj.bias.float(),
                                      reverse=backward, mask_diag=backward and self.mask_backward,
                                      elemental=self.elemental_residual,
                                      dt=dbc[..., :R], dt_weight=dt_proj.weight.float()))
        y, _ = scan_directions(dirs, z, out_dtype=act)
        if self.divide_out:  # Vim: the mean of the two directions
            y = y * 0.5
        return self.out_proj(_product_input(y, self.out_proj))

    # Sequence tiles for long sequences (_forward_chunked): the bytes of the mixer's activations
    # per tile, 0 = off, "auto" = half the last-level cache (retrieval.models.device.cpu_cache_bytes).
    # A tile's in_proj output, convolutions and scan inputs then stay in cache instead of making
    # full-length round trips through memory. Off by default: where measured (docs/performance.md,
    # docs/long_clips_and_rerank.md) the tiles' extra kernel calls cost more than the saved
    # traffic. Set it per mixer (or on the class) where measurements say otherwise.
    chunk_bytes: int | str = 0

    def _position_bytes(self, hidden: torch.Tensor) -> int:
        """Bytes of activations one position of one sample carries through pass 1 of the tiles:
        in_proj's output, both conv outputs, both x_proj outputs and the forward branch's output."""
        act = 2 if torch.is_autocast_enabled("cpu") or hidden.dtype == torch.bfloat16 else 4
        e, rn = self.d_inner, self.dt_rank + 2 * self.d_state
        return act * (2 * e + 2 * e + 2 * rn) + 4 * (2 * rn + e)

    def _chunk_len(self, hidden: torch.Tensor) -> int | None:
        """Tile length for this input, or None to run the whole sequence at once."""
        if self.mask_backward or self.elemental_residual or self.layout != "v2" or not self.chunk_bytes:
            return None   # the VideoMambaPro options keep the one-pass path
        budget = cpu_cache_bytes() // 2 if self.chunk_bytes == "auto" else int(self.chunk_bytes)
        length = max(256, budget // (hidden.shape[0] * self._position_bytes(hidden)) // 64 * 64)
        return length if hidden.shape[1] > 2 * length else None

    def _forward_chunked(self, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        """:meth:`_forward_fused` over sequence tiles of ``chunk`` positions, differentiable.

        Pass 1 runs the tiles in order: in_proj (with the conv's d_conv - 1 halo positions on each
        side), both convolutions, both x_proj, and the forward scan, which carries its state from
        tile to tile through the kernel's initial/last state. It keeps the backward branch's scan
        inputs, the gate and the forward output per tile. Pass 2 runs the tiles in reverse: the
        backward scan (state carried from the end), the sum, out_proj. Autograd runs back through
        the carried states (the kernel's last-state gradient) and the overlapping halos (their
        gradients add up in ``hidden``). Under bf16 autocast the kernels read in_proj's bf16
        output in place, as on the one-pass path. Same function as the one-pass path up to float
        rounding (tests/models/test_mixer_chunked.py).
        """
        E, R, N, K = self.d_inner, self.dt_rank, self.d_state, self.d_conv
        length = hidden.shape[1]
        bounds = [(start, min(start + chunk, length)) for start in range(0, length, chunk)]
        params = {}
        for sfx in ("", "_b"):
            dt_proj = getattr(self, f"dt_proj{sfx}")
            params[sfx] = (getattr(self, f"x_proj{sfx}"), -torch.exp(getattr(self, f"A{sfx}_log").float()),
                           getattr(self, f"D{sfx}").float(), dt_proj.bias.float(), dt_proj.weight.float())

        def direction(sfx: str, xc: torch.Tensor, dbc: torch.Tensor, h0: torch.Tensor | None) -> ScanDirection:
            _, A, D, bias, weight = params[sfx]
            return ScanDirection(xc, None, dbc[..., R:R + N], dbc[..., R + N:], A, D=D, bias=bias, h0=h0,
                                 reverse=sfx == "_b", dt=dbc[..., :R], dt_weight=weight)

        kept = []
        state = None
        for start, stop in bounds:
            lo, hi = max(0, start - (K - 1)), min(length, stop + K - 1)
            xz = self.in_proj(hidden[:, lo:hi])
            if xz.dtype not in (torch.float32, torch.bfloat16):   # the kernels read fp32 or bf16 in place
                xz = xz.float()
            x, z = (xz[..., :E], xz[..., E:]) if self.gate else (xz, None)
            xc_f, xc_b = conv_silu(x, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight, self.conv1d_b.bias,
                                   out_dtype=xz.dtype)
            inner = slice(start - lo, stop - lo)
            xc_f, xc_b = xc_f[:, inner], xc_b[:, inner]
            z = z[:, inner] if z is not None else None
            dbc_f = params[""][0](_product_input(xc_f, params[""][0]))
            dbc_b = params["_b"][0](_product_input(xc_b, params["_b"][0]))
            if dbc_f.dtype not in (torch.float32, torch.bfloat16):
                dbc_f, dbc_b = dbc_f.float(), dbc_b.float()
            y_f, (state,) = scan_directions([direction("", xc_f, dbc_f, state)], z)
            kept.append((xc_b, dbc_b, z, y_f))
        pieces = []
        state = None
        for xc_b, dbc_b, z, y_f in reversed(kept):
            y_b, (state,) = scan_directions([direction("_b", xc_b, dbc_b, state)], z)
            y = y_f + y_b
            if self.divide_out:  # Vim: the mean of the two directions
                y = y * 0.5
            pieces.append(self.out_proj(_product_input(y, self.out_proj)))
        return torch.cat(pieces[::-1], dim=1)

    def _use_fused(self, hidden: torch.Tensor) -> bool:
        if hidden.device.type != "cpu" or self.scan_backend not in ("auto", "cpu"):
            return False
        # the conv kernel reads the weights itself: only for plain, hook-free convs
        convs = [self.conv1d] + ([self.conv1d_b] if self.layout == "v2" else [])
        if not all(_plain(c, nn.Conv1d) for c in convs):
            return False
        return fused_mixer_available(self.d_state, self.d_conv)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._use_fused(hidden):
            chunk = self._chunk_len(hidden)
            if chunk is not None:
                return self._forward_chunked(hidden, chunk)
            return self._forward_fused(hidden)
        return self._forward_composed(hidden)


class MambaBlock(nn.Module):
    def __init__(self, dim: int, mixer: BiMambaMixer, drop_path: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        residual = hidden.float() if residual is None else residual + _widened(self.drop_path(hidden))
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype), _autocast_dtype(residual)))
        return hidden, residual


class CLIPDecoder(nn.Module):
    """Maps student tokens to the teacher's space for unmasked-teacher alignment (UTA)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.head = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(x))


class VideoMamba(nn.Module):
    """VideoMamba video encoder; see the module docstring for the layout.

    ``forward(video [B, C, T, H, W], mask=None)`` returns ``{"tokens": [B, 1+L, D], "pooled":
    [B, T, D] or [B, D]}``; with ``return_distill=True`` also ``"distill"`` ``[1, B, 1+V, Dt]``:
    the cls and visible tokens of the residual stream aligned to the CLIP teacher (UTA, see
    :meth:`_distill`). With a mask, ``pooled`` is one vector per clip over the visible patches.
    """

    def __init__(self, embed_dim: int = 192, depth: int = 24, img_size: int = 224, patch_size: int = 16,
                 num_frames: int = 8, in_chans: int = 3, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, drop_path_rate: float = 0.0, cls_position: str = "head",
                 keep_temporal: bool = True, pool_norm: bool = True, clip_output_dim: int | None = 512,
                 gate: bool = True, mask_backward: bool = False, elemental_residual: bool = False,
                 scan_backend: str = "auto", grad_checkpointing: bool = False, num_classes: int | None = None,
                 patch_pool: str = "mean", stem_channels: tuple[int, ...] | None = None,
                 stem_kernel_t: int = 1, tubelet_size: int = 1,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 bimamba_layout: str = "v2", scan_input: str = "conv", patch_stride: int | None = None,
                 divide_out: bool = False, pool: str = "cls_mean"):
        super().__init__()
        if cls_position not in ("head", "middle"):
            raise ValueError(f"cls_position must be 'head' (VideoMamba) or 'middle' (Vim), got {cls_position!r}")
        # patch_stride < patch_size: overlapping patches (Vim's "+" models: 16 px patches every 8 px)
        self.patch_stride = patch_stride = patch_stride or patch_size
        if patch_stride != patch_size and stem_channels:
            raise ValueError("patch_stride other than patch_size does not combine with stem_channels")
        if img_size < patch_size or (img_size - patch_size) % patch_stride:
            raise ValueError(f"img_size {img_size} does not tile into patches of {patch_size} every {patch_stride} px")
        if pool not in ("cls_mean", "cls"):
            raise ValueError(f"pool must be 'cls_mean' (VideoMamba) or 'cls' (Vim's classifier feature), got {pool!r}")
        self.pool = pool
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.img_size, self.num_frames, self.in_chans = img_size, num_frames, in_chans
        self.cls_position, self.keep_temporal = cls_position, keep_temporal
        self.grad_checkpointing = grad_checkpointing
        self.preprocess = {"size": img_size, "num_frames": num_frames, "mean": list(mean), "std": list(std),
                           "interpolation": "bicubic"}
        if tubelet_size < 1 or num_frames % tubelet_size:
            raise ValueError(f"tubelet_size must be >= 1 and divide num_frames {num_frames}, got {tubelet_size}")
        self.tubelet_size = tubelet_size
        grid = (img_size - patch_size) // patch_stride + 1
        self.patch_embed = nn.Module()
        stem_channels = tuple(int(c) for c in stem_channels or ())
        if stem_channels:
            # Small objects in small frames straddle patch borders; early convolutions see them
            # the same wherever they fall, and with stem_kernel_t > 1 see how they move.
            if stem_kernel_t < 1 or stem_kernel_t % 2 == 0:
                raise ValueError(f"stem_kernel_t must be an odd number of frames >= 1, got {stem_kernel_t}")
            if patch_size % (2 ** len(stem_channels)):
                raise ValueError(f"patch_size {patch_size} is not divisible by 2**{len(stem_channels)} "
                                 f"(one stride-2 conv per stem_channels entry)")
        convs, prev, kt = [], in_chans, stem_kernel_t
        for ch in stem_channels:
            convs += [nn.Conv3d(prev, ch, (kt, 3, 3), (1, 2, 2), (kt // 2, 1, 1)), nn.GELU()]
            prev = ch
        self.patch_embed.stem = nn.Sequential(*convs) if convs else None
        # the projection covers what the stem's stride-2 convs leave of each patch, over a tubelet
        rest = patch_size // 2 ** len(stem_channels)
        kernel = (tubelet_size, rest, rest)
        stride = kernel if patch_stride == patch_size else (tubelet_size, patch_stride, patch_stride)
        self.patch_embed.proj = nn.Conv3d(prev, embed_dim, kernel, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, num_frames // tubelet_size, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            MambaBlock(embed_dim, BiMambaMixer(embed_dim, d_state, d_conv, expand, dt_rank, gate=gate,
                                               mask_backward=mask_backward, elemental_residual=elemental_residual,
                                               scan_backend=scan_backend, layout=bimamba_layout,
                                               scan_input=scan_input, divide_out=divide_out), rates[i])
            for i in range(depth))
        self.drop_path = DropPath(rates[-1] if depth else 0.0)
        self.norm = RMSNorm(embed_dim)
        self.pool_norm = nn.LayerNorm(embed_dim) if pool_norm else None
        if patch_pool not in ("mean", "max"):
            raise ValueError(f"patch_pool must be 'mean' (official) or 'max', got {patch_pool!r}")
        self.patch_pool = patch_pool
        self.clip_decoder = nn.ModuleList([CLIPDecoder(embed_dim, clip_output_dim)]) if clip_output_dim else None
        # supervised classifier on the final cls token (official K400/SSv2 fine-tuned weights)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None
        self._init_weights()

    # -- init -------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        for t in (self.cls_token, self.pos_embed, self.temporal_pos_embedding):
            nn.init.trunc_normal_(t, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith(("dt_proj", "dt_proj_b")):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for layer in self.layers:  # pre-norm residual rescaling (GPT-2 / Mamba)
            with torch.no_grad():
                layer.mixer.out_proj.weight.div_(math.sqrt(self.depth))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # -- embeddings -------------------------------------------------------------------------
    def _check_input(self, video: torch.Tensor) -> tuple[int, int, int]:
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"VideoMamba expects video [B, C, T, H, W], got {shape}")
        if not video.is_floating_point():
            raise ValueError(f"VideoMamba expects a float video (normalised frames), got dtype {video.dtype}")
        _, c, t, h, w = video.shape
        if c != self.in_chans:
            raise ValueError(f"VideoMamba expects {self.in_chans} channels in dim 1 of [B, C, T, H, W], got {c} "
                             f"(shape {tuple(video.shape)}; is the video [B, T, C, H, W]?)")
        p = self.patch_size
        st = self.patch_stride
        if h < p or w < p or (h - p) % st or (w - p) % st:
            raise ValueError(f"frame size {h}x{w} does not tile into patches of {p} every {st} px"
                             if st != p else f"frame size {h}x{w} is not divisible by the patch size {p}")
        if t > max(64, MAX_TEMPORAL_STRETCH * self.num_frames):
            raise ValueError(f"{t} frames is beyond what the temporal position embeddings (built for "
                             f"{self.num_frames}) can be interpolated to (max {max(64, MAX_TEMPORAL_STRETCH * self.num_frames)})")
        grid = (self.img_size - p) // st + 1
        if (max(h, w) - p) // st + 1 > MAX_SPATIAL_STRETCH * grid:
            raise ValueError(f"frame size {h}x{w} is beyond what the position embeddings (built for "
                             f"{self.img_size}px) can be interpolated to")
        if t % self.tubelet_size:
            raise ValueError(f"{t} frames do not split into tubelets of {self.tubelet_size} frames")
        return t // self.tubelet_size, (h - p) // st + 1, (w - p) // st + 1

    def _spatial_pos(self, gh: int, gw: int) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        g = int(round(math.sqrt(n)))
        if (gh, gw) == (g, g):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def _temporal_pos(self, t: int) -> torch.Tensor:
        if t == self.temporal_pos_embedding.shape[1]:
            return self.temporal_pos_embedding
        return resize_temporal_pos(self.temporal_pos_embedding, t)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, T'*N, D] patch tokens with positions (cls not included); T' = T /
        ``tubelet_size``."""
        t, gh, gw = self._check_input(video)
        b = video.shape[0]
        x = video.to(self.patch_embed.proj.weight.dtype)
        if self.patch_embed.stem is not None:
            x = self.patch_embed.stem(x)
        x = self.patch_embed.proj(x)                                                # [B, D, T, gh, gw]
        x = x.flatten(3).permute(0, 2, 3, 1)                                        # [B, T, N, D]
        pos = self._spatial_pos(gh, gw)
        x = x + pos[:, 1:].unsqueeze(1) + self._temporal_pos(t).unsqueeze(2)
        return x.reshape(b, t * gh * gw, -1)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None,
                return_distill: bool = False) -> dict[str, torch.Tensor]:
        """``mask``: optional bool [B, T*N], True = token dropped (same count per sample). An image model
        (``num_frames`` 1, e.g. Vim) also takes images [B, C, H, W]."""
        if video.dim() == 4 and self.num_frames == 1:
            video = video.unsqueeze(2)
        t = video.shape[2] // self.tubelet_size if video.dim() == 5 else 0              # token time steps
        x = self.embed(video)
        b, L, d = x.shape
        if mask is not None:
            if mask.shape != (b, L) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool [B, T*N] = {(b, L)}, got {tuple(mask.shape)} {mask.dtype}")
            keep = (~mask).sum(1)
            if (keep != keep[0]).any():
                raise ValueError("mask must keep the same number of tokens in every sample")
            x = x[~mask].reshape(b, int(keep[0]), d)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        mid = x.shape[1] // 2 if self.cls_position == "middle" else 0
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1)

        hidden, residual = x, None
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
        distill_src = residual  # the stream before the last mixer output is added (official quirk)
        residual = residual + _widened(self.drop_path(hidden))
        tokens = self.norm(residual.to(self.norm.weight.dtype))
        if mid:
            tokens = torch.cat([tokens[:, mid:mid + 1], tokens[:, :mid], tokens[:, mid + 1:]], dim=1)
            distill_src = torch.cat([distill_src[:, mid:mid + 1], distill_src[:, :mid], distill_src[:, mid + 1:]], 1)

        # a masked (UTA) pass pools the visible patches of the whole clip, as the official code
        # does when its mask is drawn from attention (keep_temporal is off for it)
        out = {"tokens": tokens, "pooled": self._pool(tokens, t if mask is None else 0)}
        if return_distill:
            out["distill"] = self._distill(distill_src.to(tokens.dtype), mask, L)
        return out

    # teacher targets: cls first, then every patch (see retrieval.train.teacher)
    uta_layout = {"cls_target": True, "ln_post": False, "layers": 1}

    def _distill(self, stream: torch.Tensor, mask: torch.Tensor | None, n_patches: int) -> torch.Tensor:
        """UTA's aligned tokens ``[1, B, 1+V, Dt]`` (unit vectors): the residual stream of the cls and
        the visible patches, plus the fixed sinusoidal ``clip_pos_embed`` at their places in the
        full ``1 + T*N`` sequence, through ``clip_decoder`` (Linear + LayerNorm), L2-normalised."""
        if self.clip_decoder is None:
            raise ValueError("this VideoMamba has no clip_decoder (clip_output_dim=None): cannot distill")
        b, length, d = stream.shape
        table = clip_pos_table(1 + n_patches, d).to(stream.device, stream.dtype)
        if mask is None:
            pos = table.expand(b, -1, -1)
        else:
            visible = ~torch.cat([mask.new_zeros(b, 1), mask], dim=1)
            pos = table.expand(b, -1, -1)[visible].reshape(b, length, d)
        return torch.stack([F.normalize(decoder(stream + pos), dim=-1) for decoder in self.clip_decoder])

    def classify(self, video: torch.Tensor) -> torch.Tensor:
        """Logits of the supervised head (only for weights that carry one, e.g. K400 fine-tuned)."""
        if self.head is None:
            raise ValueError("this VideoMamba has no classification head (num_classes not set)")
        return self.head(self.forward(video)["tokens"][:, 0])

    def _pool(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        if self.pool == "cls":  # Vim: its classifier reads the (middle) cls token's output
            return tokens[:, 0]
        cls, patches = tokens[:, :1], tokens[:, 1:]
        b, L, d = patches.shape
        if self.keep_temporal and t and L % t == 0:
            pooled = cls + self._reduce(patches.reshape(b, t, L // t, d))          # [B, T, D]
        else:
            pooled = cls.squeeze(1) + self._reduce(patches)                          # [B, D]
        return self.pool_norm(pooled) if self.pool_norm is not None else pooled

    def _reduce(self, patches: torch.Tensor) -> torch.Tensor:
        """[..., N, D] -> [..., D] over the patch axis: the official mean, or the max, which keeps
        a small object's features from being averaged away by the background patches around it."""
        return patches.amax(-2) if self.patch_pool == "max" else patches.mean(-2)


@functools.lru_cache(maxsize=8)
def clip_pos_table(positions: int, dim: int) -> torch.Tensor:
    """UTA's ``clip_pos_embed`` ``[1, positions, dim]``: the Transformer's sinusoidal table, fixed."""
    from .layers import sincos_table  # noqa: PLC0415

    return sincos_table(positions, dim).unsqueeze(0)


def resize_temporal_pos(pos: torch.Tensor, t: int) -> torch.Tensor:
    """Linear interpolation of a [1, T, D] temporal position table to t frames."""
    x = pos.float().transpose(1, 2)                                                  # [1, D, T]
    x = F.interpolate(x, size=t, mode="linear", align_corners=False)
    return x.transpose(1, 2).to(pos.dtype)


@register_arch("videomamba")
def build_videomamba(**cfg: Any) -> VideoMamba:
    return VideoMamba(**cfg)


# --------------------------------------------------------------------------- official checkpoints

# aliases used by other official VideoMamba folders (video_sm: norm_f, K400 head)
_ALIASES = {"norm_f.weight": "norm.weight"}
VARIANTS = ("videomamba", "pro")


def bimamba_layout_of(sd: dict[str, torch.Tensor]) -> str:
    """"v2" when the backward branch has its own conv1d_b/x_proj_b/dt_proj_b/D_b (VideoMamba, Vim,
    VideoMambaPro v2), "v1" when only A_b_log is separate (VideoMambaPro's masked model)."""
    mixer = "layers.0.mixer."
    if f"{mixer}conv1d_b.weight" in sd:
        return "v2"
    if f"{mixer}A_b_log" in sd:
        return "v1"
    raise CheckpointError(f"not a bidirectional Mamba: {mixer}A_b_log is missing")


def pro_config(layout: str) -> dict[str, Any]:
    """What VideoMambaPro's code computes for weights of one layout (hotfinda/VideoMambaPro,
    mamba_simple.py + selective_scan_interface.py): the scan, the D skip and the start state read
    in_proj's x before the conv; both directions start from their first input; the masked
    backward scan belongs to the v1 layout only (``bimamba_inner_ref``)."""
    return {"bimamba_layout": layout, "scan_input": "raw", "elemental_residual": True,
            "mask_backward": layout == "v1"}


def infer_config_from_state(state_dict: dict[str, torch.Tensor], num_frames: int | None = None,
                            variant: str = "videomamba") -> dict[str, Any]:
    """Builder config of an official VideoMamba vision state dict, read from the tensor shapes.

    ``variant="pro"`` adds VideoMambaPro's options for the layout the keys show (see
    :func:`pro_config`); plain VideoMamba must have the v2 layout. ``num_frames`` overrides the
    clip length of the temporal table (:func:`checkpoint_filter_fn` re-samples it to match).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'videomamba' or 'pro', got {variant!r}")
    sd = {_ALIASES.get(k, k): v for k, v in state_dict.items()}
    need = ("patch_embed.proj.weight", "pos_embed", "temporal_pos_embedding", "layers.0.mixer.A_log")
    absent = [k for k in need if k not in sd]
    if absent:
        hint = "; it looks like UMT's ViT: use --format umt" if "encoder.patch_embed.proj.weight" in sd else ""
        raise CheckpointError("not a VideoMamba vision encoder: missing " + ", ".join(absent)
                              + f" (first keys seen: {', '.join(list(sd)[:5])}){hint}")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 5:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; VideoMamba uses a Conv3d [D,3,1,p,p]")
    dim, in_chans, _, patch, _ = w.shape
    n_patches = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_patches ** 0.5))
    if grid * grid != n_patches:
        raise CheckpointError(f"pos_embed has {n_patches} patch slots, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    e, n = sd["layers.0.mixer.A_log"].shape
    in_rows = sd["layers.0.mixer.in_proj.weight"].shape[0]
    cfg: dict[str, Any] = {
        "arch": "videomamba", "embed_dim": int(dim), "depth": depth, "img_size": int(grid * patch),
        "patch_size": int(patch), "num_frames": int(sd["temporal_pos_embedding"].shape[1]), "in_chans": int(in_chans),
        "d_state": int(n), "expand": int(e // dim), "dt_rank": int(sd["layers.0.mixer.dt_proj.weight"].shape[1]),
        "d_conv": int(sd["layers.0.mixer.conv1d.weight"].shape[-1]), "gate": in_rows == 2 * e,
        "clip_output_dim": int(sd["clip_decoder.0.head.weight"].shape[0]) if "clip_decoder.0.head.weight" in sd else None,
        "pool_norm": "pool_norm.weight" in sd,
        "keep_temporal": True,
    }
    if "head.weight" in sd:
        cfg["num_classes"] = int(sd["head.weight"].shape[0])
    layout = bimamba_layout_of(sd)
    if variant == "pro":
        cfg.update(pro_config(layout))
    elif layout != "v2":
        raise CheckpointError("these weights share conv1d/x_proj/dt_proj between the two scan directions "
                              "(bimamba v1): that is VideoMambaPro's masked model; convert with --variant pro")
    if num_frames:
        cfg["num_frames"] = num_frames
    return cfg


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], num_frames: int | None = None) -> dict[str, torch.Tensor]:
    """An official VideoMamba vision state dict in vtr naming: the other folders' aliases renamed
    (``norm_f`` -> ``norm``) and, with ``num_frames``, the temporal table re-sampled to that many
    frames. Every other key already has vtr's name; the distillation head ``clip_decoder`` is kept
    (vtr's VideoMamba has the same module, UTA)."""
    sd = {_ALIASES.get(k, k): v for k, v in state_dict.items()}
    pos = sd.get("temporal_pos_embedding")
    if num_frames and pos is not None and num_frames != pos.shape[1]:
        sd["temporal_pos_embedding"] = resize_temporal_pos(pos, num_frames)
    return sd
