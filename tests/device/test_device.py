"""--device / --precision resolution, the missing-CUDA error of every verb, and the CUDA scan's
VideoMambaPro corrections (checked on CPU with the reference scan standing in for the kernel)."""
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from retrieval.models import device as D
from retrieval.models.ssm import scan_with_extensions, selective_scan_ref


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(D, "cuda_device_count", lambda: 0)


def test_resolve_device_spellings(no_cuda):
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device(None) == torch.device("cpu")
    for bad in ("gpu", "cpu:1", "cuda:x", "tpu"):
        with pytest.raises(D.DeviceError, match="--device must be"):
            D.resolve_device(bad)


def test_cuda_without_cuda_is_a_user_error(no_cuda):
    for spec in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(D.DeviceError, match="use --device cpu"):
            D.resolve_device(spec)
    assert issubclass(D.DeviceError, ValueError)  # the CLI's one-line, exit-2 class


def test_gpu_index_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(D, "cuda_device_count", lambda: 2)
    with pytest.raises(D.DeviceError, match=r"2 CUDA device\(s\)"):
        D.resolve_device("cuda:2")


def test_precision_auto_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("VTR_CPU_BF16", raising=False)
    monkeypatch.setattr(D, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert D.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(D, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert D.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(D, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert D.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setenv("VTR_CPU_BF16", "1")
    assert D.resolve_precision("auto", cpu) == "bf16"
    assert D.resolve_precision("fp32", cpu) == "fp32" and D.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(D.DeviceError, match="fp16"):
        D.resolve_precision("fp16", cpu)
    with pytest.raises(D.DeviceError, match="--precision must be"):
        D.resolve_precision("int8", cpu)


def test_this_machine_auto_precision_matches_its_flags():
    flags = D.cpu_flags()
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    if "VTR_CPU_BF16" not in __import__("os").environ and flags:
        assert D.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


def test_autocast_runs_matmuls_in_the_precision():
    a = torch.randn(4, 4)
    with D.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with D.autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32


def _recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: missing/train.json\n  videos: missing/videos\n")
    return recipe


def _verbs(tmp_path: Path):
    missing = str(tmp_path / "missing")
    return {
        "train": ["train", str(_recipe(tmp_path))],
        "eval": ["eval", "-m", missing, "-d", "generic", "--ann", missing, "--videos", missing],
        "index": ["index", "-m", missing, "--videos", missing, "--out", missing],
        "classify": ["classify", missing, "-m", missing],
        "search": ["search", "a red circle", "-i", missing],
        "serve": ["serve", "-i", missing],
    }


@pytest.mark.parametrize("verb", ["train", "eval", "index", "classify", "search", "serve"])
def test_every_verb_refuses_cuda_without_cuda_before_any_work(verb, tmp_path, no_cuda, monkeypatch):
    monkeypatch.delenv("VTR_DEBUG", raising=False)
    args = _verbs(tmp_path)[verb] + ["--device", "cuda"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    # one line, about the device, although every path given is missing: the check comes first
    assert len(lines) == 1 and "--device cuda" in lines[0] and "missing" not in lines[0], result.output


@pytest.mark.parametrize("verb", ["eval", "index", "classify", "search", "serve"])
def test_every_inference_verb_checks_precision_first(verb, tmp_path, monkeypatch):
    monkeypatch.delenv("VTR_DEBUG", raising=False)
    result = CliRunner().invoke(app, _verbs(tmp_path)[verb] + ["--device", "cpu", "--precision", "half"])
    assert result.exit_code == 2 and "--precision must be" in result.output, result.output


def test_train_precision_override_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("VTR_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["train", str(_recipe(tmp_path)), "--precision", "int8"])
    assert result.exit_code == 2 and "run.precision" in result.output, result.output


# -- the CUDA scan's VideoMambaPro corrections -------------------------------------------------------

def _inputs(b=2, d=5, n=4, L=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-torch.rand(d, n, generator=g) - 0.2, B=r(b, n, L),
                C=r(b, n, L), D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.1)


def _plain_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    # stands in for mamba-ssm's kernel: the plain scan, no extensions
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


@pytest.mark.parametrize("mask_diag,with_h0", [(True, False), (False, True), (True, True)])
def test_pro_options_as_corrections_match_the_reference(mask_diag, with_h0):
    x = _inputs()
    h0 = torch.randn(2, 5, 4) if with_h0 else None
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    h0a = h0.clone().requires_grad_() if with_h0 else None
    out, last = scan_with_extensions(_plain_kernel, **leaves, delta_softplus=True, return_last_state=True,
                                     initial_state=h0a, mask_diag=mask_diag, chunk=8)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    h0b = h0.clone().requires_grad_() if with_h0 else None
    ref, ref_last = selective_scan_ref(**ref_leaves, delta_softplus=True, return_last_state=True,
                                       initial_state=h0b, mask_diag=mask_diag)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    ((out * w).sum() + last.sum()).backward()
    ((ref * w).sum() + ref_last.sum()).backward()
    for k in x:
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-4, atol=1e-4, msg=k)
    if with_h0:
        torch.testing.assert_close(h0a.grad, h0b.grad, rtol=1e-4, atol=1e-4)


def test_the_mixer_picks_the_reference_scan_off_the_cpu():
    from retrieval.models.ssm import resolve_backend

    assert resolve_backend("auto", torch.device("meta"), extensions=True) == "ref"
