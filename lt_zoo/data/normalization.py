"""Normalisation statistics: exact per-channel mean/std of a training split, or a timm model's pretrained cfg."""
from __future__ import annotations

from typing import Any, Tuple

import datasets
import numpy as np

from .decode import decode_image

__all__ = ["dataset_mean_std", "mean_std_from_timm"]

_MODES = {1: "L", 3: "RGB"}


def dataset_mean_std(ds: datasets.Dataset, image_column: str, in_chans: int,
                     batch_size: int = 1000) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel (mean, std) of pixel values scaled to [0, 1], over every pixel of every image.

    Exact and streaming: images are decoded batch by batch, converted to 'L'/'RGB' per in_chans, at
    their stored size (no resize), and summed as integers: mean = S1 / N, std = sqrt(S2 / N - mean^2)
    (population std, as torchvision's CIFAR stats).
    """
    if in_chans not in _MODES:
        raise ValueError(f"in_chans={in_chans!r}; expected 1 or 3")
    if image_column not in ds.column_names:
        raise ValueError(f"image column {image_column!r} not found; available columns: {ds.column_names}")
    if len(ds) == 0:
        raise ValueError("dataset_mean_std needs a non-empty dataset")
    mode = _MODES[in_chans]
    s1 = np.zeros(in_chans, dtype=np.int64)
    s2 = np.zeros(in_chans, dtype=np.int64)  # 255^2 * pixels fits int64 up to ~1.4e14 pixels
    count = 0
    view = ds.with_format(None).select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    for start, batch in zip(range(0, len(view), batch_size), view.iter(batch_size=batch_size)):
        for offset, value in enumerate(batch[image_column]):
            img = decode_image(value, index=start + offset)
            px = np.asarray(img if img.mode == mode else img.convert(mode), dtype=np.int64).reshape(-1, in_chans)
            s1 += px.sum(axis=0)
            s2 += (px * px).sum(axis=0)
            count += px.shape[0]
    mean = s1 / (count * 255.0)
    var = np.maximum(s2 / (count * 255.0 ** 2) - mean ** 2, 0.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(var))


def mean_std_from_timm(model: Any, in_chans: int = 3) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) from `timm.data.resolve_model_data_config(model)` (the model's pretrained cfg).

    timm reports 3-channel stats even for in_chans=1 models; for in_chans=1 they are averaged to one
    value (a grayscale image replicated to RGB has the same per-channel mean as that average only
    approximately, so prefer dataset_mean_std when training from scratch).
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if in_chans == 1 and len(mean) == 3:
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"timm data config has mean {mean} / std {std}; cannot use them for in_chans={in_chans}")
    return mean, std
