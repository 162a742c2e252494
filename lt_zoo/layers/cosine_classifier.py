"""Cosine classifier (the normalised linear head of GCL, Li et al. CVPR'22)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CosineClassifier']


class CosineClassifier(nn.Module):
    """logits = scale * normalize(x) @ normalize(W)^T, no bias.

    Args:
        in_features: D, feature size.
        num_classes: C.
        scale: s multiplying the cosines (30, GCLLoss official CIFAR stage 1, docs/gcl.md). The head
            owns its scale: losses that work on cosines (GCL, LDAM) read :meth:`cosine` and apply their own s.
    Shapes: x (B, D) -> (B, C).  ``weight`` is (C, D), laid out like nn.Linear (the official
    ``NormedLinear`` stores the transpose), so CAMs and tau-normalisation treat both heads alike.
    Init as the official code: U(-1, 1), then every class vector renormalised to unit length.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, device=None, dtype=None):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"CosineClassifier scale must be a positive finite number, got {scale!r}")
        self.in_features = in_features
        self.out_features = num_classes
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-1, 1)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (B, C) in [-1, 1]."""
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.cosine(x)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}'
