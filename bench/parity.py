"""Parity of converted official checkpoints with their authors' code (the committed fixtures).

Each fixture under tests/models/fixtures holds a tiny random model's official state dict, an input,
and what the authors' code computed for it on CPU (see the test beside each fixture). This loads
the state dict through vtr's converter, runs vtr's model with every scan backend and prints the
largest absolute difference per output, one JSON line per (model, backend).

    python bench/parity.py --output bench/results/parity.jsonl
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument

from retrieval.models.convert import convert_videomamba
from retrieval.models.convert_timesformer_uniformer_vim import convert_uniformer, convert_vim
from retrieval.models.model_dir import load_model
from retrieval.models.ssm import fused_mixer_available

FIX = ROOT / "tests" / "models" / "fixtures"


def _split(path: Path, prefix: str):
    data = load_file(str(path))
    state = {k[len(prefix) + 6:]: v for k, v in data.items() if k.startswith(prefix + "state.")}
    ref = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix) and not k.startswith(prefix + "state.")}
    return state, ref


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{(a - b).abs().max().item():.3g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_argument(ap, "parity")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    backends = ["ref"] + (["cpu"] if fused_mixer_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        for layout in ("v1", "v2"):
            state, ref = _split(FIX / "videomambapro_official.safetensors", f"{layout}.")
            torch.save(state, tmp / f"pro_{layout}.pth")
            model = load_model(convert_videomamba(tmp / f"pro_{layout}.pth", tmp / f"pro_{layout}", variant="pro"))
            for be in backends:
                for layer in model.layers:
                    layer.mixer.scan_backend = be
                tokens = model(ref["video"])["tokens"]
                rows.append({"model": f"videomambapro_{layout}", "backend": be, "tokens": _err(tokens, ref["tokens"]),
                             "cls": _err(tokens[:, 0], ref["cls"]),
                             "logits": _err(model.classify(ref["video"]), ref["logits"])})
        for name in ("vim", "vimplus"):
            state, ref = _split(FIX / "vim_official.safetensors", f"{name}.")
            torch.save(state, tmp / f"{name}.pth")
            model = load_model(convert_vim(tmp / f"{name}.pth", tmp / name, img_size=32))
            for be in backends:
                for layer in model.layers:
                    layer.mixer.scan_backend = be
                rows.append({"model": name, "backend": be, "feature": _err(model(ref["image"])["pooled"], ref["feature"]),
                             "logits": _err(model.classify(ref["image"]), ref["logits"])})
        state, ref = _split(FIX / "uniformer_official.safetensors", "")
        torch.save({"model_state": state}, tmp / "uniformer.pyth")
        model = load_model(convert_uniformer(tmp / "uniformer.pyth", tmp / "uniformer", head_dim=16))
        out = model(ref["video"])
        rows.append({"model": "uniformer", "backend": "-", "tokens": _err(out["tokens"], ref["tokens"]),
                     "pooled": _err(out["pooled"], ref["pooled"]), "logits": _err(model.classify(ref["video"]),
                                                                                ref["logits"])})
    results = Recorder(args.output, append=args.append)
    for row in rows:
        results.add({"bench": "parity", **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
