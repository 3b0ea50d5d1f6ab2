"""Can a video backbone learn motion from the synthetic corpus? Supervised action classification.

The demo backbone (``videomamba_demo``) is trained from scratch with a linear head on the action
label of the one-object training clips of the synthetic corpus (cross-entropy, AdamW, one-cycle
schedule), then classifies the one-object *test* clips, whose colour-shape-action combinations
never occur in training. Each variant of the backbone (JSON overrides of its config) gets its own
run from the same seed; one JSON line per variant with train and held-out accuracy and the most
frequent confusions, saved to ``bench/results/action_probe.jsonl`` (``--output``).

This isolates the video side of the retrieval problem: no text tower, no contrastive loss.

    python bench/action_probe.py                                   # patches / per-frame stem / 3-frame stem
    python bench/action_probe.py --corpus runs/demo/corpus --steps 300
    python bench/action_probe.py --variants '{"patch_pool": "mean"}'
"""
from __future__ import annotations

import argparse
import collections
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
from retrieval.data.dataset import ClipTextDataset
from retrieval.data.synthetic import generate_corpus
from retrieval.data.video import Preprocess
from retrieval.models.registry import create_model

THREADS = 2
DEFAULT_VARIANTS = [
    {"stem_channels": None},
    {"stem_channels": [16, 32], "stem_kernel_t": 1},
    {"stem_channels": [16, 32], "stem_kernel_t": 3},
]


def _single_object_split(corpus: Path, split: str, pre: Preprocess, work: Path):
    entries = [e for e in json.loads((corpus / f"{split}.json").read_text())
               if len(e["attributes"]["objects"]) == 1]
    ann = work / f"{split}_one_object.json"
    ann.write_text(json.dumps(entries))
    data = ClipTextDataset(load_corpus("generic", ann, corpus / "videos"), pre, cache=True, progress=False)
    return data, [e["attributes"]["objects"][0]["action"] for e in entries]


def probe(corpus: Path, overrides: dict, steps: int, batch: int, lr: float, seed: int, work: Path,
          splits: dict) -> dict:
    """``splits`` keeps the decoded clips per preprocessing, so variants that share it decode once."""
    torch.manual_seed(seed)
    encoder = create_model("videomamba_demo", **overrides)
    pre = Preprocess.from_dict(encoder.preprocess)
    if pre not in splits:
        splits[pre] = tuple(_single_object_split(corpus, split, pre, work) for split in ("train", "test"))
    (train, train_labels), (test, test_labels) = splits[pre]
    classes = sorted(set(train_labels))
    y_train = torch.tensor([classes.index(a) for a in train_labels])
    y_test = torch.tensor([classes.index(a) for a in test_labels])
    head = torch.nn.Linear(encoder.embed_dim, len(classes))
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.06)

    def logits(video: torch.Tensor) -> torch.Tensor:
        pooled = encoder(video)["pooled"]
        return head(pooled.mean(1) if pooled.dim() == 3 else pooled)

    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    t0 = time.perf_counter()
    for step in range(steps):
        train.set_epoch(step)
        idx = torch.randint(len(train), (batch,), generator=gen)
        video = torch.stack([train[int(i)][0] for i in idx])
        loss = torch.nn.functional.cross_entropy(logits(video), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    encoder.eval()

    def predict(data) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for j in range(0, len(data), batch):
                video = torch.stack([data[i][0] for i in range(j, min(j + batch, len(data)))])
                out.append(logits(video).argmax(1))
        return torch.cat(out)

    pred_train, pred_test = predict(train), predict(test)
    pairs = zip(y_test.tolist(), pred_test.tolist(), strict=True)
    confusions = collections.Counter(f"{classes[a]} -> {classes[b]}" for a, b in pairs if a != b)
    return {"bench": "action_probe", "video_model": "videomamba_demo", "overrides": overrides, "steps": steps,
            "batch": batch, "lr": lr, "seed": seed, "threads": torch.get_num_threads(),
            "train_clips": len(train), "test_clips": len(test), "classes": len(classes),
            "train_acc": round((pred_train == y_train).float().mean().item(), 3),
            "test_acc": round((pred_test == y_test).float().mean().item(), 3),
            "chance": round(max(collections.Counter(test_labels).values()) / len(test_labels), 3),
            "top_confusions": dict(confusions.most_common(4)), "train_s": round(train_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path,
                        help="synthetic corpus (default: generate the demo's in a temp dir)")
    parser.add_argument("--variants", nargs="*", type=json.loads, help="JSON override dicts, one run each")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "action_probe")
    args = parser.parse_args()
    results = Recorder(args.output, append=args.append)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if corpus is None:
            corpus = Path(tmp) / "corpus"
            generate_corpus(corpus, n_train=600, n_test=100, seed=0, size=128, long_videos=0, progress=False)
        splits: dict = {}
        for overrides in args.variants or DEFAULT_VARIANTS:
            row = probe(corpus, overrides, args.steps, args.batch, args.lr, args.seed, Path(tmp), splits)
            results.add(row)


if __name__ == "__main__":
    main()
