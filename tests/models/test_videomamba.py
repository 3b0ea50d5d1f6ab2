"""VideoMamba / VideoMambaPro encoders: official layout, interface, options, bad input."""
import json
from pathlib import Path

import pytest
import torch

from retrieval.models.registry import UnknownModelError, create_model, list_models
from retrieval.models.videomamba import BiMambaMixer

# the official Ti/S/M vision-encoder keys and shapes, read off OpenGVLab/VideoMamba's checkpoints
SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "videomamba_official_keys.json"


def expected_keys(spec_entry):
    keys = {k: tuple(v) for k, v in spec_entry["non_layer_keys"].items()}
    for i in range(spec_entry["constructor"]["depth"]):
        for k, v in spec_entry["per_layer_keys (layers.{0..depth-1}.)"].items():
            keys[f"layers.{i}.{k}"] = tuple(v)
    return keys


@pytest.mark.parametrize("name,key", [("videomamba_tiny", "videomamba_tiny"), ("videomamba_small", "videomamba_small"),
                                      ("videomamba_middle", "videomamba_middle")])
def test_state_dict_matches_official_spec(name, key):
    spec = json.loads(SPEC.read_text())[key]
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected_keys(spec)
    assert sum(p.numel() for p in model.parameters()) == spec["n_params_total"]


def test_registry_lists_and_rejects_unknown():
    names = list_models()
    assert {"videomamba_tiny", "videomamba_small", "videomamba_middle", "videomambapro_tiny", "vim_tiny"} <= set(names)
    with pytest.raises(UnknownModelError, match="videomamba_tiny"):
        create_model("videomamba_tinyy")
    with pytest.raises(ValueError, match="bad config"):
        create_model("videomamba_tiny_test", no_such_option=1)


@pytest.mark.parametrize("name", ["videomamba_tiny_test", "videomambapro_tiny_test"])
def test_forward_backward_interface(name):
    model = create_model(name)
    video = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    out = model(video)
    assert out["tokens"].shape == (2, 1 + 4 * 4, 32)
    assert out["pooled"].shape == (2, 4, 32)
    out["pooled"].sum().backward()
    assert video.grad is not None and torch.isfinite(video.grad).all()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if not n.startswith(("clip_decoder", "head")))


def test_keep_temporal_off_pools_to_clip_vector():
    model = create_model("videomamba_tiny_test", keep_temporal=False)
    assert model(torch.randn(1, 3, 4, 32, 32))["pooled"].shape == (1, 32)


@pytest.mark.parametrize("keep_temporal", [True, False])
def test_patch_pool_reduces_the_final_patch_tokens(keep_temporal):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 32, 32)
    for pool in ("mean", "max"):
        model = create_model("videomamba_tiny_test", patch_pool=pool, keep_temporal=keep_temporal,
                             pool_norm=False).eval()
        with torch.no_grad():
            out = model(x)
        cls, patches = out["tokens"][:, :1], out["tokens"][:, 1:]
        if keep_temporal:
            patches = patches.reshape(2, 4, 4, -1)                     # [B, T, N, D]: per frame
            cls = cls.expand(-1, 4, -1)
        else:
            cls = cls.squeeze(1)
        if pool == "mean":
            want = cls + patches.mean(-2)
        else:
            want = cls + patches.amax(-2)
        torch.testing.assert_close(out["pooled"], want)
    with pytest.raises(ValueError, match="patch_pool"):
        create_model("videomamba_tiny_test", patch_pool="median")


def test_conv_stem_keeps_the_token_grid_and_adds_only_stem_parameters():
    official = create_model("videomamba_tiny_test")
    stem = create_model("videomamba_tiny_test", stem_channels=[8, 16], stem_kernel_t=3)
    assert not any(k.startswith("patch_embed.stem") for k in official.state_dict())
    extra = {k: tuple(v.shape) for k, v in stem.state_dict().items() if k not in official.state_dict()}
    assert extra == {"patch_embed.stem.0.weight": (8, 3, 3, 3, 3), "patch_embed.stem.0.bias": (8,),
                     "patch_embed.stem.2.weight": (16, 8, 3, 3, 3), "patch_embed.stem.2.bias": (16,)}
    # the projection covers what the two stride-2 convs leave of a 16 px patch
    assert stem.patch_embed.proj.weight.shape == (32, 16, 1, 4, 4)
    x = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    out = stem(x)
    assert out["tokens"].shape == official(x)["tokens"].shape == (2, 1 + 4 * 4, 32)
    (out["pooled"] * torch.randn(out["pooled"].shape)).sum().backward()
    assert stem.patch_embed.stem[0].weight.grad.abs().sum() > 1e-3


