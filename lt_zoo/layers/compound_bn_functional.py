"""Compound Batch Normalization as a function on tensors, as ``F.batch_norm`` is for BN (no module state).

:func:`compound_batch_norm` takes the map x (N, C, H, W), the running state (prior (M,), mean (M, C),
var (M, C)) and the affine parameters (M, C) and returns the output and, in training, the batch
statistics (:class:`BatchStats`); it never writes the running state, the caller (the module) does.
Math (Cheng et al., ACM MM 2022, Eq. 7-16; docs/compound_bn.md, docs/compound_bn_numerics.md):

    E-step   l_pk = log pi_k - 1/2 sum_c [log var_kc + (x_pc - mu_kc)^2 / var_kc],   r_pk = softmax_k(l_pk / T)
    M-step   N_k = sum_p r_pk,  mu^_k = sum_p r_pk x_p / N_k,  var^_k = sum_p r_pk (x_p - mu^_k)^2 / N_k
    output   y_p = sum_k r_pk c_k (A_k x_p + B_k),  A_k = gamma_k / sqrt(var_k + eps),  B_k = beta_k - A_k mu_k

with c_k = 1 ('posterior') or pi_k^-1/2 ('mn').  Layout: one strategy for both memory formats.  X is
``x.flatten(2)``, an (N, C, L) view (L = H*W) for contiguous *and* channels_last maps (then its strides
are (LC, 1, C)); the responsibilities R are (N, M, L) (per image, (N, M, 1), on the split path).  Every
reduction and expansion is a batched GEMM with M on one side; nothing of size P x M x C exists.  On CPU
the same steps run as one C++ pass each (compound_bn_native) where the library is built: see KERNELS.  Squares
are taken of x - s with a constant shift s near the data (the mixture mean in eval, a detached batch
mean in training), so E[(x-s)^2] - E[x-s]^2 does not cancel when |mean| >> std.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import compound_bn_native as _native
from . import compound_bn_ops as _ops
from . import compound_bn_triton as _triton

__all__ = ['BatchStats', 'FoldedEval', 'compound_batch_norm', 'estep_coefficients', 'fold_running',
           'compound_norm_eval', 'responsibilities', 'check_kernel']

# A component needs more than one (soft) vector for a variance: at or below this it is inactive this batch.
MIN_COUNT = 1.0
# Responsibilities below this are set to 0: irrelevant, and subnormal floats are slow on CPUs.
_R_FLOOR = 1e-30
# Three formulations of the same math (equal to float64 rounding, tests/test_compound_bn_kernels.py):
# 'gemm': every sum over C or M is a batched GEMM with M on one side and the backward is analytic, so
#   eager never holds an M x map-sized temporary; 'pointwise': per-component broadcasts of the 4-D map and
#   sums of BN's shape, differentiated by autograd; eager would materialise them, but torch.compile fuses
#   them into a few loops over the map (BN's memory traffic; GEMMs with an inner dimension of M stay
#   library calls).
# 'native': the map-sized steps of 'gemm' as one C++ pass each (compound_bn_native; CPU float32/float64,
#   built on first use), with the same analytic backward; where a step needs autograd through the map
#   (responsibility_grad, train_stats='running' with gradients) it uses 'gemm'.
# 'auto' picks 'native' where it is built and takes the map, else 'gemm'.  While torch.compile traces, 'auto'
# and 'native' call the native passes as custom ops on CPU (compound_bn_ops: the analytic training forward
# without DDP, eval without gradients) and trace 'pointwise' elsewhere (CUDA, DDP, autograd through r);
# under torch.jit.trace they run 'gemm'.
# 'triton': the map-sized steps of 'gemm' as Triton kernels on CUDA maps (compound_bn_triton: three passes
#   forward, two backward, float32/bf16/fp16 maps with float32 sums), the (M, C) statistics between them as
#   torch ops, the same analytic backward; eager and compiled alike (the passes are custom ops), and under
#   DDP (the sums are all-reduced between the passes).  Opt-in until a GPU has measured it.
KERNELS = ('auto', 'gemm', 'pointwise', 'native', 'triton')


class BatchStats(NamedTuple):
    """Batch ("temporary") statistics of one training forward (global under DDP), no gradient."""
    counts: torch.Tensor  # (M,) N_k = sum_p r_pk
    n_eff: torch.Tensor  # (M,) effective sample size N_k^2 / sum_p r_pk^2 (Kish), >= N_k
    mean: torch.Tensor  # (M, C) mu^_k
    var: torch.Tensor  # (M, C) biased var^_k
    finite: torch.Tensor  # () bool: every statistic is finite (False: the batch held NaN/inf)


class FoldedEval(NamedTuple):
    """Everything eval needs that depends only on the running state and the affine parameters, in
    coordinates x - s (raw coordinates lose ~3 digits of the output at |mean| = 1000 std)."""
    shift: torch.Tensor  # (C,) mixture mean s
    w1: torch.Tensor  # (M, C) E-step weights of x - s
    w2: torch.Tensor  # (M, C) E-step weights of (x - s)^2
    const: torch.Tensor  # (M,)
    scale: torch.Tensor  # (M, C) c_k A_k
    offset: torch.Tensor  # (M, C) c_k (beta_k - A_k (mu_k - s))


def _pointwise(kernel: str) -> bool:
    """'pointwise' itself, and what torch.compile traces for 'auto' and 'native' (no trace sees into C++)."""
    return kernel == 'pointwise' or (kernel in ('auto', 'native') and torch.compiler.is_compiling())


def _compiled_native(kernel: str, x: torch.Tensor) -> bool:
    """Under torch.compile on CPU, 'auto' and 'native' call the native passes as custom ops (compound_bn_ops)
    where they apply: the analytic training forward without DDP, and eval without gradients."""
    return kernel in ('auto', 'native') and torch.compiler.is_compiling() and _ops.applies(x)


def compiled_native_train(kernel: str, x: torch.Tensor, train_stats: str, responsibility_grad: bool,
                          groups: Optional[torch.Tensor], sync: bool) -> bool:
    """Whether a compiled training forward runs as the native custom op ``lt_zoo::cbn_native_train``, whose
    backward reads only its own outputs, never the running state (batch statistics, r constant, no DDP)."""
    return (train_stats == 'batch' and not (responsibility_grad and groups is None) and not sync
            and _compiled_native(kernel, x))


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _use_native(kernel: str, xc4: torch.Tensor) -> bool:
    """Whether the GEMM formulation's map-sized steps run in the native kernel (``xc4`` in standard layout)."""
    if torch.jit.is_tracing():  # a TorchScript trace would not record the C++ passes
        return False
    if kernel == 'native':
        if not _native.supports(xc4):
            raise ValueError(f"kernel='native' needs a CPU float32/float64 map, got {xc4.dtype} on {xc4.device}")
        if not _native.available():
            raise RuntimeError("kernel='native': the native CPU kernel could not be built or is turned off "
                               "(LT_ZOO_NATIVE=0); use kernel='auto' or 'gemm'")
        return True
    return kernel == 'auto' and _native.supports(xc4) and _native.available()


