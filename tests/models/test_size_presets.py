"""Named sizes of the ViT-like families (joint_vit, uniformer, timesformer): a size preset merged
with keyword arguments builds exactly the module that the constructor builds from the published
dimensions spelled out.

The reference below writes every dimension out by hand (the papers' sizes), so a change to a
preset table or to how presets and keyword arguments merge shows up as a different state dict
or a different output. Full-size configs are compared on the meta device (names and shapes);
the tiny test configs are built for real with one seed and compared value for value, outputs
included.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from timm.layers import trunc_normal_
from torch import nn
from transformers import TimesformerConfig

from retrieval.models.joint_vit import JointSpaceTimeViT
from retrieval.models.registry import build_from_config, create_model, list_models, model_config
from retrieval.models.timesformer import TimeSformerEncoder
from retrieval.models.uniformer import UniFormerVideo

# the published dimensions, written out: (arch, size) -> constructor arguments
PUBLISHED: dict[tuple[str, str], dict[str, Any]] = {
    ("joint_vit", "ti"): {"embed_dim": 192, "depth": 12, "num_heads": 3},
    ("joint_vit", "s"): {"embed_dim": 384, "depth": 12, "num_heads": 6},
    ("joint_vit", "base"): {"embed_dim": 768, "depth": 12, "num_heads": 12},
    ("uniformer", "s"): {"depths": (3, 4, 8, 3)},
    ("uniformer", "b"): {"depths": (5, 8, 20, 7)},
    ("timesformer", "ti"): {"embed_dim": 192, "depth": 12, "num_heads": 3},
    ("timesformer", "base"): {"embed_dim": 768, "depth": 12, "num_heads": 12},
}
DEFAULT_SIZE = {"joint_vit": "ti", "uniformer": "s", "timesformer": "base"}
FAMILIES = tuple(DEFAULT_SIZE)
CONFIGS = [name for name in list_models() if model_config(name)["arch"] in FAMILIES]


def reference(cfg: dict[str, Any]) -> nn.Module:
    """The module of a config, built from the class with every dimension given explicitly."""
    args = dict(cfg)
    arch = args.pop("arch")
    size = args.pop("size", DEFAULT_SIZE[arch])
    args = {**PUBLISHED.get((arch, size), {}), **{k: v for k, v in args.items() if v is not None}}
    if arch == "joint_vit":
        return JointSpaceTimeViT(**args)
    if arch == "uniformer":
        return UniFormerVideo(**args)
    args.pop("hf_dir", None)
    args.pop("drop_path_rate", None)  # the tests run in eval mode and build with rate 0
    width = args["embed_dim"]
    return TimeSformerEncoder(TimesformerConfig(
        image_size=args.get("img_size", 224), patch_size=args.get("patch_size", 16),
        num_frames=args.get("num_frames", 8), hidden_size=width, num_hidden_layers=args["depth"],
        num_attention_heads=args["num_heads"], intermediate_size=int(width * args.get("mlp_ratio", 4.0))))


def shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def test_every_family_has_configs() -> None:
    assert {model_config(name)["arch"] for name in CONFIGS} == set(FAMILIES)


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.endswith("_tiny_test")])
def test_full_size_config_builds_the_published_module(name: str) -> None:
    with torch.device("meta"):
        built = create_model(name)
        expected = reference(model_config(name))
    assert type(built) is type(expected)
    assert shapes(built) == shapes(expected)
    assert built.preprocess == expected.preprocess


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.endswith("_tiny_test")])
def test_tiny_config_builds_the_same_weights_and_outputs(name: str) -> None:
    torch.manual_seed(0)
    built = create_model(name).eval()
    torch.manual_seed(0)
    expected = reference(model_config(name)).eval()
    assert shapes(built) == shapes(expected)
    for (key, value), other in zip(built.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(value, other), key
    cfg = model_config(name)
    video = torch.randn(2, 3, cfg["num_frames"], cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        out, ref = built(video), expected(video)
    assert set(out) == set(ref)
    for key in out:
        assert torch.equal(out[key], ref[key]), key


@pytest.mark.parametrize("arch", FAMILIES)
def test_keyword_overrides_one_dimension_of_a_size(arch: str) -> None:
    size = DEFAULT_SIZE[arch]
    key, value = ("depths", [1, 1, 1, 1]) if arch == "uniformer" else ("depth", 1)
    cfg = {"arch": arch, "size": size, key: value}
    with torch.device("meta"):
        built = build_from_config(cfg)
        expected = reference(cfg)
        whole = reference({"arch": arch, "size": size})
    assert shapes(built) == shapes(expected)
    assert len(shapes(built)) < len(shapes(whole))


@pytest.mark.parametrize("arch", FAMILIES)
def test_none_keeps_the_size_value(arch: str) -> None:
    key = "depths" if arch == "uniformer" else "depth"
    with torch.device("meta"):
        given_none, left_out = build_from_config({"arch": arch, key: None}), build_from_config({"arch": arch})
    assert shapes(given_none) == shapes(left_out)


@pytest.mark.parametrize("arch", FAMILIES)
def test_unknown_size_and_missing_dimensions_are_refused(arch: str) -> None:
    with pytest.raises(ValueError, match="unknown .*size 'huge'"):
        build_from_config({"arch": arch, "size": "huge"})
    with pytest.raises(ValueError, match="size=None needs"):
        build_from_config({"arch": arch, "size": None})
    with pytest.raises(ValueError, match="bad config"):
        build_from_config({"arch": arch, "no_such_option": 1})


def vit_init_by_hand(model: nn.Module) -> None:
    """The textbook ViT rule: truncated normal (std 0.02) embeddings and linear weights, zero biases,
    unit LayerNorms; convolutions and BatchNorms keep what they have. Drawn with timm's sampler
    (torch's own ``trunc_normal_`` samples another way in recent versions)."""
    for name in ("cls_token", "spatial_pos_embed", "temporal_pos_embed"):
        if getattr(model, name, None) is not None:
            trunc_normal_(getattr(model, name), std=0.02)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@pytest.mark.parametrize("name", ["joint_vit_tiny_test", "uniformer_tiny_test"])
def test_weight_init_is_the_textbook_vit_rule(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    torch.manual_seed(0)
    by_hand = create_model(name)
    torch.manual_seed(1)
    model.init_weights()
    torch.manual_seed(1)
    vit_init_by_hand(by_hand)
    for (key, value), other in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert torch.equal(value, other), key
