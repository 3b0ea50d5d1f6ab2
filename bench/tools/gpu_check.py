"""The CUDA check: one command for a machine with a GPU (the CUDA path is untested on hardware
until this has run there).

    pip install -e '.[cuda,gpu]'         # mamba-ssm (+ causal-conv1d) and faiss-gpu, optional
    python bench/tools/gpu_check.py            # ~5-10 minutes on one GPU

Steps, each one JSON line (also written to ``bench/results/gpu_check.jsonl``); a failing step is
reported with its error and the rest still run; exit status 1 if any step failed:

1. ``scan``: the selective scan on CUDA (mamba-ssm's kernel when installed, else the sequential
   reference; the line names which) against the fused CPU kernel, forward and backward, plain and
   with each VideoMambaPro option (mask_diag, initial state), at VideoMamba-Ti's width and an
   8x224 sequence: max errors and seconds.
2. ``encoder``: VideoMamba-Ti 8x224 clips/s on the GPU in fp32 and bf16, and bf16's cosine to fp32.
3. ``train``: 20 steps of the demo recipe on ``cuda`` (bf16 autocast) on a freshly generated
   synthetic corpus: samples/s and the loss trajectory.
4. ``eval``: the trained model's retrieval on the test split, fp32 and bf16 on the GPU (R@1 and
   clips/s).
5. ``index``: indexing the test split on the GPU: clips/s; the published index is a CPU FAISS
   index on disk either way.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from bench.record import Recorder, add_output_argument


def _sync():
    torch.cuda.synchronize()


def step_scan(dev) -> list[dict]:
    from retrieval.models.ssm import cuda_available, selective_scan

    backend = "cuda" if cuda_available() else "ref"
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 1, 768, 16, 1569          # VideoMamba-Ti: d_inner 2*384, 8x224 -> 1 + 8*196 tokens
    base = dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) * 0.5,
                A=-torch.rand(d, n, generator=g) - 0.2, B=torch.randn(b, n, L, generator=g),
                C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g),
                z=torch.randn(b, d, L, generator=g), delta_bias=torch.randn(d, generator=g) * 0.1)
    h0 = torch.randn(b, d, n, generator=g)
    rows = []
    for option in ("plain", "mask_diag", "initial_state"):
        kwargs = {"mask_diag": option == "mask_diag", "initial_state": h0 if option == "initial_state" else None}
        res = {}
        for where, be in (("cpu", "cpu"), (dev, backend)):
            leaves = {k: v.detach().clone().to(where).requires_grad_() for k, v in base.items()}
            kw = {**kwargs, "initial_state": None if kwargs["initial_state"] is None else kwargs["initial_state"].to(where)}
            if where != "cpu":
                _sync()
            t0 = time.perf_counter()
            out = selective_scan(**leaves, delta_softplus=True, backend=be, **kw)
            out.square().mean().backward()
            if where != "cpu":
                _sync()
            res[str(where)] = (time.perf_counter() - t0, out.detach().cpu(),
                               {k: v.grad.cpu() for k, v in leaves.items()})
        (t_cpu, o_cpu, g_cpu), (t_gpu, o_gpu, g_gpu) = res["cpu"], res[str(dev)]
        rows.append({"step": "scan", "option": option, "cuda_backend": backend, "shape": [b, d, L, n],
                     "fwd_max_abs_err": float((o_gpu - o_cpu).abs().max()),
                     "bwd_max_rel_err": max(float((g_gpu[k] - g_cpu[k]).abs().max() / (g_cpu[k].abs().max() + 1e-12))
                                            for k in g_cpu),
                     "cpu_fwd_bwd_s": round(t_cpu, 4), "cuda_fwd_bwd_s": round(t_gpu, 4)})
    return rows


def step_encoder(dev) -> list[dict]:
    import torch.nn.functional as F

    from retrieval.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("videomamba_tiny").eval().to(dev)
    video = torch.randn(8, 3, 8, 224, 224, device=dev)
    out = {}
    for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(video)
            _sync()
            t0 = time.perf_counter()
            for _ in range(5):
                feat = model(video)["pooled"]
            _sync()
        out[prec] = (5 * 8 / (time.perf_counter() - t0), feat.float())
    cos = F.cosine_similarity(out["bf16"][1].flatten(1), out["fp32"][1].flatten(1), dim=1)
    return [{"step": "encoder", "model": "videomamba_tiny", "batch": 8, "fp32_clips_per_s": round(out["fp32"][0], 1),
             "bf16_clips_per_s": round(out["bf16"][0], 1), "bf16_cos_min": round(float(cos.min()), 6)}]


def step_train(dev, work: Path) -> tuple[list[dict], Path]:
    from retrieval.data.synthetic import generate_corpus
    from retrieval.train.loop import train
    from retrieval.train.recipe import load_recipe

    corpus = work / "corpus"
    if not (corpus / "train.json").exists():
        generate_corpus(corpus, progress=False)
    recipe = load_recipe(ROOT / "configs/train/demo.yaml", [
        f"data.train={corpus / 'train.json'}", f"data.videos={corpus / 'videos'}", f"run.out={work / 'train'}",
        "optim.steps=20", "optim.warmup_steps=5", "run.log_every=5", "run.save_every=1000", f"run.device={dev}",
        "run.precision=bf16", "run.progress=false"])
    t0 = time.perf_counter()
    final = train(recipe)
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    return [{"step": "train", "recipe": "configs/train/demo.yaml (20 steps, bf16, cuda)", "seconds": round(seconds, 1),
             "samples_per_s": log[-1].get("samples_per_s"), "loss": [r["loss"] for r in log]}], final


def step_eval(dev, work: Path, model_dir: Path) -> list[dict]:
    from retrieval.data.corpora import load_corpus
    from retrieval.eval.retrieval import evaluate_retrieval
    from retrieval.models.model_dir import load_model

    corpus = load_corpus("generic", work / "corpus" / "test.json", work / "corpus" / "videos")
    rows = []
    for prec in ("fp32", "bf16"):
        model = load_model(model_dir, str(dev), prec)
        t0 = time.perf_counter()
        res = evaluate_retrieval(model, corpus, rerank_k=0, batch_size=16, progress=False)
        rows.append({"step": "eval", "precision": prec, "seconds": round(time.perf_counter() - t0, 2),
                     "t2v_R@1": res.metrics["itc"]["t2v"]["R@1"], "v2t_R@1": res.metrics["itc"]["v2t"]["R@1"],
                     "clips_per_s": round(res.metrics["info"]["timing"].get("embed_clips_per_s", 0.0), 1)})
    return rows


def step_index(dev, work: Path, model_dir: Path) -> list[dict]:
    from indexer.jobs import JobSpec, run_index_job

    out = work / "index"
    spec = JobSpec(model_dir=model_dir, out=out, videos=work / "corpus" / "videos",
                   ann_file=work / "corpus" / "test.json")
    summary = run_index_job(spec, workers=4, batch_size=32, progress=False, device=str(dev), precision="bf16")
    return [{"step": "index", "precision": "bf16", "indexed": summary.indexed,
             "clips_per_s": round(summary.clips_per_second, 1), "published": str(summary.published)}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu_check")
    add_output_argument(parser, "gpu_check")
    args = parser.parse_args(argv)
    from retrieval.models.device import DeviceError, resolve_device

    try:
        dev = resolve_device(args.device)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dev.type != "cuda":
        print("error: bench/tools/gpu_check.py is for a CUDA machine (--device cuda[:N])", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    results, failed = Recorder(args.output, append=args.append), False
    results.add({"step": "machine", "gpu": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda})
    model_dir = None

    def run(name, fn):
        nonlocal failed
        try:
            result = fn()
        except Exception as exc:  # report and go on: one broken step should not hide the others
            failed = True
            result = [{"step": name, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-2000:]}]
        for row in result:
            results.add(row)

    run("scan", lambda: step_scan(dev))
    run("encoder", lambda: step_encoder(dev))

    def train_step():
        nonlocal model_dir
        res, model_dir = step_train(dev, args.work)
        return res

    run("train", train_step)
    if model_dir is not None:
        run("eval", lambda: step_eval(dev, args.work, model_dir))
        run("index", lambda: step_index(dev, args.work, model_dir))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
