"""The training loop: one process or many (``torchrun``), checkpoints, exact resume.

Multi-process training splits each global batch across processes; the contrastive loss scores
local rows against features gathered from every process, and gradients are averaged with one
all-reduce per step (done here explicitly rather than by DDP's wrapper, because the losses call
the model's parts directly). Gloo on CPU, NCCL on GPU; rank 0 writes every file.

Resume is exact: data order and every per-sample choice derive from (seed, epoch, index), the
loss-side randomness from (seed, step, rank), and the checkpoint stores the optimizer, scheduler
and the global RNG state (dropout), so a killed and resumed run reaches the same parameters as an
uninterrupted one.

With ``data.images``, image-caption pairs train as 1-frame clips through the same encoders: an
epoch interleaves every video batch with every image batch in a random order drawn from
(seed, epoch) (:mod:`.batch_plan`), a batch is all videos or all images, and each process takes the
same source at a step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..atomic import atomic_dir, atomic_write
from ..data.corpora import load_corpus, load_image_captions
from ..data.dataset import ClipTextDataset, ImageTextDataset, collate
from ..data.video import Preprocess
from ..models.device import autocast, local_rank_device, resolve_precision
from ..models.model_dir import load_model, load_weights_into
from ..models.retrieval_model import RetrievalModel, build_retrieval_model
from .actions import ActionTargets, action_label_set
from .batch_plan import IMAGE, VIDEO, step_source
from .losses import (
    SpecialTokenIds,
    action_loss,
    mlm_loss,
    teacher_guided_mask,
    uta_loss,
    visible_per_frame,
    visible_targets,
    vtc_loss,
    vtm_loss,
)
from .recipe import Recipe, RecipeError, image_batch_size
from .teacher import CLIPTeacher, check_teacher_spec, load_teacher

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


# -- distributed helpers ------------------------------------------------------------------------
def _dist_setup(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        log.info("distributed training: %d processes (%s)", world, backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


def _comm_device() -> torch.device:
    """Where collective buffers live: NCCL moves CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _global_means(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Loss values averaged over processes: each holds the mean of its rows, so this is the
    mean over the global batch (what one process with the whole batch would log)."""
    keys = sorted(values)
    flat = torch.stack([values[k].detach().float() for k in keys])
    if world > 1:
        dist.all_reduce(flat)
        flat /= world
    return {k: float(v) for k, v in zip(keys, flat)}


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n




# -- building -----------------------------------------------------------------------------------
def build_model(recipe: Recipe) -> RetrievalModel:
    m = recipe.model
    if m.init:
        model = load_model(m.init)
        if not isinstance(model, RetrievalModel):
            raise RecipeError(f"model.init {m.init} is not a retrieval model directory")
        model.train()
    else:
        model = build_retrieval_model(m.video, m.text, m.num_fusion_layers, m.fusion_layer, m.embed_dim,
                                      m.max_text_len, with_mlm=recipe.loss.mlm > 0,
                                      video_overrides=m.video_overrides, text_pooling=m.text_pooling)
    if m.text_dropout is not None:
        for mod in model.text.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = m.text_dropout
            elif isinstance(getattr(mod, "dropout", None), float):  # attention-probability dropout
                mod.dropout = m.text_dropout
    if not m.init:
        model.matching_trained = recipe.loss.vtm > 0
    elif recipe.loss.vtm > 0:
        model.matching_trained = True
    k = recipe.optim.freeze_text_layers
    if k > model.text.fusion_layer:
        raise RecipeError(f"optim.freeze_text_layers={k} exceeds the text tower's {model.text.fusion_layer} "
                          "text-only layers")
    if recipe.optim.freeze_text_embeddings or k:
        model.text.embeddings.requires_grad_(False)
    for layer in model.text.encoder.layer[:k]:
        layer.requires_grad_(False)
    if recipe.optim.grad_checkpointing:
        for part in (model.video, model.text):
            if hasattr(part, "set_grad_checkpointing"):
                part.set_grad_checkpointing(True)
    return model


def param_groups(model: RetrievalModel, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embeddings tables and SSM parameters; the text
    tower's text-only layers at ``text_lr_scale`` of the base rate (they start pretrained; the
    fusion layers are new)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (p.dim() < 2 or name.endswith(("A_log", "A_b_log", "D", "D_b", "cls_token", "pos_embed",
                                                  "temporal_pos_embedding", "temp")))
        layer = re.match(r"text\.encoder\.layer\.(\d+)\.", name)
        is_text = name.startswith("text.embeddings.") or bool(layer and int(layer[1]) < model.text.fusion_layer)
        groups.setdefault((no_decay, is_text), []).append(p)
    o = recipe.optim
    return [{"params": ps, "weight_decay": 0.0 if nd else o.weight_decay,
             "lr_scale": o.text_lr_scale if txt else 1.0} for (nd, txt), ps in groups.items()]


def check_one_frame(model: RetrievalModel, teacher: CLIPTeacher | None) -> None:
    """Image steps feed 1-frame clips: refuse, before training, encoders that cannot take them
    (those built for a fixed frame count, e.g. TimeSformer and the joint space-time ViT)."""
    x = torch.zeros(1, 3, 1, model.preprocess["size"], model.preprocess["size"], device=model.temp.device)
    was_training = model.training
    model.eval()
    try:
        for name, net in (("the video encoder", model.video), ("the UTA teacher", teacher)):
            if net is None:
                continue
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    net(x)
            except (ValueError, RuntimeError) as exc:
                raise RecipeError(f"data.images trains images as 1-frame clips, but {name} cannot take a "
                                  f"1-frame input: {exc}") from exc
    finally:
        model.train(was_training)


def _batch_ids(n: int, batch: int, j: int, rank: int, local: int, seed: int) -> torch.Tensor:
    """This process's share of batch ``j`` of an epoch whose order is a permutation drawn from ``seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[j * batch:(j + 1) * batch][rank * local:(rank + 1) * local]


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- one step -----------------------------------------------------------------------------------
class FrozenTextPrefix:
    """Outputs of the frozen lower text layers, computed once per distinct caption.

    Frozen layers get no gradient, so their output for a caption never changes; they run in
    eval mode (no dropout), as frozen layers should. A step then runs only the trainable upper
    layers, which is most of the saving when the text tower is larger than the video encoder.
    """

    def __init__(self, model: RetrievalModel, layers: int) -> None:
        self.model, self.layers = model, layers
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> None:
        text = self.model.text
        ids, mask = self.model.tokenize(captions)
        was_training = text.training
        text.eval()
        try:
            h = text.embeddings(input_ids=ids.to(self.model.temp.device))
            keep = mask.bool().to(h.device)
            for layer in text.encoder.layer[:self.layers]:
                h = layer(h, keep, None, None)
        finally:
            text.train(was_training)
        for caption, row, n in zip(captions, h, mask.sum(1).tolist()):
            self._cache[caption] = row[:n].clone()

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, L, H] after layer ``layers - 1``, attention mask [B, L])."""
        todo = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if todo:
            self._compute(todo)
        rows = [self._cache[c] for c in captions]
        n = max(r.shape[0] for r in rows)
        hidden = rows[0].new_zeros(len(rows), n, rows[0].shape[1])
        mask = torch.zeros(len(rows), n, dtype=torch.long, device=hidden.device)
        for i, r in enumerate(rows):
            hidden[i, :r.shape[0]] = r
            mask[i, :r.shape[0]] = 1
        return hidden, mask


def _reversed_samples(dataset: ClipTextDataset, ids: torch.Tensor, samples: list, recipe: Recipe,
                      world: int) -> list:
    """Time-reversed copies of up to ``data.reversed_share`` of the local batch, for the clips whose
    annotation says what they show backwards. Each is its own video (index offset by the dataset
    size), so the contrastive loss treats the pair as hard negatives of each other. Every process
    adds the same number (the smallest any process can), as the feature gather needs."""
    want = round(recipe.data.reversed_share * len(ids))
    if not want:
        return []
    extra = []
    for i, forward in zip(ids.tolist(), samples):
        if len(extra) == want:
            break
        sample = dataset.reversed_sample(i, forward)
        if sample is not None:
            extra.append((sample[0], sample[1], len(dataset) + i))
    if world > 1:
        n = torch.tensor([len(extra)], device=_comm_device())
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        extra = extra[:int(n)]
    return extra


def compute_losses(model: RetrievalModel, batch, recipe: Recipe, special: SpecialTokenIds,
                   teacher: CLIPTeacher | None, gen: torch.Generator,
                   text_prefix: FrozenTextPrefix | None = None,
                   device_gen: torch.Generator | None = None,
                   action_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted losses of one batch on the model's device. ``gen`` draws on the host (MLM
    masking of the tokenizer's ids), ``device_gen`` (default ``gen``) on the device (UTA token
    choice, VTM negatives): on CPU they are one generator. ``action_targets`` ([B, n_labels] soft
    targets) for ``loss.action`` (None: no action loss on this batch, e.g. an image batch)."""
    video, captions, idx = batch
    device = model.temp.device
    video = video.to(device, non_blocking=True)
    device_gen = gen if device_gen is None else device_gen
    w = recipe.loss
    if text_prefix is not None and not w.mlm:  # MLM re-reads masked ids through every layer
        prefix, tmask = text_prefix(list(captions))
        ids = None
    else:
        ids, tmask = model.tokenize(captions)   # host tensors: MLM draws its masking on them
        tmask = tmask.to(device)
        prefix = None
    mask = targets = None
    if w.uta and teacher is not None:
        # the teacher sees the student's own normalised frames; its last block's cls attention
        # draws each frame's visible patches (images: 1-frame clips, their own ratio)
        taught = teacher(video)
        ratio = w.uta_image_mask_ratio if video.shape[2] == 1 else w.uta_mask_ratio
        mask = teacher_guided_mask(taught.attention, ratio, device_gen, mode=w.uta_mask)
        frames, patches = taught.attention.shape[1:]
        targets = visible_targets(taught.targets, mask, frames * visible_per_frame(patches, ratio))
    vout = model.encode_video(video, mask=mask, return_distill=bool(w.uta))
    if not (w.vtc or w.vtm or w.mlm):  # video-only UTA (stage 1): the captions are not needed
        tout = None
    elif prefix is not None:
        tout = model.encode_text(None, tmask, hidden=prefix, start_layer=text_prefix.layers)
    else:
        tout = model.encode_text(ids.to(device), tmask)
    temp = model.temp.clamp(0.001, 0.5)
    out: dict[str, torch.Tensor] = {}
    if w.vtc:
        out["vtc"] = vtc_loss(tout["feat"], vout["feat"], idx, temp)
    if w.vtm:
        out["vtm"] = vtm_loss(model, vout["tokens"], tout["hidden"], tmask, tout["feat"], vout["feat"], idx, temp,
                              device_gen, pairs=w.vtm_pairs)
    if w.mlm:
        out["mlm"] = mlm_loss(model, ids, tmask, vout["tokens"], special, w.mlm_prob, gen)
    if w.uta and teacher is not None:
        out["uta"] = uta_loss(vout["distill"], targets)
    if w.action and action_targets is not None:
        out["action"] = action_loss(model.action_logits(vout["feat"]), action_targets.to(vout["feat"].device))
    out["loss"] = sum(getattr(w, k) * v for k, v in out.items())
    return out


