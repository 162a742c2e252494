"""LDAM loss with deferred re-weighting (Cao et al. NeurIPS'19, kaidic/LDAM-DRW)."""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .base import REDUCTIONS, ClassCountLoss, _check_number, adjusted_cross_entropy
from .class_balanced import class_balanced_weights

__all__ = ["LDAMLoss", "ldam_margins"]


def ldam_margins(class_counts, max_m: float = 0.5) -> np.ndarray:
    """``m_j = max_m * n_j^(-1/4) / max_k n_k^(-1/4)`` (largest margin = max_m, on the rarest class)."""
    m = np.asarray(class_counts, dtype=np.float64) ** -0.25
    return m * (max_m / m.max())


class LDAMLoss(ClassCountLoss):
    """``L = CE(s * (cos - m_y e_y), y)``, optionally class-weighted; cos (B, C) in [-1, 1], y (B,).

    Takes the cosine similarities of a normalised head (LDAM-DRW ``NormedLinear``).
    Deferred re-weighting: for epochs < drw_epoch the loss is unweighted; from drw_epoch on (as set
    by :meth:`set_epoch`) each sample is weighted by the class-balanced weight of its class
    (:func:`class_balanced_weights` with ``beta``), reduced as ``reduction``.
    Defaults (LDAM-DRW ``cifar_train.py``): max_m=0.5, s=30, drw_epoch=160 (of 200), beta=0.9999,
    reduction='weighted_mean' (DRW passes ``weight=`` to ``F.cross_entropy``). drw_epoch=None never
    re-weights (plain LDAM).
    """

    expects_cosine = True

    def __init__(self, class_counts, max_m: float = 0.5, s: float = 30.0, drw_epoch: Optional[int] = 160,
                 beta: float = 0.9999, reduction: str = "weighted_mean", check_inputs: bool = True):
        super().__init__(class_counts, check_inputs=check_inputs)
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or not isinstance(drw_epoch, numbers.Integral)
                                      or drw_epoch < 0):
            raise ValueError(f"drw_epoch must be a non-negative int or None; got {drw_epoch!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        self.max_m = _check_number("max_m", max_m, 0.0, low_open=True)
        self.s = _check_number("s", s, 0.0, low_open=True)
        self.drw_epoch = drw_epoch
        self.beta = float(beta)
        self.reduction = reduction
        self.register_buffer("margins", torch.from_numpy(ldam_margins(self.class_counts, self.max_m)),
                             persistent=False)
        self.register_buffer("drw_weight", torch.from_numpy(class_balanced_weights(self.class_counts, beta)),
                             persistent=False)

    @property
    def reweighting(self) -> bool:
        """Whether the current epoch uses the deferred class-balanced weights."""
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def forward(self, cosine: Tensor, target: Tensor) -> Tensor:
        cosine, target = self._prepare(cosine, target)
        weight = self.drw_weight.to(cosine.dtype) if self.reweighting else None
        return adjusted_cross_entropy(cosine, target, target_margin=self.margins.to(cosine.dtype),
                                      scale=self.s, class_weight=weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, drw_epoch={self.drw_epoch}, "
                f"beta={self.beta}, reduction={self.reduction!r}")
