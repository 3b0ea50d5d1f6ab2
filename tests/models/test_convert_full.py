"""Whole official retrieval checkpoints (UMT_VIDEOMAMBA, UMT) convert strictly into retrieval models.

The fake checkpoints below are written in the official key layout: vision keys under
``vision_encoder.`` (VideoMamba names, or UMT's ViT names), the BERT text tower under
``text_encoder.bert.`` with cross-attention from ``fusion_layer`` on, the heads, and the
training-only parts a real checkpoint carries (CLIP teacher, MLM head, pooler, id buffers).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from app.cli import app
from retrieval import load_model
from retrieval.models.convert import CheckpointError, convert_retrieval, dropped_summary, load_checkpoint
from retrieval.models.retrieval_model import RetrievalModel

from .official_layout import official_checkpoint

TINY_BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 4,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
             "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
FUSION_LAYER = 2
EMBED = 24
UMT_DIM, UMT_DEPTH, UMT_FRAMES, UMT_PATCH = 128, 2, 4, 16  # 2 heads of 64, as UMT-B/L
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONVERT_LOG = "retrieval.models.convert"


def text_keys(width: int, prefix: str = "text_encoder.bert.") -> dict[str, torch.Tensor]:
    """A 4-layer BERT with cross-attention from layer 2, in the official naming, random weights.

    The names and shapes are Hugging Face BERT's (the official xbert is a copy of it), with
    cross-attention only from ``FUSION_LAYER`` on and its key/value reading the vision width, as
    xbert's ``encoder_width``; the pooler is listed with the training-only keys."""
    torch.manual_seed(1)
    config = BertConfig(**TINY_BERT, is_decoder=True, add_cross_attention=True)
    sd = {k: v for k, v in BertModel(config).state_dict().items()
          if not k.startswith("pooler.") and "position_ids" not in k and "token_type_ids" not in k}
    out = {}
    for key, value in sd.items():
        if ".crossattention." in key:
            if int(key.split(".")[2]) < FUSION_LAYER:
                continue
            if key.endswith(("self.key.weight", "self.value.weight")):
                value = torch.empty(value.shape[0], width)
        out[prefix + key] = torch.randn_like(value)
    return out


def training_only_keys() -> dict[str, torch.Tensor]:
    """What official pretraining checkpoints carry beyond the retrieval model."""
    v, h = TINY_BERT["vocab_size"], TINY_BERT["hidden_size"]
    return {
        "clip_teacher.transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8),
        "clip_teacher.proj": torch.randn(8, 16),
        "text_encoder.cls.predictions.bias": torch.zeros(v),
        "text_encoder.cls.predictions.transform.dense.weight": torch.randn(h, h),
        "text_encoder.cls.predictions.transform.dense.bias": torch.zeros(h),
        "text_encoder.cls.predictions.transform.LayerNorm.weight": torch.ones(h),
        "text_encoder.cls.predictions.transform.LayerNorm.bias": torch.zeros(h),
        "text_encoder.cls.predictions.decoder.weight": torch.randn(v, h),
        "text_encoder.cls.predictions.decoder.bias": torch.zeros(v),
        "text_encoder.bert.pooler.dense.weight": torch.randn(h, h),
        "text_encoder.bert.pooler.dense.bias": torch.zeros(h),
        "text_encoder.bert.embeddings.position_ids": torch.arange(TINY_BERT["max_position_embeddings"])[None],
    }


def head_keys(vision_width: int) -> dict[str, torch.Tensor]:
    h = TINY_BERT["hidden_size"]
    return {"vision_proj.weight": torch.randn(EMBED, vision_width), "vision_proj.bias": torch.randn(EMBED),
            "text_proj.weight": torch.randn(EMBED, h), "text_proj.bias": torch.randn(EMBED),
            "temp": torch.tensor(0.0421), "itm_head.weight": torch.randn(2, h), "itm_head.bias": torch.randn(2)}


def videomamba_checkpoint() -> dict[str, torch.Tensor]:
    # the sizes of videomamba_tiny_test (D=32), with clip_decoder and pool_norm
    vision = official_checkpoint(embed_dim=32, depth=2, img_size=32, num_frames=4, clip_output_dim=16)
    sd = {f"vision_encoder.{k}": v for k, v in vision.items()}
    return {**sd, **text_keys(32), **head_keys(32), **training_only_keys()}


