"""VideoMamba vision-encoder checkpoints in the official layout, at any size, for conversion tests.

The key names come from ``tests/fixtures/videomamba_official_keys.json`` (read off the authors'
released Ti/S/M checkpoints), never from vtr's own modules. Shapes follow the official
constructor: D = embed_dim, d_inner = 2D, dt_rank = ceil(D / 16), d_state 16, conv width 4;
``test_shape_rule_reproduces_the_official_sizes`` checks that rule against the listed shapes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "videomamba_official_keys.json"
PER_LAYER = "per_layer_keys (layers.{0..depth-1}.)"


def official_spec() -> dict:
    return json.loads(FIXTURE.read_text())


def official_shapes(embed_dim: int, depth: int, img_size: int, num_frames: int, patch_size: int = 16,
                    clip_output_dim: int | None = 512, pool_norm: bool = True,
                    d_state: int = 16, d_conv: int = 4) -> dict[str, tuple[int, ...]]:
    """Every key of the official vision encoder with its shape for these sizes (optional heads
    left out when ``clip_output_dim`` is None / ``pool_norm`` is False, as the video_sm models)."""
    d, inner, rank, n = embed_dim, 2 * embed_dim, math.ceil(embed_dim / 16), d_state
    patches = (img_size // patch_size) ** 2
    top = {
        "cls_token": (1, 1, d), "pos_embed": (1, 1 + patches, d), "temporal_pos_embedding": (1, num_frames, d),
        "patch_embed.proj.weight": (d, 3, 1, patch_size, patch_size), "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "clip_decoder.0.head.weight": (clip_output_dim, d), "clip_decoder.0.head.bias": (clip_output_dim,),
        "clip_decoder.0.norm.weight": (clip_output_dim,), "clip_decoder.0.norm.bias": (clip_output_dim,),
        "pool_norm.weight": (d,), "pool_norm.bias": (d,),
    }
    branch = {"conv1d.weight": (inner, 1, d_conv), "conv1d.bias": (inner,), "x_proj.weight": (rank + 2 * n, inner),
              "dt_proj.weight": (inner, rank), "dt_proj.bias": (inner,)}
    layer = {"mixer.A_log": (inner, n), "mixer.D": (inner,), "mixer.A_b_log": (inner, n), "mixer.D_b": (inner,),
             "mixer.in_proj.weight": (2 * inner, d), "mixer.out_proj.weight": (d, inner), "norm.weight": (d,)}
    for key, shape in branch.items():
        module, param = key.split(".")
        layer[f"mixer.{key}"] = shape
        layer[f"mixer.{module}_b.{param}"] = shape
    spec = official_spec()["videomamba_tiny"]
    if set(top) != set(spec["non_layer_keys"]) or set(layer) != set(spec[PER_LAYER]):
        raise AssertionError("the shape rule no longer covers exactly the official key names")
    if clip_output_dim is None:
        top = {k: v for k, v in top.items() if not k.startswith("clip_decoder.")}
    if not pool_norm:
        top = {k: v for k, v in top.items() if not k.startswith("pool_norm.")}
    shapes = dict(top)
    for i in range(depth):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def official_checkpoint(seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, with the value ranges of a trained model: A_log the
    log of 1..d_state, norm weights near 1, dt biases giving steps of 1e-3..1e-1, the rest small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_shapes(**sizes).items():
        name = key.rsplit(".", 1)[-1]
        if name in ("A_log", "A_b_log"):
            value = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).expand(shape).clone()
            value += 0.1 * torch.rand(shape, generator=g)
        elif key.endswith("norm.weight") or name in ("D", "D_b"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("dt_proj.bias") or key.endswith("dt_proj_b.bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            value = dt + torch.log(-torch.expm1(-dt))   # inverse softplus
        else:
            value = 0.02 * torch.randn(shape, generator=g)
        out[key] = value
    return out


def official_bert_checkpoint(seed: int, hidden: int, layers: int, fusion_layer: int, vision_width: int,
                             intermediate: int, vocab: int = 30522, positions: int = 64,
                             prefix: str = "text_encoder.bert.") -> dict[str, torch.Tensor]:
    """The text tower of an official retrieval checkpoint (UMT's "xbert", a BERT whose layers from
    ``fusion_layer`` on also cross-attend to ``vision_width`` tokens), every tensor drawn from one
    generator with the scales of a BERT initialisation (weights N(0, 0.02), LayerNorms near 1).

    The names are BERT's (``embeddings.*``, ``encoder.layer.{i}.attention|crossattention|
    intermediate|output.*``); no other code's modules are involved, so the authors' model and
    vtr's converter both read the same tensors.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return std * torch.randn(shape, generator=g)

    def layer_norm(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + normal(hidden, std=0.1), f"{name}.bias": normal(hidden, std=0.1)}

    def linear(name: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": normal(out, inp), f"{name}.bias": normal(out)}

    sd = {"embeddings.word_embeddings.weight": normal(vocab, hidden),
          "embeddings.position_embeddings.weight": normal(positions, hidden),
          "embeddings.token_type_embeddings.weight": normal(2, hidden), **layer_norm("embeddings.LayerNorm")}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        attentions = [("attention", hidden)] + ([("crossattention", vision_width)] if i >= fusion_layer else [])
        for kind, width in attentions:
            sd.update({**linear(p + f"{kind}.self.query", hidden, hidden),
                       **linear(p + f"{kind}.self.key", hidden, width),
                       **linear(p + f"{kind}.self.value", hidden, width),
                       **linear(p + f"{kind}.output.dense", hidden, hidden),
                       **layer_norm(p + f"{kind}.output.LayerNorm")})
        sd.update({**linear(p + "intermediate.dense", intermediate, hidden),
                   **linear(p + "output.dense", hidden, intermediate), **layer_norm(p + "output.LayerNorm")})
    return {prefix + key: value for key, value in sd.items()}


def official_umt_videomamba_checkpoint(seed: int = 0, embed_dim: int = 32, depth: int = 2, img_size: int = 32,
                                       num_frames: int = 4, text_hidden: int = 32, text_layers: int = 4,
                                       fusion_layer: int = 2, proj_dim: int = 24) -> dict[str, torch.Tensor]:
    """A whole UMT_VIDEOMAMBA retrieval checkpoint (``vision_encoder.``, ``text_encoder.bert.``,
    ``vision_proj``, ``text_proj``, ``temp``, ``itm_head``) at tiny sizes, from ``seed`` alone."""
    vision = official_checkpoint(seed=seed, embed_dim=embed_dim, depth=depth, img_size=img_size,
                                 num_frames=num_frames, clip_output_dim=16)
    text = official_bert_checkpoint(seed + 1, text_hidden, text_layers, fusion_layer, embed_dim, 2 * text_hidden)
    g = torch.Generator().manual_seed(seed + 2)
    heads = {"vision_proj.weight": 0.2 * torch.randn(proj_dim, embed_dim, generator=g),
             "vision_proj.bias": 0.02 * torch.randn(proj_dim, generator=g),
             "text_proj.weight": 0.2 * torch.randn(proj_dim, text_hidden, generator=g),
             "text_proj.bias": 0.02 * torch.randn(proj_dim, generator=g),
             "temp": torch.tensor(0.07),
             "itm_head.weight": 0.5 * torch.randn(2, text_hidden, generator=g),
             "itm_head.bias": 0.02 * torch.randn(2, generator=g)}
    return {**{f"vision_encoder.{k}": v for k, v in vision.items()}, **text, **heads}
