"""The retrieval model: encoders, scores, and the model directory round trip."""
import pytest
import torch

from retrieval import load_model
from retrieval.models.dual import RetrievalModel, build_retrieval_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_retrieval_model("videomamba_tiny_test", embed_dim=24, num_fusion_layers=1).eval()


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
    torch.testing.assert_close(clip.norm(dim=-1), torch.ones(3))
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
