"""Built-in datasets (digits, Debian Fashion-MNIST), the IDX reader, and Fashion-MNIST-LT at IF 100."""
import gzip
import io
import os
import re
import struct

import numpy as np
import PIL.Image
import pytest

from lt_zoo.data import load_splits, make_long_tailed, read_idx
from lt_zoo.data.builtin import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, load_fashion_mnist
from lt_zoo.data.png import encode_png_batch

# Not skipped when absent: CI installs Debian's dataset-fashion-mnist, and its absence must fail loudly.
FMNIST_DIR = DEBIAN_FASHION_MNIST_DIR


@pytest.fixture(scope="module")
def fmnist_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lt_zoo_cache"))


@pytest.fixture(scope="module")
def fmnist(fmnist_cache):
    return load_splits("fashion_mnist", cache_dir=fmnist_cache)


def raw_idx(name):
    """Independent IDX read: skip the fixed header (16 bytes images, 8 bytes labels)."""
    with gzip.open(os.path.join(FMNIST_DIR, name), "rb") as f:
        data = f.read()
    offset = 16 if "images" in name else 8
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    return arr.reshape(-1, 28, 28) if "images" in name else arr


def write_idx(path, array, type_code=0x08, compress=True):
    array = np.ascontiguousarray(array)
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(payload)