def umt_vision_keys() -> dict[str, torch.Tensor]:
    """UMT's ViT (OpenGVLab/unmasked_teacher, PretrainVisionTransformer) key names, random weights."""
    torch.manual_seed(2)
    d = UMT_DIM
    sd = {"encoder.patch_embed.proj.weight": torch.randn(d, 3, 1, UMT_PATCH, UMT_PATCH) * 0.02,
          "encoder.patch_embed.proj.bias": torch.randn(d) * 0.02}
    for i in range(UMT_DEPTH):
        b = f"encoder.blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + 0.1 * torch.randn(d), b + "norm1.bias": 0.1 * torch.randn(d),
            b + "attn.qkv.weight": torch.randn(3 * d, d) * 0.05,
            b + "attn.q_bias": torch.randn(d) * 0.1, b + "attn.v_bias": torch.randn(d) * 0.1,
            b + "attn.proj.weight": torch.randn(d, d) * 0.05, b + "attn.proj.bias": torch.randn(d) * 0.1,
            b + "norm2.weight": 1 + 0.1 * torch.randn(d), b + "norm2.bias": 0.1 * torch.randn(d),
            b + "mlp.fc1.weight": torch.randn(4 * d, d) * 0.05, b + "mlp.fc1.bias": torch.randn(4 * d) * 0.1,
            b + "mlp.fc2.weight": torch.randn(d, 4 * d) * 0.05, b + "mlp.fc2.bias": torch.randn(d) * 0.1,
        })
    sd.update({"encoder.norm.weight": 1 + 0.1 * torch.randn(d), "encoder.norm.bias": 0.1 * torch.randn(d),
               "pool_norm.weight": 1 + 0.1 * torch.randn(d), "pool_norm.bias": 0.1 * torch.randn(d),
               # the UTA distillation decoder: training-only, no place in joint_vit
               "clip_decoder.0.head.weight": torch.randn(16, d), "clip_decoder.0.head.bias": torch.zeros(16),
               "clip_decoder.0.norm.weight": torch.ones(16), "clip_decoder.0.norm.bias": torch.zeros(16)})
    return sd


def umt_checkpoint() -> dict[str, torch.Tensor]:
    vision = {f"vision_encoder.{k}": v for k, v in umt_vision_keys().items()}
    return {**vision, **text_keys(UMT_DIM), **head_keys(UMT_DIM), **training_only_keys()}


def save(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "ckpt.pth", **extra) -> Path:
    path = tmp_path / name
    torch.save({"model": sd, "epoch": 9, **extra}, path)
    return path


def to_vtr_key(key: str) -> str:
    """Official key -> RetrievalModel key for the parts that keep their names (VideoMamba + text + heads)."""
    if key.startswith("vision_encoder."):
        return "video." + key.removeprefix("vision_encoder.")
    if key.startswith("text_encoder.bert."):
        return "text." + key.removeprefix("text_encoder.bert.")
    if key.startswith("text_encoder."):
        return "text." + key.removeprefix("text_encoder.")
    return key


def exercise(model: RetrievalModel, frames: int, size: int) -> None:
    """encode_texts / encode_video / match_score run and give sane shapes."""
    video = torch.randn(2, 3, frames, size, size)
    with torch.no_grad():
        v = model.encode_video(video)
        t = model.encode_texts(["a man is cooking", "a dog runs on the beach"])
        sim = model.similarity(t["feat"], v["feat"])
        match = model.match_score(v["tokens"], t["hidden"], t["mask"])
    assert v["feat"].shape[-1] == EMBED and sim.shape == (2, 2) and match.shape == (2,)
    assert torch.isfinite(sim).all() and torch.isfinite(match).all()


# --------------------------------------------------------------------------- VideoMamba


