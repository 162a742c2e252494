"""Compound Batch Normalization (CBN; Cheng et al., ACM MM 2022): batch norm with a Gaussian mixture.

BN pools an (N, C, H, W) map into P = N*H*W feature vectors x_p in R^C; CBN models them with M diagonal
Gaussians (prior pi_k, mean mu_k, variance var_k) and normalises every vector by each component, mixing
the M branches with the posteriors (paper Eq. 7-16; docs/compound_bn.md):

    E-step   l_pk = log pi_k - 1/2 sum_c [log var_kc + (x_pc - mu_kc)^2 / var_kc],  r_pk = softmax_k(l_pk / T)
    M-step   N_k = sum_p r_pk,  mu^_k = sum_p r_pk x_p / N_k,  var^_k = sum_p r_pk (x_p - mu^_k)^2 / N_k
    EMA      pi_k <- (1-m) pi_k + m N_k / P,  mu_k <- (1-m) mu_k + m mu^_k,
             var_k <- (1-m) var_k + m var^_k n_k / (n_k - 1),  n_k = N_k^2 / sum_p r_pk^2
    output   y_p = sum_k r_pk (gamma_k * (x_p - mu^_k) / sqrt(var^_k + eps) + beta_k)

The E-step uses the running (previously estimated) statistics, as the paper's Eq. 8 says.  The kernel is
a function on tensors, :func:`lt_zoo.layers.compound_bn_functional.compound_batch_norm` (as
``F.batch_norm`` is for BN); this module owns the parameters and the running state and updates the
state from the batch statistics the function returns.  Numerics (shifted squares, effective sample
size, non-finite batches): docs/compound_bn_numerics.md.

Split path (paper §3.3): inside ``with split_norm(model, targets, num_classes):`` every CBN layer in
train mode normalises the features of images whose class is in group g = floor(y * M / num_classes)
(class 0 = most frequent, so group 0 = head) with component g alone and with that group's batch
mean/variance, and those statistics update component g's running mean and variance.  It is the
compound machinery with R replaced by the one-hot group matrix.

The running state (prior (M,), mean (M, C), var (M, C), num_batches_tracked) lives in fp32 persistent
buffers whatever the module dtype; statistics are computed in fp32 (fp64 for fp64 input) with autocast
off, and the output has the input dtype.
"""
import contextlib
import warnings
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import register_notrace_module

from . import compound_bn_functional as cbf
from . import compound_bn_native as cbn_native

__all__ = ['CompoundBatchNorm2d', 'CBN_OPTIONS', 'DEFAULT_NUM_COMPONENTS', 'split_norm', 'frozen_running_stats', 'convert_bn_to_cbn', 'symmetry_directions',
           'cbn_statistics', 'format_cbn_statistics', 'set_cbn_kernel']

# Model-entrypoint keyword options forwarded to every CompoundBatchNorm2d (plain JSON values).
CBN_OPTIONS = ('num_components', 'momentum', 'eps', 'train_stats', 'combine', 'responsibility_grad',
               'temperature', 'perturbation')
TRAIN_STATS = ('batch', 'running')
COMBINES = ('posterior', 'mn')
# M of every constructor and converter.  The paper's best is 4 (§4 Fig. 5); on the Fashion-MNIST-LT
# benchmark M = 2 measured best of the settings in which the mixture acts (3 seeds: 85.60 +- 0.24 against
# 83.26 +- 1.13 for M = 4), so it is the default from benchmark protocol v4 on (docs/benchmark.md,
# "Decision: the number of components").
DEFAULT_NUM_COMPONENTS = 2
# Fixed seed of the symmetry-breaking directions: a layer's init never depends on the global RNG.
_SYMMETRY_SEED = 20220000
# Kept fp32 by .half()/.to(bf16) (the last two are diagnostics, not state_dict entries).
_FP32_BUFFERS = ('running_prior', 'running_mean', 'running_var', 'last_counts')


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


