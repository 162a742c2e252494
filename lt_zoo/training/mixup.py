"""Mixup (Zhang et al. ICLR'18) as GCL stage 1 and 2 use it: one lambda per batch, loss mixed."""
from typing import Callable, Optional, Tuple

import numpy as np
import torch

__all__ = ['mixup_batch', 'mixed_loss']


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """x (B, ...), y (B,) -> (lam*x + (1-lam)*x[perm], y, y[perm], lam), lam ~ Beta(alpha, alpha).

    alpha = 1.0 in GCL's code (docs/gcl.md).  alpha <= 0 returns the batch unchanged with lam = 1.
    """
    if alpha <= 0:
        return x, y, y, 1.0
    g = generator
    lam = float(torch.distributions.Beta(alpha, alpha).sample().item()) if g is None else \
        float(np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=g, device='cpu').to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixed_loss(loss_fn: Callable, logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float):
    """lam * L(logits, y_a) + (1 - lam) * L(logits, y_b); each call draws its own GCL noise (official)."""
    if lam >= 1.0:
        return loss_fn(logits, y_a)
    return lam * loss_fn(logits, y_a) + (1 - lam) * loss_fn(logits, y_b)
