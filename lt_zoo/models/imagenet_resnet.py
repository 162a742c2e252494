"""ImageNet-style ResNets (18/34/50/101/152) with lt_zoo norms and heads, built on timm's own ``ResNet``.

Nothing of timm's ResNet is copied: the norm goes in as timm's ``norm_layer`` and the only subclassing
is for the head, so that the cosine (GCL) head survives ``reset_classifier``.  The plain-BN linear
baseline at these depths is timm's own ``resnet50`` etc.; registered here are ``resnet50_nbn``,
``resnet50_cbn`` and the ``_gcl`` (cosine head) versions of BN, NBN and CBN.
"""
import functools
import inspect
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..layers.create_norm import NORMS, create_norm_layer, split_norm_kwargs
from ._builder import (BUILDER_KWARGS, HEADS, check_model_options, create_head, model_name, paper_cfg,
                       register_variants, setup_norms)
from .pretrained_tags import check_pretrained, hub_errors, with_pretrained_tags
from .timm_weights import convert_timm_checkpoint

__all__ = ['LtResNet', 'IMAGENET_DEPTHS']

IMAGENET_DEPTHS = {
    'resnet18': (BasicBlock, (2, 2, 2, 2)),
    'resnet34': (BasicBlock, (3, 4, 6, 3)),
    'resnet50': (Bottleneck, (3, 4, 6, 3)),
    'resnet101': (Bottleneck, (3, 4, 23, 3)),
    'resnet152': (Bottleneck, (3, 8, 36, 3)),
}


class LtResNet(ResNet):
    """timm ``ResNet`` whose classifier ``fc`` may be a cosine head that ``reset_classifier`` keeps.

    Args (besides timm ResNet's):
        head: 'linear' or 'cosine' (GCL's normalised classifier).
        cosine_scale: s of the cosine head (30, GCL; the official Places-LT stage 1 uses s=30 too).
        norm_setup: called with the model at the end of construction (before any weight loading).
    """

    def __init__(self, *args, head: str = 'linear', cosine_scale: float = 30.0,
                 norm_setup: Optional[Callable[[nn.Module], None]] = None, **kwargs):
        if head not in HEADS:
            raise ValueError(f"invalid head {head!r}; expected one of {HEADS}")
        check_model_options(type(self).__name__, {**kwargs, 'cosine_scale': cosine_scale})
        self.head_type = head
        self.cosine_scale = cosine_scale
        super().__init__(*args, **kwargs)
        if head != 'linear':
            self.reset_classifier(self.num_classes)
        if norm_setup is not None:
            norm_setup(self)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        check_model_options(type(self).__name__, {'num_classes': num_classes, 'global_pool': global_pool})
        super().reset_classifier(num_classes, global_pool)
        if self.head_type != 'linear':
            p = self.conv1.weight
            in_features = self.num_features * self.global_pool.feat_mult()
            self.fc = create_head(self.head_type, in_features, num_classes, self.cosine_scale,
                                  device=p.device, dtype=p.dtype)
            self.fc.train(self.training)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'apache-2.0',
        **kwargs,
    }


# (depth, norm, head): every norm with the cosine head, and NBN/CBN with the linear head
_VARIANTS = [(d, n, h) for d in IMAGENET_DEPTHS for n in NORMS for h in HEADS if (n, h) != ('bn', 'linear')]

default_cfgs = generate_default_cfgs(with_pretrained_tags(
    {model_name(d, n, h): _cfg(**paper_cfg(n, h)) for d, n, h in _VARIANTS}))


# timm ResNet's own keyword options (block/layers/norm_layer are set by the variant) plus the head's
_MODEL_KWARGS = tuple(k for k in list(inspect.signature(ResNet.__init__).parameters)[3:] if k != 'norm_layer') + (
    'cosine_scale',)


def _create(variant: str, depth: str, norm: str, head: str, /, pretrained: bool = False, **kwargs) -> LtResNet:
    norm_opts = split_norm_kwargs(norm, kwargs)
    if 'norm_layer' in kwargs:
        raise ValueError(f"{variant} sets its own norm layer ('{norm}'); use timm's plain resnet for a custom "
                         f"norm_layer")
    valid = sorted(set(_MODEL_KWARGS + BUILDER_KWARGS))
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {variant}; valid: {valid}"
                         f" plus the norm options of its norm '{norm}'")
    check_pretrained(variant, pretrained, kwargs)
    block, layers = IMAGENET_DEPTHS[depth]
    # timm BN checkpoints (the default tags) become this variant's norms and head while loading
    convert = functools.partial(convert_timm_checkpoint, perturbation=norm_opts.get('perturbation'))
    with hub_errors(variant, kwargs):
        model = build_model_with_cfg(
            LtResNet, variant, pretrained, block=block, layers=layers, head=head,
            norm_layer=create_norm_layer(norm, **norm_opts), pretrained_filter_fn=convert,
            norm_setup=functools.partial(setup_norms, norm=norm, norm_opts=norm_opts, last_stage='layer4'),
            **kwargs)
    return model


register_variants(__name__, [
    (model_name(d, n, h), functools.partial(_create, model_name(d, n, h), d, n, h),
     f"ImageNet ResNet-{d[6:]} (timm ResNet) with norm '{n}' and head '{h}' (LtResNet).")
    for d, n, h in _VARIANTS
])