@register_notrace_module  # a leaf for FX (timm feature_cls='fx'): its forward branches on shapes and state
class CompoundBatchNorm2d(nn.Module):
    """Gaussian-mixture batch norm over the C-dim feature vectors of an (N, C, H, W) map.

    Args:
        num_features: C.
        num_components: M Gaussians (2, ``DEFAULT_NUM_COMPONENTS``: best on the Fashion-MNIST-LT benchmark;
            the paper's best is 4, §4 Fig. 5).
        momentum: m of the moving averages of prior, mean and variance (0.1: BN's default and the
            paper's "three constants all set to 0.1", §4.2); 0 freezes the running state.
        eps: added to variances before the square root, and floor of the running variance in the E-step
            (1e-5, as torch BN).
        train_stats: which statistics normalise in training. 'batch' (default, the natural reading and
            what BN does): the responsibility-weighted batch ("temporary") mean/variance, with gradients
            through them as in BN. 'running': the running statistics as constants (train forward then
            equals the eval forward; the running state is still updated).  'running' trains like BN with
            frozen statistics: no gradient keeps activations normalised, so from scratch at a high
            learning rate it diverges
            (docs/compound_bn_numerics.md#train_statsrunning-cannot-train-from-scratch); meant for
            fine-tuning a converted, already trained network.
        combine: weights of the branch sum (paper Eq. 16). 'posterior' (default): r_pk.
            'mn': r_pk / sqrt(pi_k) as in Mixture Normalization (Kalayeh & Shah, CVPR'19), pi_k the batch
            prior N_k / P under train_stats='batch' in training, else the running prior.
        responsibility_grad: False (default): r is computed under no_grad from the running statistics
            and acts as a constant soft assignment, so the gradient is BN's, per component.  True: the
            gradient also flows through r_pk(x) (running statistics still constant).
        temperature: T in softmax(l / T) (1.0: the plain posterior of Eq. 8).  l sums C terms, so in
            high C the posteriors are close to one-hot; T > 1 softens them.  'channels' sets T = C
            (the per-dimension average log-likelihood; a deviation from the paper).
        perturbation: symmetry breaking (0.1).  Components start with pi = 1/M, var = 1, gamma = 1,
            beta = 0 and running means perturbation * d_k, d_k from :func:`symmetry_directions`
            (unit RMS, centred over k): with identical components every r_pk = 1/M and EM never
            separates them.  The split path also diversifies them.
        device, dtype: of the affine parameters (timm passes both).  The EM buffers are fp32 (fp64 after
            ``.double()``); ``.half()`` / ``.to(torch.bfloat16)`` leave them fp32.

    Parameters: weight (M, C) = gamma_k, bias (M, C) = beta_k.  Buffers (state_dict): running_prior (M,),
    running_mean (M, C), running_var (M, C), num_batches_tracked.  Diagnostics (not in the state_dict;
    :func:`cbn_statistics`): last_counts (M,) N_k of the last training batch, num_batches_skipped.

    Shapes: (N, C, H, W) -> (N, C, H, W) in the input dtype and memory format (channels_last input
    is used as a free (N, C, L) view).  Training needs more than one vector (ValueError, like torch BN).

    Split path: inside :func:`split_norm` the layer (in train mode) normalises each image with the
    component of its class group instead (see there); ``responsibility_grad`` does not apply to it.

    Robustness: a component with N_k <= 1 in a batch (empty, or a single vector) has no usable batch
    variance: it is normalised with its running statistics and its running mean/variance are not
    updated (its prior still moves towards N_k / P).  The running variance gets the unbiasing factor
    n/(n-1) with n the effective sample size N_k^2 / sum_p r_pk^2 (>= N_k, so bounded where
    N_k/(N_k-1) is not; n = P for M = 1, so M = 1 equals BatchNorm2d).  A batch whose statistics are
    not finite (NaN/inf input) updates nothing and is counted in num_batches_skipped;
    :func:`cbn_statistics` warns about it.  The E-step is a max-subtracted softmax of log-densities
    in fp32 with the running variance floored at eps and the prior at the smallest normal float.

    Compilation and export: the forward is torch.compile-clean (no graph breaks) and eval is plain
    tensor ops, so ``torch.jit.trace`` / ``torch.export`` of an eval model work.  TorchScript
    (``torch.jit.script``) is refused with an error naming those alternatives.  In eval the constants
    that depend only on the state (E-step coefficients, folded scale/offset) are computed once and
    reused until a parameter or buffer changes (tracked by tensor version, so optimizer steps,
    load_state_dict and ``.to()`` all invalidate them).

    Distributed: under an initialised torch.distributed with world size > 1, training forwards
    all-reduce the batch sums (N_k, sum r^2, S1 = R^T X, S2 = R^T X^2), autograd-aware where gradients
    flow through them (as SyncBatchNorm does for sum and sum of squares), so batch statistics,
    gradients and running updates are those of the global batch and the running state stays
    identical on every rank.  Not a subclass of torch's ``_BatchNorm``: ``convert_sync_batchnorm``
    would replace it with a plain SyncBatchNorm and drop the mixture silently.
    """

    def __init__(
            self,
            num_features: int,
            num_components: int = DEFAULT_NUM_COMPONENTS,
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
        if train_stats == 'running':
            warnings.warn("CompoundBatchNorm2d(train_stats='running') normalises training batches with lagging "
                          "running statistics and no normalising gradient; trained from scratch it diverges "
                          "(docs/compound_bn_numerics.md). Use it only to fine-tune an already trained or "
                          "converted network; train from scratch with train_stats='batch'.", UserWarning,
                          stacklevel=2)
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
        self.register_buffer('last_counts', torch.empty(num_components, **f32), persistent=False)
        self.register_buffer('num_batches_skipped', torch.tensor(0, dtype=torch.long, device=device),
                             persistent=False)
        # (targets, num_classes) while a split_norm() block is active; plain attribute, not state.
        self._split: Optional[Tuple[torch.Tensor, int]] = None
        self._eval_cache = None  # (tensors, versions, options, FoldedEval)
        # Which formulation computes the layer (compound_bn_functional.KERNELS; 'auto': native C++ on CPU, the
        # pointwise one under torch.compile).  Not a model option: every kernel gives the same results to
        # rounding, so it is a plain attribute, neither a constructor argument nor state.
        self.kernel = 'auto'
        # False: training forwards normalise as usual but leave the running state alone (frozen_running_stats)
        self.update_running = True
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        """pi = 1/M, var = 1, mean = perturbation * d_k (symmetry breaking), counters 0."""
        with torch.no_grad():
            self.running_prior.fill_(1.0 / self.num_components)
            self.running_var.fill_(1.0)
            d = symmetry_directions(self.num_components, self.num_features)
            self.running_mean.copy_(self.perturbation * d)
            self.num_batches_tracked.zero_()
            self.last_counts.zero_()
            self.num_batches_skipped.zero_()

    def _apply(self, fn, recurse=True):
        """Module.to/half/bfloat16 move the EM state but never lower it below fp32 (values kept exactly)."""
        saved = {k: self._buffers[k] for k in _FP32_BUFFERS}
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

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "CompoundBatchNorm2d does not support TorchScript (torch.jit.script): its forward dispatches on "
            "training mode, split_norm and torch.distributed state in Python. Use torch.jit.trace on the model "
            "in eval mode, torch.compile, or torch.export instead.")

    @classmethod
    def from_bn(cls, bn: nn.Module, num_components: int = DEFAULT_NUM_COMPONENTS, perturbation: float = 0.01,
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
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input of shape (N, {self.num_features}, H, W), got {list(x.shape)}")

    def _temperature(self) -> float:
        return float(self.num_features) if self.temperature == 'channels' else float(self.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        sync = _sync_active(self.training)
        if self.training and not sync and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
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
        if not self.training:
            folded = self._cached_eval_constants(x)
            if folded is not None:
                return cbf.compound_norm_eval(x, folded, self.responsibility_grad, self.kernel)
        state = (self.running_prior, self.running_mean, self.running_var)
        if self.training and torch.compiler.is_compiling() and not cbf.compiled_native_train(
                self.kernel, x, self.train_stats, self.responsibility_grad, groups, sync):
            state = _state_copy(*state)  # a graph's backward must not read the buffers (the native op's does not)
        y, stats = cbf.compound_batch_norm(
            x, *state, self.weight, self.bias, self.training,
            self.eps, temperature=self._temperature(), combine=self.combine, train_stats=self.train_stats,
            responsibility_grad=self.responsibility_grad, groups=groups, sync=sync, kernel=self.kernel)
        if stats is not None and self.update_running:
            self._update_running(stats, update_prior=groups is None)
        return y

    def _cached_eval_constants(self, x: torch.Tensor) -> Optional[cbf.FoldedEval]:
        """FoldedEval for the current state, recomputed only when a parameter/buffer changed; None where
        caching does not apply (gradients to the parameters, tracing, compiling: the graph holds the ops)."""
        if (torch.jit.is_tracing() or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (self.weight.requires_grad or self.bias.requires_grad))):
            return None
        buffers, params = self._buffers, self._parameters
        tensors = (buffers['running_prior'], buffers['running_mean'], buffers['running_var'], params['weight'],
                   params['bias'])
        try:  # the version counter moves with every in-place write (optimizer step, load_state_dict)
            stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        except RuntimeError:  # inference tensors have no version counter
            return None
        options = (cbf.compute_dtype(x), self.eps, self.temperature, self.combine)
        cache = self._eval_cache
        if (cache is not None and cache[2] == options and cache[1] == stamp
                and all(a is b for a, b in zip(cache[0], tensors))):
            return cache[3]
        cdt = options[0]
        prior, mean, var = (t if t.dtype == cdt else t.to(cdt) for t in tensors[:3])
        # this refresh runs after every training step that precedes an eval, once per layer: each small
        # cost below is paid ~30 times per network evaluation
        with torch.no_grad():
            folded = cbf.fold_running(prior, mean, var, tensors[3], tensors[4], self.eps, self._temperature(),
                                      self.combine, self.kernel, x if x.dtype == cdt else None)
        self.__dict__['_eval_cache'] = (tensors, stamp, options, folded)  # a plain attribute: skip Module.__setattr__
        return folded

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posteriors r_pk of the E-step (running statistics, temperature applied): (N, C, H, W) -> (N, M, H, W)."""
        self._check_input(x)
        return cbf.responsibilities(x, self.running_prior, self.running_mean, self.running_var, self.eps,
                                    self._temperature())

    @torch.no_grad()
    def _update_running(self, stats: cbf.BatchStats, update_prior: bool) -> None:
        """EMA of prior (if ``update_prior``), and of mean / unbiased variance of active components.

        Masked with torch.where (no host sync, compile-friendly): a non-finite batch changes nothing.
        """
        if (self.kernel in ('auto', 'native') and stats.counts.device.type == 'cpu'
                and not torch.compiler.is_compiling() and cbn_native.available()
                and cbn_native.running_update(self.running_prior, self.running_mean, self.running_var,
                                              self.last_counts, self.num_batches_tracked, self.num_batches_skipped,
                                              stats, self.momentum, cbf.MIN_COUNT, update_prior)):
            return  # one native call (the same formulas as below) instead of ~40 small torch ops
        m, ok = self.momentum, stats.finite
        counts = stats.counts
        active = (counts > cbf.MIN_COUNT) & ok
        if update_prior:
            prior = (1 - m) * self.running_prior.to(counts.dtype) + m * counts / counts.sum()
            self.running_prior.copy_(torch.where(ok, prior / prior.sum(), self.running_prior.to(counts.dtype)))
        n_eff = torch.where(active, stats.n_eff, torch.full_like(counts, 2.0))
        unbias = (n_eff / (n_eff - 1)).unsqueeze(1)
        act = active.unsqueeze(1)
        mean = self.running_mean.to(counts.dtype)
        var = self.running_var.to(counts.dtype)
        self.running_mean.copy_(torch.where(act, (1 - m) * mean + m * stats.mean, mean))
        self.running_var.copy_(torch.where(act, (1 - m) * var + m * stats.var * unbias, var))
        self.last_counts.copy_(torch.where(ok, counts, self.last_counts.to(counts.dtype)))
        self.num_batches_tracked.add_(ok.long())
        self.num_batches_skipped.add_((~ok).long())


@torch.library.custom_op('lt_zoo::cbn_state_copy', mutates_args=())
def _state_copy(prior: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of the running state that a compiled training graph saves for its backward.

    The partitioner of torch.compile may save a graph input (the running buffer) instead of the values
    derived from it and recompute them in the backward; the buffer is then read after this forward's,
    and any later forward's, in-place update (the dual path runs the network several times before one
    backward: wrong values, or autograd's "modified by an inplace operation").  A custom op is opaque
    to it, so its outputs are saved instead.  Eager autograd saves fresh tensors and does not need this.
    """
    return prior.clone(), mean.clone(), var.clone()


@_state_copy.register_fake
def _(prior, mean, var):
    return torch.empty_like(prior), torch.empty_like(mean), torch.empty_like(var)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def set_cbn_kernel(model: nn.Module, kernel: str) -> int:
    """Set the ``kernel`` attribute of every CompoundBatchNorm2d of ``model`` (compound_bn_functional.KERNELS;
    the formulations agree to rounding, docs/compound_bn_numerics.md#decision-kernel); returns how many."""
    cbf.check_kernel(kernel)
    layers = [m for m in model.modules() if isinstance(m, CompoundBatchNorm2d)]
    for m in layers:
        m.kernel = kernel
    return len(layers)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module, frozen: bool = True) -> Iterator[nn.Module]:
    """Within the block (if ``frozen``), training forwards of every CompoundBatchNorm2d of ``model`` use
    batch statistics as usual but do not update the running prior, mean and variance.

    The dual path runs up to four forwards per step; this picks which of them update the running state
    (``dual_stat_updates``, docs/compound_bn.md).  Nested blocks restore the outer setting on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, CompoundBatchNorm2d)]
    saved = [m.update_running for m in layers]
    for m in layers:
        m.update_running = not frozen and m.update_running
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.update_running = s


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


def convert_bn_to_cbn(model: nn.Module, num_components: int = DEFAULT_NUM_COMPONENTS, perturbation: float = 0.01,
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


# A component whose running prior is below this fraction of the uniform 1/M counts as starving.
_STARVING_FRACTION = 0.01


def cbn_statistics(model: nn.Module) -> Dict[str, dict]:
    """Readable mixture state of every CompoundBatchNorm2d of ``model``: layer name -> dict.

    Per layer: 'prior' (M running priors), 'min_prior', 'starving' (components with prior <
    0.01 / M: a collapse in progress), 'active' (components with N_k > 1 in the last training batch,
    i.e. normalised with batch statistics; None before the first batch), 'components' (M),
    'min_var' / 'max_var' (running variance), 'batches' (num_batches_tracked) and 'skipped_batches'
    (non-finite batches that updated nothing; a warning is issued when it is non-zero).  Plain
    floats/ints (JSON-serialisable); one host sync per layer, meant for once per epoch.
    """
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, CompoundBatchNorm2d):
            continue
        prior = m.running_prior.detach().double().cpu()
        var = m.running_var.detach().double().cpu()
        seen = int(m.num_batches_tracked) > 0
        skipped = int(m.num_batches_skipped)
        if skipped:
            warnings.warn(f"CompoundBatchNorm2d {name or '<model>'}: {skipped} training batch(es) had non-finite "
                          f"statistics (NaN/inf input) and were skipped; the running state is intact")
        out[name or '<model>'] = {
            'prior': [float(p) for p in prior], 'min_prior': float(prior.min()),
            'starving': int((prior < _STARVING_FRACTION / m.num_components).sum()),
            'active': int((m.last_counts > cbf.MIN_COUNT).sum()) if seen else None,
            'components': m.num_components, 'min_var': float(var.min()), 'max_var': float(var.max()),
            'batches': int(m.num_batches_tracked), 'skipped_batches': skipped,
        }
    return out


def format_cbn_statistics(stats: Dict[str, dict]) -> str:
    """One line summarising :func:`cbn_statistics`: weakest prior, active/starving components, skips."""
    if not stats:
        return 'cbn: no CompoundBatchNorm2d layers'
    weakest = min(stats, key=lambda k: stats[k]['min_prior'])
    total = sum(s['components'] for s in stats.values())
    active = [s['active'] for s in stats.values() if s['active'] is not None]
    active_txt = f"{sum(active)}/{total}" if len(active) == len(stats) else 'n/a (no training batch yet)'
    return (f"cbn: {len(stats)} layers, min prior {stats[weakest]['min_prior']:.3g} ({weakest}), "
            f"active {active_txt}, starving {sum(s['starving'] for s in stats.values())}, "
            f"skipped batches {sum(s['skipped_batches'] for s in stats.values())}")