def test_fashion_mnist_sizes_classes_and_pixels(fmnist):
    assert fmnist.source == "fashion_mnist"
    assert (len(fmnist.train), len(fmnist.test)) == (60000, 10000)
    assert fmnist.num_classes == 10 and fmnist.class_names == list(FASHION_MNIST_CLASSES)
    assert (fmnist.image_column, fmnist.label_column) == ("image", "label")
    train_labels = np.asarray(fmnist.train[:]["label"])
    np.testing.assert_array_equal(train_labels, raw_idx("train-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(np.bincount(train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.asarray(fmnist.test[:]["label"]), raw_idx("t10k-labels-idx1-ubyte.gz"))
    raw_train, raw_test = raw_idx("train-images-idx3-ubyte.gz"), raw_idx("t10k-images-idx3-ubyte.gz")
    for i in (0, 12345, 59999):
        img = fmnist.train[i]["image"]
        assert img.mode == "L" and img.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(img), raw_train[i])
    np.testing.assert_array_equal(np.asarray(fmnist.test[9999]["image"]), raw_test[9999])


def test_fashion_mnist_cache_is_reused(fmnist, fmnist_cache):
    entries = [e for e in os.listdir(fmnist_cache) if e.startswith("fashion_mnist-")]
    assert len(entries) == 1 and not [e for e in os.listdir(fmnist_cache) if ".tmp-" in e]
    again = load_fashion_mnist(cache_dir=fmnist_cache)
    assert os.listdir(fmnist_cache) == [entries[0]]
    assert again["train"].cache_files[0]["filename"].startswith(os.path.join(fmnist_cache, entries[0]))
    np.testing.assert_array_equal(np.asarray(again["train"][777]["image"]), np.asarray(fmnist.train[777]["image"]))


def test_fashion_mnist_long_tailed_if100(fmnist):
    subset, info = make_long_tailed(fmnist.train, fmnist.label_column, imbalance_factor=100)
    expected = [int(6000 * 0.01 ** (i / 9)) for i in range(10)]
    assert info.counts == expected and info.n_max == 6000
    np.testing.assert_array_equal(np.bincount(np.asarray(subset[:]["label"]), minlength=10), expected)
    assert len(subset) == sum(expected)


def test_digits_split():
    from sklearn.datasets import load_digits

    splits = load_splits("digits")
    assert (len(splits.train), len(splits.test)) == (1257, 540)
    assert splits.class_names == [str(i) for i in range(10)]
    bunch = load_digits()
    train_y, test_y = np.asarray(splits.train[:]["label"]), np.asarray(splits.test[:]["label"])
    per_class = np.bincount(bunch.target)
    np.testing.assert_array_equal(np.bincount(train_y) + np.bincount(test_y), per_class)
    assert np.all(np.abs(np.bincount(test_y) - 0.3 * per_class) <= 1)  # stratified
    # pixel values 0..16 -> round(v * 255 / 16); the two splits together are exactly the 1797 images
    expected = sorted((np.round(bunch.images * 255 / 16).astype(np.uint8)[i].tobytes(), int(y))
                      for i, y in enumerate(bunch.target))
    got = sorted((np.asarray(s[i]["image"]).tobytes(), int(s[i]["label"]))
                 for s in (splits.train, splits.test) for i in range(len(s)))
    assert got == expected
    assert splits.train[0]["image"].mode == "L" and splits.train[0]["image"].size == (8, 8)
    again = load_splits("digits")
    assert np.asarray(again.train[100]["image"]).tobytes() == np.asarray(splits.train[100]["image"]).tobytes()


def test_png_batch_round_trip_gray_and_rgb():
    rng = np.random.default_rng(0)
    for shape, mode in (((5, 7, 3), "L"), ((4, 6, 5, 3), "RGB")):
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        for blob, ref in zip(encode_png_batch(arr), arr):
            img = PIL.Image.open(io.BytesIO(blob))
            assert img.format == "PNG" and img.mode == mode
            np.testing.assert_array_equal(np.asarray(img), ref)


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a.idx.gz", arr, type_code=0x0B)
    out = read_idx(str(tmp_path / "a.idx.gz"))
    assert out.dtype == np.int16 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    write_idx(tmp_path / "b.idx", np.arange(5, dtype=np.uint8), compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.idx"), np.arange(5))


def make_fake_fmnist(folder, n_train=6, n_test=4):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def test_fashion_mnist_from_given_dir(tmp_path):
    make_fake_fmnist(tmp_path)
    splits = load_splits("fashion_mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert (len(splits.train), len(splits.test)) == (6, 4)
    assert np.asarray(splits.test[:]["label"]).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("damage,message", [
    (lambda raw: b"\x08\x03" + raw[2:], "bad magic number"),              # first bytes not zero
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "bad magic number"),         # unknown type code
    (lambda raw: raw[:-10], "needs .* bytes, file has"),                   # truncated payload
    (lambda raw: raw + b"\x00", "needs .* bytes, file has"),               # trailing garbage
    (lambda raw: raw[:2], "bad magic number"),
])
def test_corrupt_idx_is_named(tmp_path, damage, message):
    make_fake_fmnist(tmp_path)
    name = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(name, "rb") as f:
        raw = f.read()
    with gzip.open(name, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(ValueError, match=message) as err:
        load_fashion_mnist(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert str(name) in str(err.value)


def test_broken_gzip_and_wrong_shape_and_mismatch(tmp_path):
    make_fake_fmnist(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match=re.escape(f"corrupt IDX file '{bad}'")):
        load_fashion_mnist(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    write_idx(bad, np.zeros(3, np.uint8))  # 4 test images, 3 labels
    with pytest.raises(ValueError, match="has 4 images but .* has 3 labels"):
        load_fashion_mnist(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"item shape \(32, 32\); expected \(28, 28\)"):
        load_fashion_mnist(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist(data_dir=str(tmp_path))


def test_fashion_mnist_falls_back_to_hub_with_canonical_names(tmp_path, monkeypatch):
    import datasets

    import lt_zoo.data.builtin as builtin

    hub_names = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=hub_names)})
    blank = PIL.Image.new("L", (28, 28))
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append(path)
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": [blank] * 3, "label": [0, 9, 4]},
                                                                   features=features) for s in ("train", "test")})

    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_splits("fashion_mnist")
    assert calls == ["zalando-datasets/fashion_mnist"]
    assert splits.class_names == list(FASHION_MNIST_CLASSES)
    assert splits.train[:]["label"] == [0, 9, 4]
    summary = splits.to_dict()
    assert summary["train_size"] == 3 and summary["num_classes"] == 10 and summary["source"] == "fashion_mnist"
