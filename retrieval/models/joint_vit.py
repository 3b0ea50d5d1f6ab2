"""Joint space-time ViT (the video encoder of UMT): one self-attention over every patch of every frame.

Why this baseline: it is the quadratic-cost reference that VideoMamba is compared against. Every
block attends over all ``1 + T·N`` tokens (N = (img_size / patch_size)² patches per frame), so cost
grows with T² while VideoMamba grows linearly.

Layout:

* patch embed: Conv3d with kernel = stride = (tubelet, patch, patch); ``tubelet_size=1`` keeps every
  frame (UMT's default for retrieval), 2 halves the token count.
* a learnable cls token, a spatial position embedding shared by all frames, and a temporal
  position embedding shared by all patches of a frame (factorised, so ``T + N`` position
  parameters rather than ``T·N``).
* pre-norm transformer blocks (timm's ``Block``), final LayerNorm.
* ``pooled``: mean of the patch tokens (``pool="avg"``, UMT) or the cls token (``pool="cls"``).

Options that exist to hold official UMT weights exactly (``vtr convert --format umt``); their
defaults keep the layout above:

* ``cls_token=False``: UMT's ViT has no cls token; ``tokens`` are then the patch tokens only.
* ``pos_embed="sincos"``: UMT adds a fixed 1-D sinusoidal table over all ``T'·N`` space-time
  positions (the Transformer formula, position ``t·N + n``) instead of learned factorised
  embeddings; the table is a non-persistent buffer, so it is neither trained nor saved.
* ``keep_temporal=True``: ``pooled`` is the mean patch token of each time step ``[B, T', D]``
  (UMT's retrieval setting: clip-text scores are averaged over frames).
* ``pool_norm=True``: a LayerNorm (eps 1e-6) on ``pooled``, as UMT's ``pool_norm``.
* ``clip_output_dim=Dt``: UMT's unmasked-teacher alignment (UTA) head, ``clip_return_layers``
  (default 6) decoders ``clip_decoder.i`` aligning the last blocks to a CLIP teacher's last
  blocks (``ln_post``, no cls target; see ``retrieval.train.teacher``).

Attention implementation (``fused_attn``): by default timm's block calls
``torch.nn.functional.scaled_dot_product_attention``, whose CPU/GPU kernels never materialise the
``[heads, L, L]`` score matrix, so activation memory grows linearly with the token count.
``fused_attn=False`` selects the textbook ``softmax(q kᵀ) v`` path, which stores that matrix (and
its softmax) per block: at 64 frames × 224 px (L = 12 545, ti: 3 heads) that is 1.9 GB per copy.
Both give the same outputs; ``bench/scaling.py`` measures both (spec ``joint_vit_ti:fused_attn=false``).
Measured at 32 frames (L = 6 273), ti, 2 CPU threads on a busy machine: fused 9.9 s and +0.13 GB
over the built model, textbook 28.8 s and +1.03 GB (two 0.47 GB score/softmax matrices).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

from retrieval.models.layers import IMAGENET_MEAN, IMAGENET_STD, route_linears, sincos_table, validate_video
from retrieval.models.model_dir import CheckpointError
from retrieval.models.registry import merge_size_preset, register_arch

# the published sizes
JOINT_VIT_SIZES: dict[str, dict[str, int]] = {
    "ti": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "s": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


class JointSpaceTimeViT(nn.Module):
    """ViT whose blocks attend jointly over all space-time patch tokens (plus one cls token).

    ``forward(video [B, 3, T, H, W]) -> {"tokens": [B, 1 + T'·N, D], "pooled": [B, D]}`` with
    ``T' = T / tubelet_size``; tokens are frame-major (all patches of frame 0 in raster order, then
    frame 1, ...) after the final LayerNorm, cls first. With ``cls_token=False`` there is no cls
    slot (``[B, T'·N, D]``); with ``keep_temporal=True`` ``pooled`` is ``[B, T', D]``.
    """

    keep_temporal = False
    has_cls_token = True  # tokens[:, 0] is the cls token

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        tubelet_size: int = 1,
        num_frames: int = 8,
        img_size: int = 224,
        pool: str = "avg",
        drop_path_rate: float = 0.0,
        fused_attn: bool = True,
        cls_token: bool = True,
        pos_embed: str = "learned",
        keep_temporal: bool = False,
        pool_norm: bool = False,
        clip_output_dim: int | None = None,
        clip_return_layers: int = 6,
    ) -> None:
        super().__init__()
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if pool == "cls" and (not cls_token or keep_temporal):
            raise ValueError("pool='cls' needs cls_token=True and keep_temporal=False (one cls token per clip)")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not a multiple of tubelet_size {tubelet_size}")
        self.embed_dim = embed_dim
        self.num_frames = num_frames
        self.img_size = img_size
        self.pool = pool
        self.pos_embed_kind = pos_embed
        # instance attributes shadow the class defaults read by RetrievalModel and the indexer
        self.has_cls_token = cls_token
        self.keep_temporal = keep_temporal
        self.grad_checkpointing = False
        self.preprocess = {
            "size": img_size,
            "num_frames": num_frames,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bicubic",
        }

        grid = img_size // patch_size
        self.num_patches = grid * grid
        self.num_time_steps = num_frames // tubelet_size
        self.patch_embed = nn.Conv3d(
            3,
            embed_dim,
            kernel_size=(tubelet_size, patch_size, patch_size),
            stride=(tubelet_size, patch_size, patch_size),
        )
        # the cls token needs no position embedding of its own: it is a learned vector either way
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        if pos_embed == "learned":
            self.spatial_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, self.num_time_steps, embed_dim))
        else:
            self.spatial_pos_embed = self.temporal_pos_embed = None
            table = sincos_table(self.num_time_steps * self.num_patches, embed_dim)
            self.register_buffer("pos_table", table.unsqueeze(0), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate) for rate in rates
        )
        for block in self.blocks:
            block.attn.fused_attn = fused_attn
        # timm's linears as the mixer's: large fp32 CPU inference products on oneDNN where chosen
        route_linears(self.blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pool_norm = nn.LayerNorm(embed_dim, eps=1e-6) if pool_norm else None
        # UMT's unmasked-teacher alignment: one decoder per aligned layer (the last K blocks)
        self.clip_decoder = None
        if clip_output_dim:
            if not 1 <= clip_return_layers <= depth:
                raise ValueError(f"clip_return_layers must be in [1, {depth}], got {clip_return_layers}")
            self.clip_decoder = nn.ModuleList(_CLIPDecoder(embed_dim, clip_output_dim)
                                              for _ in range(clip_return_layers))
        # teacher targets as UMT aligns its ViT: ln_post, no cls target, the teacher's last K blocks
        self.uta_layout = {"cls_target": False, "ln_post": True, "layers": clip_return_layers}
        self.init_weights()

    def init_weights(self) -> None:
        """ViT init: truncated-normal embeddings, then timm's ViT rule (``init_weights_vit_timm``:
        truncated-normal linear weights, zero biases; LayerNorms stay at one and zero)."""
        for param in (self.cls_token, self.spatial_pos_embed, self.temporal_pos_embed):
            if param is not None:
                trunc_normal_(param, std=0.02)
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input in training and recompute the block in backward (less memory)."""
        self.grad_checkpointing = enable

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None,
                return_distill: bool = False) -> dict[str, torch.Tensor]:
        """``mask``: optional bool ``[B, T'·N]`` (True = patch dropped, the same count per sample): only
        the visible patches (and the cls token) enter the blocks, and ``pooled`` is then the mean of
        the visible patches of the whole clip. ``return_distill`` adds ``"distill"`` ``[K, B, V, Dt]``,
        UMT's aligned tokens (see :meth:`_distill`)."""
        validate_video(
            video, model_name="JointSpaceTimeViT", num_frames=self.num_frames, img_size=self.img_size
        )
        x = self.patch_embed(video)  # [B, D, T', g, g]
        b, d, t, _, _ = x.shape
        x = x.flatten(3).permute(0, 2, 3, 1)  # [B, T', N, D]
        if self.pos_embed_kind == "learned":
            x = x + self.spatial_pos_embed.unsqueeze(1) + self.temporal_pos_embed.unsqueeze(2)
            x = x.reshape(b, t * self.num_patches, d)
        else:
            x = x.reshape(b, t * self.num_patches, d) + self.pos_table.to(x.dtype)
        n_patches = x.shape[1]
        if mask is not None:
            if mask.shape != (b, n_patches) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool [B, T*N] = {(b, n_patches)}, got {tuple(mask.shape)} {mask.dtype}")
            keep = (~mask).sum(1)
            if (keep != keep[0]).any():
                raise ValueError("mask must keep the same number of patches in every sample")
            x = x[~mask].reshape(b, int(keep[0]), d)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        aligned = []
        first_aligned = len(self.blocks) - (len(self.clip_decoder) if return_distill and self.clip_decoder else 0)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i >= first_aligned:
                aligned.append(x)
        x = self.norm(x)
        patches = x[:, 1:] if self.cls_token is not None else x
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.keep_temporal and mask is None:
            pooled = patches.reshape(b, t, self.num_patches, d).mean(dim=2)
        else:
            pooled = patches.mean(dim=1)
        if self.pool_norm is not None:
            pooled = self.pool_norm(pooled)
        out = {"tokens": x, "pooled": pooled}
        if return_distill:
            out["distill"] = self._distill(aligned, mask, n_patches)
        return out

    def _distill(self, aligned: list[torch.Tensor], mask: torch.Tensor | None, n_patches: int) -> torch.Tensor:
        """UMT's aligned tokens ``[K, B, V, Dt]`` (unit vectors): each of the last K blocks' visible
        patch tokens through the final LayerNorm, plus the fixed sinusoidal ``clip_pos_embed``
        (``T'·N`` positions, no cls slot) at their places, through that layer's own decoder
        (Linear + LayerNorm), L2-normalised. The cls token, if any, is not aligned."""
        if self.clip_decoder is None:
            raise ValueError("this joint ViT has no clip_decoder (clip_output_dim not set): cannot distill")
        table = sincos_table(n_patches, self.embed_dim).to(aligned[0].device, aligned[0].dtype)
        b = aligned[0].shape[0]
        pos = table.expand(b, -1, -1) if mask is None else table.expand(b, -1, -1)[~mask].reshape(b, -1, self.embed_dim)
        skip = 1 if self.cls_token is not None else 0
        return torch.stack([F.normalize(decoder(self.norm(z)[:, skip:] + pos), dim=-1)
                            for decoder, z in zip(self.clip_decoder, aligned, strict=True)])


