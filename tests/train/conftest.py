import pytest

from retrieval.data.synthetic import generate_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, n_train=16, n_test=8, size=32, long_videos=0, progress=False)
    return out


def tiny_overrides(corpus, out, **extra):
    base = {
        "model.video": "videomamba_tiny_test", "model.embed_dim": 16, "model.num_fusion_layers": 1,
        "model.text_dropout": 0.0, "data.train": str(corpus / "train.json"), "data.videos": str(corpus / "videos"),
        "data.cache": True, "optim.batch_size": 4, "optim.steps": 6, "optim.warmup_steps": 2,
        "run.out": str(out), "run.save_every": 3, "run.log_every": 1, "run.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
