"""Model directories: tied weights stored once, strict loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from retrieval import load_model
from retrieval.models.model_dir import ModelDirError, model_identity

DECODER = "mlm_head.predictions.decoder"
WORDS = "text.embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(with_mlm=True).eval()


def _stored_names(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as fh:
        return set(fh.keys())


def _mlm_logits(m, text: str = "one green triangle going up") -> torch.Tensor:
    ids, mask = m.tokenize([text])
    with torch.no_grad():
        return m.mlm_head(m.text(ids, mask, mode="text"))


def _assert_tied(m) -> None:
    predictions = m.mlm_head.predictions
    assert predictions.decoder.weight is m.text.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias


def _assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(_mlm_logits(a), _mlm_logits(b), rtol=0, atol=0)


def test_tied_weights_are_stored_once_and_tied_again_after_loading(model, tmp_path):
    _assert_tied(model)
    out = model.save(tmp_path / "m")
    stored = _stored_names(out)
    # each tie is one tensor in the file, under one of its names
    assert len({f"{DECODER}.weight", WORDS} & stored) == 1
    assert len({f"{DECODER}.bias", "mlm_head.predictions.bias"} & stored) == 1
    assert stored | {f"{DECODER}.weight", WORDS, f"{DECODER}.bias", "mlm_head.predictions.bias"} == set(model.state_dict())
    assert "tied" not in json.loads((out / "config.json").read_text())

    loaded = load_model(out)
    _assert_same_model(model, loaded)
    _assert_tied(loaded)
    # training keeps the tie: a step on the MLM loss moves the word embeddings and the decoder together
    loaded.train()
    opt = torch.optim.SGD(loaded.mlm_head.parameters(), lr=1.0)
    before = loaded.text.embeddings.word_embeddings.weight.detach().clone()
    _mlm_loss(loaded).backward()
    opt.step()
    words = loaded.text.embeddings.word_embeddings.weight
    assert not torch.equal(words.detach(), before)
    assert loaded.mlm_head.predictions.decoder.weight.data_ptr() == words.data_ptr()


def _mlm_loss(m) -> torch.Tensor:
    ids, mask = m.tokenize(["a red circle moving left"])
    logits = m.mlm_head(m.text(ids, mask, mode="text"))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def test_strict_loading_lists_missing_unexpected_and_wrong_shapes(model, tmp_path):
    out = model.save(tmp_path / "m")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in (WORDS, f"{DECODER}.bias")}
    state.pop("itm_head.bias")
    state["extra.weight"] = torch.zeros(2)
    state["vision_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ModelDirError) as info:
        load_model(out)
    message = str(info.value)
    assert "the weights do not match the architecture" in message
    assert "missing keys: itm_head.bias" in message          # the tied names the file lacks are not missing
    assert "unexpected keys: extra.weight" in message
    assert "wrong shape keys: vision_proj.weight: checkpoint (3, 3) vs model (24, 32)" in message


def test_caption_cleaning_is_the_model_directorys_setting(model, tmp_path):
    """Recorded in config.json, "umt" for directories written before the setting existed, and an
    unknown rule is refused when the directory is read, not silently replaced."""
    assert model.text_cleaning == "umt"
    model.text_cleaning = "strip_punctuation"
    try:
        out = model.save(tmp_path / "legacy")
    finally:
        model.text_cleaning = "umt"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["text_cleaning"] == "strip_punctuation"
    loaded = load_model(out)
    assert loaded.text_cleaning == "strip_punctuation" and model_identity(out)["text_cleaning"] == "strip_punctuation"
    ids, _ = loaded.tokenize(["A & B"])
    assert ids.shape[1] == 4  # [CLS] a b [SEP]: the old rule dropped "&"

    del cfg["model"]["text_cleaning"]
    (out / "config.json").write_text(json.dumps(cfg))
    older = load_model(out)
    assert older.text_cleaning == "umt" and model_identity(out)["text_cleaning"] == "umt"
    assert older.tokenize(["A & B"])[0].shape[1] == 5  # "&" reaches the tokenizer, as in the official code

    cfg["model"]["text_cleaning"] = "clip"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown caption cleaning 'clip'"):
        load_model(out)
