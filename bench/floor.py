"""A video encoder's CPU floor: its matrix products at the measured matmul rate plus its
exponentials at the measured ``torch.exp`` rate.

The counts come from the built model (its sizes, the frame count and the frame size), by hand:

* VideoMamba: the patch projection (a product: one row per patch), and per layer ``in_proj``,
  ``x_proj`` and the rank-R ``dt_proj`` of each direction, ``out_proj``; the selective scan costs
  one exp per state update, ``2 directions x L x d_inner x d_state`` per layer. Everything else (the
  conv, softplus, the gate, norms) is counted as overhead above the floor.
* joint space-time ViT: the patch projection, per block ``qkv``, ``proj``, the two MLP products and
  the attention's ``q kᵀ`` and ``softmax(.) v`` (what a fused kernel still multiplies), and one exp
  per attention score (``heads x L x L`` per block).

:func:`product_seconds` times each distinct product shape with ``torch.mm`` in the given dtype (and,
in fp32, with oneDNN's inner product, keeping the faster) and :func:`exp_rate` ``torch.exp`` over a
large tensor, so the floor is in this machine's own units:
``floor_s = sum(product time) + exps / exp rate``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from retrieval.models.device import onednn_linear_available
from retrieval.models.layers import onednn_linear


@dataclass(frozen=True)
class Product:
    """``count`` products ``[m, k] @ [k, n]`` named ``name``; ``tile`` (m, k, n), if given, is the
    shape a fused kernel computes it in (attention's score blocks, never a whole [L, L] matrix):
    its time is then the tile's, scaled by the FLOPs."""
    name: str
    m: int
    k: int
    n: int
    count: int = 1
    tile: tuple[int, int, int] | None = None

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count

    @property
    def timed_shape(self) -> tuple[int, int, int]:
        return self.tile or (self.m, self.k, self.n)

    def seconds(self, measured: dict[tuple[int, int, int], float]) -> float:
        """Its time from ``measured`` (seconds of one product per timed shape)."""
        tm, tk, tn = self.timed_shape
        return measured[self.timed_shape] * self.flops / (2 * tm * tk * tn)


# rows and columns of a score block (256 measured 2 GFLOP/s on 2 shared cores: each torch.mm call's
# overhead dominated)
ATTENTION_TILE = 1024


@dataclass
class Costs:
    """What a forward must do at least: its products and its exponentials."""
    model: str
    tokens: int
    products: list[Product] = field(default_factory=list)
    exps: int = 0

    @property
    def product_flops(self) -> int:
        return sum(p.flops for p in self.products)


def videomamba_costs(model: nn.Module, frames: int, img_size: int, batch: int = 1) -> Costs:
    """Products and scan exps of one VideoMamba forward (see the module docstring)."""
    if model.patch_embed.stem is not None:
        raise ValueError("the floor count covers the official patch projection, not a convolutional stem")
    p, st, tub = model.patch_size, model.patch_stride, model.tubelet_size
    grid = (img_size - p) // st + 1
    patches = batch * (frames // tub) * grid * grid
    length = patches // batch + 1                                   # + the cls token
    rows = batch * length
    d = model.embed_dim
    costs = Costs("videomamba", length, [Product("patch_embed", patches, model.in_chans * tub * p * p, d)])
    depth = len(model.layers)
    mixer = model.layers[0].mixer
    e, n, r = mixer.d_inner, mixer.d_state, mixer.dt_rank
    x_projs = 2 if mixer.layout == "v2" else 1                      # v1 shares x_proj between directions
    costs.products += [Product("in_proj", rows, d, 2 * e if mixer.gate else e, depth),
                       Product("x_proj", rows, e, r + 2 * n, depth * x_projs),
                       Product("dt_proj", rows, r, e, depth * 2),
                       Product("out_proj", rows, e, d, depth)]
    costs.exps = depth * 2 * rows * e * n
    return costs


def joint_vit_costs(model: nn.Module, frames: int, img_size: int, batch: int = 1) -> Costs:
    """Products and softmax exps of one joint space-time ViT forward."""
    conv = model.patch_embed
    tub, p = conv.kernel_size[0], conv.kernel_size[1]
    grid = img_size // p
    patches = batch * (frames // tub) * grid * grid
    length = patches // batch + (1 if model.cls_token is not None else 0)
    rows = batch * length
    d = model.embed_dim
    depth = len(model.blocks)
    attn = model.blocks[0].attn
    heads, hidden = attn.num_heads, model.blocks[0].mlp.fc1.out_features
    head_dim = d // heads
    costs = Costs("joint_vit", length, [
        Product("patch_embed", patches, 3 * tub * p * p, d),
        Product("qkv", rows, d, 3 * d, depth), Product("proj", rows, d, d, depth),
        Product("fc1", rows, d, hidden, depth), Product("fc2", rows, hidden, d, depth),
        Product("q_kT", length, head_dim, length, depth * batch * heads,
                tile=(ATTENTION_TILE, head_dim, ATTENTION_TILE)),
        Product("attn_v", length, length, head_dim, depth * batch * heads,
                tile=(ATTENTION_TILE, ATTENTION_TILE, head_dim))])
    costs.exps = depth * batch * heads * length * length
    return costs


def model_costs(model: nn.Module, frames: int, img_size: int, batch: int = 1) -> Costs:
    """:func:`videomamba_costs` or :func:`joint_vit_costs`, by the model's class."""
    if hasattr(model, "layers") and hasattr(model.layers[0], "mixer"):
        return videomamba_costs(model, frames, img_size, batch)
    if hasattr(model, "blocks") and hasattr(model.blocks[0], "attn"):
        return joint_vit_costs(model, frames, img_size, batch)
    raise ValueError(f"no floor count for {type(model).__name__}")


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def product_seconds(products: list[Product], dtype: torch.dtype, repeats: int = 5) -> dict[tuple[int, int, int], float]:
    """Median seconds of one ``[m, k] @ [k, n]`` per distinct timed shape, in ``dtype``: the faster of
    ``torch.mm`` and, in fp32 where torch has it, oneDNN's inner product (which the model layers'
    large fp32 products may run on: ``retrieval.models.layers.linear``), so the floor is the
    fastest product this machine offers either way."""
    onednn = dtype == torch.float32 and onednn_linear_available()
    seconds = {}
    for shape in dict.fromkeys(p.timed_shape for p in products):
        m, k, n = shape
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        torch.mm(a, b, out=out)                                     # warm-up (oneDNN primitive)
        seconds[shape] = _best_of(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), repeats)
        if onednn:
            w = b.t().contiguous()
            def run(a=a, w=w):
                return onednn_linear(a, w)

            run()
            seconds[shape] = min(seconds[shape], _best_of(run, repeats))
    return seconds


def exp_rate(n: int = 1 << 22, repeats: int = 5) -> float:
    """``torch.exp`` elements per second over fp32 (the scan's exps are fp32 in every precision).
    4M elements: on 2 shared cores a cache-sized tensor (256k) measured 6x slower, the parallel
    region's wait dominating."""
    x = torch.rand(n) * -8.0
    out = torch.empty_like(x)
    torch.exp(x, out=out)
    return n / _best_of(lambda: torch.exp(x, out=out), repeats)


def floor(costs: Costs, seconds: dict[tuple[int, int, int], float], exps_per_s: float) -> dict[str, float]:
    """The floor in seconds, its two parts and the products' effective GFLOP/s."""
    products_s = sum(p.seconds(seconds) for p in costs.products)
    scan_s = costs.exps / exps_per_s
    return {"floor_s": products_s + scan_s, "products_s": products_s, "exp_s": scan_s,
            "products_gflops": costs.product_flops / products_s / 1e9 if products_s else 0.0}


__all__ = ["Costs", "Product", "exp_rate", "floor", "joint_vit_costs", "model_costs", "product_seconds",
           "videomamba_costs"]
