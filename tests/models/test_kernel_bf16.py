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
