"""A torch-ready view of a datasets.Dataset: transformed images + int labels, and a batch collate.

The view is `ds.with_transform(BatchTransform(...))` wrapped in a thin torch Dataset whose only job is
to put the row index into image-decoding errors (the transform itself never sees indices).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch

from .columns import label_array, num_classes_of, resolve_columns
from .decode import ImageReadError, decode_image

__all__ = ["BatchTransform", "TransformedDataset", "attach_transform", "collate"]


class BatchTransform:
    """datasets transform: batch {image_column: [stored images], label_column: [ints]} ->
    {'image': [transform(PIL image)], 'label': [int]}.

    A top-level class, so DataLoader workers can pickle it. Images are decoded here (the column is cast
    to Image(decode=False)) so that a bad file raises ImageReadError naming its path.
    """

    def __init__(self, transform: Callable, image_column: str, label_column: str):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column

    def __call__(self, batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        images = [self.transform(decode_image(value, position=pos))
                  for pos, value in enumerate(batch[self.image_column])]
        return {"image": images, "label": [int(y) for y in batch[self.label_column]]}


class TransformedDataset(torch.utils.data.Dataset):
    """Items {'image': tensor or tuple of tensors, 'label': int}; `dataset` is the with_transform view.

    `labels` (int64 array, no decoding) and `num_classes` serve samplers and class-count losses.
    """

    def __init__(self, ds: datasets.Dataset, transform: Callable, image_column: Optional[str] = None,
                 label_column: Optional[str] = None):
        image_column, label_column = resolve_columns(ds, image_column, label_column)
        if not isinstance(ds.features[image_column], datasets.Image):
            raise TypeError(f"column {image_column!r} has feature {ds.features[image_column]}; expected datasets.Image")
        self.labels = label_array(ds, label_column)
        self.num_classes = num_classes_of(ds, label_column, self.labels)
        self.image_column, self.label_column = image_column, label_column
        self.dataset = (ds.with_format(None)
                        .cast_column(image_column, datasets.Image(decode=False))
                        .with_transform(BatchTransform(transform, image_column, label_column),
                                        columns=[image_column, label_column]))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of size {len(self)}")
        index = index % len(self)
        try:
            row = self.dataset[index]
        except ImageReadError as err:
            raise err.with_index(index) from err.cause
        return {"image": row["image"], "label": row["label"]}

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, Any]]:
        # DataLoader's batched fetch: one Arrow query + one transform call per batch.
        indices = [int(i) for i in indices]
        try:
            batch = self.dataset[indices]
        except ImageReadError as err:
            index = indices[err.position] if err.position is not None else None
            raise (err.with_index(index) if index is not None else err) from err.cause
        return [{"image": img, "label": y} for img, y in zip(batch["image"], batch["label"])]


def attach_transform(ds: datasets.Dataset, transform: Callable, image_column: Optional[str] = None,
                     label_column: Optional[str] = None) -> TransformedDataset:
    """Torch-ready dataset of {'image': transform(img), 'label': int}; works with num_workers=0 and > 0."""
    return TransformedDataset(ds, transform, image_column, label_column)


def collate(items: Sequence[Dict[str, Any]]) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]:
    """[{'image', 'label'}] -> (images (B, C, H, W) or a tuple of per-view (B, C, H, W), labels int64 (B,))."""
    if not items:
        raise ValueError("collate got an empty batch")
    first = items[0]["image"]
    if isinstance(first, (tuple, list)):
        images = tuple(torch.stack([it["image"][v] for it in items]) for v in range(len(first)))
    else:
        images = torch.stack([it["image"] for it in items])
    labels = torch.as_tensor(np.asarray([it["label"] for it in items], dtype=np.int64))
    return images, labels
