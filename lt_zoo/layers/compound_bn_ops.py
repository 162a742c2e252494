"""The native CPU passes of Compound BN as ``torch.library`` custom ops, for ``torch.compile`` on CPU.

No trace sees into the C++ passes of :mod:`compound_bn_native`, so a compiled graph used to trace the
'pointwise' formulation instead (inductor's generated loops: 2.9-4.8x BN's cost per block,
``benchmarks/cbn_compiled_block.py``).  As custom ops the passes are opaque nodes of the graph: no graph
break, the convolutions and activations around them still compile, and the compile itself is shorter.

- ``lt_zoo::cbn_native_train``: the training forward with batch statistics (``train_stats='batch'``,
  r constant: the analytic backward of ``compound_bn_functional._ConstantAssignmentNorm``), registered
  with its backward ``lt_zoo::cbn_native_train_backward``;
- ``lt_zoo::cbn_native_eval``: the eval forward from folded constants (no gradient).

Each returns fresh tensors (a custom op's outputs may not alias); the (M, C) statistics come back as the
one buffer the native call wrote them into, which :func:`train` splits.  The same math as the eager native path, which
``tests/test_compound_bn_compile.py`` compares against.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import compound_bn_native as _native

__all__ = ['TrainOut', 'train', 'eval_forward', 'applies']


@torch.compiler.assume_constant_result
def _built() -> bool:
    # run eagerly while dynamo traces, its result a constant of the graph: building or loading the
    # library takes a lock, which dynamo cannot trace (a graph break at every layer)
    return _native.available()


def applies(x: Tensor) -> bool:
    """Whether a compiled graph can call the native ops on this map: CPU float32/float64 with the
    library built (any memory format: the op makes a standard-layout copy where needed)."""
    return x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64) and x.dim() == 4 and _built()


# Inductor may store activations channels_last behind the trace (layout optimisation); a custom op is
# by default handed the strides dynamo traced, which costs a copy of the map in and out of every layer.
# The passes take either layout, and the fake implementations follow the input's, so the layout is free.
_FLEXIBLE = (torch.Tag.flexible_layout,)


def _standard(x: Tensor) -> Tensor:
    return x if _native.supports(x) else x.contiguous()


def _layout_of(y: Tensor, x: Tensor) -> Tensor:
    """y in x's strides (what the fake implementation promises)."""
    return y if y.stride() == x.stride() else torch.empty_like(x).copy_(y)


def _stat_sizes(m: int, c: int):
    # counts, n_eff, safe, mask, finite, bmean, bvar, scale, offset, inv, mean_used (native.batch_affine)
    return [m, m, m, m, 1] + [m * c] * 6


@torch.library.custom_op('lt_zoo::cbn_native_train', mutates_args=(), tags=_FLEXIBLE)
def _train_op(x: Tensor, shift: Tensor, prior: Tensor, mean_rel: Tensor, var: Tensor, weight: Tensor,
              bias: Tensor, groups: Optional[Tensor], eps: float, temperature: float, min_count: float,
              mn: bool) -> Tuple[Tensor, Tensor, Tensor]:
    xs = _standard(x)
    m = prior.shape[0]
    coef = _native.coefficients(prior, mean_rel, var, eps, temperature, xs) if groups is None else None
    R, sums = _native.estep_moments(xs, m, coef, groups, shift)
    buf = _native.batch_affine(sums, prior, mean_rel, var, weight, bias, eps, min_count, True, mn, packed=True)
    c = mean_rel.shape[1]
    scale, offset = (t.view(m, c) for t in buf.split_with_sizes(_stat_sizes(m, c))[7:9])
    y = _native.combine(xs, None, R, scale, None, offset, shift)
    return _layout_of(y, x), R, buf


@_train_op.register_fake
def _(x, shift, prior, mean_rel, var, weight, bias, groups, eps, temperature, min_count, mn):
    n, c, h, w = x.shape
    m = prior.shape[0]
    R = x.new_empty((n, m, 1 if groups is not None else h * w))
    return torch.empty_like(x), R, x.new_empty(sum(_stat_sizes(m, c)))


