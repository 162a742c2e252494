"""Feature Space Augmentation, phase II (Chu, Bian, Liu, Ling, ECCV'20, arXiv 2008.03673).

Phase I trains an ordinary GAP -> FC network. Phase II freezes the trunk, caches the pre-pool
feature maps F (N, K, H, W) of every training image once, and fine-tunes only the classifier on
batches that mix real tail samples, augmented tail samples and head samples (Alg. 1). Augmented
tail samples merge class-specific feature vectors of a real tail sample (where its class
activation map is high) with class-generic vectors of a sample from one of its confusing classes
(where that sample's own CAM is low). Because global average pooling follows, only the ratio of
the two kinds of vectors matters, not where they sit (§4.3).

Everything here works on cached feature maps, so phase II needs no forward pass through the trunk:

    bank = FeatureSpaceAugmenter.from_classifier(features, labels, model.get_classifier())
    for feats, y in FsaBatchSampler(bank, seed=0):        # feats (128, K, H, W) with defaults
        logits = model.forward_head(feats)                # GAP -> FC, only the FC trains

Options and their sources: tau_s=0.8 / tau_g=0.2 are NOT given in the paper; they come from the
unofficial SSRSGJYD implementation (docs/fsa.md). head_ratio=0.9: paper §5.4, all CIFAR runs.
num_confusing=N_f=N_a=3 and num_tail=N_t=16 (batch 128): paper §5.1. num_batches=6400: paper §5.1,
CIFAR phase II (200 for iNaturalist).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    'class_activation_maps', 'split_features', 'confusing_classes', 'head_tail_split',
    'AugmentedFeatures', 'FeatureSpaceAugmenter', 'FsaBatchSampler',
]

_CHUNK = 2048  # bank rows per step when computing CAMs / scores; bounds the float32 working copy

_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}

IntLike = Union[torch.Tensor, np.ndarray, Sequence[int]]


def _int_vector(values: IntLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.dim() != 1:
        raise ValueError(f'{name} must be 1-D, got shape {tuple(t.shape)}')
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f'{name} must hold integers, got dtype {t.dtype}')
    return t.long()


def _check_range(t: torch.Tensor, upper: int, name: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(f'{name} must lie in [0, {upper}), got values in [{int(t.min())}, {int(t.max())}]')


def _check_feature_maps(features: torch.Tensor, name: str = 'features') -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 4 or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f'{name} must be a floating (N, K, H, W) tensor of pre-pool feature maps, got {shape}')


def _check_threshold(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f'{name} must lie in (0, 1) (paper §3.2), got {value}')
    return value


def class_activation_maps(features: torch.Tensor, fc_weight: torch.Tensor, classes: IntLike) -> torch.Tensor:
    """Min-max normalised class activation maps, one class per sample (paper Eq. 1, §3.2).

    M_c(x, y) = sum_k w^c_k f_k(x, y) with w^c the classifier row of the sample's class, then
    (M - min M) / (max M - min M) per sample. A constant map (no spatial preference) becomes all
    zeros instead of 0/0. The FC bias is left out: it shifts M by a constant that the min-max
    normalisation removes anyway; likewise a positive per-class scale of w^c (a cosine head normalises
    its rows) does not change the result, so a cosine classifier's raw ``weight`` serves as well.

    Args:
        features: F, (N, K, H, W) pre-pool feature maps (any float dtype; computed in float32).
        fc_weight: (C, K) classifier weight, nn.Linear layout.
        classes: (N,) class per sample; Alg. 1 uses the ground-truth class.
    Returns:
        (N, H, W) float32 maps in [0, 1].
    """
    _check_feature_maps(features)
    if not isinstance(fc_weight, torch.Tensor) or fc_weight.dim() != 2 or fc_weight.shape[1] != features.shape[1]:
        got = tuple(fc_weight.shape) if isinstance(fc_weight, torch.Tensor) else type(fc_weight).__name__
        raise ValueError(f'fc_weight must be (C, K={features.shape[1]}), got {got}')
    classes = _int_vector(classes, 'classes').to(features.device)
    if classes.numel() != features.shape[0]:
        raise ValueError(f'classes must have one entry per sample ({features.shape[0]}), got {classes.numel()}')
    _check_range(classes, fc_weight.shape[0], 'classes')
    w = fc_weight.detach().to(device=features.device, dtype=torch.float32)[classes]          # (N, K)
    cam = torch.einsum('nkhw,nk->nhw', features.detach().float(), w)
    flat = cam.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    flat = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return flat.view_as(cam)


def split_features(features: torch.Tensor, cam: torch.Tensor, tau_s: float = 0.8,
                   tau_g: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary class-specific / class-generic masks (paper Alg. 1 lines 7 and 12, Eq. 2-3).

    specific = M > tau_s, generic = M < tau_g (Alg. 1 uses strict inequalities; Eq. 2-3 write >= / <=).
    Positions whose feature vector is all zero are left out of both masks: Alg. 1 line 14 draws
    "excluding all zeros feature" (after a ReLU such vectors occur and carry nothing). Either mask
    may be empty; callers decide the fallback (FeatureSpaceAugmenter: all positions of that map).

    Args:
        features: (N, K, H, W) the maps the CAM was computed from.
        cam: (N, H, W) normalised CAMs from ``class_activation_maps``.
        tau_s: 0.8, tau_g: 0.2 -- not given in the paper; unofficial SSRSGJYD configs (docs/fsa.md).
    Returns:
        (specific_mask, generic_mask), each bool (N, H, W).
    """
    _check_feature_maps(features)
    tau_s, tau_g = _check_threshold(tau_s, 'tau_s'), _check_threshold(tau_g, 'tau_g')
    n, _, h, w = features.shape
    if not isinstance(cam, torch.Tensor) or tuple(cam.shape) != (n, h, w):
        raise ValueError(f'cam must be (N, H, W) = {(n, h, w)}, got '
                         f'{tuple(cam.shape) if isinstance(cam, torch.Tensor) else type(cam).__name__}')
    nonzero = features.ne(0).any(dim=1)
    return (cam > tau_s) & nonzero, (cam < tau_g) & nonzero


