"""Baseline video backbones (TimeSformer, per-frame CLIP, joint space-time ViT, UniFormer).

Every test uses the ``*_tiny_test`` configs (a few thousand parameters, 32-64 px, 4 frames) or
builds the full-size models on the meta device (shapes only, no memory, no compute).
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import TimesformerConfig, TimesformerForVideoClassification, ViTConfig

from retrieval.models.frame_clip import register_open_clip_config
from retrieval.models.registry import create_model, model_config
from retrieval.models.timesformer import load_timesformer_hf
from retrieval.models.uniformer import GlobalBlock, LocalBlock

TINY = ["timesformer_tiny_test", "frame_clip_tiny_test", "joint_vit_tiny_test", "uniformer_tiny_test"]
# token count L of each tiny model for a [B, 3, 4, S, S] clip
TINY_TOKENS = {
    "timesformer_tiny_test": 1 + 16 * 4,  # cls + (32/8)² patches × 4 frames
    "frame_clip_tiny_test": 4 * (1 + 16),  # per frame: embedding + 16 patches
    "joint_vit_tiny_test": 1 + 4 * 16,
    "uniformer_tiny_test": 2 * 2 * 2,  # T/2 × (64/32)²
}
# how each model's pooled output derives from its (final-normed) tokens
POOLED_FROM_TOKENS = {
    "timesformer_tiny_test": lambda tokens: tokens[:, 0],  # cls
    "frame_clip_tiny_test": lambda tokens: tokens.reshape(2, 4, 17, -1)[:, :, 0],  # per-frame embedding
    "joint_vit_tiny_test": lambda tokens: tokens[:, 1:].mean(1),  # mean of patch tokens
    "uniformer_tiny_test": lambda tokens: tokens.mean(1),
}
# models whose parameters fix the frame count
FIXED_FRAMES = ["timesformer_tiny_test", "joint_vit_tiny_test"]


def tiny_video(name: str, batch: int = 2, frames: int | None = None) -> torch.Tensor:
    cfg = model_config(name)
    torch.manual_seed(0)
    return torch.randn(batch, 3, frames or cfg["num_frames"], cfg["img_size"], cfg["img_size"])


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: create_model(name) for name in TINY}


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_follows_interface(name: str, tiny_models: dict) -> None:
    model = tiny_models[name].train()
    video = tiny_video(name)
    out = model(video)
    d = model.embed_dim
    assert set(out) == {"tokens", "pooled"}
    assert out["tokens"].shape == (2, TINY_TOKENS[name], d)
    assert out["pooled"].shape == ((2, 4, d) if model.keep_temporal else (2, d))
    torch.testing.assert_close(out["pooled"], POOLED_FROM_TOKENS[name](out["tokens"]))
    assert model.num_frames == 4 and model.img_size == video.shape[-1]
    assert model.has_cls_token == (name in ("timesformer_tiny_test", "joint_vit_tiny_test"))
    assert set(model.preprocess) >= {"mean", "std", "size", "interpolation"}
    assert len(model.preprocess["mean"]) == len(model.preprocess["std"]) == 3
    assert model.preprocess["size"] == model.img_size
    (out["pooled"].square().mean() + out["tokens"].mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    model.zero_grad()


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_gives_same_gradients(name: str, tiny_models: dict) -> None:
    model = tiny_models[name].train()
    video = tiny_video(name)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(video)["pooled"].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    try:
        checkpointed = grads()
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_rejects_wrong_rank_channels_and_dtype(name: str, tiny_models: dict) -> None:
    model = tiny_models[name].eval()
    video = tiny_video(name, batch=1)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        model(video[:, :, 0])
    with pytest.raises(ValueError, match="3 channels"):
        model(video[:, :1])
    with pytest.raises(ValueError, match="float"):
        model((video * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match="px|multiples of 32"):
        model(torch.randn(1, 3, 4, 48, 48))


@pytest.mark.parametrize("name", FIXED_FRAMES)
def test_fixed_frame_models_reject_other_frame_counts(name: str, tiny_models: dict) -> None:
    with pytest.raises(ValueError, match="built for 4 frames at 32 px got 6 frames"):
        tiny_models[name].eval()(tiny_video(name, batch=1, frames=6))


def test_convolutional_and_per_frame_models_take_any_frame_count(tiny_models: dict) -> None:
    uniformer = tiny_models["uniformer_tiny_test"].eval()
    with torch.no_grad():
        out = uniformer(tiny_video("uniformer_tiny_test", batch=1, frames=6))
    assert out["tokens"].shape == (1, 3 * 2 * 2, 64)  # the stem halves time: 6 -> 3
    frame_clip = tiny_models["frame_clip_tiny_test"].eval()
    with torch.no_grad():
        out = frame_clip(tiny_video("frame_clip_tiny_test", batch=1, frames=7))
    assert out["pooled"].shape == (1, 7, frame_clip.embed_dim)


def test_joint_attention_mixes_frames_but_frame_clip_does_not(tiny_models: dict) -> None:
    """Joint space-time attention lets frame 0's tokens see frame 3; per-frame CLIP must not."""
    for name in ("joint_vit_tiny_test", "timesformer_tiny_test", "frame_clip_tiny_test"):
        model = tiny_models[name].eval()
        video = tiny_video(name, batch=1)
        changed = video.clone()
        changed[:, :, 3] += 1.0
        with torch.no_grad():
            a, b = model(video)["tokens"], model(changed)["tokens"]
        if name == "frame_clip_tiny_test":
            per_frame = a.shape[1] // 4
            torch.testing.assert_close(a[:, :per_frame], b[:, :per_frame])  # frame 0 unchanged
        else:
            assert not torch.allclose(a[:, 1], b[:, 1], atol=1e-5)  # first patch token (frame 0) changed