# -- checkpoints --------------------------------------------------------------------------------
def _save_checkpoint(out: Path, model: RetrievalModel, opt, sched, step: int, recipe: Recipe,
                     scaler: torch.amp.GradScaler | None = None) -> None:
    extra = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
    if model.temp.device.type == "cuda":  # dropout on the GPU draws from its own generator
        extra["cuda_rng"] = torch.cuda.get_rng_state(model.temp.device)
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": torch.get_rng_state(), "fingerprint": recipe.fingerprint(), **extra}
    # the previous checkpoint stays whole until the new one is (a full disk leaves it in place)
    with atomic_dir(out / "checkpoint") as tmp:
        model.save(tmp, source={"recipe": recipe.to_dict(), "step": step})
        # through a Python file: torch's own file writer reports a full disk without its errno
        atomic_write(tmp / STATE_FILE, lambda handle: torch.save(state, handle))


def _read_resume_state(out: Path, recipe: Recipe) -> dict[str, Any]:
    ckpt = out / "checkpoint"
    if not (ckpt / STATE_FILE).is_file():
        if (out / "checkpoint.old" / STATE_FILE).is_file():  # killed between the two renames
            os.replace(out / "checkpoint.old", ckpt)
        else:
            raise FileNotFoundError(f"--resume: no checkpoint in {out} (expected {ckpt}/{STATE_FILE})")
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != recipe.fingerprint():
        raise RecipeError(f"--resume: the checkpoint in {out} was made by another recipe (fingerprint "
                          f"{state.get('fingerprint')} vs {recipe.fingerprint()}); use a new run.out or the same recipe")
    return state


