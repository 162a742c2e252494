"""Batched, seeded augmentation on decoded uint8 tensors, and a DataLoader-free batch iterator.

The tensor counterpart of `create_transform` for images already decoded and resized by
`decode_split`: the weak view (zero-padded random crop + horizontal flip, as torchvision's
RandomCrop(padding=pad) / RandomHorizontalFlip) and the normalisation run on a whole batch in a few
tensor ops; the strong view adds AutoAugment (CIFAR10 policy) or RandAugment from
torchvision.transforms.v2 with each image drawing its own ops exactly as torchvision does, the images
that drew the same op then transformed together (`apply_policy_batched`; it reads the policy tables
of torchvision's v2 classes, and tests/test_batch_augment.py pins it to torchvision's per-image output).
Every random draw comes from a torch.Generator that `TensorLoader` seeds from (seed, epoch, rank), so
an epoch replays identically after a resume; the global RNG is left untouched.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

__all__ = ["BATCH_TRANSFORM_KINDS", "random_pad_crop", "random_hflip", "normalize", "BatchAugment",
           "BatchTwoView", "create_batch_transform", "TensorLoader", "epoch_generator", "apply_policy_batched"]

BATCH_TRANSFORM_KINDS = ("weak", "strong", "eval")
_STRONG = ("autoaugment", "randaugment")
Batch = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def _check_batch(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected a batch (B, C, H, W); got shape {tuple(images.shape)}")


def random_pad_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): zero-pad each side by `pad`, then crop an H x W window at a
    per-image offset (top, left) drawn uniformly from {0..2 pad}^2 (torchvision RandomCrop(padding=pad))."""
    _check_batch(images)
    if pad == 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    rows = top[:, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=images.device)  # (B, W)
    batch_idx = torch.arange(b, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """(B, C, H, W): mirror each image left-right with probability p (RandomHorizontalFlip, p=0.5)."""
    _check_batch(images)
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, mean/std of shape (C, 1, 1).

    The same float ops, in the same order, as v2.ToDtype(float32, scale=True) + v2.Normalize.
    """
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean.to(images.device)).div_(std.to(images.device))


def _stats(name: str, values: Sequence[float]) -> torch.Tensor:
    values = tuple(float(v) for v in values)
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers; got {values}")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive; got {values}")
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


def _magnitude_table(policy: Union[v2.AutoAugment, v2.RandAugment], height: int, width: int) -> Dict[str, Tuple]:
    """{op: (magnitudes or None, signed)} for this image size (deterministic: no RNG is consumed)."""
    bins = 10 if isinstance(policy, v2.AutoAugment) else policy.num_magnitude_bins
    return {name: (fn(bins, height, width), signed) for name, (fn, signed) in policy._AUGMENTATION_SPACE.items()}


def _policy_plan(policy: Union[v2.AutoAugment, v2.RandAugment], table: Dict[str, Tuple]) -> List[Tuple[str, float]]:
    """One image's [(op, magnitude)], drawn from the global RNG in exactly the order and way of
    torchvision's AutoAugment.forward / RandAugment.forward (so a seed gives torchvision's own choice)."""
    def magnitude(transform_id: str, index) -> float:
        magnitudes, signed = table[transform_id]
        if magnitudes is None:
            return 0.0
        value = float(magnitudes[index])
        return -value if signed and torch.rand(()) <= 0.5 else value

    ops: List[Tuple[str, float]] = []
    if isinstance(policy, v2.AutoAugment):
        steps = policy._policies[int(torch.randint(len(policy._policies), ()))]
        for transform_id, probability, magnitude_idx in steps:
            if torch.rand(()) <= probability:
                ops.append((transform_id, magnitude(transform_id, magnitude_idx)))
    else:
        for _ in range(policy.num_ops):
            transform_id, _ = policy._get_random_item(policy._AUGMENTATION_SPACE)
            ops.append((transform_id, magnitude(transform_id, policy.magnitude)))
    return ops


def apply_policy_batched(policy: Union[v2.AutoAugment, v2.RandAugment], images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> (B, C, H, W): `policy` applied to every image independently.

    Equals `torch.stack([policy(img) for img in images])` under the same global RNG state (same draws,
    same order, same torchvision op per image) but runs each distinct (op, magnitude) once on the
    images that drew it: about 30 op calls per batch instead of ~2 per image.
    """
    _check_batch(images)
    table = _magnitude_table(policy, images.shape[-2], images.shape[-1])
    plans = [_policy_plan(policy, table) for _ in range(images.shape[0])]
    out = images.clone()
    for slot in range(max((len(p) for p in plans), default=0)):
        groups: Dict[Tuple[str, float], List[int]] = {}
        for i, plan in enumerate(plans):
            if slot < len(plan) and plan[slot][0] != "Identity":
                groups.setdefault(plan[slot], []).append(i)
        for (transform_id, magnitude), members in groups.items():
            sel = torch.tensor(members, device=images.device)
            out[sel] = policy._apply_image_or_video_transform(out[sel], transform_id, magnitude,
                                                              interpolation=policy.interpolation, fill=policy._fill)
    return out


