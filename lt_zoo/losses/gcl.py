"""Gaussian Clouded Logit loss (Li, Cheung, Lu CVPR'22; Keke921/GCLLoss ``losses.py::GCLLoss``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..class_counts import normalized_log_count_gap
from .base import ClassCountLoss, _check_number, adjusted_cross_entropy

__all__ = ["GCLLoss"]

#: std of the Gaussian cloud before clamping to [-1, 1] (official ``normal.Normal(0, 1/3)``).
NOISE_STD = 1.0 / 3.0


class GCLLoss(ClassCountLoss):
    """GCL on cosine similarities cos (B, C) in [-1, 1] and target y (B,) -> scalar.

    With ``delta_hat_j = (log n_max - log n_j) / max_k(log n_max - log n_k)`` and a fresh draw
    ``eps ~ N(0, 1/3)`` (B, C) clamped to [-1, 1] on every call:

        z = cos - noise_mul * |eps| * delta_hat      (every column)
        z_iy -= m                                    (target column only)
        L = mean_i CE(s z_i, y_i)                    (gamma = 0)
        L = mean_i (1 - p_i)^gamma CE(s z_i, y_i), p_i = exp(-CE), factor detached   (gamma > 0)

    The trainer passes the cosine head's ``cosine(features)``. Noise only perturbs the loss;
    predict with argmax cos. With all counts equal delta_hat = 0 and the loss is CE(s (cos - m e_y)).
    Noise is drawn in float32 on ``cos.device`` from ``generator`` if given (then on the
    generator's device), else from torch's global RNG -- on CPU this is the official draw
    (``Normal(0, 1/3).sample(cos.shape)``) bit for bit; on GPU the official code samples on the CPU.

    Defaults: s=30, m=0.0, noise_mul=0.5 -- official CIFAR stage 1 (``cifar_train_backbone.py``);
    gamma=0.0. Official stage 2 (classifier re-training, ``train_cls=True``): m=0.1, s=20, gamma=1.0
    (docs/gcl.md). ``generator`` is a runtime object, not a config value.
    """

    expects_cosine = True

    def __init__(self, class_counts, s: float = 30.0, m: float = 0.0, noise_mul: float = 0.5,
                 gamma: float = 0.0, generator: Optional[torch.Generator] = None, check_inputs: bool = True):
        super().__init__(class_counts, check_inputs=check_inputs)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.s = _check_number("s", s, 0.0, low_open=True)
        self.m = _check_number("m", m)
        self.noise_mul = _check_number("noise_mul", noise_mul, 0.0)
        self.gamma = _check_number("gamma", gamma, 0.0)
        self.generator = generator
        self.register_buffer("cloud_size", torch.from_numpy(normalized_log_count_gap(self.class_counts)),
                             persistent=False)

    def sample_noise(self, shape, device: torch.device) -> Tensor:
        """``|clamp(N(0, 1/3), -1, 1)|`` of ``shape``, float32, on ``device``."""
        where = self.generator.device if self.generator is not None else device
        eps = torch.normal(0.0, NOISE_STD, size=tuple(shape), generator=self.generator,
                           device=where, dtype=torch.float32)
        return eps.clamp(-1.0, 1.0).abs().to(device)

    def forward(self, cosine: Tensor, target: Tensor) -> Tensor:
        cosine, target = self._prepare(cosine, target)
        noise = self.sample_noise(cosine.shape, cosine.device).to(cosine.dtype)
        offset = -self.noise_mul * noise * self.cloud_size.to(cosine.dtype)
        margin = torch.full((self.num_classes,), self.m, dtype=cosine.dtype, device=cosine.device)
        return adjusted_cross_entropy(cosine, target, offset=offset, target_margin=margin, scale=self.s,
                                      gamma=self.gamma, detach_focal=True)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, s={self.s}, m={self.m}, noise_mul={self.noise_mul}, "
                f"gamma={self.gamma}")