def confusing_classes(scores: torch.Tensor, labels: IntLike, num_classes: int, tail_classes: IntLike,
                      top_n: int = 3) -> torch.Tensor:
    """Top-N confusing classes of each tail class (paper §4.2).

    For tail class c, average the phase-I score vectors of all training samples of class c and rank
    the other classes by that average. Ties go to the lower class index.

    Args:
        scores: (N, C) phase-I classification scores of the training samples (softmax probabilities;
            the ranking only needs a per-sample monotone score, but averaging assumes probabilities).
        labels: (N,) ground-truth classes.
        num_classes: C.
        tail_classes: (T,) distinct tail classes, each with at least one sample.
        top_n: N_f = 3 (paper §5.1, CIFAR).
    Returns:
        (T, top_n) int64, row t = confusing classes of tail_classes[t], most confusing first.
    """
    num_classes = int(num_classes)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] != num_classes:
        raise ValueError(f'scores must be (N, C={num_classes}), got '
                         f'{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}')
    labels = _int_vector(labels, 'labels')
    if labels.numel() != scores.shape[0]:
        raise ValueError(f'labels must have one entry per score row ({scores.shape[0]}), got {labels.numel()}')
    _check_range(labels, num_classes, 'labels')
    tail = _int_vector(tail_classes, 'tail_classes')
    _check_range(tail, num_classes, 'tail_classes')
    if tail.unique().numel() != tail.numel():
        raise ValueError(f'tail_classes must be distinct, got {tail.tolist()}')
    if not 1 <= int(top_n) <= num_classes - 1:
        raise ValueError(f'top_n must be in [1, C-1={num_classes - 1}], got {top_n}')
    counts = torch.bincount(labels, minlength=num_classes)
    empty = tail[counts[tail] == 0]
    if empty.numel():
        raise ValueError(f'tail classes {empty.tolist()} have no samples; their confusing classes are undefined')
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    sums.index_add_(0, labels, scores.detach().to('cpu', torch.float64))
    mean = sums[tail] / counts[tail].unsqueeze(1)
    mean[torch.arange(tail.numel()), tail] = -math.inf   # a class cannot confuse itself
    order = torch.sort(mean, dim=1, descending=True, stable=True).indices
    return order[:, :int(top_n)].contiguous()