def test_videomamba_full_checkpoint_converts_every_key(tmp_path, tokenizer_dir, caplog):
    sd = videomamba_checkpoint()
    # the fake uses the official names (spot check against the spec)
    for key in ("text_encoder.bert.encoder.layer.2.crossattention.self.query.weight",
                "text_encoder.bert.encoder.layer.3.crossattention.output.LayerNorm.bias",
                "text_encoder.bert.encoder.layer.0.attention.self.key.weight",
                "vision_encoder.layers.0.mixer.A_b_log", "vision_encoder.clip_decoder.0.head.weight"):
        assert key in sd
    assert "text_encoder.bert.encoder.layer.1.crossattention.self.query.weight" not in sd
    caplog.set_level(logging.INFO, logger=CONVERT_LOG)
    out = convert_retrieval(save(tmp_path, sd), tmp_path / "model", tokenizer_dir)

    model = load_model(out)
    assert isinstance(model, RetrievalModel) and model.mlm_head is None
    assert model.text.fusion_layer == FUSION_LAYER and model.text.encoder_width == 32
    assert model.text.config.num_attention_heads == 2 and model.embed_dim == EMBED
    own = model.state_dict()
    converted = {k: v for k, v in sd.items() if k not in training_only_keys()}
    assert set(map(to_vtr_key, converted)) == set(own)  # nothing left over on either side
    for key, value in converted.items():
        torch.testing.assert_close(own[to_vtr_key(key)], value, rtol=0, atol=0)
    assert all((out / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))
    exercise(model, frames=4, size=32)

    # the dropped parts are named in the log and recorded in the model directory
    text = caplog.text
    assert "CLIP teacher" in text and "MLM head" in text and "clip_teacher.proj" in text
    summary = dropped_summary(out)
    assert summary["CLIP teacher (UTA distillation)"] == 2 and summary["MLM head"] == 7
    assert summary["BERT pooler (NSP)"] == 2 and summary["BERT id buffers"] == 1


def test_fine_tuned_naming_without_bert_prefix(tmp_path, tokenizer_dir):
    """Fine-tuned official checkpoints hold BertModel keys: ``text_encoder.embeddings...``."""
    sd = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in videomamba_checkpoint().items()}
    model = load_model(convert_retrieval(save(tmp_path, sd), tmp_path / "m", tokenizer_dir, num_frames=8))
    key = "text_encoder.encoder.layer.3.crossattention.self.value.weight"
    torch.testing.assert_close(model.state_dict()[to_vtr_key(key)], sd[key], rtol=0, atol=0)
    assert model.video.num_frames == 8  # temporal position embeddings re-sampled


