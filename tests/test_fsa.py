"""Feature Space Augmentation phase II (lt_zoo.fsa) against hand-made tensors and NumPy references."""
import math

import numpy as np
import pytest
import timm
import torch

from lt_zoo.fsa import (FeatureSpaceAugmenter, FsaBatchSampler, class_activation_maps, confusing_classes,
                        head_tail_split, split_features)

CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# ----------------------------------------------------------------------------- references

def ref_cam(fmap, w_row):
    """Explicit loops, float64: fmap (K, H, W) numpy, w_row (K,) -> min-max normalised (H, W)."""
    k, h, w = fmap.shape
    cam = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            total = 0.0
            for c in range(k):
                total += float(w_row[c]) * float(fmap[c, y, x])
            cam[y, x] = total
    lo, hi = cam.min(), cam.max()
    return np.zeros_like(cam) if hi == lo else (cam - lo) / (hi - lo)


def ref_sets(fmap, w_row, tau_s=0.8, tau_g=0.2):
    """Column sets (as tuples) of the specific / generic parts of one map, with the all-columns fallback."""
    k = fmap.shape[0]
    cam = ref_cam(fmap, w_row).reshape(-1)
    cols = fmap.reshape(k, -1).T
    nonzero = np.array([np.any(col != 0) for col in cols])
    out = []
    for mask in (cam > tau_s, cam < tau_g):
        mask = mask & nonzero
        if not mask.any():
            mask = np.ones_like(mask)
        out.append({tuple(cols[p]) for p in np.flatnonzero(mask)})
    return out


def make_bank(counts=(12, 9, 6, 4, 3, 2), k=4, h=3, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    # ReLU leaves some all-zero columns (prob 1/16 per position with K = 4), as in a real trunk
    feats = torch.relu(torch.randn(len(labels), k, h, w, generator=g))
    weight = torch.randn(len(counts), k, generator=g)
    return feats, labels, weight


# ----------------------------------------------------------------------------- CAM and masks

def test_cam_matches_explicit_loops():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 4, 2, 5, generator=g)
    weight = torch.randn(6, 4, generator=g)
    classes = torch.tensor([5, 0, 2])
    cam = class_activation_maps(feats, weight, classes)
    assert cam.shape == (3, 2, 5) and cam.dtype == torch.float32
    for n in range(3):
        expected = ref_cam(feats[n].double().numpy(), weight[classes[n]].double().numpy())
        np.testing.assert_allclose(cam[n].numpy(), expected, atol=1e-6)
        assert cam[n].min() == 0 and cam[n].max() == 1


def test_cam_ignores_positive_row_scale_and_constant_maps_are_zero():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 3, 4, 4, generator=g)
    feats[1] = 0.7  # constant map: 0/0 in min-max
    weight = torch.randn(2, 3, generator=g)
    classes = torch.tensor([1, 0])
    cam = class_activation_maps(feats, weight, classes)
    scaled = class_activation_maps(feats, weight * torch.tensor([[3.0], [0.25]]), classes)
    torch.testing.assert_close(cam, scaled)
    assert torch.isfinite(cam).all() and (cam[1] == 0).all()


