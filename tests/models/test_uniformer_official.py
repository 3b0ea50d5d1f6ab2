"""UniFormer video weights in the official key layout, against tensors from the authors' code.

The fixture holds the state dict of Sense-X/UniFormer's video ``Uniformer`` (a tiny random
configuration: widths 8/16/32/64, depths 1/1/2/1, head_dim 16, 7 classes, 64 px), an input clip,
and what the official code returned for it on CPU: the feature map after the final BatchNorm
(flattened: tokens), its mean and the head's logits.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from retrieval.models.convert import CheckpointError
from retrieval.models.convert_timesformer_uniformer_vim import convert_uniformer
from retrieval.models.model_dir import load_model, read_model_config
from retrieval.models.uniformer import BLOCK_NORM_EPS, UniFormerVideo

FIXTURE = Path(__file__).parent / "fixtures" / "uniformer_official.safetensors"
TOL = 1e-4


def _official() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    data = load_file(str(FIXTURE))
    state = {k[len("state."):]: v for k, v in data.items() if k.startswith("state.")}
    return state, {k: data[k] for k in ("video", "tokens", "pooled", "logits")}


@pytest.mark.parametrize("wrapped", [True, False])
def test_converted_uniformer_reproduces_the_official_forward(tmp_path, wrapped):
    state, ref = _official()
    torch.save({"model_state": state, "epoch": 3} if wrapped else state, tmp_path / "u.pyth")
    out = convert_uniformer(tmp_path / "u.pyth", tmp_path / "m", num_frames=4, head_dim=16)
    cfg = read_model_config(out)
    assert cfg["preprocess"]["mean"] == [0.45] * 3 and cfg["preprocess"]["std"] == [0.225] * 3
    model = load_model(out)
    with torch.no_grad():
        got = model(ref["video"])
        logits = model.classify(ref["video"])
    assert (got["tokens"] - ref["tokens"]).abs().max().item() < TOL
    assert (got["pooled"] - ref["pooled"]).abs().max().item() < TOL
    assert (logits - ref["logits"]).abs().max().item() < TOL


def test_norm_layers_carry_the_official_epsilons():
    model = UniFormerVideo(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), head_dim=16, img_size=64)
    assert model.patch_embeds[0].norm.eps == 1e-5 and model.norm.eps == 1e-5
    assert model.stages[2][0].block.norm1.eps == BLOCK_NORM_EPS == 1e-6


def test_head_dim_is_a_flag_and_a_wrong_one_changes_the_output(tmp_path):
    state, ref = _official()
    torch.save(state, tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match="head-dim 24"):
        convert_uniformer(tmp_path / "u.pth", tmp_path / "bad", head_dim=24)
    wrong = load_model(convert_uniformer(tmp_path / "u.pth", tmp_path / "m8", head_dim=8))  # 4 and 8 heads
    with torch.no_grad():
        assert (wrong.classify(ref["video"]) - ref["logits"]).abs().max().item() > 1e-3


def test_strict_conversion_lists_foreign_keys(tmp_path):
    state, _ = _official()
    state["blocks3.0.attn.extra"] = torch.zeros(2)
    torch.save({"model_state": state}, tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match="blocks3.0.attn.extra"):
        convert_uniformer(tmp_path / "u.pth", tmp_path / "m", head_dim=16)
    state, _ = _official()
    del state["blocks4.0.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "u.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: stages.3.0.block.mlp.fc2.bias"):
        convert_uniformer(tmp_path / "u.safetensors", tmp_path / "m2", head_dim=16)


def test_cli_convert_format_uniformer(tmp_path):
    from app.cli import app

    state, ref = _official()
    torch.save({"model_state": state}, tmp_path / "u.pyth")
    res = CliRunner().invoke(app, ["convert", "--format", "uniformer", "--checkpoint", str(tmp_path / "u.pyth"),
                                   "--out", str(tmp_path / "m"), "--head-dim", "16", "--num-frames", "4"])
    assert res.exit_code == 0, res.output
    assert "head 7 classes" in res.stdout
    with torch.no_grad():
        logits = load_model(tmp_path / "m").classify(ref["video"])
    assert (logits - ref["logits"]).abs().max().item() < TOL
