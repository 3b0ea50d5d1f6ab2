"""The fused CPU kernels read bf16 inputs in place (in_proj's output under bf16 autocast): the conv
input and the gate give exactly what their fp32 widening gives (bf16 -> fp32 is exact), forward
and backward; state and accumulation stay fp32. The mixer under bf16 autocast tracks fp32."""
import pytest
import torch

from retrieval.models.ssm.cpu import ScanDirection, conv_silu, kernel_available, scan_directions
from retrieval.models.videomamba import BiMambaMixer

pytestmark = pytest.mark.skipif(not kernel_available(), reason="no C compiler for the fused kernels")


def _xz(b=2, L=45, E=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, 2 * E, generator=g).bfloat16()


@pytest.mark.parametrize("both", [True, False])
def test_conv_reads_bf16_exactly(both):
    xz = _xz()
    E = xz.shape[-1] // 2
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(E, 1, 4, generator=g), torch.randn(E, generator=g)
    wb, bb = (torch.randn(E, 1, 4, generator=g), torch.randn(E, generator=g)) if both else (None, None)
    xh = xz[..., :E].clone().requires_grad_()            # a strided half of in_proj's output, as in the mixer
    xf = xz[..., :E].float().requires_grad_()
    outs_h = conv_silu(xh[..., :], w, bias, wb, bb)
    outs_f = conv_silu(xf, w, bias, wb, bb)
    assert outs_h[0].dtype == torch.float32
    for a, b in zip(outs_h, outs_f):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    gw = torch.randn_like(outs_f[0])
    (outs_h[0] * gw).sum().backward()
    (outs_f[0] * gw).sum().backward()
    assert xh.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xh.grad, xf.grad.bfloat16(), rtol=0, atol=0)


def test_scan_gate_reads_bf16_exactly():
    xz = _xz(seed=2)
    b, L, E2 = xz.shape
    E, N, g = E2 // 2, 16, torch.Generator().manual_seed(3)
    u = torch.randn(b, L, E, generator=g)
    dpre = torch.randn(b, L, E, generator=g)
    Bm, Cm = torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g)
    A = -torch.rand(E, N, generator=g) - 0.1
    dirs = [ScanDirection(u, dpre, Bm, Cm, A), ScanDirection(u, dpre, Bm, Cm, A, reverse=True, mask_diag=True)]
    zh = xz[..., E:].clone().requires_grad_()
    zf = xz[..., E:].float().requires_grad_()
    out_h, _ = scan_directions(dirs, zh)
    out_f, _ = scan_directions(dirs, zf)
    torch.testing.assert_close(out_h, out_f, rtol=0, atol=0)
    w = torch.randn_like(out_f)
    (out_h * w).sum().backward()
    (out_f * w).sum().backward()
    torch.testing.assert_close(zh.grad, zf.grad.bfloat16(), rtol=0, atol=0)


def test_no_fp32_copy_of_in_proj_output_on_the_fused_path(monkeypatch):
    """Under bf16 autocast the mixer hands in_proj's bf16 output to the kernels as it is."""
    from retrieval.models.ssm import cpu

    torch.manual_seed(0)
    mixer = BiMambaMixer(32, d_state=16).eval()
    seen = []
    real = cpu._rows_or_bf16
    monkeypatch.setattr(cpu, "_rows_or_bf16", lambda t: seen.append(t.dtype) or real(t))
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        ref = mixer(x)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = mixer(x)
    assert seen and all(dt == torch.bfloat16 for dt in seen), seen
    cos = torch.nn.functional.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, float(cos)


def test_conv_writes_bf16_rounded_once_from_its_fp32_result():
    xz = _xz(seed=4)
    E = xz.shape[-1] // 2
    g = torch.Generator().manual_seed(5)
    w, bias, wb, bb = (torch.randn(E, 1, 4, generator=g), torch.randn(E, generator=g),
                       torch.randn(E, 1, 4, generator=g), torch.randn(E, generator=g))
    xh = xz[..., :E].clone().requires_grad_()
    xf = xz[..., :E].float().requires_grad_()
    yh = conv_silu(xh, w, bias, wb, bb, out_dtype=torch.bfloat16)
    yf = conv_silu(xf, w, bias, wb, bb)
    for a, b in zip(yh, yf):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b.bfloat16())                 # torch's round-to-nearest-even, bit for bit
    gw = torch.randn_like(yf[0]).bfloat16()
    (yh[0].float() * gw.float()).sum().backward()
    (yf[0] * gw.float()).sum().backward()
    torch.testing.assert_close(xh.grad, xf.grad.bfloat16(), rtol=0, atol=0)


def _scan_inputs(seed, b=2, L=70, E=40, N=16, R=6):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, L, E, generator=g).bfloat16()
    dbc = (torch.randn(b, L, R + 2 * N, generator=g) * 0.5).bfloat16()      # x_proj's output: dt | B | C
    z = torch.randn(b, L, E, generator=g).bfloat16()
    A = -torch.rand(E, N, generator=g) - 0.1
    W, bias, D = torch.randn(E, R, generator=g) * 0.3, torch.randn(E, generator=g) * 0.5, torch.randn(E, generator=g)
    return u, dbc, z, A, W, bias, D, R, N


def _dirs(u, dbc, A, W, bias, D, R, N):
    return [ScanDirection(u, None, dbc[..., R:R + N], dbc[..., R + N:], A, D=D, bias=bias, dt=dbc[..., :R],
                          dt_weight=W, reverse=reverse) for reverse in (False, True)]


