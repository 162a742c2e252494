"""Class-count statistics shared by samplers, losses and metrics (no dataset or model dependency).

Every long-tail method starts from the training count n_j of each class; these helpers validate such a
vector and derive the quantities several methods share (effective numbers, GCL's normalised log gap).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

__all__ = ["validate_class_counts", "effective_number_weights", "normalized_log_count_gap",
           "class_counts_from_labels"]


def validate_class_counts(class_counts, name: str = "class_counts") -> np.ndarray:
    """Check a per-class training-count vector and return it as a float64 array of shape (C,).

    Accepts a sequence, NumPy array or tensor of positive integers (integral floats such as 3.0
    from JSON are accepted). Raises ``TypeError`` for non-numbers and ``ValueError`` for an empty
    vector, non-integers, zeros or negatives, naming the offending positions and values.
    """
    if isinstance(class_counts, torch.Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    if isinstance(class_counts, np.ndarray):
        if class_counts.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one count per class); got shape {class_counts.shape}")
        class_counts = class_counts.tolist()
    if isinstance(class_counts, (str, bytes)) or not isinstance(class_counts, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints; got {type(class_counts).__name__}")
    if len(class_counts) == 0:
        raise ValueError(f"{name} is empty; expected one positive int per class")
    bad_type = [(i, v) for i, v in enumerate(class_counts)
                if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad_type:
        raise TypeError(f"{name} must hold numbers; got {_first(bad_type)}")
    values = [float(v) for v in class_counts]
    non_int = [(i, class_counts[i]) for i, v in enumerate(values) if not (math.isfinite(v) and v.is_integer())]
    if non_int:
        raise ValueError(f"{name} must be integers; non-integer entries (index, value): {_first(non_int)}")
    non_pos = [(i, int(v)) for i, v in enumerate(values) if v <= 0]
    if non_pos:
        raise ValueError(f"{name} must be positive (every class needs a training sample); "
                         f"zero/negative entries (index, value): {_first(non_pos)}")
    return np.asarray(values, dtype=np.float64)


def _first(pairs, k: int = 5) -> str:
    shown = ", ".join(f"({i}, {v!r})" for i, v in pairs[:k])
    more = f" and {len(pairs) - k} more" if len(pairs) > k else ""
    return shown + more


def effective_number_weights(class_counts, beta) -> np.ndarray:
    """Per-class weights ``w_j = (1 - beta_j) / (1 - beta_j^n_j)`` (Cui et al. CVPR'19), shape (C,).

    ``beta`` is a scalar in [0, 1) or a per-class array. Unnormalised: callers rescale as needed.
    ``beta = 0`` gives all-ones (LDAM-DRW uses that for the un-weighted phase).
    """
    n = validate_class_counts(class_counts)
    b = np.broadcast_to(np.asarray(beta, dtype=np.float64), n.shape)
    if not np.all((b >= 0) & (b < 1)):
        raise ValueError(f"beta must lie in [0, 1); got {np.asarray(beta).tolist()}")
    # -expm1(n log b) = 1 - b^n without cancellation when b is close to 1.
    with np.errstate(divide="ignore"):
        log_b = np.log(b)
    effective = -np.expm1(n * log_b)
    return -np.expm1(log_b) / effective


def normalized_log_count_gap(class_counts) -> np.ndarray:
    """``delta_hat_j = (log n_max - log n_j) / max_k(...)`` in [0, 1], shape (C,).

    GCL's cloud size (Li et al. CVPR'22 Eq. 9) and CBEN's beta offset (Eq. 14);
    docs/gcl.md#decision-gcl-balanced-counts. With all counts equal the official code divides 0 by 0;
    here every entry is then 0 (no class is rarer than another).
    """
    log_n = np.log(validate_class_counts(class_counts))
    delta = log_n.max() - log_n
    top = delta.max()
    return delta / top if top > 0 else np.zeros_like(delta)


def class_counts_from_labels(labels, num_classes: Optional[int] = None) -> np.ndarray:
    """Histogram of int labels, shape (num_classes,), int64. Classes may have zero samples here."""
    y = _as_label_array(labels)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    elif y.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}; got max label {int(y.max())}")
    return np.bincount(y, minlength=num_classes).astype(np.int64)


def _as_label_array(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (one int per sample); got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels is empty; a sampler needs at least one sample")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels must be integers; got dtype {y.dtype} (e.g. {y.ravel()[:3].tolist()})")
    if y.min() < 0:
        raise ValueError(f"labels must be >= 0; got {int(y.min())} at index {int(np.argmin(y))}")
    return y.astype(np.int64)
