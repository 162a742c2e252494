"""Built-in datasets that load without network: scikit-learn's digits and Debian's Fashion-MNIST.

Both come back as a DatasetDict {'train', 'test'} with an Image feature 'image' (PNG-encoded, mode 'L')
and a ClassLabel 'label'.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import datasets
import numpy as np

from .cache import cached_dataset_dict, files_digest
from .idx import read_idx
from .png import encode_png_batch

__all__ = ["DIGITS_CLASSES", "DIGITS_TEST_FRACTION", "DIGITS_SPLIT_SEED", "FASHION_MNIST_CLASSES",
           "FASHION_MNIST_HUB_NAME", "DEBIAN_FASHION_MNIST_DIR", "FASHION_MNIST_FILES",
           "arrays_to_dataset", "load_digits", "load_fashion_mnist", "read_fashion_mnist_idx"]

DIGITS_CLASSES = tuple(str(i) for i in range(10))
# digits split: 70/30 stratified by class, seed 0 (sklearn train_test_split) -> 1257 train / 540 test.
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0

# Class names from Zalando's Fashion-MNIST README (label order 0..9).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_HUB_NAME = "zalando-datasets/fashion_mnist"
# Debian/Ubuntu package `dataset-fashion-mnist` installs the original gzip IDX files here.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def arrays_to_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> datasets.Dataset:
    """uint8 images (N, H, W) or (N, H, W, 3) + int labels (N,) -> Dataset{'image': Image, 'label': ClassLabel}.

    Images are stored as PNG bytes (what datasets itself stores for PIL images), encoded in one
    vectorised pass (`encode_png_batch`) and passed as {'bytes', 'path'} dicts.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(class_names))})
    encoded = [{"bytes": b, "path": None} for b in encode_png_batch(images)]
    return datasets.Dataset.from_dict({"image": encoded, "label": labels.astype(np.int64)}, features=features)


def load_digits() -> datasets.DatasetDict:
    """scikit-learn's bundled 8x8 digits (1797 images) as a seeded, stratified 70/30 train/test split.

    Pixel values 0..16 are mapped to uint8 by round(v * 255 / 16), so 16 -> 255. Row order inside each
    split follows the original sklearn order.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                           stratify=labels, random_state=DIGITS_SPLIT_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return datasets.DatasetDict({
        "train": arrays_to_dataset(images[train_idx], labels[train_idx], DIGITS_CLASSES),
        "test": arrays_to_dataset(images[test_idx], labels[test_idx], DIGITS_CLASSES),
    })


def read_fashion_mnist_idx(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split from the gzip IDX files in data_dir."""
    image_file, label_file = (os.path.join(data_dir, f) for f in FASHION_MNIST_FILES[split])
    images = read_idx(image_file, expect_ndim=3, expect_dtype="uint8", expect_shape_tail=(28, 28))
    labels = read_idx(label_file, expect_ndim=1, expect_dtype="uint8")
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {image_file!r} has {len(images)} images but "
                         f"{label_file!r} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST {split}: {label_file!r} has label {int(labels.max())}; expected 0..9")
    return images, labels.astype(np.int64)


def _fashion_mnist_files(data_dir: str) -> list[str]:
    return [os.path.join(data_dir, f) for pair in FASHION_MNIST_FILES.values() for f in pair]


def load_fashion_mnist(data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> datasets.DatasetDict:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale, 10 classes).

    Source: the IDX files in `data_dir` if given; else Debian's `DEBIAN_FASHION_MNIST_DIR` when that
    folder exists; else the Hub dataset `zalando-datasets/fashion_mnist` (needs network). IDX builds are
    cached under `cache_dir` (default ~/.cache/lt_zoo) keyed by the files' sha256. Class names are
    `FASHION_MNIST_CLASSES` whichever the source.
    """
    if data_dir is None and not os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
        hf_cache = None if cache_dir is None else os.fspath(cache_dir)
        ds = datasets.load_dataset(FASHION_MNIST_HUB_NAME, cache_dir=hf_cache)
        names = datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))
        return datasets.DatasetDict({k: ds[k].cast_column("label", names) for k in ("train", "test")})
    data_dir = DEBIAN_FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
    files = _fashion_mnist_files(data_dir)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST IDX files missing in {data_dir!r}: {missing} "
                                f"(install the Debian package dataset-fashion-mnist or pass data_dir)")

    def build() -> datasets.DatasetDict:
        out = {}
        for split in FASHION_MNIST_FILES:
            images, labels = read_fashion_mnist_idx(data_dir, split)
            out[split] = arrays_to_dataset(images, labels, FASHION_MNIST_CLASSES)
        return datasets.DatasetDict(out)

    return cached_dataset_dict("fashion_mnist", files_digest(files), build, cache_dir)
