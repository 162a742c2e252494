"""Balanced Softmax (Ren et al. NeurIPS'20, BALMS)."""
from __future__ import annotations

from torch import Tensor

from .logit_adjustment import LogitAdjustedLoss

__all__ = ["BalancedSoftmaxLoss"]


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """``L = mean_i CE(z_i + log n, y_i)``; logits (B, C), target (B,) -> scalar.

    BALMS ``loss/BalancedSoftmaxLoss.py`` (docs/losses.md). ``log n`` and ``log pi`` differ by a
    constant per row, which softmax ignores, so this is :class:`LogitAdjustedLoss` with tau = 1;
    it has no options. Inference uses the plain logits.
    """

    def __init__(self, class_counts, check_inputs: bool = True):
        super().__init__(class_counts, tau=1.0, check_inputs=check_inputs)

    def _offset(self) -> Tensor:
        return self.log_counts

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
