"""Softmax focal loss (Lin et al. ICCV'17) on multi-class logits."""
from __future__ import annotations

from torch import Tensor

from .base import ClassCountLoss, _check_number, adjusted_cross_entropy

__all__ = ["FocalLoss"]


class FocalLoss(ClassCountLoss):
    """``L = mean_i (1 - p_i)^gamma * CE(z_i, y_i)`` with ``p_i = softmax(z_i)_{y_i}``.

    logits (B, C), target (B,) -> scalar; ``class_counts`` is only used for the shape check.
    gamma=1.0: LDAM-DRW ``cifar_train.py`` 'Focal' baseline and GCL stage 2 (docs/gcl.md);
    gamma=0 is plain CE. The modulating factor keeps its gradient (LDAM-DRW ``losses.py``).
    """

    def __init__(self, class_counts, gamma: float = 1.0, check_inputs: bool = True):
        super().__init__(class_counts, check_inputs=check_inputs)
        self.gamma = _check_number("gamma", gamma, 0.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = self._prepare(logits, target)
        return adjusted_cross_entropy(logits, target, gamma=self.gamma)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}"
