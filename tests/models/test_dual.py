"""The retrieval model: encoders, scores, and the model directory round trip."""
import pytest
import torch

from retrieval import load_model
from retrieval.models.retrieval_model import RetrievalModel


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model().eval()


def test_encode_and_similarity_shapes(model):
    video = torch.randn(3, 3, 4, 32, 32)
    with torch.no_grad():
        v = model.encode_video(video)
        t = model.encode_texts(["a red circle moving left", "a blue square", "a star"])
    assert v["feat"].shape == (3, 4, 24) and v["tokens"].shape == (3, 16, 32)
    torch.testing.assert_close(v["feat"].norm(dim=-1), torch.ones(3, 4))
    sim = model.similarity(t["feat"], v["feat"])
    assert sim.shape == (3, 3)
    # per-frame cosine averaged over frames
    expect = torch.stack([torch.stack([(t["feat"][i] * v["feat"][j]).sum(-1).mean() for j in range(3)]) for i in range(3)])
    torch.testing.assert_close(sim, expect)
    clip = RetrievalModel.clip_vector(v["feat"])
    # the index vector: mean of the unit frame vectors, not renormalised, so its inner product
    # with a unit text vector is exactly the evaluation score
    assert (clip.norm(dim=-1) <= 1 + 1e-6).all() and (clip.norm(dim=-1) < 0.99).any()
    torch.testing.assert_close(t["feat"] @ clip.t(), sim)
    with torch.no_grad():
        m = model.match_score(v["tokens"], t["hidden"], t["mask"])
    assert m.shape == (3,)


def test_save_and_load_roundtrip(model, tmp_path):
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, RetrievalModel)
    video = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        a = model.encode_video(video)["feat"]
        b = loaded.encode_video(video)["feat"]
        ta = model.encode_texts(["one green triangle going up"])["feat"]
        tb = loaded.encode_texts(["one green triangle going up"])["feat"]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ta, tb)
    # the MLM decoder stays tied to the word embeddings after loading
    assert loaded.mlm_head.predictions.decoder.weight.data_ptr() == loaded.text.embeddings.word_embeddings.weight.data_ptr()


def test_empty_query_is_an_error(model):
    with pytest.raises(ValueError, match="empty"):
        model.encode_texts(["   ...  "])


def test_mean_text_pooling_is_the_masked_mean_and_survives_saving(tiny_model, tmp_path):
    m = tiny_model(text_pooling="mean").eval()
    texts = ["a red circle", "one small green triangle moving up on a dark background"]
    with torch.no_grad():
        out = m.encode_texts(texts)
        ids, mask = m.tokenize(texts)
        hidden = m.text(ids, mask, mode="text")
        n = int(mask[0].sum())                       # the short text is padded: padding must not count
        expect = torch.nn.functional.normalize(m.text_proj(hidden[0, :n].mean(0)), dim=-1)
    torch.testing.assert_close(out["feat"][0], expect)
    m.save(tmp_path / "mean")
    loaded = load_model(tmp_path / "mean")
    assert loaded.text_pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_texts(texts)["feat"], out["feat"])
    with pytest.raises(ValueError, match="text_pooling"):
        tiny_model(text_pooling="max")


def test_text_can_resume_from_a_cached_layer(model):
    ids, mask = model.tokenize(["a blue square growing", "a star"])
    with torch.no_grad():
        full = model.encode_text(ids, mask)
        h = model.text.embeddings(input_ids=ids)
        for layer in model.text.encoder.layer[:2]:
            h = layer(h, mask.bool(), None, None)
        resumed = model.encode_text(None, mask, hidden=h, start_layer=2)
    torch.testing.assert_close(resumed["feat"], full["feat"])
    torch.testing.assert_close(resumed["hidden"], full["hidden"])
    with pytest.raises(ValueError, match="start_layer"):
        model.text(attention_mask=mask, mode="text", hidden_states=h, start_layer=model.text.fusion_layer + 1)
    with pytest.raises(ValueError, match="start_layer"):
        model.text(ids, mask, mode="text", start_layer=1)


def test_an_untrained_matching_head_is_recorded_and_not_used(tiny_model, tmp_path):
    from retrieval.eval.retrieval import has_itm_head

    m = tiny_model()
    assert m.matching_trained and has_itm_head(m)
    m.matching_trained = False
    m.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.matching_trained is False and not has_itm_head(loaded)


def test_video_options_survive_saving(tiny_model, tmp_path):
    """Non-official encoder options (the demo model's stem and max pooling) are part of the
    saved config: the loaded model has the same parameters and computes the same features."""
    m = tiny_model(with_mlm=False, video_overrides={"stem_channels": [8, 16], "stem_kernel_t": 3,
                                                    "patch_pool": "max", "tubelet_size": 2}).eval()
    m.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.video.patch_embed.stem is not None and loaded.video.patch_pool == "max"
    assert loaded.video.tubelet_size == 2
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(video)["feat"], m.encode_video(video)["feat"])
