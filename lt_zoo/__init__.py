"""lt_zoo: long-tailed image classification methods as ordinary timm models.

``import lt_zoo`` registers every lt_zoo architecture with timm (timm has no plugin discovery, so the
import is required before ``timm.create_model('resnet32_cbn')`` or an ``hf-hub:`` load of one)::

    import timm, lt_zoo
    model = timm.create_model('resnet32_cbn', num_classes=10, num_components=4)

Training-side pieces live in submodules that need the ``train`` extras: ``lt_zoo.data`` (datasets),
``lt_zoo.plots`` (matplotlib), ``lt_zoo.training``, ``lt_zoo.hub``.
"""
__version__ = "0.1.0"

from . import models  # noqa: F401  (registers the architectures with timm)
from .decoupling import LearnableWeightScaling, tau_normalize, tau_normalize_
from .export import export_model, load_exported
from .layers import (CompoundBatchNorm2d, CosineClassifier, NormalizedBatchNorm2d, convert_bn_to_cbn, fold_nbn,
                     split_norm)
from .losses import create_loss, list_losses
from .metrics import evaluate
from .samplers import create_sampler, list_samplers
from timm import create_model, list_models  # noqa: F401  (convenience re-exports)