def test_cam_rejects_bad_input():
    feats = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match='fc_weight'):
        class_activation_maps(feats, torch.randn(5, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='classes'):
        class_activation_maps(feats, torch.randn(5, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match='one entry per sample'):
        class_activation_maps(feats, torch.randn(5, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match='features'):
        class_activation_maps(torch.randn(2, 3, 16), torch.randn(5, 3), torch.tensor([0, 1]))


def test_split_masks_strict_thresholds_and_zero_vectors():
    cam = torch.tensor([[[0.1, 0.2, 0.5], [0.8, 0.9, 0.0]]])        # (1, 2, 3)
    feats = torch.ones(1, 2, 2, 3)
    specific, generic = split_features(feats, cam, tau_s=0.8, tau_g=0.2)
    assert specific.tolist() == [[[False, False, False], [False, True, False]]]
    assert generic.tolist() == [[[True, False, False], [False, False, True]]]
    feats[0, :, 1, 1] = 0.0   # the only specific position now holds a zero vector
    feats[0, :, 0, 0] = 0.0
    specific, generic = split_features(feats, cam, tau_s=0.8, tau_g=0.2)
    assert not specific.any()
    assert generic.tolist() == [[[False, False, False], [False, False, True]]]
    with pytest.raises(ValueError, match='tau_s'):
        split_features(feats, cam, tau_s=1.0)
    with pytest.raises(ValueError, match='cam'):
        split_features(feats, cam[:, :1])


# ----------------------------------------------------------------------------- confusing classes, head/tail

def test_confusing_classes_hand_built():
    scores = torch.tensor([
        [0.10, 0.50, 0.10, 0.30],   # class 3
        [0.30, 0.10, 0.20, 0.40],   # class 3
        [0.20, 0.30, 0.10, 0.40],   # class 3 -> means 0.2, 0.3, 0.1333, (0.3667 own, excluded)
        [0.25, 0.25, 0.40, 0.10],   # class 2 -> tie 0 / 1 at 0.25, lower index first
        [0.90, 0.05, 0.03, 0.02],   # class 0
    ])
    labels = torch.tensor([3, 3, 3, 2, 0])
    out = confusing_classes(scores, labels, 4, [3, 2], top_n=2)
    assert out.tolist() == [[1, 0], [0, 1]]
    assert confusing_classes(scores, labels, 4, [3], top_n=3).tolist() == [[1, 0, 2]]
    with pytest.raises(ValueError, match='top_n'):
        confusing_classes(scores, labels, 4, [3], top_n=4)
    with pytest.raises(ValueError, match=r'\[1\]'):
        confusing_classes(scores, labels, 4, [1], top_n=2)   # class 1 has no sample


def test_confusing_classes_match_numpy_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(60, 7))
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 7, size=60)
    tail = [6, 4, 5]
    out = confusing_classes(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels), 7, tail, top_n=3)
    for row, c in zip(out.tolist(), tail):
        mean = scores[labels == c].mean(0)
        ranked = [j for j in sorted(range(7), key=lambda j: -mean[j]) if j != c]
        assert row == ranked[:3]


def test_head_tail_split_cifar10_if100():
    total = sum(CIFAR10_IF100)
    num_head, acc = 0, 0
    for n in sorted(CIFAR10_IF100, reverse=True):   # counts already descend
        if acc >= 0.9 * total:
            break
        acc += n
        num_head += 1
    assert num_head == 5   # 11,515 / 12,406 = 0.928 >= 0.9 > 10,870 / 12,406
    head, tail = head_tail_split(CIFAR10_IF100, head_ratio=0.9)
    assert head.tolist() == list(range(num_head)) and tail.tolist() == list(range(num_head, 10))


def test_head_tail_split_unsorted_ties_and_boundary():
    perm = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]
    counts = [CIFAR10_IF100[p] for p in perm]
    head, tail = head_tail_split(counts, 0.9)
    assert sorted(perm[i] for i in head.tolist()) == [0, 1, 2, 3, 4]
    assert head_tail_split([9, 1], 0.9)[0].tolist() == [0]            # share exactly h_r counts as enough
    assert head_tail_split([5, 5, 5, 5], 0.5)[0].tolist() == [0, 1]   # ties: lower index first
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match='head_ratio'):
            head_tail_split(CIFAR10_IF100, bad)
    with pytest.raises(ValueError, match='class_counts'):
        head_tail_split([3, -1], 0.9)


# ----------------------------------------------------------------------------- augmentation

def build_augmenter(storage_dtype=None, **kw):
    feats, labels, weight = make_bank(**kw)
    tail = [3, 4, 5]
    confusing = [[0, 1], [0, 2], [1, 3]]
    return FeatureSpaceAugmenter(feats, labels, weight, tail, confusing, storage_dtype=storage_dtype), feats, weight