def test_scan_reads_bf16_u_dt_B_C_exactly_and_writes_bf16_once():
    """bf16 u and x_proj's bf16 dt/B/C read in place give what their fp32 widening gives (state and
    accumulation fp32), forward and backward; a bf16 output is the fp32 one rounded once."""
    u, dbc, z, A, W, bias, D, R, N = _scan_inputs(6)
    uh, dh = u.clone().requires_grad_(), dbc.clone().requires_grad_()
    uf, df = u.float().requires_grad_(), dbc.float().requires_grad_()
    out_h, last_h = scan_directions(_dirs(uh, dh, A, W, bias, D, R, N), z)
    out_f, last_f = scan_directions(_dirs(uf, df, A, W, bias, D, R, N), z)
    assert out_h.dtype == torch.float32
    torch.testing.assert_close(out_h, out_f, rtol=0, atol=0)
    for a, b in zip(last_h, last_f):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out_16, _ = scan_directions(_dirs(uh, dh, A, W, bias, D, R, N), z, out_dtype=torch.bfloat16)
    assert out_16.dtype == torch.bfloat16 and torch.equal(out_16, out_f.bfloat16())
    # gradients, one direction (with two, autograd adds the two directions' du after rounding each
    # to u's bf16, where the fp32 run adds them first)
    one_h, _ = scan_directions(_dirs(uh, dh, A, W, bias, D, R, N)[:1], z, out_dtype=torch.bfloat16)
    one_f, _ = scan_directions(_dirs(uf, df, A, W, bias, D, R, N)[:1], z)
    w = torch.randn_like(one_f).bfloat16().float()           # the bf16 output's gradient is bf16 too
    (one_h.float() * w).sum().backward()
    (one_f * w).sum().backward()
    torch.testing.assert_close(uh.grad, uf.grad.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(dh.grad, df.grad.bfloat16(), rtol=0, atol=0)


def test_bf16_scan_agrees_with_the_reference_forward_and_backward():
    """The bf16-input scan against selective_scan_ref on the same (widened) values."""
    from retrieval.models.ssm import selective_scan_ref

    u, dbc, z, A, W, bias, D, R, N = _scan_inputs(7, b=1, L=33, E=24)
    uh, dh = u.clone().requires_grad_(), dbc.clone().requires_grad_()
    out, _ = scan_directions(_dirs(uh, dh, A, W, bias, D, R, N)[:1], z, out_dtype=torch.bfloat16)
    ur, dr = u.float().requires_grad_(), dbc.float().requires_grad_()
    delta = (dr[..., :R] @ W.t()).transpose(1, 2)
    ref = selective_scan_ref(ur.transpose(1, 2), delta, A, dr[..., R:R + N].transpose(1, 2),
                             dr[..., R + N:].transpose(1, 2), D, z.float().transpose(1, 2), bias,
                             delta_softplus=True).transpose(1, 2)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)   # bf16 output: 8 bits of mantissa
    w = torch.randn_like(ref)
    (out.float() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(uh.grad.float(), ur.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dh.grad.float(), dr.grad, rtol=2e-2, atol=2e-2)


def test_mixer_under_bf16_autocast_converts_no_activation_between_in_proj_and_out_proj():
    """Every [B, L, *] tensor the fused mixer makes under bf16 autocast is written once in the dtype
    its reader takes: no _to_copy / copy_ of an activation (weights are cast by autocast, [out, in])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    L = 37

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                t = args[0] if func is torch.ops.aten._to_copy.default else args[1]
                if t.dim() == 3 and t.shape[1] == L:
                    self.seen.append((str(func), tuple(t.shape), t.dtype))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    mixer = BiMambaMixer(32, d_state=16).eval()
    x = torch.randn(2, L, 32)
    xh = x.bfloat16()                                        # what the block's RMSNorm hands over
    with torch.no_grad():
        ref = mixer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixer(xh)                                        # autocast's weight casts happen here first
            with Copies() as copies:
                low = mixer(xh)
    assert copies.seen == [], copies.seen
    assert low.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, float(cos)


def test_videomamba_bf16_output_tracks_fp32():
    """The whole encoder under bf16 autocast: pooled features at cosine >= 0.9999 to fp32 (the
    residual stream, norms and scan state stay fp32)."""
    from retrieval.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("videomamba_tiny", depth=4, num_frames=4, img_size=64).eval()
    video = torch.randn(2, 3, 4, 64, 64)
    with torch.inference_mode():
        ref = model(video)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(video)
    for key in ("pooled", "tokens"):
        cos = torch.nn.functional.cosine_similarity(low[key].float().flatten(1), ref[key].flatten(1), dim=1)
        assert float(cos.min()) >= 0.9999, (key, cos)


@pytest.mark.parametrize("options", [
    {"layout": "v1", "scan_input": "raw", "elemental_residual": True, "mask_backward": True},   # Pro v1
    {"layout": "v2", "scan_input": "raw", "elemental_residual": True},                          # Pro v2
    {"divide_out": True},                                                                      # Vim
])
def test_mixer_variants_under_bf16_autocast_track_fp32(options):
    """The raw (strided bf16) scan input, the elemental start state read from it, the v1 layout's
    shared x_proj output and Vim's halving, all read in place under autocast."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(32, **options).eval()
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        ref = mixer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = mixer(x)
    cos = torch.nn.functional.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0)
    assert low.dtype == torch.bfloat16 and float(cos) > 0.9999, float(cos)
