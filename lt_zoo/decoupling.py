"""Classifier re-balancing heads of the decoupling recipe (Kang et al., ICLR'20, "Decoupling
representation and classifier for long-tailed recognition"; code: facebookresearch/classifier-balancing).

Both act on a trained classifier with the trunk frozen. cRT (re-train the classifier with
class-balanced sampling) needs no op of its own and lives in the trainer.

- tau-normalisation: W_c <- W_c / ||W_c||^tau, no training (``tau_normalize`` / ``tau_normalize_``).
- LWS (learnable weight scaling): logits_c <- f_c * logits_c with only f trained
  (``LearnableWeightScaling``; ``model.fc = LearnableWeightScaling(model.fc)``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

__all__ = ['tau_normalize', 'tau_normalize_', 'LearnableWeightScaling']


def _classifier_weight(classifier: nn.Module) -> torch.Tensor:
    weight = getattr(classifier, 'weight', None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError('expected a classifier with a (C, K) .weight (nn.Linear layout), '
                        f'got {type(classifier).__name__}')
    return weight


def tau_normalize(weight: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-class tau-normalisation W_c / ||W_c||_2^tau (Kang et al. ICLR'20, Sec. 4).

    tau = 1 gives unit rows, tau = 0 returns the weight unchanged; Kang et al. sweep tau in [0, 2]
    (``tau_norm.py``). All-zero rows stay zero. Computed in at least float32, returned in weight's dtype.

    Args:
        weight: (C, K) classifier weight, one row per class (nn.Linear layout).
        tau: the exponent; 1.0 is plain L2 normalisation.
    Returns:
        (C, K) new tensor (no autograd link to ``weight``).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f'weight must be a floating (C, K) tensor, got '
                         f'{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}')
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f'tau must be a finite number, got {tau}')
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    norms = w.norm(dim=1, keepdim=True)
    # clamp keeps 0 / 0 out for zero rows (they stay zero); pow(., 0) == 1 keeps tau = 0 exact
    return (w / norms.clamp_min(torch.finfo(w.dtype).tiny).pow(tau)).to(weight.dtype)


@torch.no_grad()
def tau_normalize_(classifier: nn.Module, tau: float = 1.0, zero_bias: bool = True) -> nn.Module:
    """tau-normalise a classifier's ``weight`` in place; the module keeps its type and state_dict keys.

    Args:
        classifier: an nn.Linear, cosine classifier or ``LearnableWeightScaling`` exposing a (C, K) weight.
            (For a cosine head the op is a no-op on the logits: it re-normalises the rows itself.)
        tau: exponent, 1.0 (Kang et al.; pick it on a validation set).
        zero_bias: True sets the bias to zero. Kang et al.'s ``tau_norm.py`` scores with features @ W^T and
            ignores the bias; zeroing keeps a plain nn.Linear that reproduces that. False keeps the bias.
    Returns:
        the same module.
    """
    weight = _classifier_weight(classifier)
    weight.copy_(tau_normalize(weight, tau))
    bias = getattr(classifier, 'bias', None)
    if zero_bias and isinstance(bias, torch.Tensor):
        bias.zero_()
    return classifier


class LearnableWeightScaling(nn.Module):
    """LWS (Kang et al. ICLR'20, Sec. 4): logits = f * classifier(x), a learnable scale f_c per class.

    The wrapped classifier is frozen (``requires_grad=False``), f starts at 1, so wrapping does not change
    the predictions until f is trained. As in the official LWS head, the scale multiplies the full logit,
    bias included. ``weight``, ``bias``, ``in_features`` and ``out_features`` read through to the wrapped
    layer so code written for timm's ``get_classifier()`` (CAMs, tau-norm, feature dims) still works.

    state_dict keys under ``model.fc``: ``fc.scales`` (C,) and ``fc.classifier.<inner keys>``.

    Args:
        classifier: the trained head, (B, K) -> (B, C), with a (C, K) ``weight`` (nn.Linear or cosine).
    Shapes: x (B, K) -> (B, C).
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        weight = _classifier_weight(classifier)
        self.classifier = classifier.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(weight.shape[0], device=weight.device, dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        return self.classifier.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.classifier, 'bias', None)

    @property
    def in_features(self) -> int:
        return self.classifier.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.classifier.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x) * self.scales

    def to_linear(self) -> nn.Linear:
        """Fold the scales into a plain nn.Linear (W_c f_c, b_c f_c) for export; Linear heads only.

        A cosine head re-normalises its rows, so a per-row scale cannot be folded into its weight.
        """
        if type(self.classifier) is not nn.Linear:
            raise TypeError(f'only an nn.Linear head can absorb the scales, got {type(self.classifier).__name__}')
        inner = self.classifier
        folded = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None,
                           device=inner.weight.device, dtype=inner.weight.dtype)
        with torch.no_grad():
            scales = self.scales.to(inner.weight.dtype)
            folded.weight.copy_(inner.weight * scales.unsqueeze(1))
            if inner.bias is not None:
                folded.bias.copy_(inner.bias * scales)
        return folded

    def extra_repr(self) -> str:
        return f'num_classes={self.scales.numel()}'
