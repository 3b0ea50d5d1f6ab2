"""Unmasked-teacher alignment (UTA) with a CLIP teacher, as UMT / VideoMamba compute it.

The teacher is a tiny open_clip ViT saved to a local file (``clip_teacher_file``); its references
below come from open_clip's own forward pass (hooks on its modules) and from the attention
formula written out, never from the code under test.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval import load_model
from retrieval.models.registry import create_model, model_config
from retrieval.models.videomamba import clip_pos_table
from retrieval.train import loop
from retrieval.train.losses import teacher_guided_mask, uta_loss, visible_per_frame, visible_targets
from retrieval.train.recipe import RecipeError, load_recipe
from retrieval.train.teacher import CLIPTeacher, load_teacher

from .conftest import assert_same_parameters, kill_and_resume, tiny_overrides, uta_overrides

REPO = Path(__file__).resolve().parents[2]
T, GRID, WIDTH, HEADS = 4, 4, 32, 2          # the tiny teacher: 4x4 patches of 8 px, width 32, 2 heads
N = GRID * GRID


def _student(**extra):
    torch.manual_seed(0)
    return create_model("videomamba_tiny_test", patch_size=8, clip_output_dim=24, **extra)


@pytest.fixture(scope="module")
def video():
    return torch.randn(2, 3, T, 32, 32, generator=torch.Generator().manual_seed(5))


def test_visible_patches_per_frame_as_the_official_count():
    assert visible_per_frame(196, 0.8) == 40 and visible_per_frame(196, 0.5) == 98
    assert visible_per_frame(16, 0.8) == 4


def _open_clip_reference(visual, video):
    """open_clip's own forward on every frame, with hooks: the last block's output, the input of
    its attention (after ln_1), and the tokens after ln_post."""
    seen = {}
    last = visual.transformer.resblocks[-1]
    hooks = [last.register_forward_hook(lambda m, i, o: seen.__setitem__("block", o)),
             last.ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_1", o))]
    frames = video.transpose(1, 2).reshape(-1, 3, 32, 32)
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, seen["post_tokens"] = visual(frames)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_teacher_attention_and_targets_match_open_clip(clip_teacher_file, video):
    student = _student()
    teacher = load_teacher(str(clip_teacher_file), student, "frame_clip_tiny_test")
    assert isinstance(teacher, CLIPTeacher) and (teacher.cls_target, teacher.ln_post, teacher.layers) == (True, False, 1)
    out = teacher(video)
    ref = _open_clip_reference(teacher.visual, video)
    b = video.shape[0]

    # attention: per head softmax(q k^T / sqrt(d)) over all 1+N keys, mean over heads, cls row, patch keys
    attn = teacher.visual.transformer.resblocks[-1].attn
    y = ref["ln_1"]                                                      # [BT, 1+N, W]
    q, k, _ = (y @ attn.in_proj_weight.T + attn.in_proj_bias).split(WIDTH, dim=-1)
    hd = WIDTH // HEADS
    q = q.reshape(*q.shape[:2], HEADS, hd).transpose(1, 2)
    k = k.reshape(*k.shape[:2], HEADS, hd).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1).mean(1)
    expected_attn = probs[:, 0, 1:].reshape(b, T, N)
    torch.testing.assert_close(out.attention, expected_attn, atol=1e-6, rtol=1e-5)
    assert (out.attention.sum(-1) < 1).all()                              # the cls key's share is left out

    # VideoMamba targets: no ln_post; mean of the T frame cls tokens first, then patches frame by frame
    z = ref["block"] @ teacher.visual.proj                                # [BT, 1+N, 24]
    cls = z[:, 0].reshape(b, T, -1).mean(1)
    patches = z[:, 1:].reshape(b, T * N, -1)
    expected = F.normalize(torch.cat([cls[:, None], patches], dim=1), dim=-1)
    assert out.targets.shape == (1, b, 1 + T * N, 24)
    torch.testing.assert_close(out.targets[0], expected, atol=1e-5, rtol=1e-5)

    # UMT's ViT layout: ln_post, no cls target (what open_clip returns as its output tokens)
    umt = CLIPTeacher(teacher.visual, cls_target=False, ln_post=True, layers=1)(video)
    expected_umt = F.normalize(ref["post_tokens"] @ teacher.visual.proj, dim=-1).reshape(b, T * N, -1)
    torch.testing.assert_close(umt.targets[0], expected_umt, atol=1e-5, rtol=1e-5)
    assert CLIPTeacher(teacher.visual, cls_target=False, ln_post=True, layers=2)(video).targets.shape == (2, b, T * N, 24)


def test_the_mask_is_drawn_from_the_teachers_attention(clip_teacher_file, video):
    teacher = load_teacher(str(clip_teacher_file), _student(), "frame_clip_tiny_test")
    attention = teacher(video).attention                                  # [B, T, N]
    gen = torch.Generator().manual_seed(0)
    draws = 400
    kept = torch.zeros_like(attention)
    for _ in range(draws):
        mask = teacher_guided_mask(attention, 0.8, gen)
        assert mask.shape == (2, T * N) and ((~mask).view(2, T, N).sum(-1) == 4).all()
        kept += (~mask).view(2, T, N).float()
    rate = kept / draws
    most, least = attention.argmax(-1, keepdim=True), attention.argmin(-1, keepdim=True)
    rate_most, rate_least = rate.gather(-1, most), rate.gather(-1, least)
    assert (rate_most > 0.5).all() and (rate_most > 3 * rate_least).all(), (rate_most, rate_least)
    # more attention, kept more often: rank correlation per frame
    for frame_rate, frame_attn in zip(rate.reshape(-1, N), attention.reshape(-1, N)):
        ra, rb = frame_rate.argsort().argsort().float(), frame_attn.argsort().argsort().float()
        assert torch.corrcoef(torch.stack([ra, rb]))[0, 1] > 0.6

    # the deterministic option keeps exactly the 4 most-attended patches of every frame
    top = teacher_guided_mask(attention, 0.8, mode="topk")
    visible = (~top).view(2, T, N)
    expected = torch.zeros_like(visible)
    expected.scatter_(-1, attention.topk(4, dim=-1).indices, True)
    assert torch.equal(visible, expected)
    assert torch.equal(top, teacher_guided_mask(attention, 0.8, mode="topk"))
    with pytest.raises(ValueError, match="sample"):
        teacher_guided_mask(attention, 0.8, mode="best")


def test_student_aligns_cls_and_visible_tokens_with_the_position_table(clip_teacher_file, video):
    student = _student().eval()
    teacher = load_teacher(str(clip_teacher_file), student, "frame_clip_tiny_test")
    mask = teacher_guided_mask(teacher(video).attention, 0.8, mode="topk")
    seen = {}
    hook = student.layers[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("residual", o[1]))
    with torch.no_grad():
        out = student(video, mask=mask, return_distill=True)
    hook.remove()
    b, v = 2, 1 + 4 * T                                                    # cls + 4 visible patches per frame
    assert out["distill"].shape == (1, b, v, 24)
    torch.testing.assert_close(out["distill"].norm(dim=-1), torch.ones(1, b, v))
    assert out["pooled"].shape == (b, student.embed_dim)                   # masked: one vector per clip

    # the fixed table: the Transformer's sinusoid (numpy formula), 1 + T*N positions of the student's width
    d = student.embed_dim
    angles = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(1 + T * N)])
    angles[:, 0::2], angles[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    table = clip_pos_table(1 + T * N, d)
    torch.testing.assert_close(table[0], torch.tensor(angles, dtype=torch.float32))
    # the aligned stream: the residual before the last mixer output is added, plus the table at the
    # visible places (cls at 0, patch i at 1 + i), through clip_decoder, L2-normalised
    places = torch.cat([torch.zeros(b, 1, dtype=torch.long), 1 + (~mask).nonzero()[:, 1].view(b, -1)], dim=1)
    expected = F.normalize(student.clip_decoder[0](seen["residual"] + table[0][places]), dim=-1)
    torch.testing.assert_close(out["distill"][0], expected, atol=1e-5, rtol=1e-5)


def test_uta_loss_counts_the_cls_token():
    targets = F.normalize(torch.randn(1, 2, 1 + 8, 24), dim=-1)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, ::2] = True
    aligned = visible_targets(targets, mask)
    assert aligned.shape == (1, 2, 5, 24)
    torch.testing.assert_close(aligned[:, :, 0], targets[:, :, 0])        # cls first, always visible
    torch.testing.assert_close(aligned[:, :, 1:], targets[:, :, 2::2])
    assert uta_loss(aligned * 3.0, aligned) < 1e-6                         # same directions
    assert uta_loss(-aligned, aligned) == pytest.approx(4.0)
    wrong_cls = aligned.clone()
    wrong_cls[:, :, 0] *= -1                                               # only the cls disagrees: 4 / 5 tokens
    assert uta_loss(wrong_cls, aligned) == pytest.approx(4.0 / 5, rel=1e-5)
    with pytest.raises(ValueError, match="grids"):
        visible_targets(targets, torch.zeros(2, 7, dtype=torch.bool))


def test_uta_loss_falls_on_a_fixed_batch(clip_teacher_file, video):
    student = _student().train()
    teacher = load_teacher(str(clip_teacher_file), student, "frame_clip_tiny_test")
    taught = teacher(video)
    mask = teacher_guided_mask(taught.attention, 0.8, torch.Generator().manual_seed(1))
    targets = visible_targets(taught.targets, mask)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = uta_loss(student(video, mask=mask, return_distill=True)["distill"], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_teacher_that_is_not_a_clip_vit_is_refused(clip_teacher_file):
    with pytest.raises(ValueError, match="not a CLIP ViT image tower"):
        load_teacher("videomamba_tiny_test", _student())
    # a student whose patch grid is not the teacher's (16 px patches: 4 per frame, the teacher has 16)
    student = create_model("videomamba_tiny_test", clip_output_dim=24)
    teacher = load_teacher(str(clip_teacher_file), student, "frame_clip_tiny_test")
    video = torch.randn(1, 3, T, 32, 32)
    mask = torch.zeros(1, T * 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="patch grids"):
        visible_targets(teacher(video).targets, mask)


# -- recipes and the loop -----------------------------------------------------------------------
def test_umt_recipes_parse():
    s1 = load_recipe(REPO / "configs" / "train" / "umt_stage1.yaml")
    assert (s1.loss.vtc, s1.loss.vtm, s1.loss.mlm, s1.loss.uta) == (0.0, 0.0, 0.0, 1.0)
    s2 = load_recipe(REPO / "configs" / "train" / "umt_stage2.yaml")
    assert (s2.loss.vtc, s2.loss.vtm, s2.loss.mlm, s2.loss.uta) == (1.0, 1.0, 1.0, 1.0)
    for r in (s1, s2):
        assert (r.loss.uta_mask_ratio, r.loss.uta_image_mask_ratio, r.loss.uta_mask) == (0.8, 0.5, "sample")
        assert r.loss.uta_teacher_arch == "clip_teacher_b16"
    teacher_cfg = model_config("clip_teacher_b16")
    assert teacher_cfg["clip_arch"] == "ViT-B-16-quickgelu" and teacher_cfg["img_size"] == 224
    with pytest.raises(RecipeError, match="uta_mask"):
        load_recipe(REPO / "configs" / "train" / "umt_stage1.yaml", ["loss.uta_mask=best"])


def test_stage1_video_only_uta_trains_and_resumes_exactly(tmp_path, tiny_corpus, clip_teacher_file, monkeypatch):
    extra = uta_overrides(clip_teacher_file, **{"loss.vtc": 0, "loss.vtm": 0, "loss.mlm": 0})
    monkeypatch.setattr(loop, "plot_losses", lambda *a: None)
    straight = load_model(loop.train(load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "a", **extra))))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [set(r) >= {"uta", "loss"} and "vtc" not in r for r in rows] == [True] * 6
    assert all(0 < r["uta"] < 4 for r in rows)
    resumed = kill_and_resume(load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "b", **extra)), monkeypatch)
    assert_same_parameters(straight, resumed)


def test_stage2_trains_all_four_losses(tmp_path, tiny_corpus, clip_teacher_file, monkeypatch):
    monkeypatch.setattr(loop, "plot_losses", lambda *a: None)
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "s2", **uta_overrides(
        clip_teacher_file, **{"loss.mlm": 1.0, "optim.steps": 2})))
    loop.train(r)
    rows = [json.loads(x) for x in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("vtc", "vtm", "mlm", "uta", "loss")), row


# -- UMT's variant: the joint space-time ViT student ----------------------------------------------
def _vit_student():
    torch.manual_seed(0)
    return create_model("joint_vit_tiny_test", clip_output_dim=24, clip_return_layers=2)


def test_joint_vit_aligns_its_last_layers_to_the_teachers_with_ln_post(clip_teacher_file, video):
    student = _vit_student().eval()
    teacher = load_teacher(str(clip_teacher_file), student, "frame_clip_tiny_test")
    assert (teacher.cls_target, teacher.ln_post, teacher.layers) == (False, True, 2)
    taught = teacher(video)
    assert taught.targets.shape == (2, 2, T * N, 24)                       # 2 layers, no cls target
    mask = teacher_guided_mask(taught.attention, 0.8, mode="topk")
    targets = visible_targets(taught.targets, mask)
    with torch.no_grad():
        out = student(video, mask=mask, return_distill=True)
    assert out["distill"].shape == targets.shape == (2, 2, 4 * T, 24)
    assert out["pooled"].shape == (2, student.embed_dim)
    # the last aligned layer is the final (normed) patch tokens + the T'*N-position table, decoder 1
    table = clip_pos_table(T * N, student.embed_dim)[0]
    places = (~mask).nonzero()[:, 1].view(2, -1)
    expected = F.normalize(student.clip_decoder[1](out["tokens"][:, 1:] + table[places]), dim=-1)
    torch.testing.assert_close(out["distill"][1], expected, atol=1e-5, rtol=1e-5)

    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = uta_loss(student(video, mask=mask, return_distill=True)["distill"], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_joint_vit_trains_with_uta_in_the_loop(tmp_path, tiny_corpus, clip_teacher_file, monkeypatch):
    monkeypatch.setattr(loop, "plot_losses", lambda *a: None)
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "vit", **{
        **uta_overrides(clip_teacher_file), "model.video": "joint_vit_tiny_test",
        "model.video_overrides": "{clip_output_dim: 24, clip_return_layers: 2}", "optim.steps": 2}))
    model = load_model(loop.train(r))
    assert len(model.video.clip_decoder) == 2
    rows = [json.loads(x) for x in (tmp_path / "vit" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["uta"] < 4 and math.isfinite(row["loss"]) for row in rows)


# -- against the authors' code ------------------------------------------------------------------
FIXTURE = Path(__file__).parent / "fixtures" / "official_clip_teacher_tiny.safetensors"


def test_teacher_reproduces_the_official_clip_teacher(tmp_path):
    """Tensors from the authors' teacher code (VideoMamba ``video_mm`` / ``video_sm`` ``clip.py``, run
    outside this repository on a 2-block, 32-wide, QuickGELU ViT with random weights): its targets,
    its attention, and the visible patches its ``torch.multinomial`` rule drew with seed 11."""
    from safetensors.torch import load_file, save_file

    ref = load_file(str(FIXTURE))
    weights = {k.removeprefix("weights."): v for k, v in ref.items() if k.startswith("weights.")}
    weights["conv1.weight"] = weights["conv1.weight"].squeeze(2)          # their Conv3d (1, 8, 8) kernel
    save_file(weights, str(tmp_path / "clip.safetensors"))
    tiny = dict(model_config("frame_clip_tiny_test")["model_config"], quick_gelu=True)
    net = create_model("frame_clip_tiny_test", clip_arch="vtr-tiny-test-ViT-quickgelu", model_config=tiny,
                       pretrained=str(tmp_path / "clip.safetensors"))
    video = ref["video"]

    vm = CLIPTeacher(net.visual, cls_target=True, ln_post=False, layers=1)(video)
    torch.testing.assert_close(vm.targets, F.normalize(ref["targets_videomamba"], dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vm.attention.reshape(-1, N), ref["attention"], atol=1e-6, rtol=1e-5)
    umt = CLIPTeacher(net.visual, cls_target=False, ln_post=True, layers=2)(video)
    torch.testing.assert_close(umt.targets, ref["targets_umt"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(umt.attention.reshape(-1, N), ref["attention_umt"], atol=1e-6, rtol=1e-5)

    # the same draw: multinomial without replacement keeps its first picks whether it draws all N or 4
    mask = teacher_guided_mask(ref["attention"].reshape(2, T, N), 0.8, torch.Generator().manual_seed(11))
    assert torch.equal(mask, ref["mask_seed11"])


def test_a_missing_teacher_is_one_clear_error_before_training(tmp_path, tiny_corpus, monkeypatch):
    built = []
    monkeypatch.setattr(loop, "build_model", lambda *a: built.append(1))
    for teacher, error, message in ((str(tmp_path / "nope.bin"), FileNotFoundError, "teacher checkpoint not found"),
                                    ("no_such_model", ValueError, "neither a file")):
        r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "x", **{"loss.uta": 1.0,
                                                                            "loss.uta_teacher": teacher}))
        with pytest.raises(error, match=message):
            loop.train(r)
    assert not built


def test_image_steps_use_their_own_mask_ratio(tmp_path, tiny_corpus, clip_teacher_file, monkeypatch):
    r = load_recipe(None, tiny_overrides(tiny_corpus, tmp_path / "r", **uta_overrides(
        clip_teacher_file, **{"loss.vtm": 0, "loss.mlm": 0})))
    model = loop.build_model(r)
    teacher = load_teacher(r.loss.uta_teacher, model.video, r.loss.uta_teacher_arch)
    seen = []
    real = loop.teacher_guided_mask

    def recording(attention, ratio, gen, mode):
        mask = real(attention, ratio, gen, mode=mode)
        seen.append((attention.shape[1], ratio, int((~mask).sum(1)[0])))
        return mask

    monkeypatch.setattr(loop, "teacher_guided_mask", recording)
    gen = torch.Generator().manual_seed(0)
    for frames in (T, 1):
        batch = (torch.randn(2, 3, frames, 32, 32), ["a red circle", "a blue square"], torch.tensor([0, 1]))
        out = loop.compute_losses(model, batch, r, None, teacher, gen)
        assert math.isfinite(float(out["uta"].detach()))
    # videos: 4 of 16 patches per frame stay visible (0.8); images: 8 of 16 (0.5)
    assert seen == [(T, 0.8, 4 * T), (1, 0.5, 8)]