def test_joint_vit_fused_and_naive_attention_agree() -> None:
    torch.manual_seed(0)
    fused = create_model("joint_vit_tiny_test").eval()
    naive = create_model("joint_vit_tiny_test", fused_attn=False).eval()
    naive.load_state_dict(fused.state_dict())
    assert not naive.blocks[0].attn.fused_attn
    video = tiny_video("joint_vit_tiny_test")
    with torch.no_grad():
        torch.testing.assert_close(naive(video)["tokens"], fused(video)["tokens"], rtol=1e-4, atol=1e-5)


def test_joint_vit_cls_pooling() -> None:
    model = create_model("joint_vit_tiny_test", pool="cls").eval()
    with torch.no_grad():
        out = model(tiny_video("joint_vit_tiny_test"))
    torch.testing.assert_close(out["pooled"], out["tokens"][:, 0])


def test_uniformer_layout_is_local_local_global_global(tiny_models: dict) -> None:
    stages = tiny_models["uniformer_tiny_test"].stages
    assert [type(stage[0]) for stage in stages] == [LocalBlock, LocalBlock, GlobalBlock, GlobalBlock]
    local = stages[0][0]
    assert isinstance(local.norm1, torch.nn.BatchNorm3d)
    assert local.attn.kernel_size == (5, 5, 5) and local.attn.groups == local.attn.in_channels
    assert local.pos_embed.kernel_size == (3, 3, 3) and stages[3][0].pos_embed.groups == 64


@pytest.mark.parametrize(
    ("name", "params_m", "embed_dim"),
    [
        ("timesformer_base", 121.26, 768),  # + 0.31M for the K400 head = the published 121.4M-121.6M
        ("timesformer_ti", 7.75, 192),
        ("joint_vit_ti", 5.53, 192),
        ("joint_vit_base", 85.80, 768),
        ("uniformer_s", 21.20, 512),  # official 21.4M includes the 400-way head (0.2M)
        ("uniformer_b", 49.61, 512),  # official 49.8M, same
    ],
)
def test_full_size_configs_match_published_sizes(name: str, params_m: float, embed_dim: int) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert model.embed_dim == embed_dim
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


# ---------------------------------------------------------------- TimeSformer from a Hugging Face directory


def _tiny_hf_config() -> TimesformerConfig:
    labels = ["abseiling", "archery", "zumba"]
    return TimesformerConfig(
        image_size=32,
        patch_size=8,
        num_frames=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


@pytest.fixture(scope="module")
def hf_timesformer(tmp_path_factory) -> tuple[Path, TimesformerForVideoClassification]:
    torch.manual_seed(0)
    model = TimesformerForVideoClassification(_tiny_hf_config()).eval()
    path = tmp_path_factory.mktemp("hf_timesformer")
    model.save_pretrained(path)
    return path, model


def test_load_timesformer_hf_reproduces_hf_logits_and_labels(hf_timesformer) -> None:
    path, hf_model = hf_timesformer
    encoder = load_timesformer_hf(path).eval()
    video = tiny_video("timesformer_tiny_test")
    with torch.no_grad():
        hf_logits = hf_model(pixel_values=video.transpose(1, 2)).logits
        hf_tokens = hf_model.timesformer(pixel_values=video.transpose(1, 2)).last_hidden_state
        ours = encoder(video)
        logits = encoder.classify(video)
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["tokens"], hf_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], hf_tokens[:, 0], rtol=0, atol=1e-6)
    assert encoder.id2label == ["abseiling", "archery", "zumba"]
    assert encoder.preprocess["mean"] == [0.45] * 3 and encoder.preprocess["std"] == [0.225] * 3


