"""Compound Batch Normalization (CBN; Cheng et al., ACM MM 2022): batch norm with a Gaussian mixture.

BN pools an (N, C, H, W) map into P = N*H*W feature vectors x_p in R^C; CBN models them with M diagonal
Gaussians (prior pi_k, mean mu_k, variance var_k; shared/reference/METHODS.md §6, §6a) and normalises
every vector by each component, mixing the M branches with the posteriors (paper Eq. 7-16):

    E-step   l_pk = log pi_k - 1/2 sum_c [log var_kc + (x_pc - mu_kc)^2 / var_kc],  r_pk = softmax_k(l_pk / T)
    M-step   N_k = sum_p r_pk,  mu^_k = sum_p r_pk x_p / N_k,  var^_k = sum_p r_pk (x_p - mu^_k)^2 / N_k
    EMA      pi_k <- (1-m) pi_k + m N_k / P,  mu_k <- (1-m) mu_k + m mu^_k,  var_k <- (1-m) var_k + m var^_k N_k/(N_k-1)
    output   y_p = sum_k r_pk (gamma_k * (x_p - mu^_k) / sqrt(var^_k + eps) + beta_k)

The E-step always uses the running (previously estimated) statistics, as the paper's Eq. 8 says.  All of
it is a handful of (P x C)(C x M) products (METHODS.md §6b): l = X^2 W2 + X W1 + const, S1 = R^T X,
S2 = R^T X^2, and the output is one per-vector scale and shift, y = X * (R A) + R B with
A_k = gamma_k / s_k, B_k = beta_k - A_k mu_k.  No P x M x C tensor is formed.

Split path (paper §3.3, METHODS.md §6a): inside ``with split_norm(model, targets, num_classes):`` every
CBN layer in train mode normalises the features of images whose class is in group
g = floor(y * M / num_classes) (class 0 = most frequent, so group 0 = head) with component g alone and
with that group's batch mean/variance, and those statistics update component g's running mean and
variance.  It is the compound machinery with R replaced by the one-hot group matrix.

The running state (prior (M,), mean (M, C), var (M, C), num_batches_tracked) lives in fp32 persistent
buffers whatever the module dtype; statistics are computed in fp32 (fp64 for fp64 input) with autocast
off, and the output has the input dtype.
"""
import contextlib
import math
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CompoundBatchNorm2d', 'CBN_OPTIONS', 'split_norm', 'convert_bn_to_cbn', 'symmetry_directions']

# Model-entrypoint keyword options forwarded to every CompoundBatchNorm2d (plain JSON values).
CBN_OPTIONS = ('num_components', 'momentum', 'eps', 'train_stats', 'combine', 'responsibility_grad',
               'temperature', 'perturbation')
TRAIN_STATS = ('batch', 'running')
COMBINES = ('posterior', 'mn')
# Fixed seed of the symmetry-breaking directions: a layer's init never depends on the global RNG.
_SYMMETRY_SEED = 20220000
# A component needs more than one (soft) vector for a variance: below this it is "inactive" this batch.
_MIN_COUNT = 1.0


def symmetry_directions(num_components: int, num_features: int) -> torch.Tensor:
    """Deterministic (M, C) offsets d_k that break the symmetry of identically initialised components.

    Seeded standard normals, centred over k (so sum_k d_k = 0 and the mixture mean is unchanged) and
    scaled to unit root-mean-square per component.  M = 1 gives zeros (CBN with M = 1 is plain BN).
    """
    gen = torch.Generator().manual_seed(_SYMMETRY_SEED)
    d = torch.randn(num_components, num_features, generator=gen, dtype=torch.float64)
    d = d - d.mean(0, keepdim=True)
    if num_components > 1:
        d = d / d.pow(2).mean(1, keepdim=True).sqrt()
    return d.float()


