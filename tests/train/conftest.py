import pytest
import torch

from retrieval import load_model
from retrieval.data.synthetic import generate_corpus
from retrieval.train import loop


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, n_train=16, n_test=8, size=32, long_videos=0, progress=False)
    return out


@pytest.fixture(scope="session")
def clip_teacher_file(tmp_path_factory):
    """A tiny open_clip ViT (2 blocks, 32 px, 8 px patches, 24-d output) saved as a local checkpoint
    file, as a real CLIP teacher is given: built from the test config, random weights."""
    from safetensors.torch import save_file

    from retrieval.models.registry import create_model

    torch.manual_seed(123)
    visual = create_model("frame_clip_tiny_test").visual
    with torch.no_grad():  # sharper attention than a random init gives, so the mask has a preference
        visual.transformer.resblocks[-1].attn.in_proj_weight[:32].mul_(6.0)
    path = tmp_path_factory.mktemp("teacher") / "clip_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(path))
    return path


def uta_overrides(teacher_file, **extra):
    """Recipe overrides for UTA with the tiny CLIP teacher: the student's patch grid (8 px) and its
    decoder width (24) match the teacher's."""
    return {"loss.uta": 1.0, "loss.uta_teacher": str(teacher_file), "loss.uta_teacher_arch": "frame_clip_tiny_test",
            "model.video_overrides": "{clip_output_dim: 24, patch_size: 8}", **extra}


def tiny_overrides(corpus, out, **extra):
    base = {
        "model.video": "videomamba_tiny_test", "model.embed_dim": 16, "model.num_fusion_layers": 1,
        "model.text_dropout": 0.0, "data.train": str(corpus / "train.json"), "data.videos": str(corpus / "videos"),
        "data.cache": True, "optim.batch_size": 4, "optim.steps": 6, "optim.warmup_steps": 2,
        "run.out": str(out), "run.save_every": 3, "run.log_every": 1, "run.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class Killed(RuntimeError):
    pass


def kill_and_resume(recipe, monkeypatch, die_in_step=5):
    """Train ``recipe``, kill the run in step ``die_in_step`` (after a checkpoint), resume it;
    returns the resumed run's final model."""
    real = loop.compute_losses
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == die_in_step:
            raise Killed()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_losses", dying)
    with pytest.raises(Killed):
        loop.train(recipe)
    monkeypatch.setattr(loop, "compute_losses", real)
    return load_model(loop.train(recipe, resume=True))


def assert_same_parameters(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
