"""The native CPU passes of Compound BN as ``torch.library`` custom ops, for ``torch.compile`` on CPU.

No trace sees into the C++ passes of :mod:`compound_bn_native`, so a compiled graph used to trace the
'pointwise' formulation instead (inductor's generated loops: 2.9-4.8x BN's cost per block,
``benchmarks/cbn_compiled_block.py``).  As custom ops the passes are opaque nodes of the graph: no graph
break, the convolutions and activations around them still compile, and the compile itself is shorter.

- ``lt_zoo::cbn_native_train``: the training forward with batch statistics (``train_stats='batch'``,
  r constant: the analytic backward of ``compound_bn_functional._ConstantAssignmentNorm``), registered
  with its backward ``lt_zoo::cbn_native_train_backward``; one native call each
  (``compound_bn_native.train_forward`` and ``train_backward``), the batch shift included;
- ``lt_zoo::cbn_native_eval``: the eval forward from folded constants (no gradient);
- ``lt_zoo::cbn_native_eval_running``: the same from the running state, the constants folded in the
  same native call (what a compiled layer runs: no fold ops in the graph);
- ``lt_zoo::cbn_cpp_eval_running``: the same op with its kernel in C++ (:mod:`compound_bn_torch`, built on
  first use), which a compiled layer traces instead when it builds: no Python per call.

Each returns fresh tensors (a custom op's outputs may not alias); the (M, C) statistics come back as the
one buffer the native call wrote them into, which :func:`train` splits.  The same math as the eager native path, which
``tests/test_compound_bn_compile.py`` compares against.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import compound_bn_native as _native
from . import compound_bn_torch as _torch_ops

__all__ = ['TrainOut', 'train', 'eval_forward', 'eval_running', 'eval_running_py', 'eval_running_cpp', 'applies']


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

# The ops are defined with torch.library.Library and a CPU kernel rather than the @custom_op decorator:
# the same dispatcher entry, fake and autograd registrations, with less Python per call (on a tiny map,
# about 16 us less for an op with this schema and no autograd; the training op keeps the Python autograd
# wrapper's cost), which a ResNet-32 pays 31 times per direction.
_LIB = torch.library.Library('lt_zoo', 'FRAGMENT')


def _op(schema: str):
    """Define ``lt_zoo::<schema>`` with its CPU kernel (the decorated function); returns the op overload."""
    name = schema.split('(', 1)[0]

    def define(fn):
        _LIB.define(schema, tags=_FLEXIBLE)
        _LIB.impl(name, fn, 'CPU')
        return getattr(torch.ops.lt_zoo, name).default
    return define


def _standard(x: Tensor) -> Tensor:
    return x if _native.supports(x) else x.contiguous()


def _layout_of(y: Tensor, x: Tensor) -> Tensor:
    """y in x's strides (what the fake implementation promises)."""
    return y if y.stride() == x.stride() else torch.empty_like(x).copy_(y)


@_op('cbn_native_train(Tensor x, Tensor prior, Tensor mean, Tensor var, Tensor weight, Tensor bias, '
     'Tensor? groups, float eps, float temperature, float min_count, bool mn) -> (Tensor, Tensor, Tensor)')
def _train_op(x: Tensor, prior: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
              groups: Optional[Tensor], eps: float, temperature: float, min_count: float,
              mn: bool) -> Tuple[Tensor, Tensor, Tensor]:
    y, R, buf = _native.train_forward(_standard(x), prior, mean, var, weight, bias, groups, eps, temperature,
                                      min_count, True, mn)
    return _layout_of(y, x), R, buf


@torch.library.register_fake('lt_zoo::cbn_native_train')
def _(x, prior, mean, var, weight, bias, groups, eps, temperature, min_count, mn):
    n, c, h, w = x.shape
    m = prior.shape[0]
    R = x.new_empty((n, m, 1 if groups is not None else h * w))
    return torch.empty_like(x), R, x.new_empty(_native.train_buffer_size(m, c))


@_op('cbn_native_train_backward(Tensor x, Tensor gy, Tensor R, Tensor weight, Tensor buf, bool mn) '
     '-> (Tensor, Tensor)')
def _train_backward_op(x: Tensor, gy: Tensor, R: Tensor, weight: Tensor, buf: Tensor,
                       mn: bool) -> Tuple[Tensor, Tensor]:
    dx, dwb = _native.train_backward(_standard(x), gy, R, weight, buf, mn)
    return _layout_of(dx, x), dwb