def _sync_active(training: bool) -> bool:
    return training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CompoundBatchNorm2d(nn.Module):
    """Gaussian-mixture batch norm over the C-dim feature vectors of an (N, C, H, W) map.

    Args:
        num_features: C.
        num_components: M Gaussians (4: the paper's best, §4 Fig. 5).
        momentum: m of the moving averages of prior, mean and variance (0.1: BN's default and the
            paper's "three constants all set to 0.1", METHODS.md §6a); 0 freezes the running state.
        eps: added to variances before the square root, and floor of the running variance in the E-step
            (1e-5, as torch BN).
        train_stats: which statistics normalise in training. 'batch' (default, the natural reading and
            what BN does): the responsibility-weighted batch ("temporary") mean/variance, with gradients
            through them as in BN. 'running': the running statistics as constants (train forward then
            equals the eval forward; the running state is still updated).  METHODS.md §6a last bullet.
        combine: weights of the branch sum (paper Eq. 16). 'posterior' (default): r_pk.
            'mn': r_pk / sqrt(pi_k) as in Mixture Normalization (Kalayeh & Shah, CVPR'19), pi_k the batch
            prior N_k / P under train_stats='batch' in training, else the running prior.
        responsibility_grad: False (default): r is computed under no_grad from the running statistics
            and acts as a constant soft assignment, so the gradient is BN's, per component.  True: the
            gradient also flows through r_pk(x) (running statistics still constant).  METHODS.md §6b.
        temperature: T in softmax(l / T) (1.0: the plain posterior of Eq. 8).  l sums C terms, so in
            high C the posteriors are close to one-hot; T > 1 softens them.  'channels' sets T = C
            (the per-dimension average log-likelihood; a deviation from the paper, METHODS.md §7).
        perturbation: symmetry breaking (0.1).  Components start with pi = 1/M, var = 1, gamma = 1,
            beta = 0 and running means perturbation * d_k, d_k from :func:`symmetry_directions`
            (unit RMS, centred over k): with identical components every r_pk = 1/M and EM never
            separates them (METHODS.md §6).  The split path also diversifies them.
        device, dtype: of the affine parameters (timm passes both); buffers are always fp32.

    Parameters: weight (M, C) = gamma_k, bias (M, C) = beta_k.  Buffers: running_prior (M,),
    running_mean (M, C), running_var (M, C), num_batches_tracked.

    Shapes: (N, C, H, W) -> (N, C, H, W) in the input dtype and memory format; channels_last input is
    used as a free (P, C) view.  Training needs more than one vector (ValueError, like torch BN).

    Robustness: a component with N_k <= 1 in a batch (empty, or a single vector) has no usable batch
    variance: it is normalised with its running statistics and its running mean/variance are not
    updated (its prior still moves towards N_k / P).  Batch variances are clamped at 0; the E-step uses
    log-sum-exp in fp32 and floors the running variance at eps and the prior at the smallest normal.
    The running variance gets the N_k / (N_k - 1) correction of torch BN, so M = 1 equals BatchNorm2d.

    Distributed: under an initialised torch.distributed with world size > 1, training forwards
    all-reduce (N_k, S1 = R^T X, S2 = R^T X^2) with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce`` (as SyncBatchNorm does for sum and sum of squares),
    so batch statistics, gradients and running updates are those of the global batch and the running
    state stays identical on every rank; DDP's default ``broadcast_buffers`` therefore replaces nothing
    that differs.  Not a subclass of torch's ``_BatchNorm``: ``convert_sync_batchnorm`` would replace it
    with a plain SyncBatchNorm and drop the mixture silently.
    """

    def __init__(
            self,
            num_features: int,
            num_components: int = 4,
            momentum: float = 0.1,
            eps: float = 1e-5,
            *,
            train_stats: str = 'batch',
            combine: str = 'posterior',
            responsibility_grad: bool = False,
            temperature: Union[float, str] = 1.0,
            perturbation: float = 0.1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        _check_int('num_features', num_features)
        _check_int('num_components', num_components)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        if train_stats not in TRAIN_STATS:
            raise ValueError(f"train_stats must be one of {TRAIN_STATS}, got {train_stats!r}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if not isinstance(responsibility_grad, bool):
            raise TypeError(f"responsibility_grad must be a bool, got {responsibility_grad!r}")
        if temperature != 'channels' and (isinstance(temperature, (bool, str)) or not isinstance(
                temperature, (int, float)) or not temperature > 0):
            raise ValueError(f"temperature must be a positive float or 'channels', got {temperature!r}")
        if isinstance(perturbation, bool) or not isinstance(perturbation, (int, float)) or not perturbation >= 0:
            raise ValueError(f"perturbation must be a float >= 0, got {perturbation!r}")
        self.num_features = num_features
        self.num_components = num_components
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.train_stats = train_stats
        self.combine = combine
        self.responsibility_grad = responsibility_grad
        self.temperature = temperature
        self.perturbation = float(perturbation)
        dd = {'device': device, 'dtype': dtype}
        shape = (num_components, num_features)
        self.weight = nn.Parameter(torch.empty(shape, **dd))
        self.bias = nn.Parameter(torch.empty(shape, **dd))
        f32 = {'device': device, 'dtype': torch.float32}
        self.register_buffer('running_prior', torch.empty(num_components, **f32))
        self.register_buffer('running_mean', torch.empty(shape, **f32))
        self.register_buffer('running_var', torch.empty(shape, **f32))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long, device=device))
        # (targets, num_classes) while a split_norm() block is active; plain attribute, not state.
        self._split: Optional[Tuple[torch.Tensor, int]] = None
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        """pi = 1/M, var = 1, mean = perturbation * d_k (symmetry breaking), counter 0."""
        with torch.no_grad():
            self.running_prior.fill_(1.0 / self.num_components)
            self.running_var.fill_(1.0)
            d = symmetry_directions(self.num_components, self.num_features)
            self.running_mean.copy_(self.perturbation * d)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_components={self.num_components}, momentum={self.momentum}, "
                f"eps={self.eps}, train_stats={self.train_stats!r}, combine={self.combine!r}, "
                f"responsibility_grad={self.responsibility_grad}, temperature={self.temperature!r}")

    @classmethod
    def from_bn(cls, bn: nn.Module, num_components: int = 4, perturbation: float = 0.01,
                **options) -> 'CompoundBatchNorm2d':
        """A CBN layer whose every component is the BN layer ``bn``, means nudged apart.

        mu_k = mu_bn + perturbation * sqrt(var_bn) * d_k, var_k = var_bn, pi_k = 1/M, gamma_k = gamma,
        beta_k = beta; eps and a float momentum are copied.  Device and parameter dtype are kept.
        """
        ref = bn.weight if bn.weight is not None else bn.running_mean
        device = ref.device if ref is not None else None
        dtype = bn.weight.dtype if bn.weight is not None else None
        momentum = options.pop('momentum', bn.momentum if bn.momentum is not None else 0.1)
        layer = cls(bn.num_features, num_components, momentum=momentum, eps=bn.eps,
                    perturbation=perturbation, device=device, dtype=dtype, **options)
        with torch.no_grad():
            if bn.weight is not None:
                layer.weight.copy_(bn.weight.detach().expand_as(layer.weight))
            if bn.bias is not None:
                layer.bias.copy_(bn.bias.detach().expand_as(layer.bias))
            if bn.running_mean is not None:
                mean = bn.running_mean.detach().float()
                std = bn.running_var.detach().float().clamp_min(0).sqrt()
                d = symmetry_directions(num_components, bn.num_features).to(mean.device)
                layer.running_mean.copy_(mean + perturbation * std * d)
                layer.running_var.copy_(bn.running_var.detach().float().expand_as(layer.running_var))
                layer.num_batches_tracked.copy_(bn.num_batches_tracked)
        return layer

    # --------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        sync = _sync_active(self.training)
        if self.training and not sync and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        groups = None
        if self.training and self._split is not None:
            targets, num_classes = self._split
            if targets.shape[0] != x.shape[0]:
                raise ValueError(f"split_norm targets have {targets.shape[0]} entries but the batch has "
                                 f"{x.shape[0]} images")
            groups = torch.div(targets.to(x.device) * self.num_components, num_classes, rounding_mode='floor')
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x, groups, sync)
        return self._forward(x, groups, sync)

    def _temperature(self) -> float:
        return float(self.num_features) if self.temperature == 'channels' else float(self.temperature)

    def _forward(self, x: torch.Tensor, groups: Optional[torch.Tensor], sync: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        m_comp = self.num_components
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        prior = self.running_prior.to(cdt)
        mean = self.running_mean.to(cdt)
        var = self.running_var.to(cdt)
        # Work relative to the running mixture mean: keeps E[x^2] - E[x]^2 and the expanded quadratic of
        # the E-step free of cancellation when |mean| >> std (a constant, so gradients are unchanged).
        shift = (prior / prior.sum()) @ mean
        xc = torch.sub(x, shift.view(1, c, 1, 1))  # promotes bf16/fp16 to fp32
        cl = not xc.is_contiguous() and xc.is_contiguous(memory_format=torch.channels_last)
        # cf: (N, C, L) batched matrices; cl: one (P, C) matrix (free view of channels_last memory).
        X = xc.permute(0, 2, 3, 1).reshape(n * h * w, c) if cl else xc.reshape(n, c, h * w)
        X2 = X * X
        mean_c = mean - shift

        if groups is None:
            grad_r = self.responsibility_grad and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad_r):
                R = self._responsibilities(X, X2, prior, mean_c, var, cl)
        else:
            R = F.one_hot(groups, m_comp).to(cdt)  # (N, M), one row per image

        w_comb = R
        if self.training:
            counts, s1, s2 = self._moments(X, X2, R, groups is not None, cl, h * w)
            if sync:
                packed = torch.cat([counts.unsqueeze(1), s1, s2], 1)
                packed = torch.distributed.nn.functional.all_reduce(packed)
                counts, s1, s2 = packed[:, 0], packed[:, 1:c + 1], packed[:, c + 1:]
            counts_nd = counts.detach()
            active = counts_nd > _MIN_COUNT
            safe = torch.where(active, counts, torch.ones_like(counts)).unsqueeze(1)
            bmean_c = s1 / safe
            bvar = (s2 / safe - bmean_c * bmean_c).clamp_min(0)
            if self.momentum > 0:
                self._update_running(counts_nd, active, bmean_c.detach() + shift, bvar.detach(), groups is None)
            if self.train_stats == 'batch':
                norm_mean = torch.where(active.unsqueeze(1), bmean_c, mean_c)
                norm_var = torch.where(active.unsqueeze(1), bvar, var)
                batch_prior = counts_nd / counts_nd.sum()
            else:
                norm_mean, norm_var, batch_prior = mean_c, var, prior
        else:
            norm_mean, norm_var, batch_prior = mean_c, var, prior
        if groups is None and self.combine == 'mn':
            floor = torch.finfo(cdt).tiny
            w_comb = R * batch_prior.clamp_min(floor).rsqrt().view((1, m_comp) + (() if cl else (1,)))

        # Fold normalisation and affine per component: branch k is A_k * x + B_k (shifted coordinates).
        scale = self.weight.to(cdt) * torch.rsqrt(norm_var + self.eps)
        ab = torch.cat([scale, self.bias.to(cdt) - scale * norm_mean], 1)  # (M, 2C)
        if groups is not None:
            sab = w_comb @ ab  # (N, 2C): per image
            if cl:
                y = torch.addcmul(sab[:, None, c:], X.view(n, h * w, c), sab[:, None, :c])
                y = y.view(n, h, w, c).permute(0, 3, 1, 2)
            else:
                y = torch.addcmul(sab[:, c:, None], X, sab[:, :c, None]).view(n, c, h, w)
        elif cl:
            sab = w_comb @ ab  # (P, 2C)
            y = torch.addcmul(sab[:, c:], X, sab[:, :c]).view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            sab = torch.matmul(ab.t(), w_comb)  # (2C, M) @ (N, M, L) -> (N, 2C, L)
            y = torch.addcmul(sab[:, c:], X, sab[:, :c]).view(n, c, h, w)
        return y.to(x.dtype)

    def _responsibilities(self, X, X2, prior, mean_c, var, cl: bool) -> torch.Tensor:
        """r = softmax_k(l / T) from the running statistics: (N, M, L) for cf, (P, M) for cl."""
        var = var.clamp_min(self.eps)
        ivar = var.reciprocal()
        w1 = mean_c * ivar
        w2 = -0.5 * ivar
        const = (prior.clamp_min(torch.finfo(prior.dtype).tiny).log()
                 - 0.5 * (var.log().sum(1) + (mean_c * w1).sum(1)))
        if cl:
            logits = torch.addmm(const.unsqueeze(0), X, w1.t())
            logits = logits.addmm_(X2, w2.t())
        else:
            logits = torch.matmul(w1, X).add_(torch.matmul(w2, X2)).add_(const.view(1, -1, 1))
        t = self._temperature()
        if t != 1.0:
            logits = logits / t
        return torch.softmax(logits, dim=1)

    @staticmethod
    def _moments(X, X2, R, split: bool, cl: bool, hw: int):
        """N_k (M,), S1 = R^T X (M, C), S2 = R^T X^2 (M, C), over this process's vectors."""
        if split:  # R is (N, M) per image: sum each image's vectors first
            if cl:
                n = R.shape[0]
                t1, t2 = X.view(n, hw, -1).sum(1), X2.view(n, hw, -1).sum(1)
            else:
                t1, t2 = X.sum(2), X2.sum(2)
            return R.sum(0) * hw, R.t() @ t1, R.t() @ t2
        if cl:
            return R.sum(0), R.t() @ X, R.t() @ X2
        rt = R.transpose(1, 2)  # (N, L, M)
        return R.sum((0, 2)), torch.matmul(X, rt).sum(0).t(), torch.matmul(X2, rt).sum(0).t()

    @torch.no_grad()
    def _update_running(self, counts, active, bmean, bvar, update_prior: bool) -> None:
        m = self.momentum
        if update_prior:
            total = counts.sum()
            prior = (1 - m) * self.running_prior.to(counts.dtype) + m * counts / total
            self.running_prior.copy_(prior / prior.sum())
        act = active.unsqueeze(1)
        unbiased = bvar * (counts / torch.where(active, counts - 1, torch.ones_like(counts))).unsqueeze(1)
        mean = self.running_mean.to(bmean.dtype)
        var = self.running_var.to(bvar.dtype)
        self.running_mean.copy_(torch.where(act, (1 - m) * mean + m * bmean, mean))
        self.running_var.copy_(torch.where(act, (1 - m) * var + m * unbiased, var))
        self.num_batches_tracked.add_(1)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@contextlib.contextmanager