def _use_triton(kernel: str, x: torch.Tensor) -> bool:
    """Whether the map-sized steps run as Triton kernels: kernel='triton', which refuses a map they cannot
    take (checked on entry, before any work, even where a step then needs autograd and runs 'gemm')."""
    if kernel != 'triton':
        return False
    if not _triton.supports(x):
        raise ValueError(f"kernel='triton': {_triton.why_not(x)}")
    return True


def _passes_for(kernel: str, x: torch.Tensor, shift: torch.Tensor, allowed: bool):
    """(map, shift to subtract or None, passes) for the non-pointwise kernels; passes: 'native' or 'triton'
    (the map-sized steps in compound_bn_native / compound_bn_triton, which subtract the shift in their tiles:
    the raw map, no shifted copy) or 'gemm' (x - s in a standard layout and the compute dtype, bf16/fp16
    promoted, which the native passes may still take).  ``allowed``: no autograd through the map needed."""
    if allowed and _use_triton(kernel, x):
        return x, shift, 'triton'
    if allowed and x.dtype == shift.dtype and _native.supports(x) and _use_native(kernel, x):
        return x, shift, 'native'
    xc4 = _standard_layout(torch.sub(x, shift.view(1, -1, 1, 1)))
    return xc4, None, 'native' if allowed and _use_native(kernel, xc4) else 'gemm'


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics are fp32 (fp64 for fp64 input) whatever the activation dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def estep_coefficients(prior, mean_rel, var, eps: float, temperature: float):
    """l_pk / T = (x-s)^2_p . w2_k + (x-s)_p . w1_k + const_k, mean_rel = mu - s.

    var is floored at eps and the prior at the smallest normal float; -C/2 log 2 pi cancels in the softmax.
    """
    var = var.clamp_min(eps)
    ivar = var.reciprocal()
    w1 = mean_rel * ivar
    const = prior.clamp_min(torch.finfo(var.dtype).tiny).log() - 0.5 * (var.log().sum(1) + (mean_rel * w1).sum(1))
    if temperature == 1.0:
        return w1, ivar * -0.5, const
    return w1 / temperature, ivar * (-0.5 / temperature), const / temperature


