"""Does the backbone see time? The demo recipe trained with VideoMamba and with a frame-mean CLIP ViT.

Both runs use ``configs/train/demo.yaml`` unchanged except ``model.video`` (``videomamba_demo``
vs ``frame_clip_demo``, about the same size), on the same synthetic corpus, and are evaluated
on its held-out test split with ITC scores:

* ``t2v_R@1`` over all 100 test captions;
* on the *direction twins* (test clips whose frames are exactly the time-reverse of another test
  clip's: left/right, up/down, clockwise/counter-clockwise, growing/shrinking):
  ``twin_R@1`` and ``twin_pair_acc``, the share of twin captions scored higher against their
  own clip than against its reversed twin. A model that ignores frame order scores both clips
  of a pair the same, so its pair accuracy is 0.5 at best (ties count as failures).

    python bench/direction_gap.py                      # generates the demo corpus in a temp dir
    python bench/direction_gap.py --corpus runs/demo/corpus
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.record import Recorder, add_output_argument
from retrieval.data.corpora import load_corpus
from retrieval.data.synthetic import generate_corpus
from retrieval.eval.retrieval import embed_corpus
from retrieval.models.model_dir import load_model
from retrieval.models.retrieval_model import RetrievalModel
from retrieval.train.loop import train
from retrieval.train.recipe import load_recipe

THREADS = 2


def direction_scores(model: RetrievalModel, corpus_dir: Path) -> dict[str, float]:
    """ITC t2v R@1 overall and on the direction twins of ``corpus_dir``'s test split."""
    ann = json.loads((corpus_dir / "test.json").read_text())
    corpus = load_corpus("generic", corpus_dir / "test.json", corpus_dir / "videos")
    index = {item.video: i for i, item in enumerate(corpus.items)}
    with torch.inference_mode():
        video = embed_corpus(model, corpus, batch_size=16, progress=False, with_tokens=False)["feat"]
        text = model.encode_texts([entry["caption"] for entry in ann])["feat"]
        sim = RetrievalModel.similarity(text, torch.as_tensor(video))     # [captions, videos]
    gt = torch.tensor([index[entry["video"]] for entry in ann])
    top1 = sim.argmax(1) == gt
    twins = [(q, index[entry["attributes"]["direction_twin"]]) for q, entry in enumerate(ann)
             if entry["attributes"].get("direction_twin")]
    pair_ok = [bool(sim[q, gt[q]] > sim[q, twin]) for q, twin in twins]
    return {
        "t2v_R@1": round(100 * top1.float().mean().item(), 1),
        "twins": len(twins),
        "twin_R@1": round(100 * sum(bool(top1[q]) for q, _ in twins) / max(1, len(twins)), 1),
        "twin_pair_acc": round(sum(pair_ok) / max(1, len(pair_ok)), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="a synthetic corpus (default: generate the demo's)")
    parser.add_argument("--models", default="videomamba_demo,frame_clip_demo")
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "train" / "demo.yaml")
    add_output_argument(parser, "direction_gap")
    args = parser.parse_args(argv)
    results = Recorder(args.output, append=args.append)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = args.corpus
        if corpus is None:
            corpus = tmp / "corpus"
            generate_corpus(corpus, n_train=600, n_test=100, seed=0, size=128, long_videos=0, progress=False)
        for name in args.models.split(","):
            recipe = load_recipe(args.recipe, [f"model.video={name}", f"data.train={corpus / 'train.json'}",
                                               f"data.videos={corpus / 'videos'}", f"run.out={tmp / name}",
                                               "run.progress=false"])
            started = time.perf_counter()
            model = load_model(train(recipe)).eval()
            seconds = time.perf_counter() - started
            row = {"bench": "direction_gap", "video_model": name, "steps": recipe.optim.steps,
                   "train_s": round(seconds, 1), "threads": THREADS, **direction_scores(model, corpus)}
            results.add(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
