"""Long-tail-aware classification losses, one module per method, built by :func:`create_loss`.

Every loss is ``Loss(class_counts, **options)`` and ``loss(logits, target) -> scalar``; losses with
``expects_cosine = True`` (LDAM, GCL) take cosine similarities in [-1, 1] instead of logits.
"""
from .balanced_softmax import BalancedSoftmaxLoss
from .base import ClassCountLoss, adjusted_cross_entropy, focal_modulate
from .class_balanced import ClassBalancedLoss, class_balanced_weights
from .consistency import ConsistencyLoss, consistency_loss
from .cross_entropy import CrossEntropyLoss
from .factory import create_loss, list_losses, loss_options, register_loss
from .focal import FocalLoss
from .gcl import GCLLoss
from .ldam import LDAMLoss, ldam_margins
from .logit_adjustment import LogitAdjustedLoss, posthoc_adjust

__all__ = [
    "ClassCountLoss", "adjusted_cross_entropy", "focal_modulate",
    "CrossEntropyLoss", "FocalLoss", "ClassBalancedLoss", "class_balanced_weights",
    "LDAMLoss", "ldam_margins", "LogitAdjustedLoss", "posthoc_adjust", "BalancedSoftmaxLoss",
    "GCLLoss", "ConsistencyLoss", "consistency_loss",
    "create_loss", "list_losses", "loss_options", "register_loss",
]
