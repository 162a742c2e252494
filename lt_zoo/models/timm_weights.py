"""Load-time conversion of a timm plain-BN ResNet checkpoint into an lt_zoo NBN / CBN / cosine-head model.

Used as ``pretrained_filter_fn`` of the ImageNet-depth models (timm calls it with the checkpoint and the
freshly built model before ``load_state_dict``).  Each piece is converted only when the checkpoint holds
it in plain-BN / linear-head form, so an lt_zoo checkpoint passes through unchanged.  docs/pretrained.md
shows the measured effect of each conversion.

- **BN -> CBN** (Cheng et al. 2022): every component starts as the BN (``CompoundBatchNorm2d.from_bn``):
  gamma_k = gamma, beta_k = beta, var_k = var, pi_k = 1/M and means mu + p * std * d_k with d_k the
  layer's symmetry directions (unit RMS, centred over k).  In eval a layer's output then moves by

      |y_cbn - y_bn|_c = p * |gamma_c| * std_c / sqrt(var_c + eps) * |sum_k r_k d_kc|  <=  p * |gamma_c| * max_k |d_kc|

  (r the posteriors).  p = 0 gives the BN network's outputs (to rounding); the default p is
  ``convert_bn_to_cbn``'s 0.01, non-zero so that EM can separate the components.
- **BN -> NBN** (Bao et al. 2025): raw gamma, beta keep the BN's vectors (their directions are what NBN
  uses) and alpha, shared by w = alpha * gamma/||gamma|| and b = alpha * beta/||beta||, is the mean of
  ||gamma|| and ||beta|| over the layers that share it: the alpha minimising the squared change of the
  outputs, sum_l (alpha - ||gamma_l||)^2 + (alpha - ||beta_l||)^2, for unit-variance normalised inputs.
  Exact only where ||gamma|| = ||beta||: one alpha scales both vectors, so a BN whose two norms differ
  has no NBN twin (short of a raw vector of norm ~1e-6, whose first gradient would be ~1e6 times larger).
- **Linear -> cosine head** (GCL, Li et al. 2022): the class vectors are the unit rows of ``fc.weight``;
  ``fc.bias`` is dropped (a cosine head has none).
"""
import inspect
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.compound_bn import CompoundBatchNorm2d, convert_bn_to_cbn
from ..layers.cosine_classifier import CosineClassifier
from ..layers.normalized_bn import NormalizedBatchNorm2d
from ._builder import check_stem

__all__ = ['DEFAULT_PERTURBATION', 'convert_timm_checkpoint', 'nbn_alpha']

# convert_bn_to_cbn's default: mean offsets of 0.01 BN standard deviations.
DEFAULT_PERTURBATION: float = inspect.signature(convert_bn_to_cbn).parameters['perturbation'].default

_BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def nbn_alpha(gammas, betas) -> float:
    """Least-squares shared alpha: mean of ||gamma_l|| and ||beta_l|| over the layers l sharing it (fp64)."""
    norms = [v.double().norm() for v in (*gammas, *betas)]
    return float(torch.stack(norms).mean())


def _bn_from(sd: Dict[str, torch.Tensor], prefix: str, eps: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(sd[prefix + 'running_mean'].numel(), eps=eps)
    bn.load_state_dict({k: sd[prefix + k] for k in _BN_KEYS if prefix + k in sd}, strict=False)
    return bn


def _convert_cbn(sd, name: str, layer: CompoundBatchNorm2d, perturbation: float) -> None:
    prefix = name + '.'
    cbn = CompoundBatchNorm2d.from_bn(_bn_from(sd, prefix, layer.eps), num_components=layer.num_components,
                                      perturbation=perturbation)
    for k in _BN_KEYS:
        sd.pop(prefix + k, None)
    sd.update({prefix + k: v for k, v in cbn.state_dict().items()})


def _convert_nbn(sd, model: nn.Module) -> None:
    """Add alpha for every NBN group (layers sharing one alpha) whose owner's alpha the checkpoint lacks."""
    own_keys = set(model.state_dict())
    groups: Dict[int, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, NormalizedBatchNorm2d):
            groups.setdefault(id(m.get_alpha()), []).append((name, m))
    for members in groups.values():
        owner = next(name for name, _ in members if f'{name}.alpha' in own_keys)
        if f'{owner}.alpha' in sd:
            continue
        alpha = nbn_alpha([sd[f'{n}.weight'] for n, _ in members], [sd[f'{n}.bias'] for n, _ in members])
        # the NBN's norm_eps is added to ||gamma|| too, so w reproduces gamma at alpha = ||gamma|| + norm_eps
        sd[f'{owner}.alpha'] = torch.tensor([alpha + members[0][1].norm_eps], dtype=sd[f'{owner}.weight'].dtype)


def convert_timm_checkpoint(state_dict: Dict[str, torch.Tensor], model: nn.Module,
                            perturbation: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: plain-BN ResNet state dict -> the state dict of ``model`` (see module doc).

    perturbation: p of the BN -> CBN conversion in BN standard deviations (None: DEFAULT_PERTURBATION, 0.01).
    Pieces already in lt_zoo form (CBN running means (M, C), an NBN alpha, a head without bias) are kept.
    """
    p = DEFAULT_PERTURBATION if perturbation is None else perturbation
    sd = dict(state_dict)
    for name, m in model.named_modules():
        if isinstance(m, CompoundBatchNorm2d) and sd.get(f'{name}.running_mean', torch.empty(0, 0)).dim() == 1:
            _convert_cbn(sd, name, m, p)
    _convert_nbn(sd, model)
    fc = getattr(model, 'fc', None)
    if isinstance(fc, CosineClassifier) and 'fc.bias' in sd:
        del sd['fc.bias']
        sd['fc.weight'] = F.normalize(sd['fc.weight'].float(), dim=1).to(sd['fc.weight'].dtype)
    return check_stem(sd, model)
