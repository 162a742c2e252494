"""Evaluation metrics for long-tailed classification on a (usually balanced) test set.

Inputs are logits (N, C) and int targets (N,) as tensors, NumPy arrays or lists; outputs are plain
Python values. Accuracies are fractions in [0, 1]. A class without test samples has accuracy
``None`` and is left out of every mean; a shot group without classes is ``None`` (not 0).

Shot groups (many n > 100, few n < 20, medium otherwise; training counts n) follow
classifier-balancing ``utils.py::shot_acc`` and NBN ``methods/utils.py`` (Kang et al. ICLR'20;
docs/data.md#decision-shot-groups-and-calibration). ECE uses 15
equal-width bins on the max-softmax confidence, bins ``(lo, hi]``, as MiSLAS.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional

import numpy as np
import torch

from .class_counts import validate_class_counts

__all__ = [
    "top1_accuracy", "per_class_accuracy", "balanced_accuracy", "shot_groups", "shot_accuracy",
    "calibration_bins", "ece_from_bins", "expected_calibration_error", "confusion_matrix", "evaluate",
]

#: rows per chunk when reducing logits, so ImageNet-size (50k x 1000) evaluations stay small in memory.
_CHUNK = 8192


def _as_logits(logits) -> torch.Tensor:
    x = logits.detach().cpu() if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, C) with C > 0; got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.double()
    return x


def _as_targets(targets, n: int, num_classes: int) -> torch.Tensor:
    t = targets.detach().cpu() if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"targets must have shape ({n},) to match the logits; got {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices; got dtype {t.dtype}")
    t = t.long()
    if n and (t.min() < 0 or t.max() >= num_classes):
        bad = ((t < 0) | (t >= num_classes)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"targets must be in [0, {num_classes}); out of range at positions {bad}: "
                         f"{t[bad].tolist()}")
    return t


def _inputs(logits, targets):
    x = _as_logits(logits)
    t = _as_targets(targets, x.shape[0], x.shape[1])
    if x.shape[0] == 0:
        raise ValueError("no samples: logits has N = 0 rows")
    if not torch.isfinite(x).all():
        raise ValueError(f"logits contain {int((~torch.isfinite(x)).sum())} non-finite values")
    return x, t


def _predictions_and_confidence(x: torch.Tensor):
    preds, conf = [], []
    for chunk in x.split(_CHUNK):
        c = chunk.double()
        top, arg = c.max(dim=1)
        preds.append(arg)
        conf.append(torch.exp(top - torch.logsumexp(c, dim=1)))  # max softmax probability
    return torch.cat(preds), torch.cat(conf)


def top1_accuracy(logits, targets) -> float:
    """Fraction of samples whose argmax logit is the target."""
    x, t = _inputs(logits, targets)
    preds, _ = _predictions_and_confidence(x)
    return float((preds == t).double().mean())


def confusion_matrix(logits, targets) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    x, t = _inputs(logits, targets)
    preds, _ = _predictions_and_confidence(x)
    c = x.shape[1]
    return torch.bincount(t * c + preds, minlength=c * c).reshape(c, c).numpy()


def _per_class_from_confusion(cm: np.ndarray) -> List[Optional[float]]:
    support = cm.sum(axis=1)
    return [float(cm[j, j] / support[j]) if support[j] else None for j in range(cm.shape[0])]


def per_class_accuracy(logits, targets) -> List[Optional[float]]:
    """Accuracy per class (length C); ``None`` for classes without test samples."""
    return _per_class_from_confusion(confusion_matrix(logits, targets))


def _mean(values) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def balanced_accuracy(logits, targets) -> Optional[float]:
    """Mean of the per-class accuracies over classes that have test samples."""
    return _mean(per_class_accuracy(logits, targets))


def _check_thresholds(many_threshold, few_threshold):
    for name, v in (("many_threshold", many_threshold), ("few_threshold", few_threshold)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number; got {v!r}")
    if few_threshold > many_threshold + 1:
        raise ValueError(f"few_threshold ({few_threshold}) must not exceed many_threshold + 1 "
                         f"({many_threshold} + 1), or the groups overlap")


def shot_groups(class_counts, many_threshold: float = 100, few_threshold: float = 20) -> List[str]:
    """'many' (n > many_threshold), 'few' (n < few_threshold) or 'medium' for each class."""
    n = validate_class_counts(class_counts)
    _check_thresholds(many_threshold, few_threshold)
    return ["many" if v > many_threshold else "few" if v < few_threshold else "medium" for v in n]


def shot_accuracy(per_class_acc, class_counts, many_threshold: float = 100,
                  few_threshold: float = 20) -> Dict[str, Optional[float]]:
    """Mean per-class accuracy within each shot group: {'many', 'medium', 'few'} -> float or None."""
    groups = shot_groups(class_counts, many_threshold, few_threshold)
    if len(per_class_acc) != len(groups):
        raise ValueError(f"per_class_acc has {len(per_class_acc)} entries but class_counts has {len(groups)}")
    return {g: _mean(a for a, k in zip(per_class_acc, groups) if k == g) for g in ("many", "medium", "few")}


def calibration_bins(logits, targets, n_bins: int = 15) -> Dict[str, list]:
    """Reliability statistics over ``n_bins`` equal-width confidence bins ``(lo, hi]``.

    Returns lists of length n_bins: 'edges' (n_bins + 1), 'count', 'accuracy' and 'confidence'
    (mean max-softmax confidence; both ``None`` for empty bins).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int; got {n_bins!r}")
    x, t = _inputs(logits, targets)
    preds, conf = _predictions_and_confidence(x)
    correct = (preds == t).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin b holds edges[b] < conf <= edges[b+1]; searchsorted(right=False) gives exactly b + 1.
    which = (torch.searchsorted(edges, conf, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(which, minlength=n_bins)
    acc_sum = torch.bincount(which, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(which, weights=conf, minlength=n_bins)
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "accuracy": [float(a / k) if k else None for a, k in zip(acc_sum.tolist(), count.tolist())],
        "confidence": [float(c / k) if k else None for c, k in zip(conf_sum.tolist(), count.tolist())],
    }


def ece_from_bins(bins: Dict[str, list]) -> float:
    """ECE from the output of :func:`calibration_bins`."""
    total = sum(bins["count"])
    return float(sum(k / total * abs(a - c)
                     for k, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if k))


def expected_calibration_error(logits, targets, n_bins: int = 15) -> float:
    """``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` (fraction, not percent)."""
    return ece_from_bins(calibration_bins(logits, targets, n_bins))


def evaluate(logits, targets, class_counts, many_threshold: float = 100, few_threshold: float = 20,
             n_bins: int = 15, include_confusion: bool = False) -> Dict[str, object]:
    """All metrics at once as JSON-serialisable values.

    logits (N, C), targets (N,), class_counts (C,) training counts. Keys: top1, balanced_acc, many,
    medium, few, ece, per_class_acc (list, None where a class has no test sample), num_samples,
    and confusion_matrix (list of lists) if ``include_confusion``.
    Pass the logits the model predicts with (for a cosine head: the scaled cosines; ECE depends on
    the scale, accuracy does not).
    """
    counts = validate_class_counts(class_counts)
    x, t = _inputs(logits, targets)
    if x.shape[1] != len(counts):
        raise ValueError(f"logits have {x.shape[1]} classes but class_counts has {len(counts)}")
    cm = confusion_matrix(x, t)
    per_class = _per_class_from_confusion(cm)
    result: Dict[str, object] = {
        "top1": float(np.trace(cm) / cm.sum()),
        "balanced_acc": _mean(per_class),
        **shot_accuracy(per_class, counts, many_threshold, few_threshold),
        "ece": expected_calibration_error(x, t, n_bins),
        "per_class_acc": per_class,
        "num_samples": int(x.shape[0]),
    }
    if include_confusion:
        result["confusion_matrix"] = cm.tolist()
    return result
