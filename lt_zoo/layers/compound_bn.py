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
A_k = gamma_k / s_k, B_k = beta_k - A_k mu_k.  No P x M x C tensor is formed.  Squares are taken of
x - s, s the running mixture mean (a constant), so that E[x^2] - E[x]^2 and the expanded quadratic of
the E-step do not cancel catastrophically when |mean| >> std (e.g. BN layers converted from a trained
network).  The default path is one autograd.Function with a BN-style analytic backward (the
responsibilities are constants there); ``responsibility_grad=True`` uses plain autograd instead.

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
from typing import Iterator, NamedTuple, Optional, Tuple, Union

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
_EM_BUFFERS = ('running_prior', 'running_mean', 'running_var')
# A component needs more than one (soft) vector for a variance: below this it is "inactive" this batch.
_MIN_COUNT = 1.0


def symmetry_directions(num_components: int, num_features: int) -> torch.Tensor:
    """Deterministic (M, C) offsets d_k that break the symmetry of identically initialised components.

    Seeded standard normals, centred over k (so sum_k d_k = 0 and the mixture mean is unchanged) and
    scaled to unit root-mean-square over all entries.  M = 1 gives zeros (CBN with M = 1 is plain BN).
    """
    gen = torch.Generator().manual_seed(_SYMMETRY_SEED)
    d = torch.randn(num_components, num_features, generator=gen, dtype=torch.float64)
    d = d - d.mean(0, keepdim=True)
    if num_components > 1:
        d = d / d.pow(2).mean().sqrt()
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
        device, dtype: of the affine parameters (timm passes both).  The EM buffers are fp32 (fp64 after
            ``.double()``); ``.half()`` / ``.to(torch.bfloat16)`` leave them fp32.

    Parameters: weight (M, C) = gamma_k, bias (M, C) = beta_k.  Buffers: running_prior (M,),
    running_mean (M, C), running_var (M, C), num_batches_tracked.

    Shapes: (N, C, H, W) -> (N, C, H, W) in the input dtype and memory format; channels_last input is
    used as a free (P, C) view.  Training needs more than one vector (ValueError, like torch BN).

    Split path: inside :func:`split_norm` the layer (in train mode) normalises each image with the
    component of its class group instead (see there); ``responsibility_grad`` does not apply to it.

    Robustness: a component with N_k <= 1 in a batch (empty, or a single vector) has no usable batch
    variance: it is normalised with its running statistics and its running mean/variance are not
    updated (its prior still moves towards N_k / P).  Batch variances are clamped at 0; the E-step is a
    max-subtracted softmax of log-densities in fp32 (never exp of a sum of C terms) with the running
    variance floored at eps and the prior at the smallest normal float; posteriors below 1e-30 are set
    to 0 (they are irrelevant, and subnormal floats are slow on CPUs).
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

    def _apply(self, fn, recurse=True):
        """Module.to/half/bfloat16 move the EM state but never lower it below fp32 (values kept exactly)."""
        saved = {k: self._buffers[k] for k in _EM_BUFFERS}
        super()._apply(fn, recurse)
        for k, old in saved.items():
            new = self._buffers[k]
            if new is not None and new.dtype in (torch.float16, torch.bfloat16):
                self._buffers[k] = old.to(device=new.device, dtype=torch.float32)
        return self

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

    def _forward(self, x: torch.Tensor, groups: Optional[torch.Tensor], sync: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        # copies: the running update writes the buffers in place
        prior, mean, var = (b.to(cdt, copy=True) for b in (self.running_prior, self.running_mean, self.running_var))
        # Squares are taken relative to the running mixture mean s: E[(x-s)^2] - E[x-s]^2 and the E-step
        # quadratic then stay free of cancellation when |mean| >> std.
        shift = (prior / prior.sum()) @ mean
        s4 = shift.view(1, c, 1, 1)
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad)
        if grad:  # coordinates x - s, saved for backward (the shift is a constant: same gradients)
            xc, cl = _standard_layout(torch.sub(x, s4))  # also promotes bf16/fp16 to fp32
            lay = _Layout(cl, groups is not None, n, c, h, w)
            run = _Running(prior, mean, var, shift, shift)
            if self.responsibility_grad and groups is None:
                y = self._forward_autograd(xc, run, lay, sync)
            else:
                y = _CompoundNormFn.apply(xc, self.weight, self.bias, self, run, lay, sync, groups)
        else:  # no graph: the same x - s coordinates (raw ones lose digits to cancellation when |mean| >> std);
            # (x - s)^2 becomes the output buffer
            xr, cl = _standard_layout(torch.sub(x, s4))
            sq = xr * xr
            lay = _Layout(cl, groups is not None, n, c, h, w)
            run = _Running(prior, mean, var, shift, shift)
            y = self._forward_fused(xr, sq, self.weight, self.bias, run, lay, sync, groups)[0]
        return y.to(x.dtype)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posteriors r_pk of the E-step (running statistics, temperature applied): (N, C, H, W) -> (N, M, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        prior, mean, var = (b.to(cdt) for b in (self.running_prior, self.running_mean, self.running_var))
        shift = (prior / prior.sum()) @ mean
        lay = _Layout(False, False, n, c, h, w)
        X = lay.view(torch.sub(x, shift.view(1, c, 1, 1)))
        R = lay.responsibilities(X, X * X, *self._estep_coefficients(_Running(prior, mean, var, shift, shift)),
                                 inplace=False)
        return R.view(n, -1, h, w)

    def _temperature(self) -> float:
        return float(self.num_features) if self.temperature == 'channels' else float(self.temperature)

    def _estep_coefficients(self, run: '_Running'):
        """l_pk / T = (x2_p . w2_k + x_p . w1_k + const_k) with x2 = (x - s)^2, x relative to the origin.

        The -C/2 log 2 pi constant is dropped (it cancels in the softmax).
        """
        var = run.var.clamp_min(self.eps)
        ivar = var.reciprocal()
        mean_s = run.mean - run.shift
        w1 = mean_s * ivar
        const = (run.prior.clamp_min(torch.finfo(var.dtype).tiny).log()
                 - 0.5 * (var.log().sum(1) + (mean_s * w1).sum(1)) + w1 @ (run.origin - run.shift))
        t = self._temperature()
        if t == 1.0:
            return w1, ivar * -0.5, const
        return w1 / t, ivar * (-0.5 / t), const / t

    def _m_step(self, lay: '_Layout', R, X, X2, run: '_Running', sync: bool, autograd: bool):
        """Batch statistics (global under DDP), running update, and the statistics that normalise.

        X is relative to run.origin, X2 = (x - s)^2 (None on the split path with origin = s).  Returns
        the mean (relative to the origin), variance and prior used for normalising/combining, the safe
        counts (M, 1) and the (M, 1) mask of components normalised with batch statistics (None: none).
        """
        c = self.num_features
        counts = lay.counts(R)
        s1 = lay.moments(R, X)
        s2 = lay.moments(R, X2) if X2 is not None else lay.moments_sq(R, X)
        if sync:
            packed = torch.cat([counts.unsqueeze(1), s1, s2], 1)
            if autograd:
                import torch.distributed.nn.functional as dist_fn
                packed = dist_fn.all_reduce(packed)
            else:
                dist.all_reduce(packed)
            counts, s1, s2 = packed[:, 0], packed[:, 1:c + 1], packed[:, c + 1:]
        raw = counts.detach()
        active = raw > _MIN_COUNT
        safe = torch.where(active, counts, torch.ones_like(counts)).unsqueeze(1)
        bmean = s1 / safe
        offset = bmean + (run.origin - run.shift)  # batch mean relative to s
        bvar = (s2 / safe - offset * offset).clamp_min(0)
        self._update_running(raw, active, bmean.detach() + run.origin, bvar.detach(), not lay.split)
        mean_o = run.mean - run.origin
        if self.train_stats == 'running':
            return mean_o, run.var, run.prior, safe, None
        mask = active.unsqueeze(1)
        return (torch.where(mask, bmean, mean_o), torch.where(mask, bvar, run.var), counts / counts.sum(),
                safe, mask)

    def _combine_weights(self, R, prior, lay: '_Layout'):
        """Weights of the branch sum (Eq. 16): r_pk, or r_pk / sqrt(pi_k) for combine='mn'."""
        if lay.split or self.combine == 'posterior':
            return R
        return R * lay.per_component(prior.clamp_min(torch.finfo(R.dtype).tiny).rsqrt())

    def _fold(self, weight, bias, mean, var):
        """Branch k as A_k x + B_k: A = gamma / sqrt(var + eps), B = beta - A mean; also 1/sqrt(var + eps)."""
        inv = torch.rsqrt(var + self.eps)
        scale = weight.to(inv.dtype) * inv
        return scale, bias.to(inv.dtype) - scale * mean, inv

    def _statistics(self, lay, R, X, X2, run, sync, autograd):
        if self.training:
            return self._m_step(lay, R, X, X2, run, sync, autograd)
        return run.mean - run.origin, run.var, run.prior, None, None

    def _forward_fused(self, x4, sq4, weight, bias, run: '_Running', lay: '_Layout', sync: bool, groups):
        """The whole layer on the (N, C, H, W) map ``x4`` (relative to run.origin), without autograd.

        ``sq4`` = (x - s)^2 in x4's layout or None (then computed here if the E-step needs it); it is
        reused as the output buffer.  Returns a 4-D tensor that is not a view, so in-place ops downstream
        (ReLU) need no CopySlices in backward.  Runs inside _CompoundNormFn.forward or under no_grad.
        """
        X = lay.view(x4)
        if sq4 is None and groups is None:
            sq4 = x4 * x4  # origin = s here
        X2 = None if sq4 is None else lay.view(sq4)
        if groups is None:
            R = lay.responsibilities(X, X2, *self._estep_coefficients(run), inplace=True)
        else:
            R = F.one_hot(groups, self.num_components).to(X.dtype)
        mean, var, prior, counts, mask = self._statistics(lay, R, X, X2, run, sync, autograd=False)
        W = self._combine_weights(R, prior, lay)
        scale, offset, inv = self._fold(weight, bias, mean, var)
        out = sq4 if sq4 is not None else torch.empty_like(x4)
        lay.mix(W, scale, offset, X, lay.view(out))
        return out, (R, W, scale, inv, mean, counts, mask)

    def _forward_autograd(self, xc, run: '_Running', lay: '_Layout', sync: bool):
        """Plain autograd version (responsibility_grad=True): gradients also flow through r_pk(x)."""
        X = lay.view(xc)
        X2 = X * X
        R = lay.responsibilities(X, X2, *self._estep_coefficients(run), inplace=False)
        mean, var, prior, _, _ = self._statistics(lay, R, X, X2, run, sync, autograd=True)
        W = self._combine_weights(R, prior, lay)
        scale, offset, _ = self._fold(self.weight, self.bias, mean, var)
        coef = lay.expand(W, torch.cat([scale, offset], 1))
        c = self.num_features
        return torch.addcmul(lay.unview(lay.part(coef, c, 2 * c)), xc, lay.unview(lay.part(coef, 0, c)))

    @torch.no_grad()
    def _update_running(self, counts, active, bmean, bvar, update_prior: bool) -> None:
        """EMA of prior (if ``update_prior``), and of mean / unbiased variance of active components."""
        m = self.momentum
        if update_prior:
            prior = (1 - m) * self.running_prior.to(counts.dtype) + m * counts / counts.sum()
            self.running_prior.copy_(prior / prior.sum())
        act = active.unsqueeze(1)
        bessel = counts / torch.where(active, counts - 1, torch.ones_like(counts))
        mean = self.running_mean.to(bmean.dtype)
        var = self.running_var.to(bvar.dtype)
        self.running_mean.copy_(torch.where(act, (1 - m) * mean + m * bmean, mean))
        self.running_var.copy_(torch.where(act, (1 - m) * var + m * bvar * bessel.unsqueeze(1), var))
        self.num_batches_tracked.add_(1)


class _Running(NamedTuple):
    """Running state in the compute dtype, the shift s of the squares and the origin of the coordinates."""
    prior: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    shift: torch.Tensor
    origin: torch.Tensor


def _standard_layout(t: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(t, channels_last?) with t contiguous or channels_last-contiguous (copied if neither)."""
    if t.is_contiguous():
        return t, False
    if t.is_contiguous(memory_format=torch.channels_last):
        return t, True
    return t.contiguous(), False


# Responsibilities below this are set to 0: they are irrelevant and would be (slow) subnormal floats.
_R_FLOOR = 1e-30


class _Layout:
    """Matrix views of the feature map and of the assignment weights, and the products CBN needs.

    X is (N, C, L) for contiguous input ("cf") or (N, L, C) for channels_last ("cl"), L = H*W, both
    free views.  Per-vector weights R are (N, M, L) for cf and (M, P) for cl (a softmax over a short
    last dim is slow on CPU); on the split path they are (N, M), one row per image.  Every product is a
    (batched) GEMM with M on one side; nothing of size P x M x C exists.
    """

    def __init__(self, cl: bool, split: bool, n: int, c: int, h: int, w: int):
        self.cl, self.split, self.n, self.c, self.h, self.w, self.hw = cl, split, n, c, h, w, h * w
        self.comp_dim = 0 if cl else 1

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> X layout; a view for tensors in the layer's memory format."""
        if self.cl:
            return t.permute(0, 2, 3, 1).reshape(self.n, self.hw, self.c)
        return t.reshape(self.n, self.c, self.hw)

    def unview(self, t: torch.Tensor) -> torch.Tensor:
        """X layout (or a per-image (N, C, 1) / (N, 1, C) coefficient) -> broadcastable (N, C, H, W)."""
        if self.split:
            return t.reshape(self.n, self.c, 1, 1)
        if self.cl:
            return t.view(self.n, self.h, self.w, self.c).permute(0, 3, 1, 2)
        return t.view(self.n, self.c, self.h, self.w)

    def _flat(self, Y: torch.Tensor) -> torch.Tensor:
        return Y.reshape(-1, self.c)

    def per_component(self, v: torch.Tensor) -> torch.Tensor:
        """(M,) -> broadcastable against the weights."""
        if self.split:
            return v.view(1, -1)
        return v.view(-1, 1) if self.cl else v.view(1, -1, 1)

    def responsibilities(self, X, X2, w1, w2, const, inplace: bool) -> torch.Tensor:
        """softmax_k(X^2 w2_k + X w1_k + const_k)."""
        if self.cl:
            logits = torch.addmm(const.view(-1, 1), w1, self._flat(X).t()).addmm_(w2, self._flat(X2).t())
        else:
            logits = torch.baddbmm(const.view(1, -1, 1), w1.expand(self.n, -1, -1), X)
            logits = logits.baddbmm_(w2.expand(self.n, -1, -1), X2)
        R = torch.softmax(logits, self.comp_dim)
        return F.threshold_(R, _R_FLOOR, 0.0) if inplace else R

    def counts(self, R: torch.Tensor) -> torch.Tensor:
        if self.split:
            return R.sum(0) * self.hw
        return R.sum(1) if self.cl else R.sum((0, 2))

    def _image_sums(self, Y: torch.Tensor) -> torch.Tensor:
        return Y.sum(1 if self.cl else 2)

    def moments(self, R: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """sum_p r_pk y_p, (M, C)."""
        if self.split:
            return R.t() @ self._image_sums(Y)
        if self.cl:
            return R @ self._flat(Y)
        return torch.matmul(R, Y.transpose(1, 2)).sum(0)

    def moments_sq(self, R: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """sum_p r_pk x_p^2 on the split path, without materialising X^2."""
        return R.t() @ torch.linalg.vector_norm(X, dim=1 if self.cl else 2).square()

    def expand(self, R: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """R @ mat for an (M, k) matrix, per vector (per image on the split path); autograd-friendly."""
        if self.split:
            return R @ mat
        return R.t() @ mat if self.cl else torch.matmul(mat.t(), R)

    def part(self, coef: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Columns start:stop of ``expand``'s result, broadcastable against X."""
        if self.split:
            return coef[:, None, start:stop] if self.cl else coef[:, start:stop, None]
        if self.cl:
            return coef[:, start:stop].view(self.n, self.hw, stop - start)
        return coef[:, start:stop]

    def _scaled(self, W: torch.Tensor, A: torch.Tensor, Y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = Y * (W A) (per-vector W), with the contiguous ``out`` as the buffer of W A."""
        if not out.is_contiguous():
            raise RuntimeError('internal: CBN output buffer must be contiguous in the layer layout')
        if self.cl:
            torch.mm(W.t(), A, out=self._flat(out))
        else:
            torch.bmm(A.t().expand(self.n, -1, -1), W, out=out)
        return out.mul_(Y)

    def _add_expanded(self, out: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """out += W B (per-vector W)."""
        if self.cl:
            self._flat(out).addmm_(W.t(), B)
        else:
            out.baddbmm_(B.t().expand(self.n, -1, -1), W)
        return out

    def mix(self, W, A, B, X, out: torch.Tensor) -> torch.Tensor:
        """X * (W A) + W B, written into ``out`` (X layout, contiguous)."""
        if self.split:
            c = self.c
            coef = W @ torch.cat([A, B], 1)
            return torch.addcmul(self.part(coef, c, 2 * c), X, self.part(coef, 0, c), out=out)
        return self._add_expanded(self._scaled(W, A, X, out), W, B)

    def mix_grad(self, W, R, A, U, V, G, X, out: torch.Tensor) -> torch.Tensor:
        """G * (W A) + X * (R U) + R V (U, V None: G * (W A)), into ``out``."""
        if self.split:
            c = self.c
            if U is None:
                return torch.mul(G, self.part(W @ A, 0, c), out=out)
            coef = torch.cat([W @ A, R @ torch.cat([U, V], 1)], 1)
            torch.addcmul(self.part(coef, 2 * c, 3 * c), X, self.part(coef, c, 2 * c), out=out)
            return out.addcmul_(G, self.part(coef, 0, c))
        out = self._scaled(W, A, G, out)
        if U is None:
            return out
        su = torch.mm(R.t(), U).view(X.shape) if self.cl else torch.matmul(U.t(), R)
        return self._add_expanded(out.addcmul_(su, X), R, V)


class _CompoundNormFn(torch.autograd.Function):
    """CBN with constant assignment weights (default and split path), with a BN-style analytic backward.

    For y_p = sum_k w_pk (A_k (x_p - mu_k) + beta_k), A_k = gamma_k / s_k, batch mu_k = sum_p r_pk x_p / N_k,
    var_k = sum_p r_pk (x_p - mu_k)^2 / N_k, and G_k = sum_p w_pk g_p, H_k = sum_p w_pk g_p x_p:
        dbeta_k = G_k,   dgamma_k = (H_k - mu_k G_k) / s_k,
        dx_p = g_p (W A)_p + x_p (R U)_p + (R V)_p,
        U_k = -gamma_k (H_k - mu_k G_k) / (s_k^3 N_k),   V_k = -A_k G_k / N_k - U_k mu_k
    (U = V = 0 for components normalised with running statistics).  Under DDP, G and H - mu G are
    all-reduced for dx (as SyncBatchNorm does); dgamma, dbeta stay local since DDP reduces parameters.
    """

    @staticmethod
    def forward(ctx, xc, weight, bias, layer, run, lay, sync, groups):
        y, (R, W, scale, inv, mean, counts, mask) = layer._forward_fused(xc, None, weight, bias, run, lay, sync, groups)
        ctx.lay, ctx.sync, ctx.mask = lay, sync, mask
        ctx.save_for_backward(xc, R, None if W is R else W, weight, scale, inv, mean, counts)
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, R, W, weight, scale, inv, mean_c, counts = ctx.saved_tensors
        W = R if W is None else W
        lay, mask = ctx.lay, ctx.mask
        X, G = lay.view(xc), lay.view(gy)
        gk = lay.moments(W, G)
        gx4 = torch.mul(gy, xc, out=torch.empty_like(xc))  # xc's layout, so lay.view(gx4) is a view
        gx = lay.view(gx4)
        gdiff = lay.moments(W, gx) - mean_c * gk
        dweight = (gdiff * inv).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = gk.to(weight.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            u = v = None
            if mask is not None:
                if ctx.sync:
                    packed = torch.cat([gk, gdiff], 1)
                    dist.all_reduce(packed)
                    gk, gdiff = packed[:, :lay.c], packed[:, lay.c:]
                zero = torch.zeros_like(gk)
                u = torch.where(mask, -weight.to(inv.dtype) * inv.pow(3) * gdiff / counts, zero)
                v = torch.where(mask, -scale * gk / counts, zero) - u * mean_c
            lay.mix_grad(W, R, scale, u, v, G, X, out=gx)
            dx = gx4
        return dx, dweight, dbias, None, None, None, None, None


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
        got = (targets.dtype, tuple(targets.shape)) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be a 1-D int64 tensor, got {got}")
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
    are left alone; a BN subclass with its own forward raises TypeError; a BN without running
    statistics (track_running_stats=False) gets the default CBN running state.  Converts in place and
    returns ``model`` (a bare BN module is returned converted).  ``options`` go to every CBN (see
    CBN_OPTIONS).
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
