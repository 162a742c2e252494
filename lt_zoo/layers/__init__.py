"""Layers: one concept per module (norms, heads) and the norm factory the models use."""
from .compound_bn import (CBN_OPTIONS, CompoundBatchNorm2d, cbn_statistics, convert_bn_to_cbn, format_cbn_statistics,
                          frozen_running_stats, split_norm)
from .cosine_classifier import CosineClassifier
from .create_norm import NBN_SCOPES, NORM_TABLE, NORMS, NormSpec, create_norm_layer
from .normalized_bn import NormalizedBatchNorm2d, fold_nbn