def test_load_timesformer_hf_from_pytorch_bin_without_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    hf_model = TimesformerForVideoClassification(_tiny_hf_config()).eval()
    hf_model.timesformer.save_pretrained(tmp_path)  # a bare TimesformerModel: no classifier.*
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    torch.save(hf_model.timesformer.state_dict(), tmp_path / "pytorch_model.bin")
    encoder = load_timesformer_hf(tmp_path).eval()
    video = tiny_video("timesformer_tiny_test", batch=1)
    with torch.no_grad():
        expected = hf_model.timesformer(pixel_values=video.transpose(1, 2)).last_hidden_state
        torch.testing.assert_close(encoder(video)["tokens"], expected, rtol=0, atol=1e-6)
    assert encoder.id2label == [] and encoder.classifier is None
    with pytest.raises(RuntimeError, match="no classification head"):
        encoder.classify(video)


def test_load_timesformer_hf_rejects_other_model_types(tmp_path: Path) -> None:
    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit"
    with pytest.raises(ValueError, match="expected .*'timesformer'.*found 'vit'"):
        load_timesformer_hf(tmp_path)


def test_timesformer_hf_with_more_frames_resizes_time_embedding(hf_timesformer) -> None:
    path, hf_model = hf_timesformer
    encoder = create_model("timesformer_tiny_test", hf_dir=str(path), num_frames=8, mlp_ratio=4.0).eval()
    original = hf_model.timesformer.embeddings.time_embeddings
    resized = encoder.backbone.embeddings.time_embeddings
    assert resized.shape == (1, 8, 32) and encoder.num_frames == 8
    torch.testing.assert_close(resized[:, [0, -1]], original[:, [0, -1]])
    with torch.no_grad():
        tokens = encoder(tiny_video("timesformer_tiny_test", batch=1, frames=8))["tokens"]
    assert tokens.shape == (1, 1 + 16 * 8, 32)
    with pytest.raises(ValueError, match="built for 8 frames at 32 px got 4 frames"):
        encoder(tiny_video("timesformer_tiny_test", batch=1))


def test_timesformer_hf_dir_must_match_requested_size(hf_timesformer) -> None:
    path, _ = hf_timesformer
    with pytest.raises(ValueError, match="hidden_size: asked 192, checkpoint 32"):
        create_model("timesformer_ti", hf_dir=str(path), img_size=32, patch_size=8, num_frames=4)


# ---------------------------------------------------------------- per-frame CLIP from an open_clip checkpoint


def _tiny_clip(arch: str):
    cfg = model_config("frame_clip_tiny_test")
    register_open_clip_config(cfg["clip_arch"], cfg["model_config"])
    torch.manual_seed(2)
    return open_clip.create_model(arch).eval()


def test_frame_clip_loads_open_clip_checkpoint(tmp_path: Path) -> None:
    clip = _tiny_clip(model_config("frame_clip_tiny_test")["clip_arch"])
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": clip.state_dict()}, checkpoint)
    encoder = create_model("frame_clip_tiny_test", pretrained=str(checkpoint)).eval()
    video = tiny_video("frame_clip_tiny_test")
    with torch.no_grad():
        out = encoder(video)
        expected = clip.encode_image(video.transpose(1, 2).reshape(8, 3, 32, 32)).reshape(2, 4, -1)
    torch.testing.assert_close(out["pooled"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["tokens"].reshape(2, 4, 17, -1)[:, :, 0], expected)
    assert encoder.preprocess["mean"] == list(open_clip.OPENAI_DATASET_MEAN)


def test_frame_clip_rejects_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    other = model_config("frame_clip_tiny_test")["model_config"]
    other = {**other, "vision_cfg": {**other["vision_cfg"], "width": 48, "layers": 3}}
    register_open_clip_config("vtr-test-other-ViT", other)
    torch.manual_seed(3)
    checkpoint = tmp_path / "other.safetensors"
    save_file(open_clip.create_model("vtr-test-other-ViT").state_dict(), str(checkpoint))
    with pytest.raises(ValueError, match=r"expected architecture 'vtr-tiny-test-ViT'") as info:
        create_model("frame_clip_tiny_test", pretrained=str(checkpoint))
    message = str(info.value)
    assert "transformer.resblocks.2" in message  # the extra layer
    assert "conv1.weight: checkpoint (48, 3, 8, 8) vs model (32, 3, 8, 8)" in message


def test_frame_clip_needs_a_local_file_and_a_consistent_config() -> None:
    with pytest.raises(FileNotFoundError, match="local open_clip checkpoint file"):
        create_model("frame_clip_tiny_test", pretrained="openai")
    with pytest.raises(ValueError, match="different architecture named 'ViT-B-16'"):
        register_open_clip_config("ViT-B-16", model_config("frame_clip_tiny_test")["model_config"])