def test_augment_columns_come_from_specific_and_generic_sets():
    aug, feats, weight = build_augmenter()
    assert aug.num_generic_fallbacks == 0
    tail_idx = aug.tail_indices[torch.tensor([0, 3, 4, 6, 8])]
    tail_labels = aug.labels[tail_idx]
    out = aug.augment(feats[tail_idx], tail_labels, torch.Generator().manual_seed(0))
    n_t, n_a, k, length = 5, 2, 4, 9
    assert out.features.shape == (n_t * n_a, k, 3, 3) and out.features.dtype == torch.float32
    assert out.labels.tolist() == tail_labels.repeat_interleave(n_a).tolist()
    table = {3: [0, 1], 4: [0, 2], 5: [1, 3]}
    spec_shares = []
    for m in range(n_t * n_a):
        i, j = divmod(m, n_a)
        c, partner = int(tail_labels[i]), int(out.partner_index[m])
        assert int(aug.labels[partner]) == table[c][j]
        spec_set, _ = ref_sets(feats[tail_idx[i]].double().numpy(), weight[c].double().numpy())
        _, gen_set = ref_sets(feats[partner].double().numpy(), weight[table[c][j]].double().numpy())
        assert spec_set and gen_set and not (spec_set & gen_set)
        cols = [tuple(col) for col in out.features[m].double().numpy().reshape(k, -1).T]
        gamma = float(out.gammas[m])
        expected_specific = math.floor(gamma * length + 0.5)
        assert 0.0 < gamma < 1.0 and int(out.num_specific[m]) == expected_specific
        assert all(col in spec_set for col in cols[:expected_specific])
        assert all(col in gen_set for col in cols[expected_specific:])
        spec_shares.append(sum(col in spec_set for col in cols))
        assert spec_shares[-1] == expected_specific
    assert len(set(spec_shares)) > 2   # gamma really varies


def test_augment_is_reproducible_with_seed():
    aug, feats, _ = build_augmenter()
    idx = aug.tail_indices[:4]
    a = aug.augment(feats[idx], aug.labels[idx], torch.Generator().manual_seed(7))
    b = aug.augment(feats[idx], aug.labels[idx], torch.Generator().manual_seed(7))
    c = aug.augment(feats[idx], aug.labels[idx], torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.gammas, c.gammas)


def test_float16_bank_outputs_stored_columns():
    aug, feats, _ = build_augmenter(storage_dtype='float16')
    assert aug.features.dtype == torch.float16
    idx = aug.tail_indices
    out = aug.augment(aug.features[idx].float(), aug.labels[idx], torch.Generator().manual_seed(0))
    assert out.features.dtype == torch.float32
    assert torch.equal(out.features.half().float(), out.features)
    bank_cols = {tuple(col) for col in aug.features.float().flatten(2).transpose(1, 2).reshape(-1, 4).tolist()}
    assert all(tuple(col) in bank_cols for col in out.features.flatten(2).transpose(1, 2).reshape(-1, 4).tolist())


def test_empty_sets_fall_back_to_all_columns():
    # K = 1, weight 1: the CAM is the feature itself.
    head = torch.tensor([[5.0, 6.0, 7.0, 1.0], [0.0, 5.0, 6.0, 7.0]])   # 2nd: min sits on a zero vector
    tail = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])                       # max sits on a zero vector
    feats = torch.cat([head, tail]).view(3, 1, 2, 2)
    aug = FeatureSpaceAugmenter(feats, [0, 0, 1], torch.ones(2, 1), [1], [[0]], storage_dtype=None)
    assert aug.num_generic_fallbacks == 1
    out = aug.augment(feats[[2] * 200], [1] * 200, torch.Generator().manual_seed(0))
    spec_vals, gen_vals = set(), {0: set(), 1: set()}
    for m in range(200):
        vals = out.features[m].flatten().tolist()
        n = int(out.num_specific[m])
        spec_vals.update(vals[:n])
        gen_vals[int(out.partner_index[m])].update(vals[n:])
    assert spec_vals == {-1.0, -2.0, -3.0, 0.0}      # no specific position: all four columns
    assert gen_vals[0] == {1.0}                      # generic = the lone low-CAM position
    assert gen_vals[1] == {0.0, 5.0, 6.0, 7.0}       # no generic position: all four columns


