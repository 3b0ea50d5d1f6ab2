"""Vim (hustvl/Vim) image checkpoints against tensors from the authors' code.

The fixture holds two tiny random official ``VisionMamba`` models (embed 32, depth 2, 8 px
patches, 6 classes, bimamba v2, middle class token, directions averaged): "vim" with patches every
8 px on 32 px images, "vimplus" with patches every 4 px (the "+" models' overlapping patches), each
with an input batch, the official feature (the middle cls output after ``norm_f``) and the head's
logits, computed on CPU with the authors' ``selective_scan_ref``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from retrieval.models.convert import CheckpointError
from retrieval.models.convert_timesformer_uniformer_vim import convert_vim
from retrieval.models.model_dir import load_model, read_model_config
from retrieval.models.ssm import fused_mixer_available
from retrieval.models.vim import infer_config_from_state

FIXTURE = Path(__file__).parent / "fixtures" / "vim_official.safetensors"
TOL = 1e-4
BACKENDS = ["ref", pytest.param("cpu", marks=pytest.mark.skipif(not fused_mixer_available(), reason="no C compiler"))]


def _official(name: str):
    data = load_file(str(FIXTURE))
    prefix = f"{name}.state."
    state = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    return state, {k: data[f"{name}.{k}"] for k in ("image", "feature", "logits")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,stride", [("vim", 8), ("vimplus", 4)])
def test_converted_vim_reproduces_the_official_forward(tmp_path, name, stride, backend):
    state, ref = _official(name)
    torch.save({"model": state, "epoch": 1}, tmp_path / "vim.pth")
    model = load_model(convert_vim(tmp_path / "vim.pth", tmp_path / "m", img_size=32))
    assert model.patch_stride == stride and model.cls_position == "middle"
    for layer in model.layers:
        layer.mixer.scan_backend = backend
    with torch.no_grad():
        out = model(ref["image"])                      # an image batch [B, 3, H, W]
        logits = model.classify(ref["image"])
    assert (out["pooled"] - ref["feature"]).abs().max().item() < TOL
    assert (out["tokens"][:, 0] - ref["feature"]).abs().max().item() < TOL
    assert (logits - ref["logits"]).abs().max().item() < TOL


def test_averaging_the_directions_matters(tmp_path):
    state, ref = _official("vim")
    torch.save(state, tmp_path / "vim.pth")
    model = load_model(convert_vim(tmp_path / "vim.pth", tmp_path / "m", img_size=32))
    for layer in model.layers:
        layer.mixer.divide_out = False
    with torch.no_grad():
        assert (model.classify(ref["image"]) - ref["logits"]).abs().max().item() > 1e-2


def test_published_grids_are_read_from_the_position_table():
    d, p = 8, 16
    def sd(grid):  # the keys infer_config_from_state reads, with a published model's shapes
        return {"patch_embed.proj.weight": torch.zeros(d, 3, p, p), "pos_embed": torch.zeros(1, grid * grid + 1, d),
                "cls_token": torch.zeros(1, 1, d), "layers.0.mixer.A_log": torch.zeros(2 * d, 16),
                "layers.0.mixer.conv1d_b.weight": torch.zeros(2 * d, 1, 4), "layers.0.mixer.conv1d.weight":
                torch.zeros(2 * d, 1, 4), "layers.0.mixer.dt_proj.weight": torch.zeros(2 * d, 1),
                "norm_f.weight": torch.zeros(d)}
    assert (infer_config_from_state(sd(14))["img_size"], infer_config_from_state(sd(14))["patch_stride"]) == (224, 16)   # Vim-T/S/B
    assert (infer_config_from_state(sd(27))["img_size"], infer_config_from_state(sd(27))["patch_stride"]) == (224, 8)    # Vim-T+/S+
    assert (infer_config_from_state(sd(24))["img_size"], infer_config_from_state(sd(24))["patch_stride"]) == (384, 16)   # 384 px fine-tune


def test_cli_convert_format_vim_and_bad_checkpoint(tmp_path):
    from app.cli import app

    state, ref = _official("vim")
    torch.save({"model": state}, tmp_path / "vim.pth")
    res = CliRunner().invoke(app, ["convert", "--format", "vim", "--checkpoint", str(tmp_path / "vim.pth"),
                                   "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    cfg = read_model_config(tmp_path / "m")
    assert cfg["model"]["pool"] == "cls" and cfg["model"]["num_classes"] == 6
    with torch.no_grad():
        logits = load_model(tmp_path / "m").classify(ref["image"])
    assert (logits - ref["logits"]).abs().max().item() < TOL
    del state["norm_f.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="norm_f.weight"):
        convert_vim(tmp_path / "bad.pth", tmp_path / "bad")
