"""Logit adjustment (Menon et al. ICLR'21): as a loss and as a post-hoc correction."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..class_counts import validate_class_counts
from .base import ClassCountLoss, _check_number, adjusted_cross_entropy

__all__ = ["LogitAdjustedLoss", "posthoc_adjust"]


def _log_prior(class_counts) -> np.ndarray:
    n = validate_class_counts(class_counts)
    # counts are >= 1, so the official "+1e-12" inside the log is unnecessary.
    return np.log(n / n.sum())


def posthoc_adjust(logits: Tensor, class_counts, tau: float = 1.0) -> Tensor:
    """Return ``z - tau * log pi`` (same shape as logits (B, C)); predict with its argmax.

    pi_j = n_j / sum n (training prior). tau=1.0: google-research ``logit_adjustment`` default.
    """
    tau = _check_number("tau", tau)
    log_pi = _log_prior(class_counts)
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[1] != len(log_pi):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (B, {len(log_pi)}) to match class_counts; got {shape}")
    return logits - tau * torch.as_tensor(log_pi, dtype=logits.dtype, device=logits.device)


class LogitAdjustedLoss(ClassCountLoss):
    """``L = mean_i CE(z_i + tau * log pi, y_i)``; logits (B, C), target (B,) -> scalar.

    Inference uses the plain logits. tau=1.0: google-research ``logit_adjustment`` (docs/losses.md);
    with tau=1 this equals Balanced Softmax.
    """

    def __init__(self, class_counts, tau: float = 1.0, check_inputs: bool = True):
        super().__init__(class_counts, check_inputs=check_inputs)
        self.tau = _check_number("tau", tau)
        self.register_buffer("log_prior", torch.from_numpy(_log_prior(self.class_counts)), persistent=False)

    def _offset(self) -> Tensor:
        return self.tau * self.log_prior

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = self._prepare(logits, target)
        return adjusted_cross_entropy(logits, target, offset=self._offset().to(logits.dtype))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"