def _posteriors(X, X2, coef) -> torch.Tensor:
    """softmax_k over (N, M, L) logits; two batched GEMMs (M x C)(C x L), max-subtracted (never exp of a sum)."""
    w1, w2, const = coef
    n = X.shape[0]
    logits = torch.baddbmm(const.view(1, -1, 1), w1.expand(n, -1, -1), X).baddbmm_(w2.expand(n, -1, -1), X2)
    R = torch.softmax(logits, 1)
    return R if R.requires_grad else F.threshold_(R, _R_FLOOR, 0.0)


def _channels_fastest(X: torch.Tensor) -> bool:
    return X.stride(1) == 1 and X.shape[2] > 1


def _expand(R, coef, cl: bool, out=None) -> torch.Tensor:
    """sum_k R[n, k, l] coef[k, c] as (N, C, L) in the map's layout ((N, C, 1) for per-image R)."""
    if cl and R.shape[2] > 1:
        return torch.matmul(R.transpose(1, 2), coef, out=None if out is None else out.transpose(1, 2)).transpose(1, 2)
    return torch.matmul(coef.t(), R, out=out)


def _scale_into(out, R, coef, Y, cl: bool) -> torch.Tensor:
    """out = Y * (R coef), no autograd; ``out`` is a free (N, C, L) buffer in Y's layout."""
    if R.shape[2] == 1:
        return torch.mul(Y, _expand(R, coef, cl), out=out)
    return _expand(R, coef, cl, out=out).mul_(Y)


def _add_into(out, R, coef, cl: bool) -> torch.Tensor:
    """out += R coef, no autograd."""
    if R.shape[2] == 1:
        return out.add_(_expand(R, coef, cl))
    n = R.shape[0]
    if cl:
        out.transpose(1, 2).baddbmm_(R.transpose(1, 2), coef.expand(n, -1, -1))
    else:
        out.baddbmm_(coef.t().expand(n, -1, -1), R)
    return out


def _moments(R, Y) -> torch.Tensor:
    """sum_p r_pk y_p, (M, C)."""
    if R.shape[2] == 1:
        return R[:, :, 0].t() @ Y.sum(2)
    return torch.bmm(R, Y.transpose(1, 2)).sum(0)


def _to4(t, h: int, w: int) -> torch.Tensor:
    return t.unflatten(2, (h, w)) if t.shape[2] > 1 else t.unsqueeze(3)


def _cview(t: torch.Tensor) -> torch.Tensor:
    """A (C,) coefficient row broadcasting against an (N, C, H, W) map."""
    return t.view(1, -1, 1, 1)


# The pointwise formulation keeps every map-sized tensor 4-D and writes each sum over components as a
# Python sum of M terms.  Every reduction then has the shape of BN's statistics (over (N, H, W) per
# channel) or of a sum over C per position, and the M moment sums can share one loop over the map.  The
# earlier formulation, one 5-D broadcast reduced over its position axes, compiled to a training step of
# 9.6x BN's on an H200 (docs/compound_bn_numerics.md#compiled-on-a-gpu: the diagnosis and its status).
def _pointwise_posteriors(xc4, coef) -> Tuple[torch.Tensor, ...]:
    """softmax_k of l_pk / T as M maps (N, 1, H, W): one sum over channels per component, max-subtracted."""
    w1, w2, const = coef
    logits = [(xc4 * (_cview(w1[k]) + xc4 * _cview(w2[k]))).sum(1, keepdim=True) + const[k]
              for k in range(w1.shape[0])]
    top = logits[0]
    for lk in logits[1:]:
        top = torch.maximum(top, lk)
    e = [torch.exp(lk - top) for lk in logits]
    total = e[0]
    for ek in e[1:]:
        total = total + ek
    R = [ek / total for ek in e]
    return tuple(r if r.requires_grad else F.threshold(r, _R_FLOOR, 0.0) for r in R)


def _pointwise_groups(groups, m: int, xc4) -> Tuple[torch.Tensor, ...]:
    """The split path's one-hot group of each image as M responsibility maps (N, 1, 1, 1)."""
    return tuple((groups == k).to(xc4.dtype).view(-1, 1, 1, 1) for k in range(m))


