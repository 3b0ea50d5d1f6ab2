"""VideoMambaPro against tensors computed by the authors' code (hotfinda/VideoMambaPro).

The fixture holds, for each parameter layout ("v1": shared conv/x_proj/dt_proj/D, masked backward
scan; "v2": VideoMamba's keys), the official ``VisionMamba`` state dict of a tiny random model
(embed 32, depth 2, 32 px, patch 8, 4 frames, 5 classes), an input clip, and what the official
forward returned for it on CPU with its ``selective_scan_ref`` / ``selective_scan_ref_sub``: every
token after the final norm, the cls feature and the head's logits. Nothing here builds the
reference from vtr's own modules: the weights enter through the converter, as a user's would.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrieval.models.convert import CheckpointError, convert_videomamba
from retrieval.models.model_dir import load_model
from retrieval.models.ssm import fused_mixer_available
from retrieval.models.videomamba import VideoMamba

FIXTURE = Path(__file__).parent / "fixtures" / "videomambapro_official.safetensors"
TOL = 1e-4
BACKENDS = ["ref", pytest.param("cpu", marks=pytest.mark.skipif(not fused_mixer_available(), reason="no C compiler"))]


def _official(layout: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    data = load_file(str(FIXTURE))
    prefix = f"{layout}.state."
    state = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    ref = {k: data[f"{layout}.{k}"] for k in ("video", "tokens", "cls", "logits")}
    return state, ref


def _convert(tmp_path: Path, layout: str, **kw) -> VideoMamba:
    state, _ = _official(layout)
    torch.save(state, tmp_path / f"{layout}.pth")
    return load_model(convert_videomamba(tmp_path / f"{layout}.pth", tmp_path / layout, **kw)).eval()


def _set_backend(model: VideoMamba, backend: str) -> None:
    for layer in model.layers:
        layer.mixer.scan_backend = backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_converted_pro_reproduces_the_official_forward(tmp_path, layout, backend):
    model = _convert(tmp_path, layout, variant="pro")
    mixer = model.layers[0].mixer
    assert (mixer.layout, mixer.scan_input, mixer.elemental_residual, mixer.mask_backward) == \
        (layout, "raw", True, layout == "v1")
    _set_backend(model, backend)
    _, ref = _official(layout)
    with torch.no_grad():
        tokens = model(ref["video"])["tokens"]
        logits = model.classify(ref["video"])
    assert tokens.shape == ref["tokens"].shape
    assert (tokens - ref["tokens"]).abs().max().item() < TOL
    assert (tokens[:, 0] - ref["cls"]).abs().max().item() < TOL
    assert (logits - ref["logits"]).abs().max().item() < TOL


def test_v1_layout_is_detected_and_refused_as_plain_videomamba(tmp_path):
    state, _ = _official("v1")
    assert not any("conv1d_b" in k or "x_proj_b" in k or "D_b" in k for k in state)
    torch.save(state, tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match="--variant pro"):
        convert_videomamba(tmp_path / "v1.pth", tmp_path / "m", variant="videomamba")


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_every_variant_computes_something_else(tmp_path, layout):
    """Of the eight (scan input, mask, elemental residual) combinations on one layout, exactly the
    official one reproduces the authors' logits; every other is far off (so the fixture tells the
    variants apart, and the test above cannot pass by accident)."""
    converted = _convert(tmp_path, layout, variant="pro")
    _, ref = _official(layout)
    cfg = {k: getattr(converted, k) for k in ("embed_dim", "depth", "img_size", "patch_size", "num_frames")}
    matches = []
    for scan_input, mask, elemental in itertools.product(("conv", "raw"), (False, True), (False, True)):
        model = VideoMamba(**cfg, d_state=16, num_classes=5, clip_output_dim=None, pool_norm=False,
                           bimamba_layout=layout, scan_input=scan_input, mask_backward=mask,
                           elemental_residual=elemental, scan_backend="ref").eval()
        model.load_state_dict(converted.state_dict())
        with torch.no_grad():
            err = (model.classify(ref["video"]) - ref["logits"]).abs().max().item()
        if err < TOL:
            matches.append((scan_input, mask, elemental))
        else:
            assert err > 1e-2, (scan_input, mask, elemental, err)
    assert matches == [("raw", layout == "v1", True)]


def test_cli_convert_variant_pro_reports_the_layout(tmp_path):
    from typer.testing import CliRunner

    from app.cli import app

    state, ref = _official("v1")
    torch.save({"model": state}, tmp_path / "pro.pth")
    res = CliRunner().invoke(app, ["convert", "--checkpoint", str(tmp_path / "pro.pth"), "--out", str(tmp_path / "m"),
                                   "--variant", "pro"])
    assert res.exit_code == 0, res.output
    assert "VideoMambaPro bimamba v1 (scan input raw, masked backward True)" in res.stdout
    with torch.no_grad():
        logits = load_model(tmp_path / "m").classify(ref["video"])
    assert (logits - ref["logits"]).abs().max().item() < TOL
    plain = CliRunner().invoke(app, ["convert", "--checkpoint", str(tmp_path / "pro.pth"), "--out",
                                     str(tmp_path / "m2")])
    assert plain.exit_code == 2 and "--variant pro" in plain.stderr
