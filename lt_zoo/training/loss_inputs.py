"""What a loss reads: plain logits, or the cosine similarities of a cosine head.

A loss declares its input (``expects_cosine = True`` for GCL and LDAM, which apply their own scale
s); the head owns its scale.  :class:`LossInputs` wraps the network (or only the head, in stage 2)
so that its ``forward`` returns exactly that input: the trainer never rescales logits itself, and the
DDP/compiled forward is the one that produces the loss input.
"""
import torch
import torch.nn as nn

__all__ = ['LossInputs', 'needs_cosine']


def needs_cosine(loss_fn) -> bool:
    """Whether ``loss_fn`` takes cosine similarities (B, C) in [-1, 1] instead of logits."""
    return bool(getattr(loss_fn, 'expects_cosine', False))


class LossInputs(nn.Module):
    """net: a timm model (x (B, C, H, W)) or, with ``head_only``, its classifier (features (B, D)).

    forward -> logits (B, K) = net(x), or with ``cosine`` the head's ``cosine(features)`` (B, K).
    """

    def __init__(self, net: nn.Module, cosine: bool, head_only: bool = False):
        super().__init__()
        self.net, self.cosine, self.head_only = net, bool(cosine), bool(head_only)
        if self.cosine and not hasattr(self.head, 'cosine'):
            raise ValueError(f"a cosine-input loss needs a head with .cosine() (a cosine classifier, as in the "
                             f"'_gcl' models); got {type(self.head).__name__}")

    @property
    def head(self) -> nn.Module:
        return self.net if self.head_only else self.net.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cosine:
            return self.net(x)
        if not self.head_only:
            x = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.head.cosine(x)
