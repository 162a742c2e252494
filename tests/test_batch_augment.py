"""Batched augmentation on uint8 tensors and TensorLoader: exact against per-image references, seeded, sampler order."""
import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lt_zoo.data.batch_augment import (BatchAugment, BatchTwoView, TensorLoader, apply_policy_batched,
                                       create_batch_transform, epoch_generator, normalize, random_hflip,
                                       random_pad_crop)
from lt_zoo.samplers import create_sampler


def images(n=64, c=1, size=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, size, size), dtype=np.uint8))


def index_images(n):
    """Image i carries its own index in pixels (0, 0) and (0, 1), so a batch says which rows it holds."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n) // 256
    x[:, 0, 0, 1] = torch.arange(n) % 256
    return x


def indices_of(batch):
    return (batch[:, 0, 0, 0].long() * 256 + batch[:, 0, 0, 1].long()).tolist()


@pytest.mark.parametrize("pad", [0, 1, 4])
@pytest.mark.parametrize("c", [1, 3])
def test_pad_crop_equals_per_image_torchvision_crop(pad, c):
    x = images(c=c)
    out = random_pad_crop(x, pad, torch.Generator().manual_seed(3))
    # Draw order is documented: all tops, then all lefts, from the given generator.
    g = torch.Generator().manual_seed(3)
    if pad:
        tops = torch.randint(0, 2 * pad + 1, (len(x),), generator=g).tolist()
        lefts = torch.randint(0, 2 * pad + 1, (len(x),), generator=g).tolist()
    else:
        tops = lefts = [0] * len(x)
    for i in range(len(x)):
        padded = TF.pad(x[i], [pad], fill=0)  # what v2.RandomCrop(padding=pad) does before cropping
        assert torch.equal(out[i], TF.crop(padded, tops[i], lefts[i], 12, 12))
    if pad == 4:
        assert len(set(zip(tops, lefts))) > 20  # offsets really vary per image


def test_pad_crop_offsets_cover_the_whole_range():
    x = torch.full((2000, 1, 3, 3), 255, dtype=torch.uint8)
    out = random_pad_crop(x, 2, torch.Generator().manual_seed(0))
    # Visible image pixels per crop = overlap of the 3x3 image with the 3x3 window: rows * cols.
    visible = (out > 0).sum(dim=(1, 2, 3))
    assert set(visible.tolist()) == {1, 2, 3, 4, 6, 9}


def test_hflip_equals_per_image_reference():
    x = images(n=200)
    out = random_hflip(x, torch.Generator().manual_seed(7))
    flip = (torch.rand(200, generator=torch.Generator().manual_seed(7)) < 0.5).tolist()
    for i in range(200):
        assert torch.equal(out[i], TF.horizontal_flip(x[i]) if flip[i] else x[i])
    assert 60 < sum(flip) < 140


def test_normalize_equals_torchvision_float_pipeline():
    x = images(n=8, c=3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    got = normalize(x, torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1))
    assert torch.equal(got, torch.stack([ref(img) for img in x]))
    expected64 = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    assert torch.allclose(got.double(), expected64, atol=1e-6)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("policy", [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.RandAugment(),
                                    v2.RandAugment(num_ops=3, magnitude=5)])
def test_batched_policy_equals_torchvision_per_image(policy, c):
    x = images(n=150, c=c, size=16)
    torch.manual_seed(11)
    expected = torch.stack([policy(img) for img in x])
    after_reference = torch.rand(4)
    torch.manual_seed(11)
    got = apply_policy_batched(policy, x)
    assert torch.equal(got, expected)
    assert torch.equal(torch.rand(4), after_reference)  # same draws consumed, in the same order
    assert not torch.equal(got, x)


def test_strong_view_is_seeded_and_leaves_global_rng_alone():
    x = images(n=32)
    strong = BatchAugment("strong", mean=(0.5,), std=(0.2,))
    torch.manual_seed(0)
    a = strong(x, torch.Generator().manual_seed(1))
    global_next = torch.rand(3)
    torch.manual_seed(0)
    b = strong(x, torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), global_next)
    assert torch.equal(a, b)
    assert not torch.equal(a, strong(x, torch.Generator().manual_seed(2)))


def test_weak_view_composes_crop_flip_normalize():
    x = images(n=40, c=3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    weak = create_batch_transform("weak", mean=mean, std=std, pad=2)
    got = weak(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ref = normalize(random_hflip(random_pad_crop(x, 2, g), g), torch.tensor(mean).view(-1, 1, 1),
                    torch.tensor(std).view(-1, 1, 1))
    assert torch.equal(got, ref)
    evaluated = create_batch_transform("eval", mean=mean, std=std)(x, torch.Generator())
    assert torch.equal(evaluated, normalize(x, torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)))


def test_create_batch_transform_rejects_bad_options():
    with pytest.raises(ValueError, match="train_crop='random_resized'"):
        create_batch_transform("weak", mean=(0.5,), std=(0.2,), train_crop="random_resized")
    with pytest.raises(ValueError, match="kind='strongest'"):
        create_batch_transform("strongest", mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="std must be positive"):
        create_batch_transform("weak", mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="two_view=True"):
        create_batch_transform("eval", mean=(0.5,), std=(0.2,), two_view=True)
    weak = create_batch_transform("weak", mean=(0.5,), std=(0.2,))
    with pytest.raises(TypeError, match="uint8"):
        weak(images().float(), torch.Generator())
    with pytest.raises(ValueError, match="3 channels but mean/std have 1"):
        weak(images(c=3), torch.Generator())


def test_loader_follows_sampler_order_exactly():
    n = 700
    labels = torch.from_numpy(np.repeat(np.arange(4), [400, 200, 80, 20]))
    sampler = create_sampler("class_balanced", labels.numpy(), seed=3)
    loader = TensorLoader(index_images(n), labels, batch_size=64, sampler=sampler)
    loader.set_epoch(2)
    seen, ys = [], []
    for x, y in loader:
        seen += indices_of(x)
        ys += y.tolist()
    assert seen == list(iter(sampler))  # the sampler is at epoch 2 too
    assert ys == labels[seen].tolist()
    assert len(loader) == 11 and len(seen) == n
    counts = np.bincount(ys, minlength=4)
    assert counts.sum() == n and counts.min() > 120  # class-balanced draw, not the 400/20 split


def test_loader_distributed_shards_are_disjoint_and_complete():
    n = 101
    labels = torch.zeros(n, dtype=torch.int64)
    shards = []
    for rank in range(2):
        sampler = create_sampler("instance", labels.numpy(), seed=1, num_replicas=2, rank=rank)
        loader = TensorLoader(index_images(n), labels, batch_size=16, sampler=sampler, rank=rank)
        loader.set_epoch(4)
        shards.append([i for x, _ in loader for i in indices_of(x)])
    assert len(shards[0]) == len(shards[1]) == 51
    assert sorted(set(shards[0]) | set(shards[1])) == list(range(n))
    assert len(set(shards[0]) & set(shards[1])) == 1  # the one wrap-around pad of the odd draw


def test_loader_without_sampler_is_sequential_with_exact_batch_sizes():
    labels = torch.arange(10) % 3
    loader = TensorLoader(index_images(10), labels, batch_size=4)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert [i for x, _ in batches for i in indices_of(x)] == list(range(10))
    dropped = TensorLoader(index_images(10), labels, batch_size=4, drop_last=True)
    assert len(dropped) == 2 and [len(y) for _, y in dropped] == [4, 4]


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(tuple(v.clone() for v in x) if isinstance(x, tuple) else x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(ya, yb) and all(torch.equal(u, v) for u, v in zip(*((xa, xb) if isinstance(xa, tuple)
                                                                       else ((xa,), (xb,)))))
        for (xa, ya), (xb, yb) in zip(a, b))


def test_loader_epochs_replay_exactly_after_a_restart():
    x, labels = images(n=90, size=8), torch.arange(90) % 5
    tf = create_batch_transform("weak", mean=(0.5,), std=(0.25,), two_view=True)

    def fresh(rank=0):
        sampler = create_sampler("sqrt", labels.numpy(), seed=7)
        return TensorLoader(x, labels, batch_size=32, sampler=sampler, transform=tf, seed=7, rank=rank)

    run = fresh()
    epochs = [epoch_batches(run, e) for e in range(3)]
    (xw, xs), y = epochs[0][0]
    assert xw.shape == xs.shape == (32, 1, 8, 8) and xw.dtype == torch.float32 and y.dtype == torch.int64
    assert not torch.equal(xw, xs)  # independent views
    assert not same(epochs[0], epochs[1])
    resumed = fresh()  # a new process resuming at epoch 2
    torch.manual_seed(12345)  # the global RNG state must not matter
    assert same(epoch_batches(resumed, 2), epochs[2])
    assert not same(epoch_batches(fresh(rank=1), 2), epochs[2])


def test_epoch_generator_is_a_function_of_its_tuple():
    draw = lambda *key: torch.rand(4, generator=epoch_generator(*key)).tolist()
    assert draw(0, 1, 0) == draw(0, 1, 0)
    assert len({tuple(draw(*k)) for k in [(0, 1, 0), (1, 0, 0), (0, 0, 1), (0, 1, 1)]}) == 4


def test_loader_rejects_bad_inputs():
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="uint8"):
        TensorLoader(torch.zeros(4, 1, 2, 2), labels, batch_size=2)
    with pytest.raises(ValueError, match=r"labels must be int64 \(4,\)"):
        TensorLoader(index_images(4), torch.zeros(3, dtype=torch.int64), batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int; got 0"):
        TensorLoader(index_images(4), labels, batch_size=0)
    tf = BatchTwoView(BatchAugment("weak", mean=(0.5,) * 3, std=(0.2,) * 3),
                      BatchAugment("strong", mean=(0.5,) * 3, std=(0.2,) * 3))
    with pytest.raises(ValueError, match="normalises 3 channels but images have 1"):
        TensorLoader(index_images(4), labels, batch_size=2, transform=tf)
    with pytest.raises(IndexError, match=r"indices in \[0, 9\] for 4 images"):
        list(TensorLoader(index_images(4), labels, batch_size=2, sampler=[0, 9]))