def test_augmenter_rejects_bad_input():
    feats, labels, weight = make_bank()
    aug = FeatureSpaceAugmenter(feats, labels, weight, [4, 5], [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match=r'non-tail classes \[0\]'):
        aug.augment(feats[:2], labels[:2])
    with pytest.raises(ValueError, match='like the bank'):
        aug.augment(feats[-2:, :3], labels[-2:])
    with pytest.raises(ValueError, match='own confusing'):
        FeatureSpaceAugmenter(feats, labels, weight, [4, 5], [[4, 1], [0, 1]])
    with pytest.raises(ValueError, match='no sample'):
        FeatureSpaceAugmenter(feats[:30], labels[:30], weight, [4], [[0, 5]])
    with pytest.raises(ValueError, match='storage_dtype'):
        FeatureSpaceAugmenter(feats, labels, weight, [4], [[0]], storage_dtype='half')


# ----------------------------------------------------------------------------- batches

def test_batch_composition_and_reproducibility():
    feats, labels, weight = make_bank()
    aug = FeatureSpaceAugmenter(feats, labels, weight, [4, 5], [[0, 1, 2], [0, 1, 3]], storage_dtype=None)
    sampler = FsaBatchSampler(aug, num_tail=16, num_batches=3, seed=5)
    assert sampler.batch_size == 2 * 16 * (1 + 3) == 128 and len(sampler) == 3
    batches = list(sampler)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (128, 4, 3, 3) and y.shape == (128,)
        real, aug_y, head_y = y[:16], y[16:64], y[64:]
        assert set(real.tolist()) <= {4, 5} and set(head_y.tolist()) <= {0, 1, 2, 3}
        assert aug_y.tolist() == real.repeat_interleave(3).tolist()
        # real and head rows are bank rows of their class
        for row, label in zip(torch.cat([x[:16], x[64:]]), torch.cat([real, head_y])):
            same = (feats == row).flatten(1).all(1)
            assert same.any() and (labels[same] == label).all()
    again = list(sampler)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    sampler.set_epoch(1)
    assert not torch.equal(next(iter(sampler))[0], batches[0][0])
    other = FsaBatchSampler(aug, num_tail=16, num_batches=1, seed=6)
    assert not torch.equal(next(iter(other))[0], batches[0][0])


def test_phase_two_on_a_timm_model():
    """The trainer's flow: cache forward_features, build the bank from the head, train only the FC."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=6, pretrained=False).eval()
    counts = [8, 6, 4, 3, 2, 1]
    labels = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
    with torch.no_grad():
        feats = model.forward_features(torch.randn(len(labels), 3, 64, 64))      # (24, 512, 2, 2)
        pooled_logits = model.forward_head(feats)
    bank = FeatureSpaceAugmenter.from_classifier(feats, labels, model.get_classifier(), storage_dtype=None)
    # 0.9 * 24 = 21.6: head = classes 0-4 (21 < 21.6 <= 23), tail = class 5
    assert bank.tail_classes.tolist() == [5] and bank.head_classes.tolist() == [0, 1, 2, 3, 4]
    probs = torch.softmax(pooled_logits.double(), 1)[labels == 5].mean(0)
    probs[5] = -1
    assert bank.confusing_table[5].tolist() == torch.argsort(probs, descending=True)[:3].tolist()
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    x, y = next(iter(FsaBatchSampler(bank, num_tail=2, num_batches=1)))
    assert x.shape == (16, 512, 2, 2)
    torch.nn.functional.cross_entropy(model.forward_head(x), y).backward()
    assert model.get_classifier().weight.grad is not None and model.conv1.weight.grad is None
