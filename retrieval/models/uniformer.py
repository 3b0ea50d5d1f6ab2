"""UniFormer (video) S/B: convolutional local relation aggregation early, global self-attention late.

Why this baseline: UniFormer is the strongest "efficient attention" alternative of VideoMamba's
comparison. Its cost is dominated by convolutions in the high-resolution stages 1-2 and by
global attention only on the 16x/32x-downsampled stages 3-4, whose token count still grows with
T² in attention.

Architecture (layout "LLGG", Li et al., ICLR'22, video_classification code):

* 4 stages of widths (64, 128, 320, 512); depths S (3, 4, 8, 3), B (5, 8, 20, 7).
* downsampling: stage 1 stem Conv3d k(3,4,4) s(2,4,4) p(1,0,0) (time halves); stages 2-4
  Conv3d k(1,2,2) s(1,2,2); each followed by a LayerNorm over channels.
* every block starts with a dynamic position encoding (DPE): x + depth-wise Conv3d 3x3x3.
* local block (stages 1-2): x + PW(DW5x5x5(PW(BN(x)))) then x + CMlp(BN(x)) (1x1x1 convs).
* global block (stages 3-4): joint space-time MHSA over all T'·H'·W' tokens, pre-LN, MLP; head
  dim 64 (5 and 8 heads), via timm's ``Block`` (``scaled_dot_product_attention``).
* final BatchNorm3d (the official head norm); ``tokens`` = the normed stage-4 map flattened
  ``[B, T/2·H/32·W/32, 512]`` (time-major, raster order); ``pooled`` = their mean ``[B, 512]``.

All position information is convolutional, so any frame count works and any frame size that is
a multiple of 32; ``num_frames``/``img_size`` are the nominal clip shape.

Norm layers are passed explicitly with the official epsilons (patch-embedding LayerNorms 1e-5,
the global blocks' LayerNorms 1e-6, BatchNorm3d 1e-5), never a library default. Official weights
(Sense-X/UniFormer ``video_classification``) map onto this module with :func:`checkpoint_filter_fn`
and :func:`infer_config_from_state` (``vtr convert --format uniformer``); their
pipelines normalise frames with mean 0.45 / std 0.225, which a converted model carries.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

from retrieval.models.layers import IMAGENET_MEAN, IMAGENET_STD, validate_video
from retrieval.models.model_dir import CheckpointError
from retrieval.models.registry import merge_size_preset, register_arch

UNIFORMER_SIZES: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "s": {"depths": (3, 4, 8, 3)},
    "b": {"depths": (5, 8, 20, 7)},
}
UNIFORMER_DIMS = (64, 128, 320, 512)
TOTAL_SPATIAL_STRIDE = 32
# the official video pipelines' frame normalisation (slowfast _C.DATA.MEAN / _C.DATA.STD)
UNIFORMER_MEAN = (0.45, 0.45, 0.45)
UNIFORMER_STD = (0.225, 0.225, 0.225)
PATCH_NORM_EPS = 1e-5   # PatchEmbed: nn.LayerNorm(embed_dim)
BLOCK_NORM_EPS = 1e-6   # SABlock: partial(nn.LayerNorm, eps=1e-6)
BN_EPS = 1e-5           # bn_3d: nn.BatchNorm3d(dim)


class PatchEmbed3d(nn.Module):
    """Strided Conv3d then LayerNorm over channels: the per-stage downsampling."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel: tuple[int, int, int],
        stride: tuple[int, int, int],
        padding: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_dim, out_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(out_dim, eps=PATCH_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class ConvMlp(nn.Module):
    """The feed-forward of local blocks: 1x1x1 conv -> GELU -> 1x1x1 conv."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LocalBlock(nn.Module):
    """DPE, then local MHRA (BN -> PW -> depth-wise 5x5x5 -> PW) and a conv MLP, on ``[B, C, T, H, W]``.

    The 5x5x5 depth-wise conv is the "local relation aggregator": each position mixes only its
    spatio-temporal neighbourhood with a learned, content-independent affinity, which is what
    makes the high-resolution stages cheap.
    """

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm3d(dim, eps=BN_EPS)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.attn = nn.Conv3d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm3d(dim, eps=BN_EPS)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GlobalBlock(nn.Module):
    """DPE, then a pre-norm transformer block over all ``T·H·W`` positions (joint space-time MHSA)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, qkv_bias: bool = True) -> None:
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.block = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
                           norm_layer=partial(nn.LayerNorm, eps=BLOCK_NORM_EPS), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, t, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(b, c, t, h, w)