# -- the loop -----------------------------------------------------------------------------------
def train(recipe: Recipe, resume: bool = False) -> Path:
    """Train per ``recipe``; returns the final model directory (``run.out``/model)."""
    out = Path(recipe.run.out)
    if not resume and (out / "checkpoint").exists():
        raise RecipeError(f"{out} already holds a checkpoint: pass --resume to continue it, or set run.out")
    state = _read_resume_state(out, recipe) if resume else None
    device = local_rank_device(recipe.run.device)   # under torchrun + CUDA: this process's LOCAL_RANK GPU
    precision = resolve_precision(recipe.run.precision, device)
    rank, world = _dist_setup(device)
    o = recipe.optim
    if o.batch_size % world:
        raise RecipeError(f"optim.batch_size {o.batch_size} does not split over {world} processes")
    local_b = o.batch_size // world
    image_b = image_batch_size(recipe)
    if recipe.data.images and image_b % world:
        raise RecipeError(f"the image batch {image_b} does not split over {world} processes")
    local_ib = image_b // world

    corpus = load_corpus(recipe.data.dataset, recipe.data.train, recipe.data.videos)
    image_pairs = None
    if recipe.data.images:  # read before building the model: a wrong path fails at once
        image_pairs = load_image_captions(recipe.data.images, recipe.data.image_root)
    if recipe.loss.uta:
        check_teacher_spec(recipe.loss.uta_teacher)
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe).to(device)
    teacher = (load_teacher(recipe.loss.uta_teacher, model.video, recipe.loss.uta_teacher_arch).to(device)
               if recipe.loss.uta else None)
    if image_pairs is not None:
        check_one_frame(model, teacher)
    # fp16 needs loss scaling (its range underflows small gradients); bf16 has fp32's range
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    log.info("training on %s in %s", device, precision)
    pixels = Preprocess.for_model(model)
    dataset = ClipTextDataset(corpus, pixels, recipe.run.seed, recipe.data.cache,
                              recipe.data.frames_per_segment, progress=recipe.run.progress and rank == 0)
    if len(dataset) < o.batch_size:
        raise RecipeError(f"the corpus has {len(dataset)} captioned clips, fewer than optim.batch_size {o.batch_size}")
    n_video = len(dataset) // o.batch_size
    images, n_image = None, 0
    if image_pairs is not None:
        images = ImageTextDataset(image_pairs, pixels, recipe.run.seed,
                                  recipe.data.cache, progress=recipe.run.progress and rank == 0)
        if len(images) < image_b:
            raise RecipeError(f"{recipe.data.images} lists {len(images)} images, fewer than the image batch "
                              f"{image_b}")
        n_image = len(images) // image_b
        log.info("each epoch interleaves %d video and %d image batches", n_video, n_image)
    action_targets = None
    if recipe.loss.action:
        action_labels = action_label_set(recipe, dataset.items)
        if model.action_labels != action_labels:
            model.set_action_head(action_labels)
        action_targets = ActionTargets(dataset.items, action_labels)
    special = SpecialTokenIds.from_tokenizer(model.tokenizer)
    text_prefix = FrozenTextPrefix(model, o.freeze_text_layers) if o.freeze_text_layers else None

    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, recipe)
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda s, g=g: g["lr_scale"] * lr_factor(s, o.warmup_steps, o.steps) for g in groups])
    start = 0
    if state is not None:
        load_weights_into(model, out / "checkpoint", f"{out}/checkpoint")
        opt.load_state_dict(state["optimizer"])   # its state follows the parameters' device
        sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start = int(state["step"])
        log.info("resuming %s at step %d", out, start)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None

    model.train()
    bar = tqdm(total=o.steps, initial=start, desc="train", disable=not (recipe.run.progress and rank == 0),
               dynamic_ncols=True)
    t_last, n_since = time.perf_counter(), 0
    try:
        for step in range(start, o.steps):
            epoch, source, j = step_source(step, n_video, n_image, recipe.run.seed)
            if source == VIDEO:
                ids = _batch_ids(len(dataset), o.batch_size, j, rank, local_b, recipe.run.seed * 1000 + epoch)
                dataset.set_epoch(epoch)
                samples = [dataset[int(i)] for i in ids]
                batch = collate(samples + _reversed_samples(dataset, ids, samples, recipe, world))
            else:
                ids = _batch_ids(len(images), image_b, j, rank, local_ib,
                                 (recipe.run.seed * 1000 + epoch) * 1_000_003 + 1)
                images.set_epoch(epoch)
                batch = collate([images[int(i)] for i in ids])
            step_seed = (recipe.run.seed * 1_000_003 + step) * 97 + rank
            gen = torch.Generator().manual_seed(step_seed)
            device_gen = torch.Generator(device).manual_seed(step_seed) if device.type == "cuda" else gen
            with autocast(device, precision):
                targets = action_targets(batch[2]) if action_targets is not None and source == VIDEO else None
                losses = compute_losses(model, batch, recipe, special, teacher, gen, text_prefix, device_gen,
                                        targets)
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(opt)   # clip and average true gradients (a no-op unless fp16)
            _average_gradients(params, world)
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            n_since += image_b if source == IMAGE else o.batch_size
            done = step + 1
            log_now = done % recipe.run.log_every == 0 or done == o.steps
            means = _global_means(losses, world) if log_now else {}
            if rank == 0 and log_now:
                now = time.perf_counter()
                rec = {"step": done, "source": source, **{k: round(v, 5) for k, v in means.items()},
                       "lr": opt.param_groups[0]["lr"], "temp": round(float(model.temp.detach()), 5),
                       "samples_per_s": round(n_since / (now - t_last), 2)}
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                t_last, n_since = now, 0
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=rec["samples_per_s"])
            bar.update(1)
            if done % recipe.run.save_every == 0 and done < o.steps:
                if rank == 0:
                    _save_checkpoint(out, model, opt, sched, done, recipe, scaler)
                _barrier()
    finally:
        bar.close()
        if metrics_f:
            metrics_f.close()
    final = out / "model"
    if rank == 0:
        _save_checkpoint(out, model, opt, sched, o.steps, recipe, scaler)
        with atomic_dir(final) as tmp:   # a model from an earlier run stays until this one is whole
            model.save(tmp, source={"recipe": recipe.to_dict(), "step": o.steps})
        plot_losses(out / "metrics.jsonl", out / "loss_curve.png")
    _barrier()
    return final


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sources = list(dict.fromkeys(r.get("source", "video") for r in rows))
    for source in sources:  # image and video steps have their own loss levels: one curve each
        part = [r for r in rows if r.get("source", "video") == source]
        for key in ("loss", "vtc", "vtm", "mlm", "uta", "action"):
            if key in part[0]:
                label = key if len(sources) == 1 else f"{key} ({source})"
                ax.plot([r["step"] for r in part], [r[key] for r in part], label=label,
                        linestyle="--" if source == "image" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
