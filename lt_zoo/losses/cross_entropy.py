"""Plain softmax cross-entropy (the ERM baseline), optionally with label smoothing."""
from __future__ import annotations

from torch import Tensor

from .base import ClassCountLoss, _check_number, adjusted_cross_entropy

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(ClassCountLoss):
    """``L = mean_i CE(z_i, y_i)``; logits (B, C), target (B,) -> scalar.

    ``class_counts`` is only used for the shape check (the loss ignores class frequencies).
    label_smoothing=0.0: plain CE, the baseline of every paper in docs/losses.md; with eps > 0 the
    target is (1 - eps) one-hot + eps / C, as ``torch.nn.functional.cross_entropy``.
    """

    def __init__(self, class_counts, label_smoothing: float = 0.0, check_inputs: bool = True):
        super().__init__(class_counts, check_inputs=check_inputs)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = self._prepare(logits, target)
        return adjusted_cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}"
