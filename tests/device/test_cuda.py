"""CUDA-only checks (marker ``cuda``): they run wherever a CUDA device is visible,
e.g. ``pytest -m cuda tests/device`` on a GPU machine; bench/tools/gpu_check.py measures the same paths."""
import pytest
import torch

from retrieval.models.retrieval_model import build_retrieval_model
from retrieval.models.ssm import selective_scan

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _has_mamba_ssm() -> bool:
    from retrieval.models.ssm import cuda_available

    return cuda_available()


def test_model_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_retrieval_model("videomamba_tiny_test", embed_dim=16, num_fusion_layers=1).eval()
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        cpu = model.encode_video(video)["feat"]
        text_cpu = model.encode_texts(["a red circle"])["feat"]
        model.cuda()
        gpu = model.encode_video(video.cuda())["feat"]
        text_gpu = model.encode_texts(["a red circle"])["feat"]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(text_gpu.cpu(), text_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mask_diag,h0", [(False, False), (True, False), (False, True)])
def test_cuda_scan_matches_the_cpu_kernel_forward_and_backward(mask_diag, h0):
    if not _has_mamba_ssm():
        pytest.skip("mamba-ssm is not installed (pip install 'vtr[cuda]')")
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 64, 16, 300
    x = dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) * 0.5,
             A=-torch.rand(d, n, generator=g) - 0.2, B=torch.randn(b, n, L, generator=g),
             C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g), z=torch.randn(b, d, L, generator=g),
             delta_bias=torch.randn(d, generator=g) * 0.1)
    state = torch.randn(b, d, n, generator=g) if h0 else None
    outs, grads = {}, {}
    for dev, backend in (("cpu", "cpu"), ("cuda", "cuda")):
        leaves = {k: v.to(dev).requires_grad_() for k, v in x.items()}
        out = selective_scan(**leaves, delta_softplus=True, initial_state=None if state is None else state.to(dev),
                             mask_diag=mask_diag, backend=backend)
        out.square().sum().backward()
        outs[dev] = out.detach().cpu()
        grads[dev] = {k: v.grad.cpu() for k, v in leaves.items()}
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-3, atol=1e-3)
    for k in x:
        torch.testing.assert_close(grads["cuda"][k], grads["cpu"][k], rtol=1e-2, atol=1e-2, msg=k)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_on_cuda(precision, tmp_path):
    from retrieval.data.synthetic import generate_corpus
    from retrieval.train.loop import STATE_FILE, train
    from retrieval.train.recipe import load_recipe

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, n_train=8, n_test=2, size=32, long_videos=0, progress=False)
    recipe = load_recipe(None, [f"data.train={corpus / 'train.json'}", f"data.videos={corpus / 'videos'}",
                                "model.video=videomamba_tiny_test", "model.embed_dim=16", "model.num_fusion_layers=1",
                                "optim.batch_size=4", "optim.steps=3", "optim.warmup_steps=1", "loss.vtm=1.0",
                                "loss.mlm=0.5", f"run.out={tmp_path / 'run'}", "run.progress=false",
                                "run.device=cuda", f"run.precision={precision}"])
    train(recipe)
    state = torch.load(tmp_path / "run" / "checkpoint" / STATE_FILE, weights_only=True)
    assert ("scaler" in state) == (precision == "fp16")   # fp16 trains with a gradient scaler
    assert "cuda_rng" in state
