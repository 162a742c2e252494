"""The norm table: a norm name -> its layer class, its model options, its name suffix and its paper.

This is lt_zoo's only norm dispatch (in the spirit of timm's ``_NORM_MAP``): the ``norm_layer``
factory below, the model builder (``lt_zoo.models._builder``) and export (``lt_zoo.export``) all
read :data:`NORM_TABLE`.  timm calls ``norm_layer(num_features, device=..., dtype=...)`` for every
norm of a ResNet, so the factory returns a class or a ``functools.partial`` of one.  Options stay
plain JSON values so that ``timm.models.save_for_hf`` can write them into config.json and
``hf-hub:`` reloads pass them back.
"""
import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Type

import torch.nn as nn

from .compound_bn import CBN_OPTIONS, CompoundBatchNorm2d
from .normalized_bn import NormalizedBatchNorm2d, fold_nbn

__all__ = ['NormSpec', 'NORM_TABLE', 'NORMS', 'NBN_SCOPES', 'norm_options', 'create_norm_layer',
           'split_norm_kwargs']

# official: the last BN of every block of the last stage plus its downsample BN, one shared alpha
#   (yuxiangbao/NBN models/ResNet_NBN.py; docs/normalized_bn.md); all: every BN layer, each with its own
#   alpha (the paper's wording, "a scalar learnable parameter" per layer).
NBN_SCOPES = ('official', 'all')


class NormSpec(NamedTuple):
    """One norm of :data:`NORM_TABLE`.

    layer: the layer class the models hold for this norm.
    options: the model keyword options that belong to this norm.
    norm_layer: options -> the timm ``norm_layer`` callable (validates the options it reads).
    suffix: what the norm appends to an architecture name (``resnet32`` + ``_nbn``).
    paper: (paper_name, paper_ids) for the pretrained cfg; None for plain BN.
    fold: in-place ``model -> model`` that turns this norm into plain BN for export; None if it cannot.
    """
    layer: Type[nn.Module]
    options: Tuple[str, ...]
    norm_layer: Callable[..., Callable[..., nn.Module]]
    suffix: str
    paper: Optional[Tuple[str, str]]
    fold: Optional[Callable[[nn.Module], nn.Module]]


def _nbn_norm_layer(nbn_scope: str = 'official') -> Callable[..., nn.Module]:
    # 'official' builds plain BN: the models swap the scoped layers to NBN after construction, since
    # timm's blocks cannot tell a stage's last BN from the others (lt_zoo.models._builder.setup_norms).
    if nbn_scope not in NBN_SCOPES:
        raise ValueError(f"invalid nbn_scope {nbn_scope!r}; expected one of {NBN_SCOPES}")
    return NormalizedBatchNorm2d if nbn_scope == 'all' else nn.BatchNorm2d


def _cbn_norm_layer(**opts) -> Callable[..., nn.Module]:
    return functools.partial(CompoundBatchNorm2d, **opts)  # CompoundBatchNorm2d checks its own options


NORM_TABLE: Dict[str, NormSpec] = {
    'bn': NormSpec(nn.BatchNorm2d, (), lambda: nn.BatchNorm2d, '', None, None),
    'nbn': NormSpec(NormalizedBatchNorm2d, ('nbn_scope',), _nbn_norm_layer, '_nbn',
                    ('Normalizing Batch Normalization for Long-Tailed Recognition', 'arXiv:2501.03122'), fold_nbn),
    'cbn': NormSpec(CompoundBatchNorm2d, tuple(CBN_OPTIONS), _cbn_norm_layer,
                    '_cbn', ('Compound Batch Normalization for Long-tailed Image Classification', 'arXiv:2212.01007'),
                    None),
}
NORMS = tuple(NORM_TABLE)


def _spec(norm: str) -> NormSpec:
    if norm not in NORM_TABLE:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return NORM_TABLE[norm]


def norm_options(norm: str) -> Tuple[str, ...]:
    """Names of the model keyword options that belong to norm ``norm``."""
    return _spec(norm).options


def split_norm_kwargs(norm: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Pop the options of ``norm`` from ``kwargs`` and check them; reject options of another norm.

    The check builds one 2-channel layer, so an invalid option fails here, before the model is built
    or any weight is loaded.
    """
    own = norm_options(norm)
    for other, spec in NORM_TABLE.items():
        stray = [k for k in spec.options if k in kwargs and k not in own]
        if other != norm and stray:
            raise ValueError(
                f"option(s) {stray} apply to norm '{other}', not to this '{norm}' model; "
                f"valid norm options here: {list(own) or 'none'}")
    opts = {k: kwargs.pop(k) for k in own if k in kwargs}
    create_norm_layer(norm, **opts)(2)
    return opts


def create_norm_layer(norm: str, **opts) -> Callable[..., nn.Module]:
    """The ``norm_layer`` callable that timm's blocks call for every norm of the network."""
    spec = _spec(norm)
    unknown = [k for k in opts if k not in spec.options]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for norm '{norm}'; expected some of {list(spec.options)}")
    return spec.norm_layer(**opts)
