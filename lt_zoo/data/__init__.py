"""lt_zoo.data: datasets-based loading, long-tailed subsets, transforms and a torch-ready view.

Typical flow::

    splits = load_splits('fashion_mnist')
    train, info = make_long_tailed(splits.train, splits.label_column, imbalance_factor=100)
    tf = create_transform('weak', input_size=28, in_chans=1, mean=m, std=s, hflip=False)
    loader = DataLoader(attach_transform(train, tf, splits.image_column, splits.label_column),
                        batch_size=128, shuffle=True, collate_fn=collate)
"""
from .builtin import FASHION_MNIST_CLASSES, arrays_to_dataset, load_digits, load_fashion_mnist
from .columns import label_array, resolve_columns
from .decode import ImageReadError, decode_image
from .idx import read_idx
from .list_file import load_list_file, parse_list_file
from .long_tail import LongTailInfo, class_counts, hash_indices, long_tail_counts, make_long_tailed
from .normalization import dataset_mean_std, mean_std_from_timm
from .splits import DataSplits, load_splits
from .torch_dataset import BatchTransform, TransformedDataset, attach_transform, collate
from .transforms import ResizeIfNeeded, ToMode, TwoView, create_transform
from .tensor_cache import DecodedSplit, TensorCacheError, decode_split, default_tensor_cache_dir
from .batch_augment import BatchAugment, BatchTwoView, TensorLoader, create_batch_transform

__all__ = [
    "DataSplits", "load_splits", "load_digits", "load_fashion_mnist", "FASHION_MNIST_CLASSES", "arrays_to_dataset",
    "read_idx", "load_list_file", "parse_list_file", "resolve_columns", "label_array",
    "LongTailInfo", "long_tail_counts", "make_long_tailed", "class_counts", "hash_indices",
    "create_transform", "TwoView", "ToMode", "ResizeIfNeeded", "dataset_mean_std", "mean_std_from_timm",
    "attach_transform", "collate", "TransformedDataset", "BatchTransform", "ImageReadError", "decode_image",
    "DecodedSplit", "TensorCacheError", "decode_split", "default_tensor_cache_dir",
    "BatchAugment", "BatchTwoView", "TensorLoader", "create_batch_transform",
]
