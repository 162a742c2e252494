"""decode_split: equal to the PIL eval pipeline, and its safetensors disk cache (round trip, keys, corruption)."""
import os

import numpy as np
import pytest
import torch

from lt_zoo.data import arrays_to_dataset, create_transform, load_splits
from lt_zoo.data.batch_augment import normalize
from lt_zoo.data.tensor_cache import (DecodedSplit, TensorCacheError, decode_split, load_decoded, save_decoded,
                                      split_digest)


@pytest.fixture(scope="module")
def fmnist_slice(tmp_path_factory):
    splits = load_splits("fashion_mnist", cache_dir=str(tmp_path_factory.mktemp("lt_zoo_cache")))
    return splits.test.select(range(300))


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def pil_eval(ds, size, chans, mean, std, **kw):
    """The PIL path: create_transform('eval') per image, as the trainer's test loader does."""
    tf = create_transform("eval", input_size=size, in_chans=chans, mean=mean, std=std, **kw)
    return torch.stack([tf(ds[i]["image"]) for i in range(len(ds))])


def as_uint8(unit):
    """[0, 1] floats that are k / 255 -> the integers k."""
    return (unit * 255).round().to(torch.uint8)


def rgb_dataset(n=40, size=20, seed=0):
    rng = np.random.default_rng(seed)
    return arrays_to_dataset(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                             rng.integers(0, 3, n), ["a", "b", "c"])


@pytest.mark.parametrize("size", [16, 28])
def test_fashion_mnist_matches_pil_eval_path(fmnist_slice, size):
    decoded = decode_split(fmnist_slice, input_size=size, in_chans=1)
    assert decoded.images.shape == (300, 1, size, size) and decoded.images.dtype == torch.uint8
    assert decoded.labels.tolist() == list(fmnist_slice["label"])
    mean, std = (0.286,), (0.353,)
    expected = pil_eval(fmnist_slice, size, 1, mean, std)
    got = normalize(decoded.images, torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1))
    # Same resize, same float ops: identical, which is tighter than the 1/255 the PIL path rounds to.
    assert torch.equal(got, expected)
    if size == 28:  # no resize: the stored pixels themselves
        first = np.asarray(fmnist_slice[0]["image"], dtype=np.uint8)
        assert np.array_equal(decoded.images[0, 0].numpy(), first)


@pytest.mark.parametrize("chans,size", [(1, 16), (3, 32)])
def test_digits_resized_like_pil_path(digits, chans, size):
    ds = digits.train.select(range(50))
    decoded = decode_split(ds, input_size=size, in_chans=chans)
    expected = pil_eval(ds, size, chans, (0.0,) * chans, (1.0,) * chans)
    assert decoded.images.shape == (50, chans, size, size)
    assert torch.equal(decoded.images, as_uint8(expected))


def test_rgb_to_gray_and_centre_crop_match_pil_path():
    ds = rgb_dataset()
    for chans, kw in ((1, {}), (3, {"crop_pct": 0.875, "interpolation": "bicubic"})):
        decoded = decode_split(ds, input_size=16, in_chans=chans, **kw)
        expected = pil_eval(ds, 16, chans, (0.0,) * chans, (1.0,) * chans, **kw)
        assert torch.equal(decoded.images, as_uint8(expected))


def test_bad_options_fail_before_decoding(digits):
    with pytest.raises(ValueError, match="in_chans=2"):
        decode_split(digits.train, input_size=16, in_chans=2)
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        decode_split(digits.train, input_size=16, in_chans=1, interpolation="cubic")
    with pytest.raises(ValueError, match="non-empty"):
        decode_split(digits.train.select([]), input_size=16, in_chans=1)


def test_cache_round_trip_and_keys(digits, tmp_path):
    ds = digits.train.select(range(64))
    first = decode_split(ds, input_size=16, in_chans=1, cache_dir=tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and files[0].endswith(".safetensors")
    mtime = os.stat(tmp_path / files[0]).st_mtime_ns
    again = decode_split(ds, input_size=16, in_chans=1, cache_dir=tmp_path)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert os.stat(tmp_path / files[0]).st_mtime_ns == mtime  # read, not rewritten
    # Another size, another subset and another channel count each get their own file.
    decode_split(ds, input_size=20, in_chans=1, cache_dir=tmp_path)
    decode_split(digits.train.select(range(1, 65)), input_size=16, in_chans=1, cache_dir=tmp_path)
    decode_split(ds, input_size=16, in_chans=3, cache_dir=tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary files left


def test_digest_depends_on_content_not_object(digits):
    a = split_digest(digits.train.select(range(10)), "image", "label")
    b = split_digest(digits.train.select(list(range(10))), "image", "label")
    c = split_digest(digits.train.select(range(1, 11)), "image", "label")
    assert a == b and a != c
    assert split_digest(digits.train.select(range(10)), "image", "label", extra="x") != a


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "garbage"])
def test_corrupt_cache_file_names_the_file(digits, tmp_path, damage):
    ds = digits.train.select(range(32))
    decode_split(ds, input_size=8, in_chans=1, cache_dir=tmp_path)
    (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_payload":  # the header stays valid; only the checksum can tell
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0xFF]) + raw[-4:])
    else:
        path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TensorCacheError, match=str(path.name)) as info:
        decode_split(ds, input_size=8, in_chans=1, cache_dir=tmp_path)
    assert "delete it" in str(info.value)


def test_load_decoded_checks_key_and_shape(tmp_path):
    decoded = DecodedSplit(torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8), torch.arange(5))
    path = tmp_path / "x.safetensors"
    save_decoded(decoded, path, key="k1")
    back = load_decoded(path, key="k1", shape=(1, 4, 4))
    assert torch.equal(back.images, decoded.images) and torch.equal(back.labels, decoded.labels)
    with pytest.raises(TensorCacheError, match="key 'k1'; expected 'k2'"):
        load_decoded(path, key="k2")
    with pytest.raises(TensorCacheError, match=r"shape \(1, 4, 4\); expected \(3, 4, 4\)"):
        load_decoded(path, shape=(3, 4, 4))
    from safetensors.torch import save_file
    save_file({"images": decoded.images}, str(path), metadata={"format": "lt_zoo-tensors-1"})
    with pytest.raises(TensorCacheError, match=r"holds tensors \['images'\]"):
        load_decoded(path)


def test_decoded_split_validates_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        DecodedSplit(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"int64 \(2,\)"):
        DecodedSplit(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
