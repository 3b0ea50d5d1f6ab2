"""bench/floor.py: the floor's counts of a tiny VideoMamba and a tiny joint ViT, against a count by
hand and against torch's FLOP counter on the same forward."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.floor import Product, floor, model_costs
from retrieval.models.registry import create_model


def _counted(model: torch.nn.Module, video: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(video)
    return counter.get_total_flops()


def test_videomamba_counts_match_a_hand_count_and_the_flop_counter() -> None:
    # embed 32, depth 2, 32 px, patch 16, 4 frames: 2x2 patches a frame, L = 1 + 16, d_inner 64,
    # d_state 16, dt_rank ceil(32 / 16) = 2
    torch.manual_seed(0)
    model = create_model("videomamba_tiny_test").eval()
    costs = model_costs(model, frames=4, img_size=32)
    assert costs.tokens == 17
    by_name = {p.name: p for p in costs.products}
    assert by_name["patch_embed"].flops == 2 * 16 * (3 * 16 * 16) * 32
    assert by_name["in_proj"].flops == 2 * 17 * 32 * 128 * 2           # x and z, 2 layers
    assert by_name["x_proj"].flops == 2 * 17 * 64 * (2 + 32) * 4        # 2 directions x 2 layers
    assert by_name["dt_proj"].flops == 2 * 17 * 2 * 64 * 4
    assert by_name["out_proj"].flops == 2 * 17 * 64 * 32 * 2
    assert costs.product_flops == 1_517_568
    assert costs.exps == 2 * 2 * 17 * 64 * 16                           # layers x directions x L x E x N
    # the torch composition runs every product as a torch op, and two more the floor leaves out:
    # the scan's per-step einsum [B, E, N] x [B, N] (2 E N per direction, step and layer) and the
    # depthwise conv (4 taps, padded to L + 3 outputs, per direction and layer)
    model_ref = create_model("videomamba_tiny_test", scan_backend="ref").eval()
    counted = _counted(model_ref, torch.randn(1, 3, 4, 32, 32))
    einsum = 2 * 2 * 17 * (2 * 64 * 16)
    depthwise = 2 * 2 * (2 * 20 * 64 * 4)
    assert counted == costs.product_flops + einsum + depthwise


def test_joint_vit_counts_match_a_hand_count_and_the_flop_counter() -> None:
    # embed 32, depth 2, 2 heads, patch 8, 4 frames of 32 px: 16 patches a frame, L = 1 + 64
    torch.manual_seed(0)
    model = create_model("joint_vit_tiny_test", fused_attn=False).eval()
    costs = model_costs(model, frames=4, img_size=32)
    assert costs.tokens == 65
    hand = (2 * 64 * 192 * 32                   # patch embed
            + 2 * (2 * 65 * 32 * 96)            # qkv
            + 2 * (2 * 65 * 32 * 32)            # proj
            + 2 * 2 * (2 * 65 * 32 * 128)       # fc1, fc2
            + 2 * 2 * 2 * (2 * 65 * 16 * 65))   # q kᵀ and attn v, 2 heads, 2 blocks
    assert costs.product_flops == hand == 5_062_912
    assert costs.exps == 2 * 2 * 65 * 65
    assert _counted(model, torch.randn(1, 3, 4, 32, 32)) == hand


def test_floor_adds_product_times_and_exps_at_the_exp_rate() -> None:
    torch.manual_seed(0)
    costs = model_costs(create_model("videomamba_tiny_test").eval(), frames=4, img_size=32)
    seconds = {p.timed_shape: 1e-6 * (i + 1) for i, p in enumerate(costs.products)}
    f = floor(costs, seconds, exps_per_s=1e9)
    want = sum(seconds[(p.m, p.k, p.n)] * p.count for p in costs.products)
    assert abs(f["products_s"] - want) < 1e-12
    assert abs(f["exp_s"] - costs.exps / 1e9) < 1e-15
    assert abs(f["floor_s"] - (want + costs.exps / 1e9)) < 1e-12
    assert Product("x", 3, 4, 5, count=2).flops == 240
    # a product timed by tiles: the tile's time scaled by the FLOPs (8 tiles of 2x4x5 in 16x4x5 x 2)
    tiled = Product("scores", 16, 4, 5, count=2, tile=(2, 4, 5))
    assert tiled.seconds({(2, 4, 5): 1e-3}) == 16e-3