def split_norm(model: nn.Module, targets: torch.Tensor, num_classes: int) -> Iterator[nn.Module]:
    """Within the block, every CompoundBatchNorm2d of ``model`` in train mode takes the split path.

    targets: (N,) int64 class indices of the batch (class 0 = most frequent); image n and all its
    positions go to group floor(targets[n] * M / num_classes), M the layer's num_components, i.e. M
    contiguous class blocks of (nearly) equal size, head classes in group 0 (paper §3.3).  Layers in eval
    mode ignore it: the compound path is the only inference path (paper §3.4).  A group absent from
    the batch, or with a single vector, keeps its running statistics and is normalised with them; the
    running prior is not touched by the split path (the paper updates only mean and variance).
    Nested blocks restore the outer targets on exit.
    """
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.dtype != torch.int64:
        raise TypeError(f"targets must be a 1-D int64 tensor, got "
                        f"{type(targets).__name__ if not isinstance(targets, torch.Tensor) else (targets.dtype, tuple(targets.shape))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    layers = [m for m in model.modules() if isinstance(m, CompoundBatchNorm2d)]
    saved = [m._split for m in layers]
    for m in layers:
        m._split = (targets, num_classes)
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m._split = s


def _is_plain_bn2d(m: nn.Module) -> bool:
    bn = nn.modules.batchnorm._BatchNorm
    if not isinstance(m, bn):
        return False
    if type(m).forward not in (bn.forward, nn.SyncBatchNorm.forward):
        raise TypeError(f"cannot convert {type(m).__name__}: it overrides BatchNorm's forward "
                        f"(e.g. a fused activation) and CompoundBatchNorm2d would drop that behaviour")
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))