class _CLIPDecoder(nn.Module):
    """Student tokens -> the teacher's space (UMT's ``clip_decoder.i``: ``head`` Linear + ``norm`` LayerNorm)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(x))


@register_arch("joint_vit")
def build(size: str | None = "ti", **kwargs: Any) -> JointSpaceTimeViT:
    """A joint space-time ViT of a named ``size`` (ti/s/base) merged with any constructor argument
    (``size=None``: ``embed_dim``, ``depth`` and ``num_heads`` given)."""
    return JointSpaceTimeViT(**merge_size_preset("joint_vit", JOINT_VIT_SIZES, size, kwargs))


# --------------------------------------------------------------------------- official UMT checkpoints

# UMT's frame count is not stored in its weights (its position table is computed, not learned);
# the official zero-shot retrieval evaluation of UMT-B/16 and UMT-L/16 uses 4 frames.
UMT_DEFAULT_FRAMES = 4
UMT_IMG_SIZE = 224
# UMT (OpenGVLab/unmasked_teacher, multi_modality/models/backbones/vit/vit.py, the model under
# ``vision_encoder.``) -> joint_vit. q_bias/v_bias are merged in checkpoint_filter_fn.
_UMT_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^encoder\.patch_embed\.proj\.(weight|bias)$"), r"patch_embed.\1"),
    (re.compile(r"^encoder\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"),
     r"blocks.\1.\2.\3"),
    (re.compile(r"^encoder\.blocks\.(\d+)\.attn\.qkv\.weight$"), r"blocks.\1.attn.qkv.weight"),
    (re.compile(r"^encoder\.norm\.(weight|bias)$"), r"norm.\1"),
    (re.compile(r"^pool_norm\.(weight|bias)$"), r"pool_norm.\1"),
)
_UMT_QV_BIAS = re.compile(r"^encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$")
# the student's distillation decoder, a training-only part (the converted model has no UTA head)
UMT_DECODER_REASON = "UMT distillation decoder"
_UMT_DECODER = re.compile(r"^clip_decoder\.")


def umt_key_mapping() -> list[tuple[str, str]]:
    """The UMT -> joint_vit key mapping as (UMT pattern, joint_vit name) pairs, for documentation."""
    rows = [(p.pattern, r) for p, r in _UMT_RENAMES]
    rows.append((_UMT_QV_BIAS.pattern, r"blocks.\1.attn.qkv.bias = cat(q_bias, 0, v_bias)"))
    return rows


def infer_config_from_state(state_dict: dict[str, torch.Tensor], num_frames: int | None = None,
                            num_heads: int | None = None, img_size: int = UMT_IMG_SIZE) -> dict[str, Any]:
    """joint_vit builder config of an official UMT ViT state dict (the keys under ``vision_encoder.``).

    Facts used (UMT's ``PretrainVisionTransformer``): Conv3d patch embedding with kernel
    ``(tubelet, p, p)``; no cls token; a fixed sinusoidal table over all ``T'·N`` positions
    (not in the checkpoint); pre-norm blocks with LayerNorm eps 1e-6, ``qkv`` without bias plus
    separate ``q_bias``/``v_bias`` (the key bias is zero), GELU MLP; final ``encoder.norm``;
    ``pool_norm`` over the per-frame mean of the patch tokens (``keep_temporal`` for retrieval).
    What the weights do not hold: ``num_frames`` (default 4), ``num_heads`` (default width / 64).
    """
    vision = state_dict
    if "encoder.patch_embed.proj.weight" not in vision:
        raise CheckpointError("not a UMT vision encoder: missing encoder.patch_embed.proj.weight "
                              f"(first keys seen: {', '.join(list(vision)[:5])}); "
                              "for VideoMamba checkpoints use --format videomamba")
    w = vision["encoder.patch_embed.proj.weight"]
    if w.dim() != 5:
        raise CheckpointError(f"encoder.patch_embed.proj.weight has shape {tuple(w.shape)}; UMT uses a Conv3d "
                              "[D, 3, tubelet, p, p]")
    dim, in_chans, tubelet, patch, _ = (int(s) for s in w.shape)
    if in_chans != 3:
        raise CheckpointError(f"UMT patch embedding reads {in_chans} channels; vtr's joint_vit reads RGB (3)")
    blocks = sorted({int(m.group(1)) for k in vision if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))})
    if not blocks:
        raise CheckpointError("not a UMT vision encoder: no encoder.blocks.* keys")
    fc1 = vision.get("encoder.blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError("UMT vision encoder: missing encoder.blocks.0.mlp.fc1.weight")
    if num_heads is None:
        if dim % 64:
            raise CheckpointError(f"UMT width {dim} is not a multiple of 64, so the number of attention heads "
                                  "(not stored in the weights) cannot be assumed; pass num_heads")
        num_heads = dim // 64  # UMT-B: 768/12, UMT-L: 1024/16 (head width 64)
    frames = num_frames or UMT_DEFAULT_FRAMES
    if frames % tubelet:
        raise CheckpointError(f"num_frames {frames} is not a multiple of the checkpoint's tubelet size {tubelet}")
    return {
        "arch": "joint_vit", "size": None, "embed_dim": dim, "depth": blocks[-1] + 1, "num_heads": num_heads,
        "mlp_ratio": int(fc1.shape[0]) / dim, "patch_size": patch, "tubelet_size": tubelet,
        "num_frames": frames, "img_size": img_size, "pool": "avg", "cls_token": False, "pos_embed": "sincos",
        "keep_temporal": True, "pool_norm": "pool_norm.weight" in vision,
    }


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], dropped: dict[str, list[str]] | None = None,
                         unmapped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """An official UMT ViT state dict (keys under ``vision_encoder.``, prefix stripped) in joint_vit naming.

    Renames as :func:`umt_key_mapping`; ``q_bias``/``v_bias`` become ``qkv.bias`` with a zero key
    bias. The distillation decoder (``clip_decoder.*``) is dropped, recorded in ``dropped``
    (reason -> keys) when given. Keys with no place in joint_vit are appended to ``unmapped`` when
    given, else they are an error.
    """
    out: dict[str, torch.Tensor] = {}
    left: list[str] = []
    qv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if _UMT_DECODER.match(key):
            if dropped is not None:
                dropped.setdefault(UMT_DECODER_REASON, []).append(key)
            continue
        if m := _UMT_QV_BIAS.match(key):
            qv.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        for pattern, repl in _UMT_RENAMES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            left.append(key)
    for i, parts in sorted(qv.items()):
        if set(parts) != {"q", "v"}:
            lack = "v_bias" if "q" in parts else "q_bias"
            raise CheckpointError(f"UMT vision encoder: encoder.blocks.{i}.attn.{lack} is missing "
                                  "(q_bias and v_bias come in pairs)")
        q, v = parts["q"], parts["v"]
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    if unmapped is not None:
        unmapped.extend(left)
    elif left:
        raise CheckpointError(f"vision keys with no place in vtr's joint_vit: {', '.join(sorted(left)[:20])}"
                              + (f", ... ({len(left)} in all)" if len(left) > 20 else ""))
    return out