class BatchAugment:
    """uint8 (B, C, H, W) + generator -> float32 (B, C, H, W), normalised.

    kind 'eval': normalise only; 'weak': pad-crop (pad) + flip (hflip) + normalise; 'strong': weak,
    then the `strong` policy per image, then normalise (the order of `create_transform`).
    """

    def __init__(self, kind: str, *, mean: Sequence[float], std: Sequence[float], pad: int = 4, hflip: bool = True,
                 strong: str = "autoaugment", randaugment_ops: int = 2, randaugment_magnitude: int = 9):
        if kind not in BATCH_TRANSFORM_KINDS:
            raise ValueError(f"kind={kind!r}; expected one of {BATCH_TRANSFORM_KINDS}")
        if strong not in _STRONG:
            raise ValueError(f"strong={strong!r}; expected one of {_STRONG}")
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad={pad!r} must be an int >= 0")
        self.mean, self.std = _stats("mean", mean), _stats("std", std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        self.kind, self.pad, self.hflip, self.strong = kind, pad, bool(hflip), strong
        self.policy = None
        if kind == "strong":
            self.policy = (v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10) if strong == "autoaugment"
                           else v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))

    @property
    def num_channels(self) -> int:
        return len(self.mean)

    def _apply_policy(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # torchvision draws from the global RNG: run it on a fork seeded from `generator`, so the
        # views are reproducible and the global stream (mixup, Accelerate's checkpoints) is not consumed.
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return apply_policy_batched(self.policy, images)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_batch(images)
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects uint8 images (decode_split output); got {images.dtype}")
        if images.shape[1] != self.num_channels:
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {self.num_channels}")
        if self.kind != "eval":
            images = random_pad_crop(images, self.pad, generator)
            if self.hflip:
                images = random_hflip(images, generator)
            if self.policy is not None:
                images = self._apply_policy(images, generator)
        return normalize(images, self.mean, self.std)

    def __repr__(self) -> str:
        extra = f", strong={self.strong!r}" if self.kind == "strong" else ""
        return f"BatchAugment({self.kind!r}, pad={self.pad}, hflip={self.hflip}{extra})"


class BatchTwoView:
    """(images, generator) -> (weak view, strong view): two independently augmented views (CBN dual path)."""

    def __init__(self, weak: BatchAugment, strong: BatchAugment):
        if weak.num_channels != strong.num_channels:
            raise ValueError(f"weak and strong views normalise {weak.num_channels} vs {strong.num_channels} channels")
        self.weak, self.strong = weak, strong

    @property
    def num_channels(self) -> int:
        return self.weak.num_channels

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.weak(images, generator), self.strong(images, generator)

    def __repr__(self) -> str:
        return f"BatchTwoView(weak={self.weak!r}, strong={self.strong!r})"


def create_batch_transform(kind: str, *, mean: Sequence[float], std: Sequence[float], pad: int = 4,
                           hflip: bool = True, strong: str = "autoaugment", train_crop: str = "pad",
                           two_view: bool = False, randaugment_ops: int = 2,
                           randaugment_magnitude: int = 9) -> Union[BatchAugment, BatchTwoView]:
    """The batched counterpart of `create_transform(kind, ...)` (same option names and defaults:
    pad=4 LDAM-DRW, AutoAugment CIFAR10 policy as in BALMS, RandAugment num_ops=2 magnitude=9).

    two_view=True (kind 'weak') gives BatchTwoView(weak, strong) for the CBN dual path.
    train_crop='random_resized' has no tensor version (images are stored at the input size): use the PIL path.
    """
    if train_crop != "pad":
        raise ValueError(f"train_crop={train_crop!r} is not supported on decoded tensors (only 'pad'); "
                         f"use the PIL data path for RandomResizedCrop")
    opts = dict(mean=mean, std=std, pad=pad, hflip=hflip, strong=strong, randaugment_ops=randaugment_ops,
                randaugment_magnitude=randaugment_magnitude)
    if two_view:
        if kind != "weak":
            raise ValueError(f"two_view=True pairs a weak and a strong view; got kind={kind!r}")
        return BatchTwoView(BatchAugment("weak", **opts), BatchAugment("strong", **opts))
    return BatchAugment(kind, **opts)


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """A CPU torch.Generator that is a pure function of (seed, epoch, rank); unrelated streams for
    nearby tuples (numpy SeedSequence mixing, as the lt_zoo samplers)."""
    state = np.random.SeedSequence([int(seed) % 2 ** 63, int(epoch) % 2 ** 63, int(rank) % 2 ** 63]).generate_state(
        2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class TensorLoader:
    """Batches (transform(images[idx]), labels[idx]) in sampler order, no DataLoader, no workers.

    images uint8 (N, C, H, W) (on any device: augmentation runs there), labels int64 (N,).
    sampler: any iterable of indices with an optional set_epoch (e.g. ClassWeightedSampler, whose
    num_replicas/rank shard it for DDP); None = 0..N-1 in order (evaluation). transform(images, generator)
    -> tensor or tuple of tensors (BatchAugment / BatchTwoView); None = normalise nothing (uint8 out).
    Yields (x, y) or ((x_weak, x_strong), y), like `collate`. Call set_epoch(e) before each epoch: the
    augmentation generator is `epoch_generator(seed, e, rank)`, so epoch e replays identically.
    device: where batches are moved (non-blocking) before the transform; None = where images are.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, sampler: Optional[Any] = None,
                 transform: Optional[Any] = None, seed: int = 0, rank: int = 0, drop_last: bool = False,
                 device: Union[str, torch.device, None] = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images must be a uint8 tensor (N, C, H, W); got "
                            f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
        labels = torch.as_tensor(labels)
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be int64 ({images.shape[0]},); got {labels.dtype} {tuple(labels.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        channels = getattr(transform, "num_channels", None)
        if channels is not None and channels != images.shape[1]:
            raise ValueError(f"transform normalises {channels} channels but images have {images.shape[1]} "
                             f"(shape {tuple(images.shape)})")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.sampler, self.transform = sampler, transform
        self.seed, self.rank, self.drop_last = int(seed), int(rank), bool(drop_last)
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass (augmentation stream and the sampler's draw)."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)

    def _num_indices(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.labels)

    def __len__(self) -> int:
        n = self._num_indices()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _indices(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(len(self.labels))
        idx = torch.as_tensor(list(iter(self.sampler)), dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self.labels)):
            raise IndexError(f"sampler yielded indices in [{int(idx.min())}, {int(idx.max())}] for "
                             f"{len(self.labels)} images")
        return idx

    def __iter__(self) -> Iterator[Tuple[Batch, torch.Tensor]]:
        generator = epoch_generator(self.seed, self.epoch, self.rank)
        idx = self._indices()
        stop = len(self) * self.batch_size
        for chunk in idx[:stop].split(self.batch_size):
            x = self.images[chunk.to(self.images.device)]
            y = self.labels[chunk.to(self.labels.device)]
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield (self.transform(x, generator) if self.transform is not None else x), y

    def __repr__(self) -> str:
        return (f"TensorLoader(n={len(self.labels)}, batch_size={self.batch_size}, sampler={self.sampler!r}, "
                f"transform={self.transform!r}, seed={self.seed}, rank={self.rank})")
