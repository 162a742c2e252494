"""Registry and factory for the class-count losses."""
from __future__ import annotations

import inspect
from typing import Dict, List, Type

from .balanced_softmax import BalancedSoftmaxLoss
from .base import ClassCountLoss
from .class_balanced import ClassBalancedLoss
from .cross_entropy import CrossEntropyLoss
from .focal import FocalLoss
from .gcl import GCLLoss
from .ldam import LDAMLoss
from .logit_adjustment import LogitAdjustedLoss

__all__ = ["create_loss", "list_losses", "loss_options", "register_loss"]

_REGISTRY: Dict[str, Type[ClassCountLoss]] = {
    "ce": CrossEntropyLoss,
    "focal": FocalLoss,
    "class_balanced": ClassBalancedLoss,
    "ldam": LDAMLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "gcl": GCLLoss,
}


def register_loss(name: str, cls: Type[ClassCountLoss]) -> None:
    """Add ``cls`` (constructed as ``cls(class_counts, **options)``) under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"loss {name!r} is already registered ({_REGISTRY[name].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, ClassCountLoss)):
        raise TypeError(f"{cls!r} is not a ClassCountLoss subclass")
    _REGISTRY[name] = cls


def list_losses() -> List[str]:
    """Names accepted by :func:`create_loss`."""
    return sorted(_REGISTRY)


def _get(name: str) -> Type[ClassCountLoss]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid names: {list_losses()}")
    return _REGISTRY[name]


def loss_options(name: str) -> Dict[str, object]:
    """Options of loss ``name`` and their defaults."""
    params = list(inspect.signature(_get(name).__init__).parameters.values())[2:]  # self, class_counts
    return {p.name: p.default for p in params}


def create_loss(name: str, class_counts, **options) -> ClassCountLoss:
    """Build loss ``name`` from per-class training counts (C,) and its options.

    Unknown names and options raise ``ValueError`` listing the valid ones.
    """
    cls = _get(name)
    valid = loss_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; valid options: {sorted(valid)}")
    return cls(class_counts, **options)
