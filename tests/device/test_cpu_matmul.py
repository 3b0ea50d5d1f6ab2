"""Who runs the model layers' fp32 CPU products (retrieval.models.device.cpu_matmul_backend) and
what retrieval.models.layers.linear does with the choice: oneDNN's inner product only for large
fp32 CPU products outside autograd and autocast, F.linear everywhere else, the same numbers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.models import layers
from retrieval.models.device import (
    DeviceError,
    choose_cpu_matmul,
    cpu_matmul,
    cpu_matmul_backend,
    onednn_linear_available,
)
from retrieval.models.layers import ONEDNN_MIN_MACS, Linear, linear, route_linears

AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
AVX2 = frozenset({"avx2", "fma"})
HAS_ONEDNN = onednn_linear_available()
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("flags,vendor,expected", [
    (AVX512, "AuthenticAMD", "onednn"),     # MKL runs AVX2 code there, oneDNN AVX-512
    (AVX512, "GenuineIntel", "torch"),      # MKL runs AVX-512 itself
    (AVX2, "AuthenticAMD", "torch"),        # no AVX-512: oneDNN is not faster everywhere
    (frozenset({"avx512f"}), "AuthenticAMD", "torch"),   # AVX-512F alone is not oneDNN's avx512_core
    (AVX512, "", "torch"),                  # unknown vendor (no /proc/cpuinfo)
])
def test_auto_choice_follows_vendor_and_flags(flags, vendor, expected):
    assert choose_cpu_matmul("auto", flags, vendor, onednn_linear=True) == expected


def test_explicit_choices_and_a_bad_one():
    assert choose_cpu_matmul("onednn", AVX2, "GenuineIntel", onednn_linear=True) == "onednn"
    assert choose_cpu_matmul("torch", AVX512, "AuthenticAMD", onednn_linear=True) == "torch"
    # a torch build without the op falls back whatever was asked
    assert choose_cpu_matmul("onednn", AVX512, "AuthenticAMD", onednn_linear=False) == "torch"
    with pytest.raises(DeviceError, match="VTR_CPU_MATMUL"):
        choose_cpu_matmul("mkl", AVX512, "AuthenticAMD", onednn_linear=True)


def test_the_context_overrides_and_restores():
    before = cpu_matmul_backend()
    with cpu_matmul("torch") as chosen:
        assert chosen == "torch" == cpu_matmul_backend()
        with cpu_matmul("onednn") as inner:
            assert cpu_matmul_backend() == inner
        assert cpu_matmul_backend() == "torch"
    assert cpu_matmul_backend() == before


class _Spy:
    """Counts calls of oneDNN's linear op while delegating to it."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = layers.onednn_linear

        def spy(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(layers, "onednn_linear", spy)


def _big(shape_m=300, k=256, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    assert shape_m * k * n >= ONEDNN_MIN_MACS
    return torch.randn(2, shape_m // 2, k, generator=g), torch.randn(n, k, generator=g) * k ** -0.5, torch.randn(n, generator=g)


@needs_onednn
def test_onednn_products_equal_f_linear(monkeypatch):
    spy = _Spy(monkeypatch)
    x, w, b = _big()
    with torch.inference_mode(), cpu_matmul("onednn"):
        for bias in (None, b):
            got = linear(x, w, bias)
            ref = F.linear(x, w, bias)
            assert got.shape == ref.shape == (2, 150, 256) and got.is_contiguous()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert spy.calls == 2


@needs_onednn
def test_onednn_is_used_only_where_it_applies(monkeypatch):
    spy = _Spy(monkeypatch)
    x, w, b = _big()
    with cpu_matmul("onednn"):
        # autograd: F.linear, and the gradients flow
        xg = x.clone().requires_grad_(True)
        linear(xg, w, b).sum().backward()
        torch.testing.assert_close(xg.grad, w.sum(0).expand_as(x))
        with torch.no_grad():
            small = torch.randn(4, 8)
            linear(small, torch.randn(8, 8))                         # below ONEDNN_MIN_MACS
            linear(x.transpose(0, 1), w)                             # not contiguous
            linear(x.double(), w.double())                           # not fp32
            with pytest.raises(RuntimeError):                        # F.linear's own shape error
                linear(x, w[:, :-1].contiguous())
            with pytest.raises(RuntimeError):
                linear(x, w, b[:-1])
            assert linear(x[..., :0], w[:, :0]).abs().sum() == 0     # K = 0: zeros, no division
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert linear(x, w).dtype == torch.bfloat16         # autocast's product
        assert spy.calls == 0
        with torch.no_grad():
            linear(x, w)
        assert spy.calls == 1
    with torch.no_grad(), cpu_matmul("torch"):
        linear(x, w)
    assert spy.calls == 1


def test_linear_module_keeps_nn_linear_state_and_routing_swaps_only_plain_linears():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    x = torch.randn(3, 8)
    ref = plain(x)
    route_linears(plain)
    assert all(type(m) is Linear for m in (plain[0], plain[2])) and type(plain[1]) is nn.ReLU
    assert plain.state_dict().keys() == state.keys()
    torch.testing.assert_close(plain(x), ref)
    sub = Linear(8, 4)
    wrapper = nn.Sequential(sub)
    route_linears(wrapper)
    assert type(wrapper[0]) is Linear and wrapper[0] is sub


@needs_onednn
@pytest.mark.parametrize("name,frames", [("videomamba_tiny", 2), ("joint_vit_ti", 2)])
def test_encoders_agree_across_the_two_product_backends(name, frames, monkeypatch):
    """The mixer's and the joint ViT's products go through linear(): a forward with oneDNN gives the
    torch forward's features up to fp32 rounding, and oneDNN was really called."""
    from retrieval.models.registry import create_model

    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    model = create_model(name, num_frames=frames, img_size=224).eval()
    video = torch.randn(1, 3, frames, 224, 224)
    with torch.inference_mode():
        with cpu_matmul("torch"):
            ref = model(video)["pooled"]
        assert spy.calls == 0
        with cpu_matmul("onednn"):
            got = model(video)["pooled"]
    assert spy.calls > 0
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("verb", ["search", "index"])
def test_a_bad_vtr_cpu_matmul_is_a_user_error_before_any_work(verb, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app.cli import app
    from retrieval.models import device

    missing = str(tmp_path / "missing")
    args = {"search": ["search", "a red circle", "-i", missing],
            "index": ["index", "-m", missing, "--videos", missing, "--out", missing]}[verb]
    monkeypatch.delenv("VTR_DEBUG", raising=False)
    monkeypatch.setenv("VTR_CPU_MATMUL", "mkl")
    device._default_cpu_matmul.cache_clear()
    try:
        result = CliRunner().invoke(app, args + ["--device", "cpu"])
    finally:
        monkeypatch.delenv("VTR_CPU_MATMUL")
        device._default_cpu_matmul.cache_clear()
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "VTR_CPU_MATMUL" in lines[0] and "missing" not in lines[0], result.output
