"""Chunked inference of the mixer (opt-in ``chunk_bytes``) equals the one-pass path and the
pure-torch reference; training (autograd on) and the VideoMambaPro options keep the one-pass path."""
import pytest
import torch

from retrieval.models.ssm.cpu import kernel_available
from retrieval.models.videomamba import BiMambaMixer

pytestmark = pytest.mark.skipif(not kernel_available(), reason="no C compiler for the fused kernels")


def _mixer(d_model: int = 32, **kwargs) -> BiMambaMixer:
    torch.manual_seed(0)
    mixer = BiMambaMixer(d_model, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter off its init, so each one matters
        for name, p in mixer.named_parameters():
            if name.startswith(("A_log", "A_b_log")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.startswith(("D", "D_b")) or "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))
    return mixer


@pytest.mark.parametrize("chunk", [1, 3, 64, 100, 299])   # shorter than the conv halo, uneven, last partial
@pytest.mark.parametrize("gate", [True, False])
def test_chunked_equals_one_pass_and_reference(chunk: int, gate: bool) -> None:
    mixer = _mixer(gate=gate)
    hidden = torch.randn(2, 300, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        one_pass = mixer._forward_fused(hidden)
        chunked = mixer._forward_chunked(hidden, chunk)
        mixer.scan_backend = "ref"
        reference = mixer(hidden)
    torch.testing.assert_close(chunked, one_pass, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, reference, atol=2e-5, rtol=1e-4)


def test_forward_uses_chunks_only_when_asked_and_only_for_inference(monkeypatch) -> None:
    mixer = _mixer()
    hidden = torch.randn(1, 2000, 32)
    calls = []
    chunked = mixer._forward_chunked
    monkeypatch.setattr(mixer, "_forward_chunked", lambda h, c: calls.append(c) or chunked(h, c))
    with torch.no_grad():
        off = mixer(hidden)
    assert calls == []                                    # default: off
    mixer.chunk_bytes = 256 * 2 * mixer.d_inner * 4       # 256 positions per chunk
    with torch.no_grad():
        on = mixer(hidden)
    assert calls == [256]
    torch.testing.assert_close(on, off, atol=2e-5, rtol=1e-4)
    out = mixer(hidden.requires_grad_(True))              # training: the one-pass path and its backward
    assert calls == [256] and out.requires_grad
    for option in ("mask_backward", "elemental_residual"):
        pro = _mixer(**{option: True})
        pro.chunk_bytes = mixer.chunk_bytes
        assert pro._chunk_len(hidden) is None
