"""The mixer in sequence tiles (opt-in ``chunk_bytes``) equals the one-pass path and the pure-torch
reference, forward and backward, in fp32 and under bf16 autocast; the VideoMambaPro options keep the
one-pass path."""
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


def _grads(mixer: BiMambaMixer, hidden: torch.Tensor, run, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    mixer.zero_grad(set_to_none=True)
    h = hidden.clone().requires_grad_(True)
    (run(h).float() * weight).sum().backward()
    return {"hidden": h.grad, **{name: p.grad for name, p in mixer.named_parameters()}}


@pytest.mark.parametrize("chunk", [3, 64, 299])
def test_chunked_backward_equals_one_pass_and_reference(chunk: int) -> None:
    """Gradients flow back through the carried scan states and the overlapping conv halos."""
    mixer = _mixer()
    hidden = torch.randn(2, 300, 32, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(2, 300, 32, generator=torch.Generator().manual_seed(3))
    tiles = _grads(mixer, hidden, lambda h: mixer._forward_chunked(h, chunk), weight)
    one_pass = _grads(mixer, hidden, mixer._forward_fused, weight)
    mixer.scan_backend = "ref"
    reference = _grads(mixer, hidden[:, :300], mixer, weight)
    for name, grad in tiles.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, one_pass[name], atol=5e-5, rtol=2e-4, msg=name)
        torch.testing.assert_close(grad, reference[name], atol=5e-5, rtol=2e-4, msg=name)


def test_chunked_under_bf16_autocast_tracks_one_pass_forward_and_backward() -> None:
    mixer = _mixer()
    hidden = torch.randn(1, 400, 32, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(1, 400, 32, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            tiles, one_pass = mixer._forward_chunked(hidden, 128), mixer._forward_fused(hidden)
        g_tiles = _grads(mixer, hidden, lambda h: mixer._forward_chunked(h, 128), weight)
        g_one = _grads(mixer, hidden, mixer._forward_fused, weight)
    with torch.no_grad():
        fp32 = mixer._forward_fused(hidden)
    cos = torch.nn.functional.cosine_similarity
    assert tiles.dtype == one_pass.dtype == torch.bfloat16
    # the same bf16 products on the same values: the tiles change only the order of fp32 sums
    assert float(cos(tiles.float().flatten(), one_pass.float().flatten(), dim=0)) > 0.99999
    assert float(cos(tiles.float().flatten(), fp32.flatten(), dim=0)) > 0.9999
    for name, grad in g_tiles.items():
        assert float(cos(grad.float().flatten(), g_one[name].float().flatten(), dim=0)) > 0.9999, name


def test_forward_uses_tiles_only_when_asked(monkeypatch) -> None:
    mixer = _mixer()
    hidden = torch.randn(1, 2000, 32)
    calls = []
    chunked = mixer._forward_chunked
    monkeypatch.setattr(mixer, "_forward_chunked", lambda h, c: calls.append(c) or chunked(h, c))
    with torch.no_grad():
        off = mixer(hidden)
    assert calls == []                                    # default: off
    mixer.chunk_bytes = 256 * mixer._position_bytes(hidden)   # 256 positions per tile
    with torch.no_grad():
        on = mixer(hidden)
    assert calls == [256]
    torch.testing.assert_close(on, off, atol=2e-5, rtol=1e-4)
    out = mixer(hidden.requires_grad_(True))              # training takes the tiles too
    assert calls == [256, 256] and out.requires_grad
    mixer.chunk_bytes = "auto"                            # half the last-level cache
    assert mixer._chunk_len(torch.randn(1, 1 << 20, 32)) >= 256
    for option in ("mask_backward", "elemental_residual"):
        pro = _mixer(**{option: True})
        pro.chunk_bytes = mixer.chunk_bytes
        assert pro._chunk_len(hidden) is None
