"""Image list files (`<relative/path> <int label>` per line), the ImageNet-LT / Places-LT / iNat18 format.

docs/data.md#decision-list-files: one image per line, whitespace-split, path joined to a data root (classifier-balancing
convention, e.g. `ImageNet_LT_train.txt`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import datasets
import numpy as np

__all__ = ["parse_list_file", "load_list_file"]


def parse_list_file(list_path: str | os.PathLike) -> Tuple[list, np.ndarray]:
    """Read (relative paths, int64 labels) from a list file.

    Blank lines and lines starting with '#' are skipped; every other line must be exactly two
    whitespace-separated fields, the second a non-negative integer (so paths cannot contain spaces).
    A bad line raises ValueError naming the file and its 1-based line number.
    """
    list_path = os.fspath(list_path)
    paths, labels = [], []
    with open(list_path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.split()
            if len(fields) != 2:
                raise ValueError(f"{list_path}:{lineno}: expected '<path> <int label>', got {len(fields)} "
                                 f"fields: {text!r}")
            try:
                label = int(fields[1])
            except ValueError:
                raise ValueError(f"{list_path}:{lineno}: label {fields[1]!r} is not an integer: {text!r}") from None
            if label < 0:
                raise ValueError(f"{list_path}:{lineno}: negative label {label}: {text!r}")
            paths.append(fields[0])
            labels.append(label)
    if not paths:
        raise ValueError(f"list file {list_path!r} has no entries")
    return paths, np.asarray(labels, dtype=np.int64)


def load_list_file(list_path: str | os.PathLike, root: str | os.PathLike, *, num_classes: Optional[int] = None,
                   class_names: Optional[Sequence[str]] = None, check_files: bool = True) -> datasets.Dataset:
    """Dataset{'image': Image (path-backed, decoded lazily), 'label': ClassLabel} from a list file.

    Number of classes: len(class_names), else `num_classes`, else max label + 1. Every image path is
    checked for existence up front (check_files=True) and the missing ones are named; an image that
    exists but cannot be decoded fails when accessed (attach_transform names its index and path).
    """
    list_path, root = os.fspath(list_path), os.fspath(root)
    rel_paths, labels = parse_list_file(list_path)
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
        num_classes = len(class_names)
    max_label = int(labels.max())
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise ValueError(f"list file {list_path!r} has label {max_label} but num_classes={num_classes}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    paths = [os.path.join(root, p) for p in rel_paths]
    if check_files:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"list file {list_path!r}: {len(missing)} of {len(paths)} image files are "
                                    f"missing under root {root!r}, e.g. {missing[:5]}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)