def convert_bn_to_cbn(model: nn.Module, num_components: int = 4, perturbation: float = 0.01,
                      **options) -> nn.Module:
    """Replace every 2-D BatchNorm (BatchNorm2d, SyncBatchNorm) of ``model`` by CompoundBatchNorm2d.

    Each CBN copies its BN (:meth:`CompoundBatchNorm2d.from_bn`): affine in every component, running
    means mu_bn + perturbation * std_bn * d_k (0.01 std: small enough that the eval outputs barely move,
    non-zero so that EM can separate the components), variances var_bn, uniform prior.  With
    perturbation 0 all components are the BN and the eval outputs are the BN network's.  BatchNorm1d/3d
    are left alone; a BN subclass with its own forward raises TypeError.  Returns ``model`` (converted
    in place; a bare BN module is returned converted).  ``options`` go to every CBN (see CBN_OPTIONS).
    """
    if _is_plain_bn2d(model):
        return CompoundBatchNorm2d.from_bn(model, num_components, perturbation, **options).train(model.training)
    for name, child in list(model.named_children()):
        if _is_plain_bn2d(child):
            layer = CompoundBatchNorm2d.from_bn(child, num_components, perturbation, **options)
            setattr(model, name, layer.train(child.training))
        else:
            convert_bn_to_cbn(child, num_components, perturbation, **options)
    return model
