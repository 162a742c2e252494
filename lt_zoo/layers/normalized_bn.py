"""Normalized Batch Normalization (NBN; Bao et al., IEEE TIP 2025).

BN statistics are exactly those of ``nn.BatchNorm2d``; only the affine vectors change:

    w = alpha * gamma / (||gamma||_2 + norm_eps),   b = alpha * beta / (||beta||_2 + norm_eps)

with gamma, beta in R^C the raw BN parameters, norms over the whole channel vector of the layer
(computed in fp32) and alpha a learnable scalar (shared between w and b).  Source:
yuxiangbao/NBN ``models/ResNet_NBN.py`` (docs/normalized_bn.md).

Sharing alpha: a layer either owns its ``alpha`` parameter or borrows the one of another NBN layer
(:meth:`NormalizedBatchNorm2d.share_alpha_with`).  A borrower holds the owner's very Parameter as its
``alpha`` (tied, as tied embeddings are), so TorchScript sees a plain parameter; its state dict leaves
the borrowed key out, so a checkpoint holds each alpha once and safetensors (which refuses aliased
tensors) can save it.  Loading re-ties a borrower to its owner (``to_empty`` unties parameters).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

__all__ = ['NormalizedBatchNorm2d', 'fold_nbn']


def _drop_borrowed_alpha(module: 'NormalizedBatchNorm2d', state_dict, prefix: str, local_metadata) -> None:
    if module._alpha_owner:
        state_dict.pop(prefix + 'alpha', None)


def _retie_borrowed_alpha(module: 'NormalizedBatchNorm2d', state_dict, prefix: str, *args) -> None:
    if module._alpha_owner:
        module._parameters['alpha'] = module._alpha_owner[0].alpha
        state_dict[prefix + 'alpha'] = module.alpha  # copied onto itself: the owner's key carries the value


def _check_positive(name: str, value, kind=float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not value > 0 or (kind is float and not math.isfinite(value)):
        what = 'a positive int' if kind is int else 'a positive finite float'
        raise ValueError(f"{name} must be {what}, got {value!r}")


# A leaf for FX: its input-rank check would otherwise branch on a traced value (timm's answer for such layers).
@register_notrace_module
class NormalizedBatchNorm2d(nn.Module):
    """BatchNorm2d whose weight and bias are unit vectors times a learnable scalar alpha.

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        eps: BN variance epsilon (1e-5, as torch BN and the official code).
        momentum: running-statistics momentum (0.1, as torch BN and the official code).
        norm_eps: added to ||gamma|| and ||beta|| (1e-6, official ``scale_modules``).
        alpha_init: initial alpha (1.0, official ``torch.ones``).
    Shapes: input (N, C, H, W) -> output (N, C, H, W).

    beta starts at 0 as in the official code, so its first gradient is scaled by alpha / norm_eps (up to
    ~1e8 was measured in ResNet-50); after one step only its direction matters.  With fp16 autocast this
    first step may overflow the gradient scaler and be skipped (bf16 does not overflow).

    Not a subclass of ``nn.modules.batchnorm._BatchNorm`` on purpose: SyncBatchNorm conversion
    replaces every such subclass by a plain SyncBatchNorm and would drop alpha silently.
    """

    def __init__(
            self,
            num_features: int,
            eps: float = 1e-5,
            momentum: float = 0.1,
            norm_eps: float = 1e-6,
            alpha_init: float = 1.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        _check_positive('num_features', num_features, int)
        _check_positive('eps', eps)
        _check_positive('norm_eps', norm_eps)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)) or not math.isfinite(alpha_init):
            raise ValueError(f"alpha_init must be a finite float, got {alpha_init!r}")
        dd = {'device': device, 'dtype': dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.norm_eps = norm_eps
        self.weight = nn.Parameter(torch.ones(num_features, **dd))
        self.bias = nn.Parameter(torch.zeros(num_features, **dd))
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init), **dd))
        self.register_buffer('running_mean', torch.zeros(num_features, **dd))
        self.register_buffer('running_var', torch.ones(num_features, **dd))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long, device=device))
        # (owner,) when alpha is borrowed; a tuple keeps nn.Module from registering the owner as a child.
        self._alpha_owner: tuple = ()
        self.register_state_dict_post_hook(_drop_borrowed_alpha)
        self.register_load_state_dict_pre_hook(_retie_borrowed_alpha)

    def share_alpha_with(self, owner: 'NormalizedBatchNorm2d') -> None:
        """Use ``owner.alpha`` instead of an own parameter (one shared scalar, official code)."""
        if owner is self:
            return
        if not isinstance(owner, NormalizedBatchNorm2d) or owner._alpha_owner:
            raise ValueError('share_alpha_with() needs an NBN layer that owns its alpha')
        self._alpha_owner = (owner,)
        self._parameters['alpha'] = owner.alpha

    def get_alpha(self) -> torch.Tensor:
        """The (1,) alpha this layer applies: its own, or the one it shares with its owner."""
        return self.alpha

    def reset_zero_weight(self) -> None:
        """Set gamma back to ones if it is all zero (e.g. after timm's ``zero_init_last``).

        gamma / ||gamma|| is undefined at 0 and its gradient there is scaled by 1 / norm_eps = 1e6.
        """
        with torch.no_grad():
            if not bool(self.weight.any()):
                self.weight.fill_(1.0)

    def affine(self):
        """Return (w, b), each (C,), in fp32: alpha times the unit-normalised gamma and beta."""
        alpha = self.alpha.float()
        g, b = self.weight.float(), self.bias.float()
        return alpha * g / (g.norm() + self.norm_eps), alpha * b / (b.norm() + self.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'NormalizedBatchNorm2d expects a 4-D (N, C, H, W) input, got shape {x.shape}')
        w, b = self.affine()
        if self.training:
            self.num_batches_tracked.add_(1)
        if x.dtype == torch.float64:  # gradcheck / float64 references; low precision keeps fp32 affine
            w, b = w.double(), b.double()
        return F.batch_norm(x, self.running_mean, self.running_var, w, b, self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        shared = ', shared_alpha' if self._alpha_owner else ''
        return f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, norm_eps={self.norm_eps}{shared}'

    @classmethod
    def from_bn(cls, bn: nn.Module, **kwargs) -> 'NormalizedBatchNorm2d':
        """An NBN layer with the running statistics and raw gamma/beta of a BatchNorm2d."""
        p = bn.weight if bn.weight is not None else bn.running_mean
        layer = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum if bn.momentum is not None else 0.1,
                    device=p.device, dtype=p.dtype, **kwargs)
        with torch.no_grad():
            if bn.weight is not None:
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
            if bn.running_mean is not None:
                layer.running_mean.copy_(bn.running_mean)
                layer.running_var.copy_(bn.running_var)
                layer.num_batches_tracked.copy_(bn.num_batches_tracked)
        layer.reset_zero_weight()
        return layer

    def to_bn(self) -> nn.BatchNorm2d:
        """A plain BatchNorm2d with identical outputs (train and eval) and the same running statistics."""
        w, b = self.affine()
        bn = nn.BatchNorm2d(self.num_features, eps=self.eps, momentum=self.momentum,
                            device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn


def fold_nbn(model: nn.Module) -> nn.Module:
    """Replace every NormalizedBatchNorm2d in ``model`` (in place) by an equivalent nn.BatchNorm2d.

    The folded model's outputs equal the original's, and its state dict has the keys of a vanilla
    timm/torchvision ResNet, so an exported NBN model loads into ``timm.create_model('resnet50')``.
    Returns ``model`` (or the folded layer if ``model`` itself is an NBN layer).
    """
    if isinstance(model, NormalizedBatchNorm2d):
        return model.to_bn()
    # Fold every layer before replacing any, so a borrowed alpha is still reachable from its owner.
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, NormalizedBatchNorm2d)]
    folded = [(name, m.to_bn()) for name, m in targets]
    for name, bn in folded:
        model.set_submodule(name, bn)
    return model
