"""Shared pieces of the lt_zoo model files: norm set-up after construction, heads, entrypoint naming.

Every lt_zoo architecture is ``<depth>[_nbn|_cbn][_gcl]``: the suffix picks the norm (plain BN,
Normalized BN, Compound BN) and the head (linear, or the cosine classifier of GCL).
"""
import inspect
import math
import sys
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, register_model

from ..layers.cosine_classifier import CosineClassifier
from ..layers.create_norm import NORM_TABLE
from ..layers.normalized_bn import NormalizedBatchNorm2d

__all__ = ['HEADS', 'HEAD_SUFFIX', 'BUILDER_KWARGS', 'GLOBAL_POOLS', 'model_name', 'create_head', 'setup_norms',
           'register_variants', 'paper_cfg', 'check_stem', 'check_model_options']

HEADS = ('linear', 'cosine')
HEAD_SUFFIX = {'linear': '', 'cosine': '_gcl'}
# the pool types timm's SelectAdaptivePool2d builds ('' = no pooling, forward_head keeps (N, C, H, W))
GLOBAL_POOLS = ('', 'avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax')


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# option -> (test, what was expected); the entrypoint options of both model families
_OPTION_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    'num_classes': (lambda v: _is_int(v) and v >= 0, 'an int >= 0 (0: no classifier)'),
    'in_chans': (lambda v: _is_int(v) and v > 0, 'a positive int'),
    'cosine_scale': (lambda v: _is_real(v) and v > 0, 'a positive finite float'),
    'drop_rate': (lambda v: _is_real(v) and 0 <= v < 1, 'a float in [0, 1)'),
    'drop_path_rate': (lambda v: _is_real(v) and 0 <= v < 1, 'a float in [0, 1)'),
    'drop_block_rate': (lambda v: _is_real(v) and 0 <= v < 1, 'a float in [0, 1)'),
    'global_pool': (lambda v: v in GLOBAL_POOLS, f'one of {GLOBAL_POOLS}'),
    'zero_init_last': (lambda v: isinstance(v, bool), 'a bool'),
    'widths': (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(w) and w > 0 for w in v),
               'three positive ints (the CIFAR stage widths)'),
    'output_stride': (lambda v: v in (8, 16, 32), 'one of (8, 16, 32)'),
    'cardinality': (lambda v: _is_int(v) and v > 0, 'a positive int'),
    'base_width': (lambda v: _is_int(v) and v > 0, 'a positive int'),
    'stem_width': (lambda v: _is_int(v) and v > 0, 'a positive int'),
    'down_kernel_size': (lambda v: _is_int(v) and v > 0, 'a positive int'),
}


def check_model_options(model: str, options: Mapping[str, Any]) -> None:
    """Refuse an invalid entrypoint option with its name, value and what was expected; None means the default."""
    for name, value in options.items():
        if name in _OPTION_CHECKS and value is not None:
            test, expected = _OPTION_CHECKS[name]
            if not test(value):
                raise ValueError(f"{model}: invalid {name}={value!r}; expected {expected}")


def model_name(depth_name: str, norm: str, head: str) -> str:
    return depth_name + NORM_TABLE[norm].suffix + HEAD_SUFFIX[head]


def create_head(head: str, num_features: int, num_classes: int, cosine_scale: float, device=None, dtype=None):
    """The classifier module ``fc``: nn.Linear, a CosineClassifier, or nn.Identity for num_classes=0."""
    if head not in HEADS:
        raise ValueError(f"invalid head {head!r}; expected one of {HEADS}")
    check_model_options('create_head', {'num_classes': num_classes, 'cosine_scale': cosine_scale})
    if num_classes == 0:
        return nn.Identity()
    if head == 'cosine':
        return CosineClassifier(num_features, num_classes, scale=cosine_scale, device=device, dtype=dtype)
    return nn.Linear(num_features, num_classes, device=device, dtype=dtype)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def setup_norms(model: nn.Module, norm: str, norm_opts: Dict[str, Any], last_stage: str) -> None:
    """Post-construction norm set-up shared by the CIFAR and ImageNet models.

    - NBN 'official' scope: in stage ``last_stage`` the last BN of every block (bn3, else bn2) and the
      downsample BN become NBN, all sharing the alpha of the first one (docs/normalized_bn.md).
    - Every NBN whose gamma was zeroed by ``zero_init_last`` gets gamma = 1 (docs/normalized_bn.md).
    """
    if norm == 'nbn' and norm_opts.get('nbn_scope', 'official') == 'official':
        stage = getattr(model, last_stage)
        owner = None
        for block_name, block in stage.named_children():
            names = ['bn3' if hasattr(block, 'bn3') else 'bn2']
            if isinstance(block.downsample, nn.Module):
                names += [f'downsample.{n}' for n, m in block.downsample.named_modules() if _is_bn(m)]
            for name in names:
                layer = NormalizedBatchNorm2d.from_bn(block.get_submodule(name))
                if owner is None:
                    owner = layer
                else:
                    layer.share_alpha_with(owner)
                block.set_submodule(name, layer)
    for m in model.modules():
        if isinstance(m, NormalizedBatchNorm2d):
            m.reset_zero_weight()


def register_variants(module_name: str, variants: Iterable[Tuple[str, Callable[..., nn.Module], str]]) -> None:
    """Register one timm entrypoint per (name, build_fn, doc); ``build_fn(pretrained, **kwargs)``.

    timm keys an entrypoint by ``fn.__name__`` and reads ``default_cfgs`` from ``fn.__module__``, so
    each generated function is given the model's name and the calling module.
    """
    module = sys.modules[module_name]
    for name, build, doc in variants:
        def entrypoint(pretrained: bool = False, _build=build, **kwargs) -> nn.Module:
            return _build(pretrained, **kwargs)
        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = module_name
        entrypoint.__doc__ = doc
        setattr(module, name, register_model(entrypoint))


def paper_cfg(norm: str, head: str) -> Dict[str, Any]:
    """paper_name / paper_ids of an architecture's pretrained cfg: the method its norm or head implements."""
    paper = NORM_TABLE[norm].paper
    if paper is not None:
        return dict(paper_name=paper[0], paper_ids=paper[1])
    if head == 'cosine':
        return dict(paper_name='Long-tailed Visual Recognition via Gaussian Clouded Logit Adjustment',
                    paper_ids='arXiv:2305.11733')
    return dict(paper_name='Deep Residual Learning for Image Recognition', paper_ids='arXiv:1512.03385')


# kwargs that timm's create_model / build_model_with_cfg consume themselves
BUILDER_KWARGS = tuple(inspect.signature(build_model_with_cfg).parameters)[3:-1] + (
    'features_only', 'out_indices', 'feature_cls')


def check_stem(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Refuse a checkpoint whose stem expects a different number of input channels, with a clear error."""
    w = state_dict.get('conv1.weight')
    if w is not None and w.shape[1] != model.conv1.weight.shape[1]:
        raise ValueError(f"checkpoint stem conv1 takes in_chans={w.shape[1]} but the model was built with "
                         f"in_chans={model.conv1.weight.shape[1]}; pass in_chans={w.shape[1]}")
    return state_dict