def test_unknown_key_fails_naming_it(tmp_path, tokenizer_dir):
    sd = videomamba_checkpoint()
    sd["text_encoder.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    sd["momentum_queue"] = torch.zeros(4, 2)
    with pytest.raises(CheckpointError) as err:
        convert_retrieval(save(tmp_path, sd), tmp_path / "m", tokenizer_dir)
    msg = str(err.value)
    assert "momentum_queue" in msg and "layer.0.attention.self.rotary.weight" in msg
    assert not (tmp_path / "m" / "config.json").exists()


def test_missing_key_fails_naming_it(tmp_path, tokenizer_dir):
    sd = videomamba_checkpoint()
    del sd["text_encoder.bert.encoder.layer.3.crossattention.self.value.bias"]
    del sd["itm_head.bias"]
    with pytest.raises(CheckpointError) as err:
        convert_retrieval(save(tmp_path, sd), tmp_path / "m", tokenizer_dir)
    msg = str(err.value)
    assert "missing keys" in msg and "text.encoder.layer.3.crossattention.self.value.bias" in msg
    assert "itm_head.bias" in msg
    assert not (tmp_path / "m" / "config.json").exists()


def test_cross_attention_width_must_match_the_vision_encoder(tmp_path, tokenizer_dir):
    sd = {**videomamba_checkpoint(), **text_keys(48)}
    with pytest.raises(CheckpointError, match="48-wide vision tokens but the vision encoder is 32 wide"):
        convert_retrieval(save(tmp_path, sd), tmp_path / "m", tokenizer_dir)


_SIDE_EFFECTS: list[str] = []


def _record(what: str) -> str:
    _SIDE_EFFECTS.append(what)
    return what


class TrainingConfig(dict):
    """Like the official EasyDict-based config saved beside the weights."""

    def __reduce__(self):
        return (_record, ("unpickling ran checkpoint code",))


def test_training_metadata_beside_the_weights_is_ignored(tmp_path, tokenizer_dir):
    sd = videomamba_checkpoint()
    path = save(tmp_path, sd, config=TrainingConfig(lr=1e-4), optimizer={"state": {}, "param_groups": [{"lr": 1.0}]},
                np_scalar=np.float64(0.5))
    state = load_checkpoint(path)
    assert not _SIDE_EFFECTS  # the foreign callable was never called
    assert set(state) == set(sd)
    convert_retrieval(path, tmp_path / "m", tokenizer_dir)
    assert not _SIDE_EFFECTS


def test_cli_whole_model_and_errors(tmp_path, tokenizer_dir):
    ckpt = save(tmp_path, videomamba_checkpoint())
    runner = CliRunner()
    base = ["convert", "-c", str(ckpt), "-o"]
    res = runner.invoke(app, base + [str(tmp_path / "none")])
    assert res.exit_code == 2 and "--tokenizer" in res.output and "--vision-only" in res.output
    assert not (tmp_path / "none").exists()

    res = runner.invoke(app, base + [str(tmp_path / "full"), "--tokenizer", str(tokenizer_dir)])
    assert res.exit_code == 0, res.output
    assert "retrieval model" in res.output and "fusion from layer 2" in res.output and "CLIP teacher" in res.output
    assert isinstance(load_model(tmp_path / "full"), RetrievalModel)

    res = runner.invoke(app, base + [str(tmp_path / "vision"), "--vision-only"])
    assert res.exit_code == 0, res.output
    assert not isinstance(load_model(tmp_path / "vision"), RetrievalModel)

    res = runner.invoke(app, base + [str(tmp_path / "x"), "--tokenizer", str(tmp_path / "no-such-bert")])
    assert res.exit_code == 2 and "tokenizer directory not found" in res.output

    vision_only = {k: v for k, v in videomamba_checkpoint().items() if k.startswith("vision_encoder.")}
    res = runner.invoke(app, ["convert", "-c", str(save(tmp_path, vision_only, "v.pth")), "-o", str(tmp_path / "y"),
                              "--tokenizer", str(tokenizer_dir)])
    assert res.exit_code == 2 and "holds no text encoder" in res.output


# --------------------------------------------------------------------------- UMT


def _sincos_numpy(positions: int, dim: int) -> np.ndarray:
    """The Transformer sinusoid table, written independently of vtr's implementation."""
    table = np.array([[p / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for p in range(positions)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


def umt_reference(sd: dict[str, torch.Tensor], video: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UMT's vision forward from the published facts, straight from the UMT-named tensors:
    (patch tokens after the final norm [B, T*N, D], pool_norm of the per-frame mean [B, T, D])."""
    x = F.conv3d(video, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"],
                 stride=(1, UMT_PATCH, UMT_PATCH))
    b, d, t = x.shape[:3]
    x = x.flatten(2).transpose(1, 2)
    x = x + torch.from_numpy(_sincos_numpy(x.shape[1], d)).float()
    hd = d // heads
    for i in range(UMT_DEPTH):
        p = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(d), sd[p + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], bias).reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, -1, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h
    x = F.layer_norm(x, (d,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], eps=1e-6)
    pooled = F.layer_norm(x.reshape(b, t, -1, d).mean(2), (d,), sd["pool_norm.weight"], sd["pool_norm.bias"], eps=1e-6)
    return x, pooled


def test_umt_full_checkpoint_maps_onto_joint_vit(tmp_path, tokenizer_dir, caplog):
    sd = umt_checkpoint()
    caplog.set_level(logging.INFO, logger=CONVERT_LOG)
    out = convert_retrieval(save(tmp_path, sd), tmp_path / "umt", tokenizer_dir, fmt="umt")
    model = load_model(out)
    video_cfg = json.loads((out / "config.json").read_text())["model"]["video"]
    assert video_cfg["arch"] == "joint_vit" and video_cfg["num_heads"] == 2 and video_cfg["num_frames"] == UMT_FRAMES
    assert not model.video.has_cls_token and model.keep_temporal
    assert "cls_token" not in model.video.state_dict() and "spatial_pos_embed" not in model.video.state_dict()

    own = model.state_dict()
    vision = umt_vision_keys()
    for i in range(UMT_DEPTH):
        q, v = vision[f"encoder.blocks.{i}.attn.q_bias"], vision[f"encoder.blocks.{i}.attn.v_bias"]
        torch.testing.assert_close(own[f"video.blocks.{i}.attn.qkv.bias"], torch.cat([q, torch.zeros_like(q), v]))
        torch.testing.assert_close(own[f"video.blocks.{i}.attn.qkv.weight"], vision[f"encoder.blocks.{i}.attn.qkv.weight"])
        torch.testing.assert_close(own[f"video.blocks.{i}.mlp.fc2.bias"], vision[f"encoder.blocks.{i}.mlp.fc2.bias"])
    torch.testing.assert_close(own["video.patch_embed.weight"], vision["encoder.patch_embed.proj.weight"])
    torch.testing.assert_close(own["video.norm.weight"], vision["encoder.norm.weight"])
    torch.testing.assert_close(own["video.pool_norm.bias"], vision["pool_norm.bias"])
    for key, value in {**text_keys(UMT_DIM), **head_keys(UMT_DIM)}.items():
        torch.testing.assert_close(own[to_vtr_key(key)], value, rtol=0, atol=0)

    # the converted joint_vit computes what UMT computes with those weights
    video = torch.randn(2, 3, UMT_FRAMES, 224, 224)
    with torch.no_grad():
        got = model.video(video)
        tokens, pooled = umt_reference(vision, video, heads=2)
    torch.testing.assert_close(got["tokens"], tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["pooled"], pooled, rtol=1e-4, atol=1e-4)
    exercise(model, frames=UMT_FRAMES, size=224)
    assert dropped_summary(out)["UMT distillation decoder"] == 4 and "clip_decoder.0.head.weight" in caplog.text


def test_umt_unknown_and_missing_vision_keys(tmp_path, tokenizer_dir):
    sd = umt_checkpoint()
    sd["vision_encoder.encoder.blocks.0.gamma_1"] = torch.ones(UMT_DIM)  # layer scale: no slot in joint_vit
    with pytest.raises(CheckpointError, match=r"vision_encoder\.encoder\.blocks\.0\.gamma_1"):
        convert_retrieval(save(tmp_path, sd), tmp_path / "m", tokenizer_dir, fmt="umt")
    sd = umt_checkpoint()
    del sd["vision_encoder.encoder.blocks.1.attn.v_bias"]
    with pytest.raises(CheckpointError, match=r"encoder\.blocks\.1\.attn\.v_bias is missing"):
        convert_retrieval(save(tmp_path, sd), tmp_path / "m", tokenizer_dir, fmt="umt")
    sd = umt_checkpoint()
    del sd["vision_encoder.encoder.blocks.1.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys.*video\.blocks\.1\.mlp\.fc1\.bias"):
        convert_retrieval(save(tmp_path, sd), tmp_path / "m", tokenizer_dir, fmt="umt")
    with pytest.raises(CheckpointError, match="not a UMT vision encoder"):
        convert_retrieval(save(tmp_path, videomamba_checkpoint()), tmp_path / "m", tokenizer_dir, fmt="umt")


def test_umt_cli(tmp_path, tokenizer_dir):
    ckpt = save(tmp_path, umt_checkpoint())
    runner = CliRunner()
    res = runner.invoke(app, ["convert", "--format", "umt", "-c", str(ckpt), "-o", str(tmp_path / "m"),
                              "--tokenizer", str(tokenizer_dir), "--num-frames", "8"])
    assert res.exit_code == 0, res.output
    assert "joint_vit D=128 depth=2 frames=8" in res.output and "UMT distillation decoder (4)" in res.output
    model = load_model(tmp_path / "m")
    assert model.video.pos_table.shape == (1, 8 * (224 // UMT_PATCH) ** 2, UMT_DIM)
    res = runner.invoke(app, ["convert", "--format", "umt", "-c", str(ckpt), "-o", str(tmp_path / "v"), "--vision-only"])
    assert res.exit_code == 0, res.output
    assert "joint_vit D=128 depth=2 frames=4" in res.output
    res = runner.invoke(app, ["convert", "--format", "umt", "-c", str(ckpt), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--tokenizer" in res.output
    res = runner.invoke(app, ["convert", "--format", "xclip", "-c", str(ckpt), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "videomamba, umt" in res.output


def test_sincos_table_matches_the_numpy_formula():
    from retrieval.models.layers import sincos_table

    assert math.isclose(float(sincos_table(3, 8)[1, 0]), math.sin(1.0), rel_tol=1e-6)
    np.testing.assert_allclose(sincos_table(50, 12).numpy(), _sincos_numpy(50, 12), rtol=1e-6, atol=1e-7)
