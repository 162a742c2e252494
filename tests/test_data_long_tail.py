"""Long-tailed subsets: exact counts (Cao et al. profile), bit-exact LDAM-DRW selection, hashes, errors."""
import hashlib
import json

import datasets
import numpy as np
import pytest

from lt_zoo.data import class_counts, hash_indices, long_tail_counts, make_long_tailed


def balanced_labels(n_per_class, num_classes, seed=123):
    """Balanced labels in a shuffled row order (like CIFAR's file order, not sorted by class)."""
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return np.random.default_rng(seed).permutation(labels)


def label_dataset(labels, num_classes):
    features = datasets.Features({"label": datasets.ClassLabel(num_classes=num_classes)})
    return datasets.Dataset.from_dict({"label": np.asarray(labels, dtype=np.int64)}, features=features)


def cao_reference(labels, counts, seed):
    """LDAM-DRW imbalance_cifar.py, written with the legacy global generator as the original does."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        targets = np.array(labels, dtype=np.int64)
        kept = []
        for the_class, the_img_num in zip(np.unique(targets), counts):
            idx = np.where(targets == the_class)[0]
            np.random.shuffle(idx)
            kept.extend(idx[:the_img_num].tolist())
    finally:
        np.random.set_state(saved)
    return sorted(kept)


@pytest.mark.parametrize("n_max,num_classes,totals", [
    (5000, 10, {10: 20431, 50: 13996, 100: 12406, 200: 11203}),   # CIFAR-10-LT totals, docs/data.md#long-tailed-subsets-cao-et-al
    (500, 100, {10: 19573, 50: 12608, 100: 10847, 200: 9502}),    # CIFAR-100-LT
])
def test_exp_counts_match_cao_totals_and_closed_form(n_max, num_classes, totals):
    for imb, total in totals.items():
        counts = long_tail_counts(n_max, num_classes, imb)
        expected = [int(n_max * (1 / imb) ** (i / (num_classes - 1))) for i in range(num_classes)]
        assert counts == expected
        assert sum(counts) == total
        assert counts[0] == n_max and counts[-1] == n_max // imb


@pytest.mark.parametrize("n_per_class,num_classes,total", [(5000, 10, 12406), (500, 100, 10847)])
def test_make_long_tailed_synthetic_balanced_exact_per_class(n_per_class, num_classes, total):
    labels = balanced_labels(n_per_class, num_classes)
    subset, info = make_long_tailed(label_dataset(labels, num_classes), "label", imbalance_factor=100)
    expected = [int(n_per_class * 0.01 ** (i / (num_classes - 1))) for i in range(num_classes)]
    got = np.bincount(np.asarray(subset[:]["label"]), minlength=num_classes).tolist()
    assert got == expected == info.counts
    assert len(subset) == total == len(info.indices)
    assert info.n_max == n_per_class
    np.testing.assert_array_equal(np.asarray(subset[:]["label"]), labels[info.indices])


@pytest.mark.parametrize("seed", [0, 7])
def test_cao2019_selection_is_bit_exact(seed):
    labels = balanced_labels(500, 10, seed=5)
    ds = label_dataset(labels, 10)
    _, info = make_long_tailed(ds, "label", imbalance_factor=50, seed=seed, selection="cao2019")
    reference = cao_reference(labels, info.counts, seed)
    assert info.indices.tolist() == reference
    # the global numpy generator is left alone
    np.random.seed(99)
    before = np.random.get_state()[1].copy()
    make_long_tailed(ds, "label", imbalance_factor=50, seed=seed)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_rng_selection_matches_default_rng_permutation_and_differs_from_cao():
    labels = balanced_labels(300, 5, seed=2)
    ds = label_dataset(labels, 5)
    _, info = make_long_tailed(ds, "label", imbalance_factor=10, seed=3, selection="rng")
    rng = np.random.default_rng(3)
    expected = []
    for c, n in enumerate(info.counts):
        expected.extend(rng.permutation(np.flatnonzero(labels == c))[:n].tolist())
    assert info.indices.tolist() == sorted(expected)
    _, cao = make_long_tailed(ds, "label", imbalance_factor=10, seed=3, selection="cao2019")
    assert cao.counts == info.counts and cao.indices_hash != info.indices_hash


def test_reproducible_hash_and_seed_sensitivity():
    ds = label_dataset(balanced_labels(200, 10), 10)
    a = make_long_tailed(ds, "label", imbalance_factor=20, seed=0)[1]
    b = make_long_tailed(ds, "label", imbalance_factor=20, seed=0)[1]
    c = make_long_tailed(ds, "label", imbalance_factor=20, seed=1)[1]
    assert a.indices_hash == b.indices_hash
    assert a.indices_hash != c.indices_hash
    independent = hashlib.sha256(np.sort(a.indices).astype("<i8").tobytes()).hexdigest()[:16]
    assert a.indices_hash == independent == hash_indices(a.indices[::-1])
    record = json.loads(json.dumps(a.to_dict()))
    assert "indices" not in record
    assert record["counts"] == a.counts and record["total"] == sum(a.counts)
    assert record["seed"] == 0 and record["selection"] == "cao2019" and record["imbalance_factor"] == 20


def test_step_profile_counts_and_subset():
    assert long_tail_counts(5000, 10, 100, profile="step") == [5000] * 5 + [50] * 5
    assert long_tail_counts(1000, 10, 10, profile="step", step_ratio=0.3) == [1000] * 7 + [100] * 3
    subset, info = make_long_tailed(label_dataset(balanced_labels(100, 4), 4), "label", 4, profile="step")
    assert np.bincount(np.asarray(subset[:]["label"])).tolist() == [100, 100, 25, 25] == info.counts


def test_n_max_from_sequence_and_explicit_n_max():
    assert long_tail_counts([9, 12, 10], 3, 4) == [9, int(9 * 0.25 ** 0.5), int(9 * 0.25)]
    ds = label_dataset(balanced_labels(50, 3), 3)
    subset, info = make_long_tailed(ds, "label", imbalance_factor=5, n_max=40)
    assert info.counts == [40, int(40 * 0.2 ** 0.5), 8] and len(subset) == sum(info.counts)


def test_class_counts():
    np.testing.assert_array_equal(class_counts([0, 2, 2, 4], 6), [1, 0, 2, 0, 1, 0])
    with pytest.raises(ValueError, match="expected 0..2"):
        class_counts([0, 3], 3)


@pytest.mark.parametrize("imb", [0.5, 0, -3, float("nan"), float("inf")])
def test_imbalance_factor_below_one_is_rejected(imb):
    with pytest.raises(ValueError, match="imbalance_factor"):
        long_tail_counts(100, 10, imb)
    with pytest.raises(ValueError, match="imbalance_factor"):
        make_long_tailed(label_dataset(balanced_labels(10, 2), 2), "label", imbalance_factor=imb)


def test_count_larger_than_class_names_class_and_counts():
    labels = np.concatenate([np.repeat(np.arange(3), 100), np.full(5, 3)])  # class 3 has only 5 images
    with pytest.raises(ValueError, match=r"class 3: requested 20, has 5") as err:
        make_long_tailed(label_dataset(labels, 4), "label", imbalance_factor=5, n_max=100)
    assert "[100, 58, 34, 20]" in str(err.value)
    with pytest.raises(ValueError, match="class 0: requested 200, has 100"):
        make_long_tailed(label_dataset(labels, 4), "label", imbalance_factor=1, n_max=200)


def test_empty_class_is_rejected():
    ds = label_dataset(balanced_labels(50, 5), 5)
    with pytest.raises(ValueError, match=r"classes \[4\] would be empty"):
        make_long_tailed(ds, "label", imbalance_factor=100)  # int(50 * 0.01) = 0
    absent = label_dataset(np.repeat([0, 1, 3], 10), 4)  # ClassLabel says 4 classes, class 2 has none
    with pytest.raises(ValueError, match=r"classes \[2\] have no images"):
        make_long_tailed(absent, "label", imbalance_factor=2)


def test_bad_profile_selection_seed_and_column():
    ds = label_dataset(balanced_labels(10, 2), 2)
    with pytest.raises(ValueError, match="profile"):
        make_long_tailed(ds, "label", profile="linear")
    with pytest.raises(ValueError, match="selection"):
        make_long_tailed(ds, "label", selection="random")
    with pytest.raises(ValueError, match="seed"):
        make_long_tailed(ds, "label", seed=-1)
    with pytest.raises(ValueError, match=r"available columns: \['label'\]"):
        make_long_tailed(ds, "fine_label")
    with pytest.raises(ValueError, match="num_classes"):
        long_tail_counts(10, 1, 10)