class UniFormerVideo(nn.Module):
    """UniFormer video backbone behind the vtr interface (``pooled`` [B, D], ``tokens`` [B, L, D])."""

    keep_temporal = False
    has_cls_token = False  # every token is a stage-4 position

    def __init__(
        self,
        depths: Sequence[int] = UNIFORMER_SIZES["s"]["depths"],
        dims: Sequence[int] | None = None,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        num_frames: int = 16,
        img_size: int = 224,
        num_classes: int | None = None,
        qkv_bias: bool = True,
        patch_t_kernel: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """``dims``, ``mean`` and ``std`` left ``None`` are UniFormer's widths and ImageNet's statistics."""
        super().__init__()
        depths, dims = tuple(depths), tuple(UNIFORMER_DIMS if dims is None else dims)
        mean = tuple(IMAGENET_MEAN if mean is None else mean)
        std = tuple(IMAGENET_STD if std is None else std)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"UniFormer has 4 stages; got depths {depths} and dims {dims}")
        bad = [d for d in dims[2:] if d % head_dim]
        if bad:
            raise ValueError(f"global-stage widths {bad} are not multiples of head_dim {head_dim}")
        if img_size % TOTAL_SPATIAL_STRIDE:
            raise ValueError(
                f"UniFormer img_size must be a multiple of {TOTAL_SPATIAL_STRIDE}, got {img_size}"
            )
        self.embed_dim: int = dims[-1]
        self.num_frames = num_frames
        self.img_size = img_size
        self.grad_checkpointing = False
        self.preprocess = {
            "size": img_size,
            "num_frames": num_frames,
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bilinear",
        }

        self.patch_embeds = nn.ModuleList([PatchEmbed3d(3, dims[0], (3, 4, 4), (2, 4, 4), (1, 0, 0))])
        # patch_t_kernel 3: the official STD option (stages 2-4 also span 3 frames, stride 1)
        kt = patch_t_kernel
        self.patch_embeds.extend(
            PatchEmbed3d(dims[i - 1], dims[i], (kt, 2, 2), (1, 2, 2), (kt // 2, 0, 0)) for i in range(1, 4)
        )
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist())
        self.stages = nn.ModuleList()
        for stage, (depth, dim) in enumerate(zip(depths, dims)):
            if stage < 2:
                blocks = [LocalBlock(dim, mlp_ratio, next(rates)) for _ in range(depth)]
            else:
                blocks = [GlobalBlock(dim, dim // head_dim, mlp_ratio, next(rates), qkv_bias) for _ in range(depth)]
            self.stages.append(nn.ModuleList(blocks))
        self.norm = nn.BatchNorm3d(dims[-1], eps=BN_EPS)
        # the supervised classifier of official fine-tuned weights (mean of the normed tokens -> Linear)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else None
        self.init_weights()

    def init_weights(self) -> None:
        """Official init, which is timm's ViT rule (``init_weights_vit_timm``): truncated-normal linear
        weights, zero biases; LayerNorms stay at one and zero, convs and BatchNorms at PyTorch's default."""
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        validate_video(video, model_name="UniFormer", size_multiple=TOTAL_SPATIAL_STRIDE)
        x = video
        for patch_embed, blocks in zip(self.patch_embeds, self.stages):
            x = patch_embed(x)
            for block in blocks:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, T'·H'·W', D]
        return {"tokens": tokens, "pooled": tokens.mean(dim=1)}

    def classify(self, video: torch.Tensor) -> torch.Tensor:
        """Logits of the official classification head (weights that carry one)."""
        if self.head is None:
            raise ValueError("this UniFormer has no classification head (num_classes not set)")
        return self.head(self(video)["pooled"])


@register_arch("uniformer")
def build(size: str | None = "s", **kwargs: Any) -> UniFormerVideo:
    """UniFormer-S or -B (``size`` "s"/"b") merged with any constructor argument; ``size=None``
    with ``depths`` given (e.g. the tiny test model)."""
    return UniFormerVideo(**merge_size_preset("UniFormer", UNIFORMER_SIZES, size, kwargs))


# --------------------------------------------------------------------------- official weights

# Sense-X/UniFormer video_classification/slowfast/models/uniformer.py -> this module
_UNIFORMER_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^patch_embed([1-4])\.(proj|norm)\.(weight|bias)$"), "patch_embeds.{s}.\\2.\\3"),
    (re.compile(r"^blocks([12])\.(\d+)\.((?:pos_embed|norm1|conv1|attn|conv2|norm2|mlp\.fc1|mlp\.fc2)\."
                r"(?:weight|bias|running_mean|running_var|num_batches_tracked))$"), "stages.{s}.\\2.\\3"),
    (re.compile(r"^blocks([34])\.(\d+)\.pos_embed\.(weight|bias)$"), "stages.{s}.\\2.pos_embed.\\3"),
    (re.compile(r"^blocks([34])\.(\d+)\.((?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))$"),
     "stages.{s}.\\2.block.\\3"),
    (re.compile(r"^(norm)\.(weight|bias|running_mean|running_var|num_batches_tracked)$"), "norm.\\2"),
    (re.compile(r"^(head)\.(weight|bias)$"), "head.\\2"),
)


def uniformer_key_mapping() -> list[tuple[str, str]]:
    """(official pattern, vtr name) pairs, for documentation."""
    return [(p.pattern, r) for p, r in _UNIFORMER_RENAMES]


def _rename(key: str) -> str | None:
    for pattern, repl in _UNIFORMER_RENAMES:
        m = pattern.match(key)
        if m:
            stage = int(m.group(1)) - 1 if m.group(1).isdigit() else 0
            return m.expand(repl.replace("{s}", str(stage)))
    return None


def infer_config_from_state(sd: dict[str, torch.Tensor], head_dim: int = 64) -> dict[str, Any]:
    """Builder config from the shapes of an official UniFormer video state dict (head widths are
    not stored: ``head_dim``, 64 in every published model)."""
    need = [f"patch_embed{i}.proj.weight" for i in range(1, 5)] + ["norm.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError("not a UniFormer video checkpoint: missing " + ", ".join(absent)
                              + f" (first keys seen: {', '.join(list(sd)[:5])})")
    if any(".t_attn." in k for k in sd):
        raise CheckpointError("this UniFormer uses split space-time attention (SPLIT: True, t_attn.*), which no "
                              "published video model does and vtr does not implement")
    w1 = sd["patch_embed1.proj.weight"]
    if w1.dim() != 5:
        raise CheckpointError(f"patch_embed1.proj.weight has shape {tuple(w1.shape)}: this is UniFormer's image model, "
                              "not the video one (Conv3d)")
    dims = [int(sd[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)]
    depths = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"blocks{i}\.(\d+)\.", k))}
        depths.append(max(idx) + 1 if idx else 0)
    bad = [d for d in dims[2:] if d % head_dim]
    if bad:
        raise CheckpointError(f"widths {bad} of the attention stages are not multiples of --head-dim {head_dim} "
                              "(heads are not stored in the weights; 64 in every published model)")
    hidden = int(sd["blocks1.0.mlp.fc1.weight"].shape[0]) if "blocks1.0.mlp.fc1.weight" in sd else 4 * dims[0]
    kt = int(sd["patch_embed2.proj.weight"].shape[2])
    cfg: dict[str, Any] = {
        "arch": "uniformer", "size": None, "depths": depths, "dims": dims, "head_dim": head_dim,
        "mlp_ratio": hidden / dims[0], "drop_path_rate": 0.0, "patch_t_kernel": kt,
        "qkv_bias": any(k.endswith("attn.qkv.bias") for k in sd),
        "mean": list(UNIFORMER_MEAN), "std": list(UNIFORMER_STD),
    }
    if "head.weight" in sd:
        cfg["num_classes"] = int(sd["head.weight"].shape[0])
    return cfg


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], unmapped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """An official UniFormer video state dict in this module's naming (:func:`uniformer_key_mapping`).

    Nothing is dropped (the classification ``head`` is kept for ``classify``). Keys that are not
    part of the video model are appended to ``unmapped`` when given, else they are an error.
    """
    out, left = {}, []
    for k, v in state_dict.items():
        new = _rename(k)
        if new is None:
            left.append(k)
        else:
            out[new] = v
    if unmapped is not None:
        unmapped.extend(left)
    elif left:
        raise CheckpointError("keys that are not part of UniFormer's video model: " + ", ".join(left[:20])
                              + (f", ... ({len(left)} in all)" if len(left) > 20 else ""))
    return out
