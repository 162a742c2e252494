"""Long-tailed subsets of a balanced dataset: per-class count profiles and seeded selection.

Protocol of Cao et al. NeurIPS'19 (LDAM-DRW, `imbalance_cifar.py`;
docs/data.md#long-tailed-subsets-cao-et-al): class i keeps n_i = int(n_max * (1/IF) ** (i / (C - 1)))
images, i = 0..C-1 in *label order*, so class 0 is the most frequent. Datasets whose label order is
not their frequency order still get the profile in label order (relabel first if another order is
wanted).
"""
from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import datasets
import numpy as np

from .columns import label_array, num_classes_of

__all__ = ["PROFILES", "SELECTIONS", "LongTailInfo", "long_tail_counts", "make_long_tailed",
           "class_counts", "hash_indices"]

PROFILES = ("exp", "step")
SELECTIONS = ("cao2019", "rng")


def class_counts(labels: Any, num_classes: int) -> np.ndarray:
    """Images per class, int64 array of shape (num_classes,); labels outside 0..num_classes-1 raise."""
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False).ravel()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span {int(labels.min())}..{int(labels.max())}; expected 0..{num_classes - 1}")
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def hash_indices(indices: Any) -> str:
    """sha256 of the sorted indices as little-endian int64 bytes; first 16 hex digits."""
    arr = np.sort(np.asarray(indices, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def _check_imbalance_factor(imbalance_factor: Any) -> float:
    if isinstance(imbalance_factor, bool) or not isinstance(imbalance_factor, numbers.Real):
        raise TypeError(f"imbalance_factor must be a number >= 1, got {imbalance_factor!r}")
    value = float(imbalance_factor)
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"imbalance_factor={imbalance_factor!r} must be >= 1 (IF = n_max / n_min, e.g. 100)")
    return value


def long_tail_counts(n_max: Union[int, Sequence[int]], num_classes: int, imbalance_factor: float,
                     profile: str = "exp", step_ratio: float = 0.5) -> List[int]:
    """Per-class image counts of a long-tailed profile, class 0 the largest.

    n_max: the head count, or a sequence of available per-class counts (its minimum is used).
    exp:  n_i = int(n_max * (1/IF) ** (i / (C-1))) -- Cao et al.'s float expression, `int` truncates.
    step: the first C - int(C * step_ratio) classes keep n_max, the rest int(n_max * (1/IF))
          (LDAM-DRW 'step' with step_ratio=0.5: half head, half tail).
    """
    if not isinstance(n_max, numbers.Integral):
        n_max = int(np.min(np.asarray(n_max)))
    n_max = int(n_max)
    if n_max < 1:
        raise ValueError(f"n_max={n_max} must be >= 1")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    num_classes = int(num_classes)
    ratio = 1.0 / _check_imbalance_factor(imbalance_factor)  # Cao's `imb_factor` = 1/IF, same float ops
    if profile == "exp":
        return [int(n_max * (ratio ** (i / (num_classes - 1.0)))) for i in range(num_classes)]
    if profile == "step":
        if not 0.0 < float(step_ratio) < 1.0:
            raise ValueError(f"step_ratio={step_ratio!r} must be in (0, 1): the share of tail classes")
        n_tail = int(num_classes * float(step_ratio))
        return [n_max] * (num_classes - n_tail) + [int(n_max * ratio)] * n_tail
    raise ValueError(f"profile={profile!r}; expected one of {PROFILES}")


@dataclass
class LongTailInfo:
    """What `make_long_tailed` kept: the profile, seed, per-class counts and the sorted kept indices."""
    imbalance_factor: float
    profile: str
    seed: int
    selection: str
    n_max: int
    step_ratio: float
    num_classes: int
    counts: List[int]
    indices: np.ndarray
    indices_hash: str

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable record for run configs / model cards (no index list; use indices_hash)."""
        return {"imbalance_factor": self.imbalance_factor, "profile": self.profile, "seed": self.seed,
                "selection": self.selection, "n_max": self.n_max, "step_ratio": self.step_ratio,
                "num_classes": self.num_classes, "counts": [int(c) for c in self.counts],
                "total": int(sum(self.counts)), "indices_hash": self.indices_hash}


def _select_per_class(labels: np.ndarray, counts: Sequence[int], seed: int, selection: str) -> np.ndarray:
    kept = []
    if selection == "cao2019":
        # LDAM-DRW: np.random.seed(seed) once, then np.random.shuffle(where(y == c)) for c = 0..C-1 with the
        # state carried across classes; a RandomState(seed) replays that stream without touching global state.
        rs = np.random.RandomState(seed)
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            rs.shuffle(idx)
            kept.append(idx[:n])
    else:
        rng = np.random.default_rng(seed)
        for c, n in enumerate(counts):
            kept.append(rng.permutation(np.where(labels == c)[0])[:n])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def make_long_tailed(ds: datasets.Dataset, label_column: str, imbalance_factor: float = 100,
                     profile: str = "exp", seed: int = 0, selection: str = "cao2019",
                     n_max: int | None = None, step_ratio: float = 0.5) -> Tuple[datasets.Dataset, LongTailInfo]:
    """Long-tailed subset `ds.select(sorted kept indices)` and its LongTailInfo.

    imbalance_factor=100, seed=0, selection='cao2019': CIFAR-LT defaults of LDAM-DRW / GCL / NBN
    (docs/data.md#decision-cao2019-selection).
    selection: 'cao2019' reproduces LDAM-DRW's kept images bit-exactly given the same row order;
    'rng' takes the first n_c of np.random.default_rng(seed).permutation of each class
    (docs/data.md#decision-cao2019-selection; a different subset). n_max=None: the smallest class
    count of `ds` (= 5000 / 500 on balanced CIFAR-10 / -100, Cao's len/C). Raises ValueError for IF < 1, a class asked for more images than it
    has, or a class left empty.
    """
    imbalance_factor = _check_imbalance_factor(imbalance_factor)
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}; expected one of {PROFILES}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; expected one of {SELECTIONS}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    labels = label_array(ds, label_column)
    num_classes = num_classes_of(ds, label_column, labels)
    available = class_counts(labels, num_classes)
    if n_max is None:
        absent = [c for c in range(num_classes) if available[c] == 0]
        if absent:
            raise ValueError(f"classes {absent} have no images in the dataset (per-class counts "
                             f"{available.tolist()}); cannot build a long-tailed subset")
        n_max = int(available.min())
    counts = long_tail_counts(n_max, num_classes, imbalance_factor, profile, step_ratio)
    short = [(c, counts[c], int(available[c])) for c in range(num_classes) if counts[c] > available[c]]
    if short:
        detail = ", ".join(f"class {c}: requested {want}, has {have}" for c, want, have in short)
        raise ValueError(f"long-tailed counts exceed what the dataset has ({detail}); requested counts "
                         f"{counts}, available {available.tolist()}")
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise ValueError(f"classes {empty} would be empty (n_max={n_max}, imbalance_factor={imbalance_factor:g}, "
                         f"profile={profile!r}, counts {counts}); lower the imbalance factor or raise n_max")
    indices = _select_per_class(labels, counts, int(seed), selection)
    info = LongTailInfo(imbalance_factor=imbalance_factor, profile=profile, seed=int(seed), selection=selection,
                        n_max=int(n_max), step_ratio=float(step_ratio), num_classes=num_classes,
                        counts=[int(c) for c in counts], indices=indices, indices_hash=hash_indices(indices))
    return ds.select(indices), info
