"""Class-balanced loss by effective number of samples (Cui et al. CVPR'19)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..class_counts import effective_number_weights
from .base import REDUCTIONS, ClassCountLoss, _check_number, adjusted_cross_entropy

__all__ = ["ClassBalancedLoss", "class_balanced_weights"]

BASES = ("ce", "focal")


def class_balanced_weights(class_counts, beta: float = 0.9999) -> np.ndarray:
    """``w_j = (1 - beta) / (1 - beta^n_j)`` rescaled so that ``sum_j w_j = C``; float64 (C,).

    Normalising to C follows Cui et al. ``class_balanced_loss.py`` and LDAM-DRW's DRW weights.
    """
    w = effective_number_weights(class_counts, _check_number("beta", beta, 0.0, 1.0, high_open=True))
    return w * (len(w) / w.sum())


class ClassBalancedLoss(ClassCountLoss):
    """Per-class weighted CE or focal loss; logits (B, C), target (B,) -> scalar.

    ``l_i`` = CE (base='ce') or ``(1 - p_i)^gamma CE`` (base='focal', softmax focal; Cui et al. used a
    sigmoid focal loss), weighted by ``w_{y_i}`` from :func:`class_balanced_weights`.

    reduction='mean' (default): ``sum_i w_{y_i} l_i / N`` -- the class-balanced loss as Cui et al.
    define it per sample and average it, and what the pip packages ``balanced-loss`` and ``cbloss``
    compute (docs/losses.md#decision-class-balanced-reduction), so its numbers are comparable with theirs.
    reduction='weighted_mean': ``sum_i w_{y_i} l_i / sum_i w_{y_i}``, as
    ``F.cross_entropy(weight=w)`` and LDAM-DRW's DRW stage; the loss scale then does not depend on
    how many rare samples the batch happens to hold.

    beta=0.9999: Cui et al. and LDAM-DRW default for CIFAR-LT. gamma (base='focal' only) defaults
    to 1.0 (LDAM-DRW focal baseline).
    """

    def __init__(self, class_counts, beta: float = 0.9999, base: str = "ce",
                 gamma: Optional[float] = None, reduction: str = "mean", check_inputs: bool = True):
        super().__init__(class_counts, check_inputs=check_inputs)
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}; got {base!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        if base == "ce" and gamma is not None:
            raise ValueError(f"gamma={gamma!r} only applies to base='focal'; got base='ce'")
        self.beta = float(beta)
        self.base = base
        self.gamma = 0.0 if base == "ce" else _check_number("gamma", 1.0 if gamma is None else gamma, 0.0)
        self.reduction = reduction
        weights = class_balanced_weights(self.class_counts, beta)
        self.register_buffer("class_weight", torch.from_numpy(weights), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = self._prepare(logits, target)
        return adjusted_cross_entropy(logits, target, class_weight=self.class_weight.to(logits.dtype),
                                      reduction=self.reduction, gamma=self.gamma)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, beta={self.beta}, base={self.base!r}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}")
