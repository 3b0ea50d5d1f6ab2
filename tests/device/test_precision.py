"""bf16 inference keeps the features: cosine >= 0.999 against fp32 for VideoMamba-Ti/S/M,
TimeSformer-B and the text tower, on inputs with real pixel statistics (a photo pan and synthetic
corpus clips, normalised as each model expects; see retrieval/eval/precision.py). The encoders
keep their full width and depth with random weights, on 4 frames at 112 px to stay quick;
bench/precision.py measures the same at 8 x 224."""
import pytest
import torch

from retrieval.eval.precision import feature_cosine, realistic_clips, text_features, video_features
from retrieval.models.registry import create_model
from retrieval.models.retrieval_model import build_retrieval_model

THRESHOLD = 0.999


def test_photo_clip_has_natural_statistics():
    from retrieval.eval.precision import photo_pan_clip

    clip = photo_pan_clip({"num_frames": 4, "size": 64, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
    assert clip.shape == (3, 4, 64, 64)
    assert abs(float(clip.mean())) < 1.0 and 0.5 < float(clip.std()) < 2.0
    assert not torch.equal(clip[:, 0], clip[:, -1])   # the camera moves


@pytest.mark.slow
@pytest.mark.parametrize("name", ["videomamba_tiny", "videomamba_small", "videomamba_middle", "timesformer_base"])
def test_bf16_video_features_match_fp32(name):
    torch.manual_seed(0)
    net = create_model(name, num_frames=4, img_size=112).eval()
    clips = realistic_clips(net.preprocess, n=2)
    result = feature_cosine(video_features(net, clips), "bf16")
    assert result["cos_min"] >= THRESHOLD, result


def test_bf16_text_features_match_fp32():
    torch.manual_seed(0)
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=32, num_fusion_layers=1).eval()
    captions = ["a red circle moves to the left across a striped background",
                "two squares grow while a star spins", "someone slices a tomato on a wooden board",
                "a dog catches a frisbee in the park"]
    hidden = feature_cosine(text_features(model, captions), "bf16")
    assert hidden["cos_min"] >= THRESHOLD, hidden
    feat = feature_cosine(lambda: model.encode_texts(captions)["feat"], "bf16")
    assert feat["cos_min"] >= THRESHOLD, feat


def test_bf16_vs_fp32_is_measurable_at_all():
    """The check above could pass vacuously if autocast did nothing: it must change the numbers."""
    torch.manual_seed(0)
    net = create_model("videomamba_tiny_test").eval()
    clips = torch.randn(1, 3, 4, 32, 32)
    result = feature_cosine(video_features(net, clips), "bf16")
    assert result["max_abs_diff"] > 0


def test_embedding_projections_and_heads_stay_fp32_under_bf16(tiny_model):
    """The shared-space projections, the action head and the matching head run in fp32 inside
    autocast: bf16 rounding in them would reorder near-tied clips; the towers beneath still run
    in bf16."""
    model = tiny_model().eval()
    model.set_action_head(["a", "b", "c"])
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args[0].dtype, output.dtype)
        return hook

    for name in ("vision_proj", "text_proj", "action_head", "itm_head"):
        getattr(model, name).register_forward_hook(record(name))
    inner = next(m for m in model.video.modules() if isinstance(m, torch.nn.Linear))
    inner.register_forward_hook(lambda m, a, out: seen.__setitem__("tower", out.dtype))
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        video = model.encode_video(clips)
        text = model.encode_texts(["a red circle", "two green squares growing"])
        logits = model.action_logits(video["feat"])
        match = model.match_score(video["tokens"], text["hidden"], text["mask"])
    assert seen["tower"] == torch.bfloat16                  # the tower's own products ran in bf16
    assert match.dtype == torch.float32                     # ITM logits re-rank near-ties too
    for name in ("vision_proj", "text_proj", "action_head", "itm_head"):
        assert seen[name] == (torch.float32, torch.float32), (name, seen[name])
    assert video["feat"].dtype == text["feat"].dtype == logits.dtype == torch.float32
    vector = model.clip_vector(video["feat"]) * model.embed_dim ** 0.5
    with torch.inference_mode():                             # the same product as the plain fp32 layer
        torch.testing.assert_close(logits, model.action_head(vector), rtol=0, atol=0)


@pytest.mark.parametrize("frames", [None, 4])
def test_similarity_scores_are_fp32_under_bf16(frames):
    """Scores are compared with each other to rank: a clip and its time-reversed twin can score
    within 1e-3 of each other, which bf16 (8 significant bits) rounds to one value."""
    from retrieval.models.retrieval_model import RetrievalModel

    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    shape = (5, 64) if frames is None else (5, frames, 64)
    video = torch.nn.functional.normalize(torch.randn(*shape), dim=-1)
    video[1] = video[0] + 1e-3 * torch.nn.functional.normalize(torch.randn(*shape[1:]), dim=-1)
    reference = RetrievalModel.similarity(text, video)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = RetrievalModel.similarity(text.bfloat16(), video)
    assert scores.dtype == torch.float32
    # bf16 inputs widen exactly: the scores are those of the widened inputs, not bf16 products
    torch.testing.assert_close(scores, RetrievalModel.similarity(text.bfloat16().float(), video), rtol=0, atol=0)
    assert torch.equal(scores[:, 0] > scores[:, 1], reference[:, 0] > reference[:, 1])
    assert (scores[:, 0] != scores[:, 1]).all()
