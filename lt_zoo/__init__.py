"""lt_zoo: long-tailed image classification methods as ordinary timm models.

``import lt_zoo`` registers every lt_zoo architecture with timm (timm has no plugin
discovery, so the import is required before ``timm.create_model``).
"""
__version__ = "0.1.0"

from . import models  # noqa: F401  (registers the architectures with timm)
from .layers import CosineClassifier, NormalizedBatchNorm2d, fold_nbn
from timm import create_model, list_models  # noqa: F401  (convenience re-exports)