@torch.library.register_fake('lt_zoo::cbn_native_train_backward')
def _(x, gy, R, weight, buf, mn):
    return torch.empty_like(x), x.new_empty((2,) + tuple(weight.shape))


class TrainOut(NamedTuple):
    y: Tensor
    counts: Tensor
    n_eff: Tensor
    mean: Tensor
    var: Tensor
    finite: Tensor


def _setup(ctx, inputs, output):
    x, prior, mean, var, weight, bias, groups, eps, temperature, min_count, mn = inputs
    _, R, buf = output
    ctx.mn = mn
    ctx.save_for_backward(x, R, weight, buf)


def _backward(ctx, gy, g_r, g_buf):
    x, R, weight, buf = ctx.saved_tensors
    dx, dwb = _train_backward_op(x, gy, R, weight, buf, ctx.mn)
    return dx, None, None, None, dwb[0].to(weight.dtype), dwb[1].to(weight.dtype), None, None, None, None, None


torch.library.register_autograd('lt_zoo::cbn_native_train', _backward, setup_context=_setup)


def train(x: Tensor, prior: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
          groups: Optional[Tensor], eps: float, temperature: float, min_count: float, mn: bool) -> TrainOut:
    """Training forward with batch statistics on the map x from the running state (prior (M,), mean and
    var (M, C)): the output in x's layout and the batch statistics, as _ConstantAssignmentNorm."""
    y, _, buf = _train_op(x, prior, mean, var, weight, bias, groups, eps, temperature, min_count, mn)
    counts, n_eff, bmean, bvar, finite = _native.batch_statistics(buf.detach(), *weight.shape)
    return TrainOut(y, counts, n_eff, bmean, bvar, finite > 0)


@_op('cbn_native_eval(Tensor x, Tensor w1, Tensor w2, Tensor const, Tensor scale, Tensor offset, Tensor shift) '
     '-> Tensor')
def eval_forward(x: Tensor, w1: Tensor, w2: Tensor, const: Tensor, scale: Tensor, offset: Tensor,
                 shift: Tensor) -> Tensor:
    """Eval output from folded constants (compound_bn_functional.FoldedEval) on the raw map; no gradient."""
    xs = _standard(x)
    return _layout_of(_native.folded_eval(xs, (w1, w2, const), scale, offset, shift), x)


@torch.library.register_fake('lt_zoo::cbn_native_eval')
def _(x, w1, w2, const, scale, offset, shift):
    return torch.empty_like(x)


_EVAL_RUNNING = ('(Tensor x, Tensor prior, Tensor mean, Tensor var, Tensor weight, Tensor bias, float eps, '
                 'float temperature, bool mn) -> Tensor')


@_op('cbn_native_eval_running' + _EVAL_RUNNING)
def eval_running_py(x: Tensor, prior: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                    temperature: float, mn: bool) -> Tensor:
    """Eval output from the running state (compound_bn_native.eval_running) on the raw map; no gradient."""
    return _layout_of(_native.eval_running(_standard(x), prior, mean, var, weight, bias, eps, temperature, mn), x)


# The same op with its CPU kernel in C++ (csrc/compound_bn_torch.cpp, registered by compound_bn_torch when it
# builds): the schema and fake are defined here, once for both.
_LIB.define('cbn_cpp_eval_running' + _EVAL_RUNNING, tags=_FLEXIBLE)
eval_running_cpp = torch.ops.lt_zoo.cbn_cpp_eval_running.default


@torch.library.register_fake('lt_zoo::cbn_native_eval_running')
@torch.library.register_fake('lt_zoo::cbn_cpp_eval_running')
def _(x, prior, mean, var, weight, bias, eps, temperature, mn):
    return torch.empty_like(x)


@torch.compiler.assume_constant_result
def _cpp_built() -> bool:
    # as _built: evaluated once while dynamo traces (the build takes a lock), a constant of the graph
    return _torch_ops.available()


def eval_running(x: Tensor, prior: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                 temperature: float, mn: bool) -> Tensor:
    """Eval output from the running state on the raw map, no gradient: lt_zoo::cbn_cpp_eval_running when its
    C++ kernel is built (compound_bn_torch), else lt_zoo::cbn_native_eval_running; the same numbers."""
    op = eval_running_cpp if _cpp_built() else eval_running_py
    return op(x, prior, mean, var, weight, bias, eps, temperature, mn)
