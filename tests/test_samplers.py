"""Samplers: target class probabilities by hand, empirical frequencies, reproducibility, sharding."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lt_zoo.samplers import (ClassWeightedSampler, create_sampler, effective_number_weights, list_samplers,
                             normalized_log_count_gap, validate_class_counts)

COUNTS = [400, 100, 25, 4]


def make_labels(counts=COUNTS, seed=0):
    """Labels with the given per-class counts, shuffled so that classes are interleaved."""
    y = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(y)


LABELS = make_labels()


# ---------------------------------------------------------------- target probabilities

def test_class_probabilities_hand_numbers():
    np.testing.assert_allclose(create_sampler("instance", LABELS).class_probabilities,
                               np.array(COUNTS) / 529, rtol=1e-14)
    np.testing.assert_allclose(create_sampler("class_balanced", LABELS).class_probabilities, [0.25] * 4)
    # sqrt(n) = 20, 10, 5, 2 -> / 37
    np.testing.assert_allclose(create_sampler("sqrt", LABELS).class_probabilities,
                               np.array([20, 10, 5, 2]) / 37, rtol=1e-14)
    np.testing.assert_allclose(create_sampler("power", LABELS, power=0.5).class_probabilities,
                               np.array([20, 10, 5, 2]) / 37, rtol=1e-14)
    np.testing.assert_allclose(create_sampler("power", LABELS, power=0.0).class_probabilities, [0.25] * 4)


def test_effective_number_probabilities_hand_numbers():
    y = make_labels([3, 1])
    # beta = 0.5: per-sample weight (1-b)/(1-b^n) = (4/7, 1); class mass n*w = (12/7, 1) -> (12/19, 7/19)
    np.testing.assert_allclose(create_sampler("effective_num", y, beta=0.5).class_probabilities,
                               [12 / 19, 7 / 19], rtol=1e-14)
    # CBEN, n = (4, 1): delta_hat = (0, 1), beta_j = 0.5 + 0.25 * delta_hat = (0.5, 0.75)
    # w = (0.5/(1-0.5^4), 0.25/(1-0.75)) = (8/15, 1); mass (32/15, 1) -> (32/47, 15/47)
    y = make_labels([4, 1])
    np.testing.assert_allclose(create_sampler("cben", y, beta_a=0.5, beta_b=0.25).class_probabilities,
                               [32 / 47, 15 / 47], rtol=1e-14)


def test_cben_defaults_near_class_balanced():
    # docs/gcl.md#decision-gcl-stage-2: CBEN's head/tail probability ratio is ~1.27 on CIFAR-10-LT IF100
    counts = [int(5000 * 100 ** (-i / 9)) for i in range(10)]
    q = create_sampler("cben", make_labels(counts)).class_probabilities
    assert q[0] / q[-1] == pytest.approx(1.27, abs=0.01)


def test_count_statistics():
    np.testing.assert_allclose(effective_number_weights([1, 2], 0.5), [1.0, 0.5 / 0.75])
    np.testing.assert_allclose(normalized_log_count_gap([100, 10, 1]), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(normalized_log_count_gap([7, 7]), [0.0, 0.0])
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        validate_class_counts([3, 0])


# ---------------------------------------------------------------- empirical behaviour

@pytest.mark.parametrize("name, opts", [("class_balanced", {}), ("sqrt", {}), ("effective_num", {"beta": 0.99}),
                                        ("cben", {}), ("power", {"power": 0.25})])
def test_empirical_class_frequencies(name, opts):
    draws = 200_000
    s = create_sampler(name, LABELS, num_samples=draws, seed=3, **opts)
    idx = np.fromiter(iter(s), dtype=np.int64)
    assert len(idx) == draws and idx.min() >= 0 and idx.max() < len(LABELS)
    freq = np.bincount(LABELS[idx], minlength=4) / draws
    q = s.class_probabilities
    sigma = np.sqrt(q * (1 - q) / draws)
    assert np.all(np.abs(freq - q) < 5 * sigma + 1e-12), (freq, q)
    # within a class every sample is equally likely: the rarest class (4 samples) is drawn uniformly
    tail = np.bincount(idx[LABELS[idx] == 3], minlength=len(LABELS))[LABELS == 3]
    expected = q[3] * draws / 4
    assert np.all(np.abs(tail - expected) < 5 * np.sqrt(expected))


def test_instance_sampling_is_a_permutation():
    s = create_sampler("instance", LABELS, seed=1)
    idx = list(s)
    assert sorted(idx) == list(range(len(LABELS)))
    longer = create_sampler("instance", LABELS, num_samples=2 * len(LABELS) + 3)
    counts = np.bincount(list(longer), minlength=len(LABELS))
    assert len(longer) == 2 * len(LABELS) + 3 and counts.min() >= 2 and counts.max() <= 3


@pytest.mark.parametrize("name", ["instance", "class_balanced"])
def test_reproducible_from_seed_and_epoch(name):
    a, b = create_sampler(name, LABELS, seed=5), create_sampler(name, LABELS, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating does not advance any hidden state
    epoch3 = list(a)
    a.set_epoch(4)
    assert list(a) != epoch3
    c = create_sampler(name, LABELS, seed=6)
    c.set_epoch(3)
    assert list(c) != epoch3
    # (seed, epoch) = (0, 1) and (1, 0) are different streams
    d, e = create_sampler(name, LABELS, seed=0), create_sampler(name, LABELS, seed=1)
    d.set_epoch(1)
    assert list(d) != list(e)
    # global RNG state is irrelevant
    torch.manual_seed(999)
    assert list(b) == epoch3


@pytest.mark.parametrize("name, num_samples", [("instance", None), ("class_balanced", 530), ("sqrt", 100)])
def test_rank_shares_are_disjoint_and_cover_the_epoch(name, num_samples):
    world = 3
    full = create_sampler(name, LABELS, seed=2, num_samples=num_samples)
    full.set_epoch(7)
    draw = full.epoch_indices().tolist()
    shares = []
    for rank in range(world):
        s = create_sampler(name, LABELS, seed=2, num_samples=num_samples, num_replicas=world, rank=rank)
        s.set_epoch(7)
        shares.append(list(s))
        assert len(shares[-1]) == len(s) == -(-len(draw) // world)
    # positions rank::world of the padded draw: interleaving the shares gives it back
    padded = draw + draw[: len(shares[0]) * world - len(draw)]
    interleaved = [shares[r][i] for i in range(len(shares[0])) for r in range(world)]
    assert interleaved == padded
    if name == "instance" and num_samples is None:
        # 529 = 3 * 176 + 1: two padded entries repeat the first indices; otherwise disjoint
        union = sorted(i for share in shares for i in share)
        assert sorted(set(union)) == list(range(len(LABELS)))
        assert len(union) == len(LABELS) + 2


def test_works_with_dataloader():
    ds = TensorDataset(torch.arange(len(LABELS)), torch.from_numpy(LABELS))
    s = create_sampler("class_balanced", LABELS, num_samples=4000, seed=0)
    loader = DataLoader(ds, sampler=s, batch_size=64)
    seen_idx, seen_y = zip(*[(i, y) for i, y in loader])
    idx, ys = torch.cat(seen_idx), torch.cat(seen_y)
    assert len(idx) == 4000
    assert torch.equal(idx, s.epoch_indices())
    assert torch.equal(ys, torch.from_numpy(LABELS)[idx])
    # rare classes are now as frequent as common ones
    assert np.bincount(ys.numpy(), minlength=4).min() > 850


def test_works_through_accelerate_prepare():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    ds = TensorDataset(torch.arange(len(LABELS)))
    s = create_sampler("sqrt", LABELS, num_samples=256, seed=4)
    try:
        accelerator = Accelerator(cpu=True)
        loader = accelerator.prepare(DataLoader(ds, sampler=s, batch_size=32))
        epoch0 = torch.cat([b[0] for b in loader])
        epoch1 = torch.cat([b[0] for b in loader])  # Accelerate advances the sampler's epoch itself
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    s.set_epoch(0)
    assert torch.equal(epoch0, s.epoch_indices())
    s.set_epoch(1)
    assert torch.equal(epoch1, s.epoch_indices())
    assert not torch.equal(epoch0, epoch1)


# ---------------------------------------------------------------- errors

def test_sampler_errors():
    with pytest.raises(ValueError, match=r"unknown sampler 'balanced'.*'class_balanced'.*'sqrt'"):
        create_sampler("balanced", LABELS)
    with pytest.raises(ValueError, match=r"\['beta'\] for sampler 'sqrt'"):
        create_sampler("sqrt", LABELS, beta=0.9)
    with pytest.raises(ValueError, match=r"\['bta'\].*valid options: \['beta'\]"):
        create_sampler("effective_num", LABELS, bta=0.9)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\); got 2"):
        create_sampler("sqrt", LABELS, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match=r"labels must be >= 0; got -1 at index 1"):
        create_sampler("sqrt", [0, -1, 2])
    with pytest.raises(ValueError, match="integers"):
        create_sampler("sqrt", [0.0, 1.5])
    with pytest.raises(ValueError, match="empty"):
        create_sampler("sqrt", [])
    with pytest.raises(ValueError, match="1-D"):
        create_sampler("sqrt", np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="num_samples"):
        create_sampler("sqrt", LABELS, num_samples=0)
    assert list_samplers() == ["cben", "class_balanced", "effective_num", "instance", "power", "sqrt"]


def test_absent_classes_get_zero_probability():
    y = np.array([0, 0, 0, 2, 2])  # class 1 has no samples
    s = create_sampler("class_balanced", y)
    np.testing.assert_allclose(s.class_probabilities, [0.5, 0.0, 0.5])
    assert isinstance(s, ClassWeightedSampler) and set(y[list(s)]) <= {0, 2}
