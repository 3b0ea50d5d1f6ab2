"""Device placement of the model-side code, checked on PyTorch's ``meta`` device.

On one CPU a placement test passes whatever the code does, since every tensor lands on the CPU
anyway. Here the model lives on ``meta`` while the batch, the tokenizer's ids and the random
generators stay on the host, as in training: any tensor the code creates on the CPU instead of
the model's device and then mixes with the model's raises "not on the expected device".
"""
import pytest
import torch

from retrieval.models.retrieval_model import build_retrieval_model
from retrieval.train import loop
from retrieval.train.losses import (
    SpecialTokenIds,
    teacher_guided_mask,
    uta_loss,
    visible_per_frame,
    visible_targets,
    vtc_loss,
)
from retrieval.train.recipe import load_recipe
from retrieval.train.teacher import CLIPTeacher

META = torch.device("meta")
CAPTIONS = ["a red circle moving left", "a blue square growing", "a green star", "a red circle moving left"]


@pytest.fixture(scope="module")
def meta_model():
    torch.manual_seed(0)
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=16, num_fusion_layers=1, with_mlm=True)
    return model.to(META)


def _recipe(**loss):
    over = [f"loss.{k}={v}" for k, v in loss.items()]
    return load_recipe(None, ["data.train=unused.json", *over])


def _batch():
    # host tensors, as the data loader produces them
    return torch.randn(4, 3, 4, 32, 32), CAPTIONS, torch.tensor([0, 1, 2, 0])


def test_the_mismatch_this_file_relies_on_is_caught_on_meta():
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(2, 3, device=META) + torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="device"):
        torch.nn.Linear(3, 2).to(META)(torch.ones(2, 3))


def test_training_step_with_vtc_vtm_mlm_on_the_model_device(meta_model):
    recipe = _recipe(vtc=1.0, vtm=1.0, mlm=0.5)
    special = SpecialTokenIds.from_tokenizer(meta_model.tokenizer)
    meta_model.train()
    losses = loop.compute_losses(meta_model, _batch(), recipe, special, None, torch.Generator().manual_seed(0))
    assert set(losses) == {"vtc", "vtm", "mlm", "loss"}
    for name, value in losses.items():
        assert value.device == META and value.shape == (), name
    losses["loss"].backward()
    grads = [p.grad for p in meta_model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.device == META for g in grads)
    meta_model.zero_grad(set_to_none=True)


def test_training_step_through_the_frozen_text_prefix(meta_model):
    recipe = _recipe(vtc=1.0, vtm=1.0, mlm=0.0)
    special = SpecialTokenIds.from_tokenizer(meta_model.tokenizer)
    prefix = loop.FrozenTextPrefix(meta_model, 1)
    losses = loop.compute_losses(meta_model, _batch(), recipe, special, None, torch.Generator().manual_seed(1),
                                 prefix)
    assert losses["loss"].device == META
    losses["loss"].backward()
    meta_model.zero_grad(set_to_none=True)


def test_encoders_itc_and_itm_scoring(meta_model):
    meta_model.eval()
    with torch.no_grad():
        video = meta_model.encode_video(torch.randn(2, 3, 4, 32, 32).to(META))
        text = meta_model.encode_texts(["a red circle", "a blue square"])
        itc = meta_model.similarity(text["feat"], video["feat"])
        itm = meta_model.match_score(video["tokens"], text["hidden"], text["mask"])
    assert video["feat"].device == text["feat"].device == itc.device == itm.device == META
    assert itc.shape == (2, 2) and itm.shape == (2,)
    meta_model.train()


def test_teacher_and_uta_on_the_model_device():
    from retrieval.models.registry import create_model

    teacher = CLIPTeacher(create_model("frame_clip_tiny_test").visual).to(META)
    video = torch.randn(2, 3, 4, 32, 32).to(META)
    taught = teacher(video)
    assert taught.targets.device == taught.attention.device == META
    t, n = taught.attention.shape[1:]
    mask = teacher_guided_mask(taught.attention, 0.5, torch.Generator().manual_seed(0))
    assert mask.device == META and mask.shape == (2, t * n)
    targets = visible_targets(taught.targets, mask, t * visible_per_frame(n, 0.5))
    assert targets.device == META and targets.shape[2] == 1 + t * visible_per_frame(n, 0.5)
    student = torch.randn(targets.shape).to(META).requires_grad_()
    loss = uta_loss(student, targets)
    assert loss.device == META
    loss.backward()


def test_vtc_loss_takes_host_indices(meta_model):
    feat = torch.randn(4, 8).to(META)
    loss = vtc_loss(feat, feat, torch.tensor([0, 1, 2, 0]), torch.tensor(0.07).to(META))
    assert loss.device == META
