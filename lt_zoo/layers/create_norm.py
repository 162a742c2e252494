"""Norm-layer factory: a norm name plus plain keyword options -> a timm-compatible ``norm_layer``.

timm calls ``norm_layer(num_features, device=..., dtype=...)`` for every norm of a ResNet, so the
factory returns a class or a ``functools.partial`` of one.  Options stay plain JSON values so that
``timm.models.save_for_hf`` can write them into config.json and ``hf-hub:`` reloads pass them back.
"""
import functools
from typing import Any, Callable, Dict, Tuple

import torch.nn as nn

from .compound_bn import CBN_OPTIONS, CompoundBatchNorm2d
from .normalized_bn import NormalizedBatchNorm2d

__all__ = ['NORMS', 'NBN_SCOPES', 'norm_options', 'create_norm_layer', 'split_norm_kwargs']

NORMS = ('bn', 'nbn', 'cbn')

# official: the last BN of every block of the last stage plus its downsample BN, one shared alpha
#   (yuxiangbao/NBN models/ResNet_NBN.py, METHODS.md §3); all: every BN layer, each with its own alpha
#   (the paper's wording, "a scalar learnable parameter" per layer).
NBN_SCOPES = ('official', 'all')


def norm_options(norm: str) -> Tuple[str, ...]:
    """Names of the model keyword options that belong to norm ``norm``."""
    if norm == 'bn':
        return ()
    if norm == 'nbn':
        return ('nbn_scope',)
    if norm == 'cbn':
        return tuple(CBN_OPTIONS)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def split_norm_kwargs(norm: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Pop the options of ``norm`` from ``kwargs``; reject options that belong to another norm."""
    own = norm_options(norm)
    for other in NORMS:
        if other == norm:
            continue
        stray = [k for k in norm_options(other) if k in kwargs and k not in own]
        if stray:
            raise ValueError(
                f"option(s) {stray} apply to norm '{other}', not to this '{norm}' model; "
                f"valid norm options here: {list(own) or 'none'}")
    opts = {k: kwargs.pop(k) for k in own if k in kwargs}
    if norm == 'nbn':
        scope = opts.setdefault('nbn_scope', 'official')
        if scope not in NBN_SCOPES:
            raise ValueError(f"invalid nbn_scope {scope!r}; expected one of {NBN_SCOPES}")
    return opts


def create_norm_layer(norm: str, **opts) -> Callable[..., nn.Module]:
    """The ``norm_layer`` callable that timm's blocks call for every norm of the network.

    For ``nbn`` with the official scope this is plain BN: the models swap the scoped layers to NBN
    after construction (timm's blocks cannot tell a stage's last BN from the others).
    """
    if norm == 'bn':
        return nn.BatchNorm2d
    if norm == 'nbn':
        if opts.get('nbn_scope', 'official') == 'all':
            return NormalizedBatchNorm2d
        return nn.BatchNorm2d
    if norm == 'cbn':
        return functools.partial(CompoundBatchNorm2d, **opts)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
