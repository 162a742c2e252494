"""Stop-gradient consistency between two predictions (SimSiam D; CBN dual-path learning, docs/compound_bn.md)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["consistency_loss", "ConsistencyLoss"]


def consistency_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``-mean_i cos(p_i, sg(z_i))`` over dim 1; pred, target (B, D) -> scalar in [-1, 1].

    Gradient reaches ``pred`` only (``target`` is detached), as SimSiam's D(p, stopgrad(z)).
    Which CBN path supplies ``pred`` and which ``target`` is the caller's choice.
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"consistency_loss expects tensors; got {type(pred).__name__}, {type(target).__name__}")
    if pred.shape != target.shape or pred.ndim < 2 or pred.shape[0] == 0:
        raise ValueError(f"pred and target must have the same shape (B, D) with B > 0; got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    return -F.cosine_similarity(pred, target.detach(), dim=1).mean()


class ConsistencyLoss(nn.Module):
    """Module form of :func:`consistency_loss`; ``forward(pred, target)`` -> scalar.

    Not a class-count loss (so not in :func:`lt_zoo.losses.create_loss`); ``set_epoch`` is a no-op
    so a trainer can drive all its loss terms alike.
    """

    expects_cosine = False

    def set_epoch(self, epoch: int) -> None:
        pass

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return consistency_loss(pred, target)
