"""Transforms (shapes, mode/size handling, two views), normalisation stats, attach_transform + DataLoader."""
import numpy as np
import PIL.Image
import pytest
import torch

from lt_zoo.data import (TwoView, attach_transform, collate, create_transform, dataset_mean_std,
                         load_splits, make_long_tailed, mean_std_from_timm)
from lt_zoo.data.transforms import ResizeIfNeeded


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def gray(size=8, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


def color(size=32, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def tf(kind, size, chans, **kw):
    return create_transform(kind, input_size=size, in_chans=chans, mean=(0.5,) * chans, std=(0.25,) * chans, **kw)


@pytest.mark.parametrize("kind", ["weak", "strong", "eval"])
@pytest.mark.parametrize("img,size,chans", [
    (gray(8), 28, 1), (gray(8), 32, 3), (gray(28), 28, 1), (color(32), 32, 3), (color(32), 32, 1), (color(40), 24, 3),
])
def test_output_shapes_and_dtype(kind, img, size, chans):
    out = tf(kind, size, chans)(img)
    assert type(out) is torch.Tensor and out.dtype == torch.float32
    assert tuple(out.shape) == (chans, size, size)


def test_randaugment_and_timm_style_size():
    out = tf("strong", (3, 32, 32), 3, strong="randaugment")(gray(8))
    assert out.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="has 3 channels but in_chans=1"):
        tf("eval", (3, 32, 32), 1)


def test_eval_matches_numpy_normalisation():
    img = color(32, seed=3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    out = create_transform("eval", input_size=32, in_chans=3, mean=mean, std=std)(img)
    ref = (np.asarray(img, dtype=np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(out.numpy(), ref.transpose(2, 0, 1), atol=1e-5)
    # RGB -> L uses PIL's ITU-R 601-2 luma; L -> RGB replicates the channel
    luma = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_allclose(tf("eval", 32, 1)(img)[0].numpy(), (luma - 0.5) / 0.25, atol=1e-5)
    g = gray(32, seed=4)
    rep = tf("eval", 32, 3)(g).numpy()
    np.testing.assert_allclose(rep[0], rep[2])
    np.testing.assert_allclose(rep[1], (np.asarray(g) / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_resize_uses_bilinear_and_only_when_needed():
    img = gray(8, seed=1)
    same = ResizeIfNeeded((8, 8))
    assert same(img) is img
    up = create_transform("eval", input_size=32, in_chans=1, mean=(0.0,), std=(1.0,))(img)[0].numpy()
    ref = np.asarray(img.resize((32, 32), PIL.Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    np.testing.assert_allclose(up, ref, atol=1e-6)


def test_weak_without_pad_and_flip_is_eval():
    img = color(32, seed=5)
    weak = tf("weak", 32, 3, pad=0, hflip=False)
    np.testing.assert_array_equal(weak(img).numpy(), tf("eval", 32, 3)(img).numpy())


def test_weak_is_a_padded_crop_or_its_flip():
    img = gray(28, seed=6)
    padded = np.pad(np.asarray(img, dtype=np.float64) / 255.0, 4)
    crops = [padded[i:i + 28, j:j + 28] for i in range(9) for j in range(9)]
    crops += [c[:, ::-1] for c in crops]
    weak = create_transform("weak", input_size=28, in_chans=1, mean=(0.0,), std=(1.0,))
    torch.manual_seed(0)
    for _ in range(5):
        out = weak(img)[0].numpy()
        assert min(np.abs(out - c).max() for c in crops) < 1e-6


def test_two_views_differ(digits):
    img = digits.train[0]["image"]
    pair = TwoView(tf("weak", 32, 3), tf("strong", 32, 3))
    torch.manual_seed(0)
    views = [pair(img) for _ in range(4)]
    for weak, strong in views:
        assert weak.shape == strong.shape == (3, 32, 32)
    assert any(not torch.equal(w, s) for w, s in views)
    assert not torch.equal(views[0][1], views[1][1])  # strong view changes between draws


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="kind="):
        tf("medium", 32, 3)
    with pytest.raises(ValueError, match="in_chans=2"):
        create_transform("eval", input_size=32, in_chans=2, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError, match="mean has 3 values"):
        create_transform("eval", input_size=32, in_chans=1, mean=(0.5,) * 3, std=(0.5,))
    with pytest.raises(ValueError, match="strong="):
        tf("strong", 32, 3, strong="trivialaugment")


def test_dataset_mean_std_is_exact(digits):
    arr = np.stack([np.asarray(digits.train[i]["image"], dtype=np.float64) for i in range(len(digits.train))]) / 255
    mean, std = dataset_mean_std(digits.train, "image", in_chans=1, batch_size=100)
    np.testing.assert_allclose(mean, [arr.mean()], rtol=1e-12)
    np.testing.assert_allclose(std, [arr.std()], rtol=1e-9)
    mean3, std3 = dataset_mean_std(digits.train, "image", in_chans=3)
    np.testing.assert_allclose(mean3, [arr.mean()] * 3, rtol=1e-12)
    np.testing.assert_allclose(std3, [arr.std()] * 3, rtol=1e-9)


def test_mean_std_from_timm():
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    mean, std = mean_std_from_timm(model)
    np.testing.assert_allclose(mean, IMAGENET_DEFAULT_MEAN)
    np.testing.assert_allclose(std, IMAGENET_DEFAULT_STD)
    mean1, std1 = mean_std_from_timm(model, in_chans=1)
    np.testing.assert_allclose(mean1, [np.mean(IMAGENET_DEFAULT_MEAN)])
    np.testing.assert_allclose(std1, [np.mean(IMAGENET_DEFAULT_STD)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_attach_transform_dataloader(digits, num_workers):
    subset, info = make_long_tailed(digits.train, digits.label_column, imbalance_factor=10)
    expected_labels = np.asarray(subset[:]["label"])
    single = attach_transform(subset, tf("eval", 28, 1), digits.image_column, digits.label_column)
    assert len(single) == sum(info.counts)
    np.testing.assert_array_equal(single.labels, expected_labels)
    item = single[5]
    assert set(item) == {"image", "label"} and item["image"].shape == (1, 28, 28)
    assert item["label"] == expected_labels[5] and isinstance(item["label"], int)
    loader = torch.utils.data.DataLoader(single, batch_size=64, num_workers=num_workers, collate_fn=collate)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    assert torch.cat(images).shape == (len(subset), 1, 28, 28)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), expected_labels)
    np.testing.assert_allclose(torch.cat(images)[5].numpy(), item["image"].numpy())

    pair = attach_transform(subset, TwoView(tf("weak", 32, 3, hflip=False), tf("strong", 32, 3)),
                            digits.image_column, digits.label_column)
    loader = torch.utils.data.DataLoader(pair, batch_size=16, shuffle=True, num_workers=num_workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(0))
    (weak, strong), y = next(iter(loader))
    assert weak.shape == strong.shape == (16, 3, 32, 32) and y.dtype == torch.int64 and y.shape == (16,)
    assert not torch.equal(weak, strong)