@pytest.mark.parametrize("kernel_t, reach", [(1, {2}), (3, {0, 1, 2, 3})])
def test_conv_stem_temporal_kernel_sets_which_frames_a_token_sees(kernel_t, reach):
    """Frame 2 changed: a per-frame stem changes only frame 2's tokens; a 3-frame stem of two
    layers reaches two frames either way (before any Mamba block mixes the sequence)."""
    torch.manual_seed(0)
    model = create_model("videomamba_tiny_test", stem_channels=[8, 16], stem_kernel_t=kernel_t).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    y = x.clone()
    y[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = model.embed(x).reshape(4, 4, -1), model.embed(y).reshape(4, 4, -1)
    changed = {t for t in range(4) if not torch.allclose(a[t], b[t])}
    assert changed == reach


def test_conv_stem_bad_options():
    with pytest.raises(ValueError, match="stem_kernel_t"):
        create_model("videomamba_tiny_test", stem_channels=[8], stem_kernel_t=2)
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*5"):
        create_model("videomamba_tiny_test", stem_channels=[4, 4, 4, 4, 4])


@pytest.mark.parametrize("stem", [None, [8, 16]])
def test_tubelets_halve_the_token_time_steps(stem):
    """tubelet_size 2: one token per patch per pair of frames; pooled features per tubelet."""
    torch.manual_seed(0)
    model = create_model("videomamba_tiny_test", tubelet_size=2, stem_channels=stem, stem_kernel_t=3 if stem else 1)
    assert model.temporal_pos_embedding.shape == (1, 2, 32)            # num_frames 4 / 2
    assert model.patch_embed.proj.weight.shape[2] == 2
    x = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    out = model(x)
    assert out["tokens"].shape == (2, 1 + 2 * 4, 32)
    assert out["pooled"].shape == (2, 2, 32)
    (out["pooled"] * torch.randn(out["pooled"].shape)).sum().backward()   # (a plain sum of a LayerNorm output has no gradient)
    assert (x.grad.abs().sum((0, 1, 3, 4)) > 0).all()                  # every frame counts
    # 8 frames: temporal positions stretch from 2 to 4 tubelets, as frames do without tubelets
    assert model(torch.randn(1, 3, 8, 32, 32))["pooled"].shape == (1, 4, 32)
    with pytest.raises(ValueError, match="tubelets of 2 frames"):
        model(torch.randn(1, 3, 3, 32, 32))


def test_tubelet_bad_options():
    with pytest.raises(ValueError, match="tubelet_size"):
        create_model("videomamba_tiny_test", tubelet_size=3)           # does not divide 4 frames
    with pytest.raises(ValueError, match="tubelet_size"):
        create_model("videomamba_tiny_test", tubelet_size=0)


def test_pro_options_change_the_function_but_not_the_parameters():
    torch.manual_seed(1)
    base = create_model("videomamba_tiny_test").eval()
    pro = create_model("videomambapro_tiny_test").eval()
    pro.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(base(x)["tokens"], pro(x)["tokens"])


def test_mixer_ref_and_cpu_backends_agree():
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, mask_backward=True, elemental_residual=True, scan_backend="ref")
    x = torch.randn(2, 23, 16, requires_grad=True)
    y_ref = mixer(x)
    g_ref = torch.autograd.grad(y_ref.sum(), [x, *mixer.parameters()])
    mixer.scan_backend = "cpu"
    y = mixer(x)
    g = torch.autograd.grad(y.sum(), [x, *mixer.parameters()])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bidirectional_sees_both_ways():
    # a change at the last token must reach the first token's output (backward branch) and vice versa
    mixer = BiMambaMixer(8, scan_backend="cpu").eval()
    x = torch.randn(1, 12, 8)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(mixer(x)[:, 0], mixer(x2)[:, 0])


def test_token_mask_drops_tokens_and_distills_visible_ones():
    model = create_model("videomamba_tiny_test")
    video = torch.randn(2, 3, 4, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True                                    # drop half of each frame's tokens
    out = model(video, mask=mask, return_distill=True)
    assert out["tokens"].shape == (2, 1 + 8, 32)
    assert out["pooled"].shape == (2, 32)                  # masked: one vector over the visible patches
    assert out["distill"].shape == (1, 2, 1 + 8, 16)       # cls + visible, one aligned layer
    with pytest.raises(ValueError, match="same number of tokens"):
        bad = mask.clone()
        bad[0, 1] = True
        model(video, mask=bad)


def test_position_embeddings_interpolate_to_other_frames_and_sizes():
    model = create_model("videomamba_tiny_test").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 8, 48, 48))
    assert out["tokens"].shape == (1, 1 + 8 * 9, 32)
    assert out["pooled"].shape == (1, 8, 32)


def test_middle_cls_token_is_returned_first():
    model = create_model("videomamba_tiny_test", cls_position="middle", num_frames=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 1, 32, 32))
    assert out["tokens"].shape == (2, 5, 32)
    # the cls output depends on where it sits: moving it must change the result
    head = create_model("videomamba_tiny_test", num_frames=1).eval()
    head.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 1, 32, 32)
        assert not torch.allclose(head(x)["tokens"][:, 0], model(x)["tokens"][:, 0])


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = create_model("videomamba_tiny_test")
    b = create_model("videomamba_tiny_test", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 4, 32, 32)
    a(x)["pooled"].sum().backward()
    b(x)["pooled"].sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("video,match", [
    (torch.randn(3, 4, 32, 32), r"\[B, C, T, H, W\]"),
    (torch.randn(1, 4, 3, 32, 32), "channels"),
    (torch.randint(0, 255, (1, 3, 4, 32, 32), dtype=torch.uint8), "float"),
    (torch.randn(1, 3, 4, 30, 30), "divisible by the patch size"),
    (torch.randn(1, 3, 80, 32, 32), "interpolated"),
])
def test_bad_video_input(video, match):
    model = create_model("videomamba_tiny_test")
    with pytest.raises(ValueError, match=match):
        model(video)
