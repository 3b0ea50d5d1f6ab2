"""The frozen teacher of unmasked-teacher alignment (UTA).

Any registered video backbone (or model directory) whose ``tokens`` are ``[B, 1+T*N, D]``, cls
first and frames in order, can teach: its patch tokens are the targets and its cls-to-patch
affinity (softmax of scaled dot products, the cls token's attention pattern in the output space)
chooses which student tokens stay visible. The teacher sees the frames normalised its own way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


class Teacher(nn.Module):
    def __init__(self, net: nn.Module, student_preprocess: dict[str, Any]):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        mean_s, std_s = student_preprocess["mean"], student_preprocess["std"]
        mean_t, std_t = net.preprocess["mean"], net.preprocess["std"]
        # student-normalised pixels -> teacher-normalised pixels: x_t = x_s * a + b
        a = torch.tensor(std_s) / torch.tensor(std_t)
        b = (torch.tensor(mean_s) - torch.tensor(mean_t)) / torch.tensor(std_t)
        self.register_buffer("a", a.view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("b", b.view(1, 3, 1, 1, 1), persistent=False)

    @classmethod
    def load(cls, spec: str, student_preprocess: dict[str, Any]) -> "Teacher":
        if Path(spec).is_dir():
            from ..models.io import load_model  # noqa: PLC0415

            net = load_model(spec)
            net = getattr(net, "video", net)
        else:
            from ..models.registry import create_model  # noqa: PLC0415

            net = create_model(spec)
        return cls(net, student_preprocess)

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens [B, T*N, D], cls-to-patch affinity [B, T, N])."""
        b, _, t = video.shape[:3]
        tokens = self.net(video * self.a + self.b)["tokens"]
        cls, patches = tokens[:, 0], tokens[:, 1:]
        if patches.shape[1] % t:
            raise ValueError(f"the UTA teacher returned {patches.shape[1]} patch tokens, not a multiple of {t} "
                             "frames: it must return [B, 1+T*N, D] tokens")
        n = patches.shape[1] // t
        affinity = torch.einsum("bd,bld->bl", cls, patches) / patches.shape[-1] ** 0.5
        return patches, affinity.reshape(b, t, n)
