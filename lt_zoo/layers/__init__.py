from .cosine_classifier import CosineClassifier
from .create_norm import NBN_SCOPES, NORMS, create_norm_layer
from .normalized_bn import NormalizedBatchNorm2d, fold_nbn
