"""Official checkpoints convert strictly into model directories and load back."""
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from retrieval import load_model
from retrieval.models.convert import CheckpointError, convert_videomamba
from retrieval.models.registry import create_model

from .official_layout import PER_LAYER, official_checkpoint, official_shapes, official_spec

# the sizes of configs/models/videomamba_tiny_test.yaml
TINY = dict(embed_dim=32, depth=2, img_size=32, num_frames=4, patch_size=16, clip_output_dim=16)


@pytest.mark.parametrize("name", ["videomamba_tiny", "videomamba_small", "videomamba_middle"])
def test_shape_rule_reproduces_the_official_sizes(name):
    spec = official_spec()[name]
    c = spec["constructor"]
    listed = {k: tuple(v) for k, v in spec["non_layer_keys"].items()}
    for i in range(c["depth"]):
        listed.update({f"layers.{i}.{k}": tuple(v) for k, v in spec[PER_LAYER].items()})
    assert official_shapes(c["embed_dim"], c["depth"], c["img_size"], c["num_frames"], c["patch_size"],
                           c["clip_output_dim"]) == listed


def official_like(full=True, **over):
    """A state dict in the official layout (full UMT_VIDEOMAMBA checkpoint when full=True)."""
    vision = official_checkpoint(**{**TINY, **over})
    if not full:
        return vision, vision
    model = {f"vision_encoder.{k}": v for k, v in vision.items()}
    model["text_encoder.bert.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
    model["temp"] = torch.tensor(0.07)
    return {"model": model, "epoch": 3}, vision


@pytest.mark.parametrize("full", [True, False])
def test_roundtrip(tmp_path, full):
    ckpt, vision = official_like(full=full)
    torch.save(ckpt, tmp_path / "ckpt.pth")
    out = convert_videomamba(tmp_path / "ckpt.pth", tmp_path / "model")
    model = load_model(out)
    for k, v in vision.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert model.embed_dim == 32 and model.depth == 2 and model.num_frames == 4
    ref = create_model("videomamba_tiny_test").eval()
    ref.load_state_dict(vision)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["pooled"], ref(x)["pooled"])


def test_infers_architecture_without_optional_heads(tmp_path):
    _, vision = official_like(full=False, clip_output_dim=None, pool_norm=False, num_frames=8)
    vision = {("norm_f.weight" if k == "norm.weight" else k): v for k, v in vision.items()}  # video_sm naming
    torch.save(vision, tmp_path / "v.pth")
    model = load_model(convert_videomamba(tmp_path / "v.pth", tmp_path / "m"))
    assert model.clip_decoder is None and model.pool_norm is None and model.num_frames == 8


def test_resample_frames_and_pro_variant(tmp_path):
    ckpt, _ = official_like()
    torch.save(ckpt, tmp_path / "c.pth")
    model = load_model(convert_videomamba(tmp_path / "c.pth", tmp_path / "m", num_frames=16, variant="pro"))
    assert model.temporal_pos_embedding.shape[1] == 16
    mixer = model.layers[0].mixer  # VideoMamba's keys = the v2 layout: raw scan input, elemental, no mask
    assert (mixer.layout, mixer.scan_input, mixer.mask_backward, mixer.elemental_residual) == ("v2", "raw", False, True)


def test_tampered_checkpoint_lists_the_keys(tmp_path):
    ckpt, _ = official_like()
    m = ckpt["model"]
    m["vision_encoder.layers.0.mixer.extra_thing"] = torch.zeros(3)
    m["vision_encoder.layers.1.mixer.D_b"] = torch.zeros(7)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        convert_videomamba(tmp_path / "bad.pth", tmp_path / "m")
    msg = str(err.value)
    assert "layers.0.mixer.extra_thing" in msg and "layers.1.mixer.D_b" in msg
    assert not (tmp_path / "m" / "config.json").exists()


def test_missing_key_is_an_error(tmp_path):
    _, vision = official_like(full=False)
    del vision["layers.1.mixer.conv1d_b.bias"]
    torch.save(vision, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match="missing keys: layers.1.mixer.conv1d_b.bias"):
        convert_videomamba(tmp_path / "v.pth", tmp_path / "m")


def test_other_architecture_is_refused(tmp_path):
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(9, 3)}}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="not a VideoMamba vision encoder"):
        convert_videomamba(tmp_path / "vit.pth", tmp_path / "m")


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("boom",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        convert_videomamba(tmp_path / "evil.pth", tmp_path / "m")


def test_cli_convert_and_errors(tmp_path):
    ckpt, _ = official_like()
    torch.save(ckpt, tmp_path / "c.pth")
    runner = CliRunner()
    res = runner.invoke(app, ["convert", "--format", "videomamba", "--checkpoint", str(tmp_path / "c.pth"),
                              "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "D=32 depth=2" in res.output
    res = runner.invoke(app, ["convert", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "checkpoint not found" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "videomamba_tiny" in res.output