def head_tail_split(class_counts: IntLike, head_ratio: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Head / tail classes by sample share (paper §5.4).

    Sort classes by count, descending (ties: lower index first); the head is the shortest prefix
    whose samples make up at least ``head_ratio`` of the data, the rest is the tail.

    Args:
        class_counts: (C,) training samples per class.
        head_ratio: h_r = 0.9 (paper §5.4, all CIFAR runs; Fig. 8 peaks near 0.95).
    Returns:
        (head_classes, tail_classes), int64, each in ascending class order. The tail may be empty
        when the smallest class alone is needed to reach h_r.
    """
    counts = _int_vector(class_counts, 'class_counts').cpu().numpy()
    if counts.size == 0 or (counts < 0).any() or counts.sum() == 0:
        raise ValueError(f'class_counts must be non-negative with a positive total, got {counts.tolist()}')
    head_ratio = float(head_ratio)
    if not 0.0 < head_ratio < 1.0:
        raise ValueError(f'head_ratio must lie in (0, 1) (paper §5.4), got {head_ratio}')
    order = np.argsort(-counts, kind='stable')
    share = np.cumsum(counts[order]) / counts.sum()
    num_head = int(np.argmax(share >= head_ratio)) + 1
    head = torch.from_numpy(np.sort(order[:num_head]).astype(np.int64))
    tail = torch.from_numpy(np.sort(order[num_head:]).astype(np.int64))
    return head, tail


def _nonempty_or_all(mask: torch.Tensor) -> torch.Tensor:
    """(M, L) bool; rows with no position set become all True (fallback: draw from the whole map)."""
    return mask | ~mask.any(dim=1, keepdim=True)


class AugmentedFeatures(NamedTuple):
    """Output of ``FeatureSpaceAugmenter.augment``; row m = i * N_a + j is tail sample i, confusing class j.

    features: (N_t * N_a, K, H, W) float32.  labels: (N_t * N_a,) int64, the tail classes.
    gammas: (N_t * N_a,) float64 combination ratios.  num_specific: (N_t * N_a,) int64 = round(gamma * L),
    columns [0, num_specific) are class-specific, the rest class-generic.
    partner_index: (N_t * N_a,) int64 bank index of the confusing-class sample that gave the generic part.
    """
    features: torch.Tensor
    labels: torch.Tensor
    gammas: torch.Tensor
    num_specific: torch.Tensor
    partner_index: torch.Tensor


class FeatureSpaceAugmenter:
    """Bank of phase-I pre-pool feature maps plus the online augmentation of paper Alg. 1.

    The trainer extracts ``model.forward_features(x)`` for every training image once, with the frozen
    trunk in eval mode and the phase-I augmentation policy (docs/fsa.md). At construction the bank
    computes, for every sample, the CAM of its ground-truth class and its class-generic mask.

    Args:
        features: (N, K, H, W) phase-I feature maps of the training set. With ``storage_dtype=None`` a
            tensor backed by a memory map (``torch.from_numpy(np.load(path, mmap_mode='r'))``) is used in
            place, for banks larger than RAM; a dtype conversion copies the bank into memory.
        labels: (N,) ground-truth classes.
        classifier_weight: (C, K) phase-I classifier weight used for the CAMs (Eq. 1); copied.
        tail_classes: (T,) classes whose samples get augmented; each needs >= 1 bank sample.
        confusing: (T, N_f) confusing classes of each tail class (``confusing_classes``); N_a = N_f because
            Alg. 1 lines 10-18 draw one partner per confusing class.
        tau_s, tau_g: 0.8 / 0.2, not in the paper (unofficial SSRSGJYD configs, docs/fsa.md).
        storage_dtype: 'float16' (default) halves the bank (CIFAR ResNet-32: 12,406 x 64 x 8 x 8 ->
            102 MB instead of 203 MB); its relative rounding error 2^-11 is far below what moves a
            fine-tuned FC. CAMs, masks and outputs use the stored values, so outputs are exact copies
            of stored columns, returned as float32. 'float32' / 'bfloat16', or None to keep the input dtype.

    Empty sets: a sample whose specific (or generic) mask is empty -- a constant CAM, or the extreme
    positions hold all-zero vectors -- contributes vectors drawn from all positions of its map instead.
    ``num_generic_fallbacks`` counts such bank samples.
    """

    def __init__(self, features: torch.Tensor, labels: IntLike, classifier_weight: torch.Tensor,
                 tail_classes: IntLike, confusing: IntLike, *, tau_s: float = 0.8, tau_g: float = 0.2,
                 storage_dtype: Optional[str] = 'float16'):
        _check_feature_maps(features)
        self.tau_s, self.tau_g = _check_threshold(tau_s, 'tau_s'), _check_threshold(tau_g, 'tau_g')
        if storage_dtype is not None and storage_dtype not in _DTYPES:
            raise ValueError(f'storage_dtype must be one of {sorted(_DTYPES)} or None, got {storage_dtype!r}')
        n, k = features.shape[:2]
        if not isinstance(classifier_weight, torch.Tensor) or classifier_weight.dim() != 2 \
                or classifier_weight.shape[1] != k:
            raise ValueError(f'classifier_weight must be (C, K={k}), got '
                             f'{getattr(classifier_weight, "shape", type(classifier_weight).__name__)}')
        self.num_classes = classifier_weight.shape[0]
        labels = _int_vector(labels, 'labels').cpu()   # validation and class tables on CPU, moved below
        if labels.numel() != n:
            raise ValueError(f'labels must have one entry per feature map ({n}), got {labels.numel()}')
        _check_range(labels, self.num_classes, 'labels')
        tail = _int_vector(tail_classes, 'tail_classes').cpu()
        _check_range(tail, self.num_classes, 'tail_classes')
        if tail.numel() == 0 or tail.unique().numel() != tail.numel():
            raise ValueError(f'tail_classes must be a non-empty set of distinct classes, got {tail.tolist()}')
        confusing = torch.as_tensor(confusing).cpu()
        if confusing.dim() != 2 or confusing.shape[0] != tail.numel() or confusing.shape[1] < 1 \
                or confusing.is_floating_point():
            raise ValueError(f'confusing must be an integer (T={tail.numel()}, N_f) table, got '
                             f'{tuple(confusing.shape)} {confusing.dtype}')
        confusing = confusing.long()
        _check_range(confusing.flatten(), self.num_classes, 'confusing')
        if (confusing == tail.unsqueeze(1)).any():
            raise ValueError('a tail class cannot be its own confusing class')
        counts = torch.bincount(labels, minlength=self.num_classes)
        for name, cls in (('tail_classes', tail), ('confusing', confusing.flatten())):
            missing = cls[counts[cls] == 0].unique()
            if missing.numel():
                raise ValueError(f'{name} holds classes {missing.tolist()} with no sample in the bank')

        device = features.device
        dtype = features.dtype if storage_dtype is None else _DTYPES[storage_dtype]
        self.features = features.detach().to(dtype=dtype).contiguous()
        self.labels = labels.to(device)
        self.classifier_weight = classifier_weight.detach().to(device=device, dtype=torch.float32).clone()
        self.tail_classes = tail.to(device)
        is_tail = torch.zeros(self.num_classes, dtype=torch.bool)
        is_tail[tail] = True
        self.head_classes = torch.nonzero(~is_tail).flatten().to(device)
        self.num_confusing = confusing.shape[1]
        self.confusing_table = torch.full((self.num_classes, self.num_confusing), -1, dtype=torch.long, device=device)
        self.confusing_table[self.tail_classes] = confusing.to(device)

        self._by_class = torch.sort(self.labels, stable=True).indices
        self._class_counts = counts.to(device)
        self._class_offsets = torch.cumsum(self._class_counts, 0) - self._class_counts
        self.tail_indices = torch.nonzero(torch.isin(self.labels, self.tail_classes)).flatten()
        self.head_indices = torch.nonzero(torch.isin(self.labels, self.head_classes)).flatten()

        generic = []
        for start in range(0, n, _CHUNK):
            chunk = self.features[start:start + _CHUNK].float()
            cam = class_activation_maps(chunk, self.classifier_weight, self.labels[start:start + _CHUNK])
            generic.append(split_features(chunk, cam, self.tau_s, self.tau_g)[1].flatten(1))
        generic = torch.cat(generic)
        self.num_generic_fallbacks = int((~generic.any(dim=1)).sum())
        self._generic = _nonempty_or_all(generic)                         # (N, L)

    @classmethod
    def from_classifier(cls, features: torch.Tensor, labels: IntLike, classifier: nn.Module, *,
                        head_ratio: float = 0.9, num_confusing: int = 3, tau_s: float = 0.8,
                        tau_g: float = 0.2, storage_dtype: Optional[str] = 'float16') -> 'FeatureSpaceAugmenter':
        """Build the bank from phase-I features and the phase-I classifier (``model.get_classifier()``).

        Scores for the confusing classes are softmax(classifier(GAP(F))) over the bank, i.e. the phase-I
        prediction for each training sample (requires a GAP head, as the paper does, §4.1). Head / tail
        classes follow ``head_tail_split`` on the bank's class counts; tail classes with no sample are
        dropped (there is nothing to augment). head_ratio=0.9: paper §5.4; num_confusing=3: paper §5.1.
        """
        weight = getattr(classifier, 'weight', None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError('classifier must expose a (C, K) .weight (nn.Linear layout), '
                            f'got {type(classifier).__name__}')
        _check_feature_maps(features)
        labels = _int_vector(labels, 'labels')
        num_classes = weight.shape[0]
        scores = []
        with torch.no_grad():
            for start in range(0, features.shape[0], _CHUNK):
                pooled = features[start:start + _CHUNK].to(device=weight.device, dtype=weight.dtype).mean(dim=(2, 3))
                scores.append(torch.softmax(classifier(pooled).float(), dim=1).cpu())
        scores = torch.cat(scores)
        counts = torch.bincount(labels.cpu(), minlength=num_classes)
        _, tail = head_tail_split(counts, head_ratio)
        tail = tail[counts[tail] > 0]
        if tail.numel() == 0:
            raise ValueError(f'head_ratio={head_ratio} leaves no tail class with samples '
                             f'(class counts {counts.tolist()})')
        confusing = confusing_classes(scores, labels.cpu(), num_classes, tail, top_n=num_confusing)
        return cls(features, labels, weight, tail, confusing, tau_s=tau_s, tau_g=tau_g, storage_dtype=storage_dtype)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(K, H, W) of every map in the bank."""
        return tuple(self.features.shape[1:])

    def augment(self, tail_features: torch.Tensor, tail_labels: IntLike,
                generator: Optional[torch.Generator] = None) -> AugmentedFeatures:
        """Alg. 1 lines 7-18: N_a = N_f augmented maps per real tail sample.

        For tail sample i of class c and its j-th confusing class u: draw a bank sample of class u,
        gamma ~ U(0, 1), then round(gamma L) columns with replacement from the specific set of sample i
        and L - round(gamma L) columns with replacement from the generic set of the partner
        (L = H W). The merged map is labelled c; specific columns come first (the layout is irrelevant
        after global average pooling, §4.3).

        Args:
            tail_features: (N_t, K, H, W) real tail maps (e.g. ``self.features[self.tail_indices[...]]``).
            tail_labels: (N_t,) their classes, each a tail class.
            generator: torch.Generator on the bank's device, for reproducible draws.
        Returns:
            AugmentedFeatures with (N_t * N_a, K, H, W) float32 maps on the bank's device.
        """
        _check_feature_maps(tail_features, 'tail_features')
        if tuple(tail_features.shape[1:]) != self.feature_shape:
            raise ValueError(f'tail_features must be (N_t, {", ".join(map(str, self.feature_shape))}) like the bank, '
                             f'got {tuple(tail_features.shape)}')
        device = self.features.device
        tail_labels = _int_vector(tail_labels, 'tail_labels').to(device)
        if tail_labels.numel() != tail_features.shape[0]:
            raise ValueError(f'tail_labels must have one entry per tail map ({tail_features.shape[0]}), '
                             f'got {tail_labels.numel()}')
        _check_range(tail_labels, self.num_classes, 'tail_labels')
        partners_cls = self.confusing_table[tail_labels]                      # (N_t, N_a)
        not_tail = tail_labels[(partners_cls < 0).any(dim=1)]
        if not_tail.numel():
            raise ValueError(f'tail_labels holds non-tail classes {not_tail.unique().tolist()}; '
                             f'tail classes are {self.tail_classes.tolist()}')

        x = tail_features.detach().to(device=device, dtype=torch.float32)
        n_t, k, h, w = x.shape
        length, n_a = h * w, self.num_confusing
        cam = class_activation_maps(x, self.classifier_weight, tail_labels)
        specific = _nonempty_or_all(split_features(x, cam, self.tau_s, self.tau_g)[0].flatten(1))

        owner = torch.arange(n_t, device=device).repeat_interleave(n_a)       # (M,) tail row of each output
        u = partners_cls.flatten()
        pick = torch.rand(u.numel(), generator=generator, device=device, dtype=torch.float64)
        rank = torch.minimum((pick * self._class_counts[u]).long(), self._class_counts[u] - 1)
        partner = self._by_class[self._class_offsets[u] + rank]
        gammas = torch.rand(u.numel(), generator=generator, device=device, dtype=torch.float64)
        num_specific = torch.round(gammas * length).long()

        spec_pos = torch.multinomial(specific[owner].float(), length, replacement=True, generator=generator)
        gen_pos = torch.multinomial(self._generic[partner].float(), length, replacement=True, generator=generator)
        spec_cols = x.flatten(2)[owner].gather(2, spec_pos.unsqueeze(1).expand(-1, k, -1))
        gen_cols = self.features[partner].float().flatten(2).gather(2, gen_pos.unsqueeze(1).expand(-1, k, -1))
        use_specific = torch.arange(length, device=device) < num_specific.unsqueeze(1)   # (M, L)
        merged = torch.where(use_specific.unsqueeze(1), spec_cols, gen_cols).view(-1, k, h, w)
        return AugmentedFeatures(merged, tail_labels[owner], gammas, num_specific, partner)


class FsaBatchSampler:
    """Phase-II batches drawn from a FeatureSpaceAugmenter (paper Alg. 1, §4.3).

    Each batch, in this order: N_t real tail maps (drawn uniformly, with replacement, from all
    tail-class samples -- Alg. 1 line 5), their N_t * N_a augmented maps, and N_t (1 + N_a) maps drawn
    uniformly with replacement from the head-class samples (line 20): 2 N_t (1 + N_a) maps in all
    (N_t = 16, N_a = 3 -> 128). Feed them to ``model.forward_head`` (GAP -> FC) and train only the FC.

    Iterating restarts from a generator seeded by (seed, epoch), so the same seed and epoch give the
    same batches; ``set_epoch`` varies them, and each data-parallel rank should use its own seed.

    Args:
        augmenter: the feature bank.
        num_tail: N_t = 16 (paper §5.1: batch 128 with N_a = 3).
        num_batches: iterations per pass, 6400 (paper §5.1, CIFAR phase II; 200 for iNaturalist).
        seed: base seed of the draws.
    Yields:
        (features (B, K, H, W) float32, labels (B,) int64) on the bank's device.
    """

    def __init__(self, augmenter: FeatureSpaceAugmenter, num_tail: int = 16, num_batches: int = 6400, seed: int = 0):
        if not isinstance(augmenter, FeatureSpaceAugmenter):
            raise TypeError(f'augmenter must be a FeatureSpaceAugmenter, got {type(augmenter).__name__}')
        if int(num_tail) < 1 or int(num_batches) < 1:
            raise ValueError(f'num_tail and num_batches must be >= 1, got {num_tail} and {num_batches}')
        if augmenter.head_indices.numel() == 0:
            raise ValueError('the bank has no head-class samples to balance the batch with')
        self.augmenter = augmenter
        self.num_tail, self.num_batches, self.seed = int(num_tail), int(num_batches), int(seed)
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        """2 N_t (1 + N_a)."""
        return 2 * self.num_tail * (1 + self.augmenter.num_confusing)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def sample_batch(self, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One phase-II batch (see the class docstring)."""
        bank = self.augmenter
        device = bank.features.device
        pick = torch.randint(bank.tail_indices.numel(), (self.num_tail,), generator=generator, device=device)
        real_idx = bank.tail_indices[pick]
        real = bank.features[real_idx].float()
        real_labels = bank.labels[real_idx]
        aug = bank.augment(real, real_labels, generator)
        pick = torch.randint(bank.head_indices.numel(), (self.num_tail * (1 + bank.num_confusing),),
                             generator=generator, device=device)
        head_idx = bank.head_indices[pick]
        features = torch.cat([real, aug.features, bank.features[head_idx].float()])
        labels = torch.cat([real_labels, aug.labels, bank.labels[head_idx]])
        return features, labels

    def __iter__(self):
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator(device=self.augmenter.features.device)
        generator.manual_seed(int(state) & ((1 << 63) - 1))
        for _ in range(self.num_batches):
            yield self.sample_batch(generator)
