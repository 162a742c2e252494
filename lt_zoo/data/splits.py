"""`load_splits`: one entry point from a source name to checked train/test datasets.Dataset splits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import datasets

from .builtin import load_digits, load_fashion_mnist
from .columns import label_array, resolve_columns
from .list_file import load_list_file, parse_list_file

__all__ = ["DataSplits", "load_splits", "LOCAL_SOURCES", "BUILTIN_SOURCES"]

BUILTIN_SOURCES = ("digits", "fashion_mnist")
LOCAL_SOURCES = ("imagefolder", "parquet", "arrow", "disk", "listfile")


@dataclass
class DataSplits:
    """Train/test splits with the resolved image/label column names and class names.

    `test` is None when `load_splits(test_split=None)`. Labels are ClassLabel in both splits.
    """
    train: datasets.Dataset
    test: Optional[datasets.Dataset]
    image_column: str
    label_column: str
    class_names: List[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable summary for run configs and model cards."""
        return {"source": self.source, "image_column": self.image_column, "label_column": self.label_column,
                "num_classes": self.num_classes, "class_names": list(self.class_names),
                "train_size": len(self.train), "test_size": None if self.test is None else len(self.test)}


def _as_split_dict(data_files: Any, default_split: str) -> Dict[str, Any]:
    if isinstance(data_files, Mapping):
        return dict(data_files)
    return {default_split: data_files}


def _load_listfiles(data_files: Any, root: Optional[str], train_split: str) -> datasets.DatasetDict:
    if data_files is None or root is None:
        raise ValueError("source='listfile' needs data_files={split: list file} and data_dir=<image root>")
    files = _as_split_dict(data_files, train_split)
    # One class count for all splits, so train and test share the same ClassLabel.
    num_classes = max(int(parse_list_file(p)[1].max()) for p in files.values()) + 1
    return datasets.DatasetDict({split: load_list_file(p, root, num_classes=num_classes)
                                 for split, p in files.items()})


def _load_source(source: str, data_dir, data_files, train_split: str, cache_dir) -> datasets.DatasetDict:
    if source == "digits":
        return load_digits()
    if source == "fashion_mnist":
        return load_fashion_mnist(data_dir=data_dir, cache_dir=cache_dir)
    if source == "imagefolder":
        if data_dir is None and data_files is None:
            raise ValueError("source='imagefolder' needs data_dir (with train/ and test/ sub-folders) or data_files")
        return datasets.load_dataset("imagefolder", data_dir=data_dir, data_files=data_files, cache_dir=cache_dir)
    if source in ("parquet", "arrow"):
        if data_files is None:
            raise ValueError(f"source={source!r} needs data_files, e.g. {{'train': 'train.{source}', "
                             f"'test': 'test.{source}'}}")
        return datasets.load_dataset(source, data_files=data_files, cache_dir=cache_dir)
    if source == "disk":
        if data_dir is None:
            raise ValueError("source='disk' needs data_dir (a DatasetDict.save_to_disk folder)")
        loaded = datasets.load_from_disk(os.fspath(data_dir))
        if not isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"{data_dir!r} holds a single Dataset; source='disk' expects a DatasetDict "
                             f"with train/test splits saved by DatasetDict.save_to_disk")
        return loaded
    if source == "listfile":
        return _load_listfiles(data_files, None if data_dir is None else os.fspath(data_dir), train_split)
    # Anything else is a Hub dataset name (e.g. uoft-cs/cifar10); needs network or a warm HF cache.
    return datasets.load_dataset(source, data_dir=data_dir, data_files=data_files, cache_dir=cache_dir)


def _pick_split(dd: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if split not in dd:
        raise ValueError(f"split {split!r} not found in source {source!r}; available splits: {list(dd.keys())}")
    return dd[split]


def _ensure_class_label(train: datasets.Dataset, test: Optional[datasets.Dataset], column: str):
    """Cast an int or string label column to ClassLabel (shared names across splits); check ClassLabels agree."""
    splits = [s for s in (train, test) if s is not None]
    features = [s.features[column] for s in splits]
    if all(isinstance(f, datasets.ClassLabel) for f in features):
        if any(list(f.names) != list(features[0].names) for f in features):
            raise ValueError(f"train and test ClassLabel names differ for column {column!r}: "
                             f"{[list(f.names) for f in features]}")
        return train, test
    dtypes = [getattr(f, "dtype", type(f).__name__) for f in features]
    if all(d.startswith("int") or d.startswith("uint") for d in dtypes):
        top = max(int(label_array(s, column).max()) for s in splits if len(s))
        names = [str(i) for i in range(top + 1)]
    elif all(d in ("string", "large_string") for d in dtypes):
        names = sorted(set().union(*(set(s.unique(column)) for s in splits)))
    else:
        raise TypeError(f"label column {column!r} has feature types {features}; expected ClassLabel, int or string")
    target = datasets.ClassLabel(names=names)
    cast = [s.cast_column(column, target) for s in splits]
    return cast[0], (cast[1] if test is not None else None)


def load_splits(source: str, *, data_dir: Optional[str] = None, data_files: Any = None,
                image_column: Optional[str] = None, label_column: Optional[str] = None,
                train_split: str = "train", test_split: Optional[str] = "test",
                cache_dir: Optional[str] = None) -> DataSplits:
    """Load train/test splits from `source` and resolve their columns.

    source: 'digits' | 'fashion_mnist' (built-ins, no network; data_dir overrides the IDX folder) |
    'imagefolder' (data_dir with train/ and test/ sub-folders of class folders) | 'parquet' | 'arrow'
    (data_files={'train': ..., 'test': ...}) | 'disk' (data_dir from DatasetDict.save_to_disk) |
    'listfile' (data_files={'train': list.txt, ...}, data_dir = image root) | any Hub dataset name
    (datasets.load_dataset; e.g. 'uoft-cs/cifar10', 'uoft-cs/cifar100', 'zalando-datasets/fashion_mnist').
    Columns are detected (image/img, label/labels/fine_label) unless given; int or string labels
    become a ClassLabel shared by both splits. cache_dir: datasets' cache for load_dataset sources and
    the lt_zoo cache of built-in builds (default ~/.cache/lt_zoo). test_split=None gives test=None.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, got {source!r}")
    dd = _load_source(source, data_dir, data_files, train_split, cache_dir)
    train = _pick_split(dd, train_split, source)
    test = _pick_split(dd, test_split, source) if test_split is not None else None
    image_column, label_column = resolve_columns(train, image_column, label_column)
    if test is not None:
        resolve_columns(test, image_column, label_column)
    for split_name, split in (("train", train), ("test", test)):
        if split is not None and not isinstance(split.features[image_column], datasets.Image):
            raise TypeError(f"{split_name} column {image_column!r} has feature {split.features[image_column]}; "
                            f"expected datasets.Image")
    train, test = _ensure_class_label(train, test, label_column)
    class_names = list(train.features[label_column].names)
    return DataSplits(train=train, test=test, image_column=image_column, label_column=label_column,
                      class_names=class_names, source=source)
