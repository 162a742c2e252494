"""Image transforms for long-tailed training: weak (pad-crop + flip), strong (+AutoAugment/RandAugment), eval.

Every pipeline starts by converting the PIL image to the model's channel count ('L' for in_chans=1,
'RGB' for 3; both directions allowed) and resizing it to input_size when its size differs (bilinear,
e.g. 8x8 digits -> 32x32), and ends with a float32 CHW tensor normalised by mean/std.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import PIL.Image
import torch
from torchvision.transforms import v2

__all__ = ["TRANSFORM_KINDS", "STRONG_POLICIES", "ToMode", "ResizeIfNeeded", "TwoView", "create_transform"]

TRANSFORM_KINDS = ("weak", "strong", "eval")
STRONG_POLICIES = ("autoaugment", "randaugment")
_MODES = {1: "L", 3: "RGB"}
_INTERPOLATIONS = {"nearest": v2.InterpolationMode.NEAREST, "bilinear": v2.InterpolationMode.BILINEAR,
                   "bicubic": v2.InterpolationMode.BICUBIC}
_PIL_RESAMPLE = {"nearest": PIL.Image.Resampling.NEAREST, "bilinear": PIL.Image.Resampling.BILINEAR,
                 "bicubic": PIL.Image.Resampling.BICUBIC}


class ToMode:
    """PIL image -> PIL image in `mode` ('L' or 'RGB'); a no-op when it already is."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: PIL.Image.Image) -> PIL.Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


class ResizeIfNeeded:
    """Resize a PIL image to (H, W) = size when it differs; images already that size pass untouched."""

    def __init__(self, size: Tuple[int, int], interpolation: str = "bilinear"):
        self.size, self.interpolation = tuple(size), interpolation

    def __call__(self, img: PIL.Image.Image) -> PIL.Image.Image:
        height, width = self.size
        if img.size == (width, height):
            return img
        return img.resize((width, height), resample=_PIL_RESAMPLE[self.interpolation])

    def __repr__(self) -> str:
        return f"ResizeIfNeeded(size={self.size}, interpolation={self.interpolation!r})"


class TwoView:
    """img -> (weak(img), strong(img)): two independently augmented views of one image."""

    def __init__(self, weak, strong):
        self.weak, self.strong = weak, strong

    def __call__(self, img):
        return self.weak(img), self.strong(img)

    def __repr__(self) -> str:
        return f"TwoView(weak={self.weak!r}, strong={self.strong!r})"


def _size_hw(input_size: Union[int, Sequence[int]], in_chans: int) -> Tuple[int, int]:
    if isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = tuple(int(s) for s in input_size)
        if len(size) == 3:  # timm data-config style (C, H, W)
            if size[0] != in_chans:
                raise ValueError(f"input_size {tuple(input_size)} has {size[0]} channels but in_chans={in_chans}")
            size = size[1:]
        if len(size) != 2:
            raise ValueError(f"input_size must be an int, (H, W) or (C, H, W); got {input_size!r}")
    if min(size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return size


def _check_stats(name: str, values: Sequence[float], in_chans: int) -> Tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != in_chans:
        raise ValueError(f"{name} has {len(values)} values {values}; expected in_chans={in_chans} "
                         f"(mean_std_from_timm(..., in_chans=1) averages RGB stats)")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive, got {values}")
    return values


def create_transform(kind: str, *, input_size: Union[int, Sequence[int]], in_chans: int,
                     mean: Sequence[float], std: Sequence[float], pad: int = 4, strong: str = "autoaugment",
                     hflip: bool = True, interpolation: str = "bilinear", train_crop: str = "pad",
                     crop_pct: float = 1.0, randaugment_ops: int = 2, randaugment_magnitude: int = 9) -> Any:
    """Build a PIL -> float32 tensor (in_chans, H, W) pipeline.

    kind: 'weak'   mode/resize, RandomCrop(size, padding=pad) (pad=4: LDAM-DRW cifar_train.py),
                   horizontal flip (hflip=True; switch off for digits), to tensor, normalise.
          'strong' weak + AutoAugment CIFAR10 policy (strong='autoaugment', BALMS) or RandAugment
                   (torchvision defaults num_ops=2, magnitude=9), then to tensor, normalise.
          'eval'   mode/resize to input_size (or, with crop_pct < 1, shorter side to size/crop_pct then
                   centre crop, the ImageNet recipe), to tensor, normalise.
    train_crop='random_resized' swaps the pad-crop for RandomResizedCrop (ImageNet-LT style).
    Normalisation: (x - mean) / std per channel on values scaled to [0, 1].
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {TRANSFORM_KINDS}")
    if in_chans not in _MODES:
        raise ValueError(f"in_chans={in_chans!r}; expected 1 (grayscale) or 3 (RGB)")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {tuple(_INTERPOLATIONS)}")
    if strong not in STRONG_POLICIES:
        raise ValueError(f"strong={strong!r}; expected one of {STRONG_POLICIES}")
    if train_crop not in ("pad", "random_resized"):
        raise ValueError(f"train_crop={train_crop!r}; expected 'pad' or 'random_resized'")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct!r} must be in (0, 1]")
    if pad < 0:
        raise ValueError(f"pad={pad!r} must be >= 0")
    size = _size_hw(input_size, in_chans)
    mean, std = _check_stats("mean", mean, in_chans), _check_stats("std", std, in_chans)
    interp = _INTERPOLATIONS[interpolation]

    steps: list = [ToMode(_MODES[in_chans])]
    if kind == "eval":
        if crop_pct < 1.0:
            # square: shorter side to size/crop_pct (timm/ImageNet: 224 / 0.875 = 256), else both sides
            scale = (int(size[0] / crop_pct) if size[0] == size[1]
                     else tuple(int(s / crop_pct) for s in size))
            steps += [v2.Resize(scale, interpolation=interp, antialias=True), v2.CenterCrop(size)]
        else:
            steps.append(ResizeIfNeeded(size, interpolation))
    else:
        if train_crop == "random_resized":
            steps.append(v2.RandomResizedCrop(size, interpolation=interp, antialias=True))
        else:
            steps.append(ResizeIfNeeded(size, interpolation))
            if pad > 0:
                steps.append(v2.RandomCrop(size, padding=pad))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if kind == "strong":
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10) if strong == "autoaugment"
                         else v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    return v2.Compose(steps)
