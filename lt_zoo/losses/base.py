"""Shared core of the class-count-aware losses: input checks and one adjusted cross-entropy.

Every classification loss in :mod:`lt_zoo.losses` is a parameterisation of
:func:`adjusted_cross_entropy`

    z'_i = s * (z_i + o_i - m_{y_i} e_{y_i}),   l_i = CE(z'_i, y_i),
    l_i <- (1 - p_i)^gamma l_i with p_i = exp(-l_i)          (focal, gamma > 0),
    L = sum_i w_{y_i} l_i / N  ('mean')   or   sum_i w_{y_i} l_i / sum_i w_{y_i}  ('weighted_mean'),

and subclasses of :class:`ClassCountLoss`, which owns the per-class counts and the argument checks.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..class_counts import validate_class_counts

__all__ = ["ClassCountLoss", "adjusted_cross_entropy", "focal_modulate", "REDUCTIONS"]

REDUCTIONS = ("mean", "weighted_mean")

# Largest |cosine| accepted: 1 plus room for half-precision rounding in the cosine head; scaled
# logits (s = 15..30) exceed it by far.
_COSINE_LIMIT = 1.05


def focal_modulate(per_sample_ce: Tensor, gamma: float, detach: bool = False) -> Tensor:
    """Focal loss from per-sample CE (B,): ``(1 - p)^gamma * ce`` with ``p = exp(-ce)``.

    ``detach=True`` treats the modulating factor as a constant in backward, as GCLLoss's
    ``losses.py::focal_loss`` does (``p.detach()``); LDAM-DRW's focal keeps its gradient.
    """
    if gamma == 0:
        return per_sample_ce
    # -expm1(-ce) = 1 - p accurately for small ce; the floor keeps gamma < 1 from an inf*0 gradient.
    one_minus_p = (-torch.expm1(-per_sample_ce)).clamp_min(torch.finfo(per_sample_ce.dtype).tiny)
    factor = one_minus_p ** gamma
    if detach:
        factor = factor.detach()
    return factor * per_sample_ce


def adjusted_cross_entropy(logits: Tensor, target: Tensor, *, offset: Optional[Tensor] = None,
                           target_margin: Optional[Tensor] = None, scale: float = 1.0,
                           class_weight: Optional[Tensor] = None, reduction: str = "mean",
                           gamma: float = 0.0, detach_focal: bool = False,
                           label_smoothing: float = 0.0) -> Tensor:
    """Scalar loss from logits (B, C) and int64 target (B,); see the module docstring.

    ``offset``: (C,) or (B, C) added to the logits; ``target_margin``: (C,) subtracted from the
    target column only; ``class_weight``: (C,) per-class weights ``w``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    z = logits
    if offset is not None:
        z = z + offset
    if target_margin is not None:
        idx = target.unsqueeze(1)
        z = z.scatter(1, idx, z.gather(1, idx) - target_margin[target].unsqueeze(1))
    if scale != 1.0:
        z = z * scale
    per_sample = F.cross_entropy(z, target, reduction="none", label_smoothing=label_smoothing)
    per_sample = focal_modulate(per_sample, gamma, detach=detach_focal)
    if class_weight is None:
        return per_sample.mean()
    w = class_weight[target]
    total = (w * per_sample).sum()
    return total / w.sum() if reduction == "weighted_mean" else total / per_sample.shape[0]


def _check_number(name: str, value, low: float = -math.inf, high: float = math.inf,
                  low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as float after checking it is a real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}; got {value!r}")
    return float(value)


class ClassCountLoss(nn.Module):
    """Base for losses built from per-class training counts ``n`` (C,).

    ``forward(logits, target)``: logits (B, C) float, target (B,) int64 class indices -> scalar.
    Checks are done before any arithmetic: shapes, dtypes, and (if ``check_inputs``) label range and
    finite logits, plus the [-1, 1] range for cosine-input losses. The value checks cost one
    host-device sync per call; ``check_inputs=False`` skips them (e.g. under ``torch.compile``).
    """

    #: True when the loss takes cosine similarities (B, C) in [-1, 1] rather than logits.
    expects_cosine: bool = False

    def __init__(self, class_counts, check_inputs: bool = True):
        super().__init__()
        counts = validate_class_counts(class_counts)
        if not isinstance(check_inputs, bool):
            raise TypeError(f"check_inputs must be a bool; got {check_inputs!r}")
        self.class_counts = tuple(int(c) for c in counts)
        self.num_classes = len(counts)
        self.check_inputs = check_inputs
        self.epoch = 0
        # float64 so that log-count differences stay exact; cast to the logits' dtype per call.
        self.register_buffer("log_counts", torch.from_numpy(np.log(counts)), persistent=False)

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch starts (0-based); losses with a schedule read ``self.epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int; got {epoch!r}")
        self.epoch = int(epoch)

    def _prepare(self, logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """Validate inputs; return (logits upcast to float32 if half precision, int64 target)."""
        name = type(self).__name__
        what = "cosine similarities" if self.expects_cosine else "logits"
        if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
            raise TypeError(f"{name} expects tensors ({what}, target); got "
                            f"{type(logits).__name__}, {type(target).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"{name}: {what} must be floating point; got dtype {logits.dtype}")
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"{name}: {what} must have shape (B, {self.num_classes}) to match "
                             f"len(class_counts)={self.num_classes}; got {tuple(logits.shape)}")
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name}: target must hold int64 class indices; got dtype {target.dtype}")
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"{name}: target must have shape ({logits.shape[0]},) to match the "
                             f"{what}; got {tuple(target.shape)}")
        if logits.shape[0] == 0:
            raise ValueError(f"{name}: empty batch (B = 0); the mean loss is undefined")
        if self.check_inputs:
            bad = ~torch.isfinite(logits).all() | (target < 0).any() | (target >= self.num_classes).any()
            if self.expects_cosine:
                bad = bad | (logits.detach().abs() > _COSINE_LIMIT).any()
            if bad.item():
                self._raise_bad_values(logits, target, what)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return logits, target.long()

    def _raise_bad_values(self, logits: Tensor, target: Tensor, what: str) -> None:
        name = type(self).__name__
        t = target.detach().cpu()
        wrong = ((t < 0) | (t >= self.num_classes)).nonzero().flatten()
        if len(wrong):
            shown = [(int(i), int(t[i])) for i in wrong[:5]]
            raise ValueError(f"{name}: target labels must be in [0, {self.num_classes}); "
                             f"{len(wrong)} out of range, (position, label): {shown}")
        x = logits.detach().cpu()
        nonfinite = (~torch.isfinite(x)).nonzero()
        if len(nonfinite):
            shown = [(tuple(int(v) for v in p), float(x[tuple(p)])) for p in nonfinite[:5]]
            raise ValueError(f"{name}: {what} contain {len(nonfinite)} non-finite values, "
                             f"(index, value): {shown}")
        outside = (x.abs() > _COSINE_LIMIT).nonzero()
        shown = [(tuple(int(v) for v in p), float(x[tuple(p)])) for p in outside[:5]]
        raise ValueError(f"{name} expects cosine similarities in [-1, 1] (pass the cosine head's "
                         f"cosine(features), not its scaled logits); {len(outside)} values outside, (index, value): "
                         f"{shown}, max |value| {float(x.abs().max()):.4g}")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
