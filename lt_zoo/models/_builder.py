"""Shared pieces of the lt_zoo model files: norm set-up after construction, heads, entrypoint naming.

Every lt_zoo architecture is ``<depth>[_nbn|_cbn][_gcl]``: the suffix picks the norm (plain BN,
Normalized BN, Compound BN) and the head (linear, or the cosine classifier of GCL).
"""
import inspect
import sys
from typing import Any, Callable, Dict, Iterable, Tuple

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, register_model

from ..layers.cosine_classifier import CosineClassifier
from ..layers.normalized_bn import NormalizedBatchNorm2d

__all__ = ['HEADS', 'NORM_SUFFIX', 'HEAD_SUFFIX', 'BUILDER_KWARGS', 'model_name', 'create_head', 'setup_norms',
           'register_variants', 'paper_cfg', 'check_stem']

HEADS = ('linear', 'cosine')
NORM_SUFFIX = {'bn': '', 'nbn': '_nbn', 'cbn': '_cbn'}
HEAD_SUFFIX = {'linear': '', 'cosine': '_gcl'}


def model_name(depth_name: str, norm: str, head: str) -> str:
    return depth_name + NORM_SUFFIX[norm] + HEAD_SUFFIX[head]


def create_head(head: str, num_features: int, num_classes: int, cosine_scale: float, device=None, dtype=None):
    """The classifier module ``fc``: nn.Linear, a CosineClassifier, or nn.Identity for num_classes=0."""
    if head not in HEADS:
        raise ValueError(f"invalid head {head!r}; expected one of {HEADS}")
    if num_classes <= 0:
        return nn.Identity()
    if head == 'cosine':
        return CosineClassifier(num_features, num_classes, scale=cosine_scale, device=device, dtype=dtype)
    return nn.Linear(num_features, num_classes, device=device, dtype=dtype)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def setup_norms(model: nn.Module, norm: str, norm_opts: Dict[str, Any], last_stage: str) -> None:
    """Post-construction norm set-up shared by the CIFAR and ImageNet models.

    - NBN 'official' scope: in stage ``last_stage`` the last BN of every block (bn3, else bn2) and the
      downsample BN become NBN, all sharing the alpha of the first one (METHODS.md §3).
    - Every NBN whose gamma was zeroed by ``zero_init_last`` gets gamma = 1 (METHODS.md §7).
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
    if norm == 'cbn':
        return dict(paper_name='Compound Batch Normalization for Long-tailed Image Classification',
                    paper_ids='arXiv:2212.01007')
    if norm == 'nbn':
        return dict(paper_name='Normalizing Batch Normalization for Long-Tailed Recognition',
                    paper_ids='arXiv:2501.03122')
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