@torch.library.custom_op('lt_zoo::cbn_native_train_backward', mutates_args=(), tags=_FLEXIBLE)
def _train_backward_op(x: Tensor, shift: Tensor, gy: Tensor, R: Tensor, cw: Optional[Tensor], weight: Tensor,
                       inv: Tensor, mean_used: Tensor, safe: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    xs = _standard(x)
    gk, hk = _native.grad_moments(xs, gy, R, shift)
    dweight, dbias, u, wa, v = _native.backward_coefficients(gk, hk, cw, mean_used, inv, weight, safe, mask)
    dx = _native.combine(xs, gy, R, u, wa, v, shift)
    return _layout_of(dx, x), torch.stack([dweight, dbias])


@_train_backward_op.register_fake
def _(x, shift, gy, R, cw, weight, inv, mean_used, safe, mask):
    return torch.empty_like(x), x.new_empty((2,) + tuple(weight.shape))


class TrainOut(NamedTuple):
    y: Tensor
    counts: Tensor
    n_eff: Tensor
    mean: Tensor  # relative to the shift
    var: Tensor
    finite: Tensor


def _unpack(buf: Tensor, m: int, c: int):
    counts, n_eff, safe, mask, finite, bmean, bvar, scale, offset, inv, mean_used = buf.split_with_sizes(
        _stat_sizes(m, c))
    mc = (m, c)
    return (counts, n_eff, safe.view(m, 1), mask.view(m, 1), finite.view(()), bmean.view(mc), bvar.view(mc),
            inv.view(mc), mean_used.view(mc))


def _mn_weights(counts: Tensor, mn: bool) -> Optional[Tensor]:
    if not mn:
        return None
    prior = counts / counts.sum()
    return prior.clamp_min(torch.finfo(prior.dtype).tiny).rsqrt()


def _setup(ctx, inputs, output):
    x, shift, prior, mean_rel, var, weight, bias, groups, eps, temperature, min_count, mn = inputs
    _, R, buf = output
    ctx.mn = mn
    ctx.save_for_backward(x, shift, R, weight, buf)


def _backward(ctx, gy, g_r, g_buf):
    x, shift, R, weight, buf = ctx.saved_tensors
    m, c = weight.shape
    counts, _, safe, mask, _, _, _, inv, mean_used = _unpack(buf, m, c)
    dx, dwb = _train_backward_op(x, shift, gy, R, _mn_weights(counts, ctx.mn), weight, inv, mean_used, safe,
                                 mask)
    return dx, None, None, None, None, dwb[0].to(weight.dtype), dwb[1].to(weight.dtype), None, None, None, None, None


_train_op.register_autograd(_backward, setup_context=_setup)


def train(x: Tensor, shift: Tensor, prior: Tensor, mean_rel: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
          groups: Optional[Tensor], eps: float, temperature: float, min_count: float, mn: bool) -> TrainOut:
    """Training forward with batch statistics on the raw map x (the op subtracts ``shift``): the output
    in x's layout and the batch statistics (mean relative to the shift), as _ConstantAssignmentNorm."""
    y, _, buf = _train_op(x, shift, prior, mean_rel, var, weight, bias, groups, eps, temperature, min_count, mn)
    counts, n_eff, _, _, finite, bmean, bvar, _, _ = _unpack(buf.detach(), *weight.shape)
    return TrainOut(y, counts, n_eff, bmean, bvar, finite > 0)


@torch.library.custom_op('lt_zoo::cbn_native_eval', mutates_args=(), tags=_FLEXIBLE)
def eval_forward(x: Tensor, w1: Tensor, w2: Tensor, const: Tensor, scale: Tensor, offset: Tensor,
                 shift: Tensor) -> Tensor:
    """Eval output from folded constants (compound_bn_functional.FoldedEval) on the raw map; no gradient."""
    xs = _standard(x)
    return _layout_of(_native.folded_eval(xs, (w1, w2, const), scale, offset, shift), x)


@eval_forward.register_fake
def _(x, w1, w2, const, scale, offset, shift):
    return torch.empty_like(x)