def _pointwise_sums(R, xc4) -> torch.Tensor:
    """_batch_sums as broadcasts and sums: (M, 2 + 2C); R per position or per image (split path)."""
    rep = (xc4.shape[2] * xc4.shape[3]) // (R[0].shape[2] * R[0].shape[3])  # H*W when R holds one weight per image
    sq = xc4 * xc4
    rows = [torch.cat([(r.sum() * rep).view(1), ((r * r).sum() * rep).view(1), (r * xc4).sum((0, 2, 3)),
                       (r * sq).sum((0, 2, 3))]) for r in R]
    return torch.stack(rows)


def _pointwise_mix(R, scale, offset, xc4) -> torch.Tensor:
    """y = sum_k r_pk (scale_k (x_p - s) + offset_k) as (N, C, H, W) in the map's layout."""
    y = None
    for k, r in enumerate(R):
        term = r * torch.addcmul(_cview(offset[k]), xc4, _cview(scale[k]))
        y = term if y is None else y + term
    return y.contiguous(memory_format=torch.channels_last) if _channels_fastest(xc4.flatten(2)) else y.contiguous()


def _mix(R, scale, offset, xc4, out4: Optional[torch.Tensor]) -> torch.Tensor:
    """y = X * (R scale) + R offset per vector, as a 4-D tensor in x's layout (never a view: in-place
    ReLU downstream then needs no CopySlices).  ``out4``: a free buffer to write into (no autograd)."""
    h, w = xc4.shape[2:]
    X = xc4.flatten(2)
    cl = _channels_fastest(X)
    if out4 is None:
        return torch.addcmul(_to4(_expand(R, offset, cl), h, w), xc4, _to4(_expand(R, scale, cl), h, w))
    out = out4.flatten(2)
    _scale_into(out, R, scale, X, cl)
    _add_into(out, R, offset, cl)
    return out4


def _needs_graph(*tensors) -> bool:
    """Out-of-place ops (autograd, or a trace: its graph must not depend on the grad mode) vs in-place."""
    return torch.jit.is_tracing() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _standard_layout(t: torch.Tensor) -> torch.Tensor:
    """t itself if contiguous or channels_last-contiguous (flatten(2) is then a view), else a copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _affine(weight, bias, mean_rel, var, eps: float, cw: Optional[torch.Tensor]):
    """Branch k as A_k (x - s) + B_k, times c_k; also 1 / sqrt(var + eps)."""
    inv = torch.rsqrt(var + eps)
    scale = weight.to(inv.dtype) * inv
    offset = bias.to(inv.dtype) - scale * mean_rel
    if cw is not None:
        return scale * cw.unsqueeze(1), offset * cw.unsqueeze(1), inv
    return scale, offset, inv


def _mn_weights(prior) -> torch.Tensor:
    """c_k = pi_k^-1/2 (Mixture Normalization, Kalayeh & Shah, CVPR'19)."""
    return prior.clamp_min(torch.finfo(prior.dtype).tiny).rsqrt()


def fold_running(prior, mean, var, weight, bias, eps: float, temperature: float, combine: str,
                 kernel: str = 'gemm', like: Optional[torch.Tensor] = None) -> FoldedEval:
    """Eval constants from the running state (compute dtype): shift, E-step coefficients, scale, offset.
    With a native ``kernel`` and the map ``like`` it takes, one native call computes them (no autograd)."""
    if like is not None and not _needs_graph(weight, bias) and _use_native(kernel, like):
        return FoldedEval(*_native.fold(prior, mean, var, weight, bias, eps, temperature, combine == 'mn', like))
    shift = (prior / prior.sum()) @ mean
    mean_rel = mean - shift
    w1, w2, const = estep_coefficients(prior, mean_rel, var, eps, temperature)
    scale, offset, _ = _affine(weight, bias, mean_rel, var, eps, _mn_weights(prior) if combine == 'mn' else None)
    return FoldedEval(shift, w1, w2, const, scale, offset)


def compound_norm_eval(x: torch.Tensor, f: FoldedEval, responsibility_grad: bool = False,
                       kernel: str = 'auto') -> torch.Tensor:
    """Inference forward from folded constants; r is a constant unless ``responsibility_grad``.
    GEMM kernel: two map-sized buffers, x - s and (x - s)^2, which then receives the output."""
    check_kernel(kernel)
    _use_triton(kernel, x)
    if _compiled_native(kernel, x) and not _needs_graph(x, f.scale, f.offset, f.w1, f.w2):
        return _ops.eval_forward(x, f.w1, f.w2, f.const, f.scale, f.offset, f.shift)
    if not _needs_graph(x, f.scale, f.offset, f.w1, f.w2) and _use_triton(kernel, x):
        return _triton.folded_eval(x, (f.w1, f.w2, f.const), f.scale, f.offset, f.shift)
    if _pointwise(kernel):
        xc4 = torch.sub(x, f.shift.view(1, -1, 1, 1))
        with torch.set_grad_enabled(responsibility_grad and torch.is_grad_enabled()):
            R = _pointwise_posteriors(xc4, (f.w1, f.w2, f.const))
        return _pointwise_mix(R, f.scale, f.offset, xc4).to(x.dtype)
    xc4, pass_shift, passes = _passes_for(kernel, x, f.shift,
                                          allowed=not _needs_graph(x, f.scale, f.offset, f.w1, f.w2))
    if passes == 'native':
        out = _native.folded_eval(xc4, (f.w1, f.w2, f.const), f.scale, f.offset, pass_shift)
        return out if out.dtype == x.dtype else out.to(x.dtype)  # .to costs a dispatch even when a no-op
    with torch.set_grad_enabled(responsibility_grad and torch.is_grad_enabled()):
        sq4 = xc4 * xc4
        R = _posteriors(xc4.flatten(2), sq4.flatten(2), (f.w1, f.w2, f.const))
    return _mix(R, f.scale, f.offset, xc4, None if _needs_graph(xc4, f.scale, f.offset) else sq4).to(x.dtype)


def responsibilities(x, prior, mean, var, eps: float, temperature: float) -> torch.Tensor:
    """Posteriors r_pk under the given state: (N, C, H, W) -> (N, M, H, W)."""
    n, c, h, w = x.shape
    cdt = compute_dtype(x)
    prior, mean, var = prior.to(cdt), mean.to(cdt), var.to(cdt)
    shift = (prior / prior.sum()) @ mean
    X = torch.sub(x, shift.view(1, c, 1, 1)).reshape(n, c, h * w)
    return _posteriors(X, X * X, estep_coefficients(prior, mean - shift, var, eps, temperature)).view(n, -1, h, w)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:  # autograd-aware, as SyncBatchNorm's sum / sum of squares
        import torch.distributed.nn.functional as dist_fn
        return dist_fn.all_reduce(t)
    dist.all_reduce(t)
    return t


def _batch_sums(R, X, X2) -> torch.Tensor:
    """(M, 2 + 2C): [N_k, sum_p r_pk^2, S1 = sum_p r_pk x_p, S2 = sum_p r_pk x_p^2] (x relative to s)."""
    if R.shape[2] == 1:  # one weight per image: reduce over positions first
        r, hw = R[:, :, 0], X.shape[2]
        sq = X2.sum(2) if X2 is not None else torch.linalg.vector_norm(X, dim=2).square()
        return torch.cat([(r.sum(0) * hw).unsqueeze(1), ((r * r).sum(0) * hw).unsqueeze(1),
                          r.t() @ X.sum(2), r.t() @ sq], 1)
    return torch.cat([R.sum((0, 2)).unsqueeze(1), (R * R).sum((0, 2)).unsqueeze(1),
                      _moments(R, X), _moments(R, X2)], 1)


def _train_forward(xc4, weight, bias, prior, mean_rel, var, groups, eps: float, temperature: float,
                   combine: str, use_batch: bool, responsibility_grad: bool, sync: bool, pointwise: bool = False,
                   passes: str = 'gemm', shift: Optional[torch.Tensor] = None):
    """One training forward in shifted coordinates: (y4, stats relative to s, saved tensors for backward).
    ``passes`` 'native' / 'triton': the map-sized steps in that kernel (no autograd through them); with
    ``shift``, xc4 is the raw map and the passes subtract the shift themselves."""
    c = xc4.shape[1]
    X = xc4.flatten(2) if passes == 'gemm' and not pointwise else None
    X2 = sq4 = None
    if passes == 'native':
        coef = _native.coefficients(prior, mean_rel, var, eps, temperature, xc4) if groups is None else None
        R, sums = _native.estep_moments(xc4, prior.shape[0], coef, groups, shift)
        if sync:
            sums = _all_reduce(sums)
        counts, n_eff, safe, mask, finite, bmean, bvar, scale, offset, inv, mean_used = _native.batch_affine(
            sums, prior, mean_rel, var, weight, bias, eps, MIN_COUNT, use_batch, combine == 'mn' and groups is None)
        stats = BatchStats(counts, n_eff, bmean, bvar, finite > 0)
        cw = _mn_weights(counts / counts.sum() if use_batch else prior) if combine == 'mn' and groups is None else None
        y4 = _native.combine(xc4, None, R, scale, None, offset, shift)
        return y4, stats, (R, cw, inv, mean_used, safe, mask if use_batch else None)
    elif passes == 'triton':
        coef = estep_coefficients(prior, mean_rel, var, eps, temperature) if groups is None else None
        R, sums = _triton.estep_moments(xc4, prior.shape[0], coef, groups, shift)
    elif pointwise:
        if groups is None:
            with torch.set_grad_enabled(responsibility_grad and torch.is_grad_enabled()):
                R = _pointwise_posteriors(xc4, estep_coefficients(prior, mean_rel, var, eps, temperature))
        else:
            R = _pointwise_groups(groups, prior.shape[0], xc4)
        sums = _pointwise_sums(R, xc4)
    elif groups is None:
        with torch.set_grad_enabled(responsibility_grad and torch.is_grad_enabled()):
            sq4 = xc4 * xc4
            X2 = sq4.flatten(2)
            R = _posteriors(X, X2, estep_coefficients(prior, mean_rel, var, eps, temperature))
    else:  # split path: the one-hot group of each image
        R = F.one_hot(groups, prior.shape[0]).to(X.dtype).unsqueeze(2)
    if X is not None:
        sums = _batch_sums(R, X, X2)
    if sync:
        sums = _all_reduce(sums)
    counts, sumsq, s1, s2 = sums[:, 0], sums[:, 1], sums[:, 2:c + 2], sums[:, c + 2:]
    active = counts.detach() > MIN_COUNT
    safe = torch.where(active, counts, torch.ones_like(counts)).unsqueeze(1)
    bmean = s1 / safe
    bvar = (s2 / safe - bmean * bmean).clamp_min(0)
    stats = BatchStats(counts.detach(), (counts * counts / sumsq.clamp_min(torch.finfo(sumsq.dtype).tiny)).detach(),
                       bmean.detach(), bvar.detach(), torch.isfinite(sums.detach()).all())
    mask = None
    if use_batch:
        mask = active.unsqueeze(1)
        mean_rel, var = torch.where(mask, bmean, mean_rel), torch.where(mask, bvar, var)
        prior = counts / counts.sum()
    cw = _mn_weights(prior) if combine == 'mn' and groups is None else None
    scale, offset, inv = _affine(weight, bias, mean_rel, var, eps, cw)
    if pointwise:
        return _pointwise_mix(R, scale, offset, xc4), stats, None
    if passes == 'triton':
        return _triton.combine(xc4, None, R, scale, None, offset, shift), stats, (R, cw, inv, mean_rel, safe, mask)
    graph = _needs_graph(xc4, scale, offset)
    if sq4 is None and not graph:
        sq4 = torch.empty_like(xc4)
    y4 = _mix(R, scale, offset, xc4, None if graph else sq4)
    return y4, stats, (R, cw, inv, mean_rel, safe, mask)


class _ConstantAssignmentNorm(torch.autograd.Function):
    """Training forward with batch statistics and r held constant, with a BN-style analytic backward.

    For y_p = sum_k w_pk (A_k (x_p - mu_k) + beta_k), w_pk = c_k r_pk, A_k = gamma_k / s_k, batch
    mu_k = sum_p r_pk x_p / N_k, var_k = sum_p r_pk (x_p - mu_k)^2 / N_k, G_k = sum_p w_pk g_p,
    H_k = sum_p w_pk g_p x_p:
        dbeta_k = G_k,   dgamma_k = (H_k - mu_k G_k) / s_k,
        dx_p = g_p (W A)_p + x_p (R U)_p + (R V)_p,
        U_k = -gamma_k (H_k - mu_k G_k) / (s_k^3 N_k),   V_k = -A_k G_k / N_k - U_k mu_k
    (U = V = 0 for inactive components, normalised with running statistics).  Under DDP, G and
    H - mu G are all-reduced for dx (as SyncBatchNorm does); dgamma, dbeta stay local (DDP reduces them).
    """

    @staticmethod
    def forward(ctx, xc4, weight, bias, prior, mean_rel, var, groups, eps, temperature, combine, sync, passes, shift):
        y4, stats, (R, cw, inv, mean_used, safe, mask) = _train_forward(
            xc4, weight, bias, prior, mean_rel, var, groups, eps, temperature, combine, True, False, sync,
            passes=passes, shift=shift)
        ctx.sync, ctx.passes, ctx.shift = sync, passes, shift
        ctx.save_for_backward(xc4, R, cw, weight, inv, mean_used, safe, mask)
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)  # the statistics have no gradient: no zero tensors made for them
        return (y4,) + tuple(stats)

    @staticmethod
    def backward(ctx, gy, *unused):
        xc4, R, cw, weight, inv, mean, safe, mask = ctx.saved_tensors
        if gy is None:  # the output did not reach the loss (gradients are not materialised)
            return (None,) * 13
        if ctx.passes == 'native':
            gk, hk = _native.grad_moments(xc4, gy, R, ctx.shift)
            if not ctx.sync:
                dweight, dbias, u, wa, v = _native.backward_coefficients(gk, hk, cw, mean, inv, weight, safe, mask)
                dx = _native.combine(xc4, gy, R, u, wa, v, ctx.shift) if ctx.needs_input_grad[0] else None
                dweight = dweight.to(weight.dtype) if ctx.needs_input_grad[1] else None
                dbias = dbias.to(weight.dtype) if ctx.needs_input_grad[2] else None
                return dx, dweight, dbias, None, None, None, None, None, None, None, None, None, None
            mask = mask > 0  # the native forward's mask is 1/0 in the map's dtype
        elif ctx.passes == 'triton':
            gk, hk = _triton.grad_moments(xc4, gy, R, ctx.shift)
        else:
            X, G = xc4.flatten(2), gy.flatten(2)
            cl = _channels_fastest(X)
            gx4 = torch.mul(gy, xc4, out=torch.empty_like(xc4))  # xc4's layout, so flatten(2) is a view
            gX = gx4.flatten(2)
            gk, hk = _moments(R, G), _moments(R, gX)
        if cw is not None:
            gk, hk = gk * cw.unsqueeze(1), hk * cw.unsqueeze(1)
        gdiff = hk - mean * gk
        dweight = (gdiff * inv).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = gk.to(weight.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.sync:
                packed = torch.cat([gk, gdiff], 1)
                dist.all_reduce(packed)
                gk, gdiff = packed.chunk(2, 1)
            scale = weight.to(inv.dtype) * inv
            zero = torch.zeros_like(gk)
            u = torch.where(mask, -weight.to(inv.dtype) * inv.pow(3) * gdiff / safe, zero)
            v = torch.where(mask, -scale * gk / safe, zero) - u * mean
            if ctx.passes != 'gemm':
                passes = _native if ctx.passes == 'native' else _triton
                dx = passes.combine(xc4, gy, R, u, scale if cw is None else scale * cw.unsqueeze(1), v, ctx.shift)
                return dx, dweight, dbias, None, None, None, None, None, None, None, None, None, None
            _scale_into(gX, R, scale if cw is None else scale * cw.unsqueeze(1), G, cl)
            gX.addcmul_(_expand(R, u, cl), X)
            _add_into(gX, R, v, cl)
            dx = gx4
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None, None


class _FusedNativeNorm(torch.autograd.Function):
    """_ConstantAssignmentNorm (the same math and backward) as one native call per direction, not under
    DDP: compound_bn_native.train_forward and train_backward.  Outputs: y and the statistics buffer."""

    @staticmethod
    def forward(ctx, x, weight, bias, prior, mean, var, groups, eps, temperature, mn):
        y, R, buf = _native.train_forward(x, prior, mean, var, weight, bias, groups, eps, temperature, MIN_COUNT,
                                          True, mn)
        ctx.mn = mn
        ctx.save_for_backward(x, R, weight, buf)
        ctx.mark_non_differentiable(buf)
        ctx.set_materialize_grads(False)
        return y, buf

    @staticmethod
    def backward(ctx, gy, unused):
        if gy is None:
            return (None,) * 10
        x, R, weight, buf = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dwb = _native.train_backward(x, gy, R, weight, buf, ctx.mn, need[0])
        if dwb.dtype != weight.dtype:
            dwb = dwb.to(weight.dtype)
        dweight, dbias = (dwb[0] if need[1] else None), (dwb[1] if need[2] else None)
        return dx, dweight, dbias, None, None, None, None, None, None, None


def batch_shift(x: torch.Tensor, sync: bool) -> torch.Tensor:
    """(C,) detached shift near the batch: the mean of the N vectors at the map's centre.

    Any s within a few std of the data removes the cancellation of E[(x-s)^2] - E[x-s]^2; this one
    costs O(NC) instead of a pass over the map.  Under DDP it is averaged over ranks (all must agree).
    """
    with torch.no_grad():
        s = x[:, :, x.shape[2] // 2, x.shape[3] // 2].to(compute_dtype(x)).mean(0)
        if sync:
            dist.all_reduce(s)
            s = s / dist.get_world_size()
    return s


def compound_batch_norm(
        x: torch.Tensor, running_prior: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
        weight: torch.Tensor, bias: torch.Tensor, training: bool, eps: float = 1e-5, *,
        temperature: float = 1.0, combine: str = 'posterior', train_stats: str = 'batch',
        responsibility_grad: bool = False, groups: Optional[torch.Tensor] = None, sync: bool = False,
        kernel: str = 'auto',
) -> Tuple[torch.Tensor, Optional[BatchStats]]:
    """CBN of an (N, C, H, W) map: (output in x's dtype and layout, BatchStats in training else None).

    The running tensors are read, never written.  ``groups`` (N,) int64: the split path (image n
    normalised by component groups[n] with that group's batch statistics; training only).  ``sync``:
    all-reduce the batch sums over the initialised process group.  Options as CompoundBatchNorm2d's.
    ``kernel``: see :data:`KERNELS`.
    """
    check_kernel(kernel)
    _use_triton(kernel, x)
    cdt = compute_dtype(x)
    prior, mean, var = (t if t.dtype == cdt else t.to(cdt) for t in (running_prior, running_mean, running_var))
    if not training:
        if _compiled_native(kernel, x) and not _needs_graph(x, weight, bias):
            return _ops.eval_running(x, prior, mean, var, weight, bias, eps, temperature, combine == 'mn'), None
        folded = fold_running(prior, mean, var, weight, bias, eps, temperature, combine, kernel,
                              x if x.dtype == cdt and not _pointwise(kernel) else None)
        return compound_norm_eval(x, folded, responsibility_grad, kernel), None
    use_batch = train_stats == 'batch'
    mn = combine == 'mn' and groups is None
    if not sync and x.dtype == cdt and not _pointwise(kernel) and _native.supports(x) and _use_native(kernel, x):
        graph = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
        if not graph or (use_batch and not (responsibility_grad and groups is None)):
            # the whole step in one native call per direction (the fixed cost per call dominates small maps)
            if graph:
                y, buf = _FusedNativeNorm.apply(x, weight, bias, prior, mean, var, groups, eps, temperature, mn)
            else:
                y, _, buf = _native.train_forward(x, prior, mean, var, weight, bias, groups, eps, temperature,
                                                  MIN_COUNT, use_batch, mn)
            counts, n_eff, bmean, bvar, finite = _native.batch_statistics(buf, *mean.shape)
            return y, BatchStats(counts, n_eff, bmean, bvar, finite > 0)
    if compiled_native_train(kernel, x, train_stats, responsibility_grad, groups, sync):
        out = _ops.train(x, prior, mean, var, weight, bias, groups, eps, temperature, MIN_COUNT, mn)
        return out.y, BatchStats(out.counts, out.n_eff, out.mean, out.var, out.finite)
    shift = batch_shift(x, sync)
    if _pointwise(kernel):  # autograd (or AOTAutograd) differentiates the graph; r is detached inside
        y4, stats, _ = _train_forward(torch.sub(x, shift.view(1, -1, 1, 1)), weight, bias, prior, mean - shift, var,
                                      groups, eps, temperature, combine, use_batch,
                                      responsibility_grad and groups is None, sync, pointwise=True)
        return y4.to(x.dtype), stats._replace(mean=stats.mean + shift)
    graph = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    analytic = graph and use_batch and not (responsibility_grad and groups is None)
    # the native steps have no autograd: only under the analytic backward or where no graph is needed
    xc4, pass_shift, passes = _passes_for(kernel, x, shift, allowed=analytic or not graph)
    if analytic:
        y4, *st = _ConstantAssignmentNorm.apply(xc4, weight, bias, prior, mean - shift, var, groups, eps,
                                                temperature, combine, sync, passes, pass_shift)
        stats = BatchStats(*st)
    else:  # autograd through the map's ops when a graph is needed
        y4, stats, _ = _train_forward(xc4, weight, bias, prior, mean - shift, var, groups, eps, temperature,
                                      combine, use_batch, responsibility_grad and groups is None, sync,
                                      passes=passes, shift=pass_shift)
    return y4.to(x.dtype), stats._replace(mean=stats.mean + shift)
