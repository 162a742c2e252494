"""The native CPU kernel of Compound BN: csrc/compound_bn_cpu.cpp, built on first use, called via ctypes.

Each map-sized step of the eager layer is one pass over the map here, where the GEMM formulation of
``compound_bn_functional`` makes several (docs/compound_bn_numerics.md#decision-kernel):

- :func:`estep_moments`: posteriors R (N, M, L) and the sums (M, 2 + 2C) of Eq. 7-10;
- :func:`combine`: x (R^T A) [+ g (R^T B)] + R^T D, the output and the input gradient;
- :func:`grad_moments`: R^T g and R^T (g x), the sums of the analytic backward;
- :func:`folded_eval`: E-step and output in one pass (:func:`eval_running`: with the constants folded
  from the running state in the same call);
- :func:`coefficients`, :func:`batch_affine`, :func:`backward_coefficients`, :func:`fold`,
  :func:`running_update`: the (M, C) statistics around the passes, one call each;
- :func:`train_forward`, :func:`train_backward`: a whole training step of the layer (not under DDP) as
  one call per direction, the passes and the statistics between them.

The library needs only a C++ compiler (no torch headers, no ninja): ``$CXX`` or ``c++``, with
``-O3 -march=native``.  It is cached under ``$LT_ZOO_KERNEL_CACHE`` (default
``~/.cache/lt_zoo/kernels``), keyed by the source, the flags and the CPU.  ``LT_ZOO_NATIVE=0`` turns it
off; a missing compiler or a failed build turns it off with one warning, and the layer keeps the GEMM
formulation.  Tensors must be CPU float32/float64 maps, contiguous or channels_last.  The batch is split
over ``torch.get_num_threads()`` OpenMP threads (a static slice of images each; partial sums added in
thread order, so a result depends only on the thread count).  libgomp has the soname of the copy that
torch loads, so both share one OpenMP runtime.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ['available', 'loaded_path', 'supports', 'estep_moments', 'combine', 'grad_moments', 'folded_eval',
           'library_path', 'tile_positions', 'tile_vectors', 'coefficients', 'fold', 'batch_affine',
           'backward_coefficients', 'running_update', 'train_forward', 'train_backward', 'batch_statistics',
           'train_buffer_size', 'eval_running']

_SRC = Path(__file__).with_name('csrc') / 'compound_bn_cpu.cpp'
# -fassociative-math (with the two flags it needs) lets the compiler vectorise the sums over a tile; it
# reorders additions and nothing else: NaN and Inf still propagate, which the layer's checks rely on.
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-fno-math-errno',
          '-fassociative-math', '-fno-signed-zeros', '-fno-trapping-math')
_SUFFIX = {torch.float32: 'f32', torch.float64: 'f64'}
_lock = threading.Lock()
_lib = None
_failed: Optional[str] = None


def _cpu_key() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        flags = ''
    return platform.machine() + flags


def library_path() -> Path:
    """Where the built library for this source, these flags and this CPU lives (built or not)."""
    cxx = os.environ.get('CXX', 'c++')
    key = hashlib.sha256(_SRC.read_bytes() + ' '.join((cxx,) + _FLAGS).encode() + _cpu_key().encode()).hexdigest()
    root = Path(os.environ.get('LT_ZOO_KERNEL_CACHE', Path.home() / '.cache' / 'lt_zoo' / 'kernels'))
    return root / f'compound_bn_cpu-{key[:16]}.so'


def _build(path: Path) -> None:
    cxx = os.environ.get('CXX', 'c++')
    if shutil.which(cxx) is None:
        raise RuntimeError(f'no C++ compiler {cxx!r} on PATH (set CXX)')
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix='.so.tmp')
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *_FLAGS, str(_SRC), '-o', tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f'{cxx} failed: {proc.stderr.strip()[-2000:]}')
        os.replace(tmp, path)  # another process building the same file replaces it with the same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load():
    global _lib, _failed
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        if os.environ.get('LT_ZOO_NATIVE', '1') == '0':
            _failed = 'LT_ZOO_NATIVE=0'
            return None
        try:
            path = library_path()
            if not path.exists():
                _build(path)
            _lib = ctypes.CDLL(str(path))
        except (RuntimeError, OSError) as e:
            _failed = str(e)
            warnings.warn(f'lt_zoo: the native CPU kernel of CompoundBatchNorm2d is off ({e}); the layer uses '
                          f'its GEMM formulation (same results, slower)', RuntimeWarning, stacklevel=3)
        return _lib


def available() -> bool:
    """True when the library is built (building it on the first call) and not turned off."""
    return _load() is not None


def loaded_path() -> Optional[Path]:
    """The file of the library this process loaded (None before :func:`available` or when off): the one to
    link against, which :func:`library_path` no longer names once the source changes on disk."""
    return Path(_lib._name) if _lib is not None else None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel takes this map: a 4-D CPU float32/float64 tensor, contiguous or channels_last."""
    return (x.device.type == 'cpu' and x.dtype in _SUFFIX and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)))


def tile_positions(dtype: torch.dtype) -> int:
    """Positions per vector of the built library: one vector register of this CPU (16 float32 with
    AVX-512, 8 with AVX2, 4 with SSE; half as many float64)."""
    return int(_fn('tile_positions', dtype)())


def tile_vectors(dtype: torch.dtype) -> int:
    """Vectors per tile of the passes: 2, or 1 with AVX-512 (csrc/compound_bn_cpu.cpp, kTileVectors)."""
    return int(_fn('tile_vectors', dtype)())


# Argument types of the entry points (P: a pointer, I: int64, i: int), declared once so that a call
# passes plain Python ints: a pass over a 4x4 map is a few microseconds, and per-call wrapping of
# arguments into ctypes objects cost as much.
_SIGNATURES = {
    'estep_moments': 'PPIIIiPPPIPPPi',
    'combine': 'PPPIIIiPIIPPPPi',
    'grad_moments': 'PPPIIIiPIIPPi',
    'eval': 'PPIIIiPPPIPPPi',
    'tile_positions': '',
    'tile_vectors': '',
    'coefficients': 'PPPIISSPPP',
    'fold': 'PPPPPIISSiP',
    'batch_affine': 'PPPPPPIISSiiP',
    'backward_coefficients': 'PPPPPPPPIIP',
    'running_update': 'PPPPPPPPPPPIISSi',
    'train_forward': 'PIIIiIPPPPPIPSSSiiPPPi',
    'train_backward': 'PPIIIiPIIPPiPPi',
    'eval_running': 'PIIIiPPPPPISSiPi',
}
_CTYPES = {'P': ctypes.c_void_p, 'I': ctypes.c_int64, 'i': ctypes.c_int}
_SCALAR = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}  # 'S': the map's scalar type
_fns = {}


def _fn(name: str, dtype: torch.dtype):
    fn = _fns.get((name, dtype))
    if fn is None:
        fn = getattr(_load(), f'cbn_{name}_{_SUFFIX[dtype]}')
        fn.argtypes = [_SCALAR[dtype] if k == 'S' else _CTYPES[k] for k in _SIGNATURES[name]]
        fn.restype = ctypes.c_int64 if name in ('tile_positions', 'tile_vectors') else None
        _fns[(name, dtype)] = fn
    return fn


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _dims(x: torch.Tensor):
    n, c, h, w = x.shape
    return n, c, h * w, 0 if x.is_contiguous() else 1


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.dtype == like.dtype and t.stride() == like.stride():
        return t
    fmt = torch.contiguous_format if like.is_contiguous() else torch.channels_last
    return t.to(like.dtype).contiguous(memory_format=fmt)


def _small(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A statistic in the map's dtype, contiguous (only read through its pointer: no detach needed)."""
    if t is None or (t.dtype == like.dtype and t.is_contiguous()):
        return t
    return t.detach().to(like.dtype).contiguous()


def _threads() -> int:
    return max(1, torch.get_num_threads())


# Every function works on x - shift (shift (C,), subtracted inside the pass; None: x is already shifted).
def estep_moments(x: torch.Tensor, m: int, coef, groups: Optional[torch.Tensor],
                  shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R, sums) of the map x (N, C, H, W): R (N, M, H*W) posteriors from the E-step coefficients ``coef``
    (w1, w2, const), or (N, M, 1) one-hot ``groups`` (N,) on the split path (``coef`` unused, may be None);
    sums (M, 2 + 2C) = [sum r, sum r^2, sum r x_c, sum r x_c^2] over the batch's positions."""
    w1, w2, const = (_small(t, x) for t in coef) if groups is None else (None, None, None)
    shift = _small(shift, x)
    R = torch.empty(x.shape[0], m, 1 if groups is not None else x.shape[2] * x.shape[3], dtype=x.dtype)
    sums = torch.empty(m, 2 + 2 * x.shape[1], dtype=x.dtype)
    g = groups.to(torch.int64).contiguous() if groups is not None else None
    _fn('estep_moments', x.dtype)(_ptr(x), _ptr(shift), *_dims(x), _ptr(w1), _ptr(w2), _ptr(const), m, _ptr(g),
                                  _ptr(R), _ptr(sums), _threads())
    return R, sums


def combine(x: torch.Tensor, g: Optional[torch.Tensor], R: torch.Tensor, A: torch.Tensor, B: Optional[torch.Tensor],
            D: torch.Tensor, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = x * (R^T A) [+ g * (R^T B)] + R^T D per position, in x's layout; A, B, D (M, C)."""
    g = _same_layout(g, x) if g is not None else None
    shift, A, B, D = (_small(t, x) for t in (shift, A, B, D))
    out = torch.empty_like(x)
    _fn('combine', x.dtype)(_ptr(x), _ptr(shift), _ptr(g), *_dims(x), _ptr(R), R.shape[2], R.shape[1],
                            _ptr(A), _ptr(B), _ptr(D), _ptr(out), _threads())
    return out


def grad_moments(x: torch.Tensor, g: torch.Tensor, R: torch.Tensor,
                 shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R^T g, R^T (g x)) summed over the batch's positions, each (M, C)."""
    g = _same_layout(g, x)
    shift = _small(shift, x)
    m, c = R.shape[1], x.shape[1]
    G, H = torch.empty(m, c, dtype=x.dtype), torch.empty(m, c, dtype=x.dtype)
    _fn('grad_moments', x.dtype)(_ptr(x), _ptr(shift), _ptr(g), *_dims(x), _ptr(R), R.shape[2], m, _ptr(G),
                                 _ptr(H), _threads())
    return G, H


def folded_eval(x: torch.Tensor, coef, scale: torch.Tensor, offset: torch.Tensor,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eval output from folded constants (E-step and mixing in one pass), in x's layout."""
    w1, w2, const, scale, offset, shift = (_small(t, x) for t in (*coef, scale, offset, shift))
    out = torch.empty_like(x)
    _fn('eval', x.dtype)(_ptr(x), _ptr(shift), *_dims(x), _ptr(w1), _ptr(w2), _ptr(const), w1.shape[0],
                         _ptr(scale), _ptr(offset), _ptr(out), _threads())
    return out


# The (M, C) statistics around the passes, one call each instead of ~130 small torch ops per layer and
# step (compound_bn_functional and CompoundBatchNorm2d keep the torch formulas for the other kernels;
# tests/test_compound_bn_kernels.py checks both agree).  Inputs are read in ``like``'s dtype; no autograd.
def coefficients(prior, mean_rel, var, eps: float, temperature: float, like: torch.Tensor):
    """E-step coefficients (w1 (M, C), w2 (M, C), const (M,)), as compound_bn_functional.estep_coefficients."""
    prior, mean_rel, var = (_small(t, like) for t in (prior, mean_rel, var))
    m, c = mean_rel.shape
    buf = torch.empty(2 * m * c + m, dtype=like.dtype)
    w1, w2, const = buf.split_with_sizes([m * c, m * c, m])
    _fn('coefficients', like.dtype)(_ptr(prior), _ptr(mean_rel), _ptr(var), m, c, eps, temperature, _ptr(w1),
                                    _ptr(w2), _ptr(const))
    return w1.view(m, c), w2.view(m, c), const


def fold(prior, mean, var, weight, bias, eps: float, temperature: float, mn: bool, like: torch.Tensor):
    """(shift (C,), w1, w2, const, scale, offset) of compound_bn_functional.fold_running."""
    prior, mean, var, weight, bias = (_small(t, like) for t in (prior, mean, var, weight, bias))
    m, c = mean.shape
    buf = torch.empty(c + 4 * m * c + m, dtype=like.dtype)
    _fn('fold', like.dtype)(_ptr(prior), _ptr(mean), _ptr(var), _ptr(weight), _ptr(bias), m, c, eps, temperature,
                            int(mn), _ptr(buf))
    shift, w1, w2, const, scale, offset = buf.split_with_sizes([c, m * c, m * c, m, m * c, m * c])
    return shift, w1.view(m, c), w2.view(m, c), const, scale.view(m, c), offset.view(m, c)


def batch_affine(sums, prior, mean_rel, var, weight, bias, eps: float, min_count: float, use_batch: bool, mn: bool):
    """Statistics of a training forward from the batch sums (M, 2 + 2C), as _train_forward computes them:
    (counts, n_eff, safe (M, 1), mask (M, 1) 1/0, finite (), bmean, bvar, scale, offset, inv, mean_used)."""
    prior, mean_rel, var, weight, bias = (_small(t, sums) for t in (prior, mean_rel, var, weight, bias))
    m, c = mean_rel.shape
    buf = torch.empty(4 * m + 1 + 6 * m * c, dtype=sums.dtype)
    _fn('batch_affine', sums.dtype)(_ptr(_small(sums, sums)), _ptr(prior), _ptr(mean_rel), _ptr(var), _ptr(weight),
                                    _ptr(bias), m, c, eps, min_count, int(use_batch), int(mn), _ptr(buf))
    counts, n_eff, safe, mask, finite, *mc = buf.split_with_sizes([m, m, m, m, 1] + [m * c] * 6)
    return (counts, n_eff, safe.view(m, 1), mask.view(m, 1), finite.view(()), *(t.view(m, c) for t in mc))


def backward_coefficients(G, H, cw, mean, inv, weight, safe, mask):
    """(dweight, dbias, U, W A, V) of _ConstantAssignmentNorm.backward from G, H (M, C), not under DDP."""
    cw, mean, inv, weight, safe, mask = (_small(t, G) for t in (cw, mean, inv, weight, safe, mask))
    m, c = G.shape
    buf = torch.empty(5 * m * c, dtype=G.dtype)
    _fn('backward_coefficients', G.dtype)(_ptr(_small(G, G)), _ptr(_small(H, G)), _ptr(cw), _ptr(mean), _ptr(inv),
                                          _ptr(weight), _ptr(safe), _ptr(mask), m, c, _ptr(buf))
    return tuple(t.view(m, c) for t in buf.split_with_sizes([m * c] * 5))


def running_update(prior, mean, var, last_counts, tracked, skipped, stats, momentum: float, min_count: float,
                   update_prior: bool) -> bool:
    """CompoundBatchNorm2d._update_running in place, when every buffer is contiguous in the statistics'
    dtype and the counters are int64; False (nothing done) otherwise."""
    dt = stats.counts.dtype
    if (dt not in _SUFFIX or any(t.dtype != dt or not t.is_contiguous() for t in (prior, mean, var, last_counts))
            or tracked.dtype != torch.int64 or skipped.dtype != torch.int64):
        return False
    counts, n_eff, bmean, bvar = (_small(t, stats.counts) for t in stats[:4])
    finite = stats.finite.to(dt)
    m, c = mean.shape
    _fn('running_update', dt)(_ptr(prior), _ptr(mean), _ptr(var), _ptr(last_counts), _ptr(tracked), _ptr(skipped),
                              _ptr(counts), _ptr(n_eff), _ptr(bmean), _ptr(bvar), _ptr(finite), m, c, momentum,
                              min_count, int(update_prior))
    # a write through a raw pointer is invisible to torch: bump the version counters as an in-place op
    # would (the layer's eval cache, and autograd's check of saved tensors, rely on them)
    torch.autograd.graph.increment_version((prior, mean, var, last_counts, tracked, skipped))
    return True


# One call per direction of a training step of the layer (not under DDP: there the batch sums are
# all-reduced between the passes).  The forward's statistics come back as one buffer.
# The buffer: batch_affine's [counts M | n_eff M | safe M | mask M | finite 1 | bmean MC | bvar MC | scale MC |
# offset MC | inv MC | mean_used MC], then [shift C | cw M | mean MC] (csrc: TrainBuffer); bmean and
# mean_used are relative to the batch shift, mean = bmean + shift.
def train_buffer_size(m: int, c: int) -> int:
    """Values in a :func:`train_forward` buffer."""
    return 4 * m + 1 + 7 * m * c + c + m


def batch_statistics(buf: torch.Tensor, m: int, c: int):
    """(counts (M,), n_eff (M,), mean (M, C), biased var (M, C), finite () 1/0) of a :func:`train_forward`
    buffer, as views (five, not fourteen: each view is a dispatch, and this runs per layer and step)."""
    mc = m * c
    var_at, mean_at = 4 * m + 1 + mc, 4 * m + 1 + 6 * mc + c + m
    return buf[:m], buf[m:2 * m], buf[mean_at:mean_at + mc].view(m, c), buf[var_at:var_at + mc].view(m, c), buf[4 * m]


def train_forward(x: torch.Tensor, prior, mean, var, weight, bias, groups: Optional[torch.Tensor], eps: float,
                  temperature: float, min_count: float, use_batch: bool, mn: bool):
    """(y, R, buf) of one training forward of the map x (N, C, H, W) from the running state (prior (M,),
    mean, var (M, C), absolute coordinates) and the affine parameters (M, C): the batch shift, E-step,
    sums, statistics (``use_batch``: batch statistics of active components, else running) and the output
    y in x's layout, in one native call.  ``groups`` (N,): the split path.  buf: see :func:`batch_statistics`."""
    prior, mean, var, weight, bias = (_small(t, x) for t in (prior, mean, var, weight, bias))
    n, c, h, w = x.shape
    m = prior.shape[0]
    R = torch.empty(n, m, 1 if groups is not None else h * w, dtype=x.dtype)
    y = torch.empty_like(x)
    buf = torch.empty(train_buffer_size(m, c), dtype=x.dtype)
    g = groups if groups is None or (groups.dtype == torch.int64 and groups.is_contiguous()) else \
        groups.to(torch.int64).contiguous()
    _fn('train_forward', x.dtype)(_ptr(x), *_dims(x), (h // 2) * w + w // 2, _ptr(prior),
                                  _ptr(mean), _ptr(var), _ptr(weight), _ptr(bias), m, _ptr(g), eps, temperature,
                                  min_count, int(use_batch), int(mn), _ptr(R), _ptr(y), _ptr(buf), _threads())
    return y, R, buf


def train_backward(x: torch.Tensor, g: torch.Tensor, R: torch.Tensor, weight: torch.Tensor, buf: torch.Tensor,
                   mn: bool, input_grad: bool = True):
    """(dx or None, [dweight, dbias] (2, M, C) in the map's dtype) of :func:`train_forward` with batch
    statistics and r constant (the analytic backward of compound_bn_functional._ConstantAssignmentNorm) in
    one native call."""
    g = _same_layout(g, x)
    weight = _small(weight, x)
    m, c = weight.shape
    out = torch.empty(2, m, c, dtype=x.dtype)
    dx = torch.empty_like(x) if input_grad else None
    _fn('train_backward', x.dtype)(_ptr(x), _ptr(g), *_dims(x), _ptr(R), R.shape[2], m,
                                   _ptr(weight), _ptr(buf), int(mn), _ptr(dx), _ptr(out), _threads())
    return dx, out


def eval_running(x: torch.Tensor, prior, mean, var, weight, bias, eps: float, temperature: float,
                 mn: bool) -> torch.Tensor:
    """Eval output from the running state (prior (M,), mean, var (M, C)) and the affine parameters:
    :func:`fold` and :func:`folded_eval` in one native call, in x's layout (no autograd)."""
    prior, mean, var, weight, bias = (_small(t, x) for t in (prior, mean, var, weight, bias))
    out = torch.empty_like(x)
    _fn('eval_running', x.dtype)(_ptr(x), *_dims(x), _ptr(prior), _ptr(mean), _ptr(var), _ptr(weight), _ptr(bias),
                                 prior.shape[0], eps, temperature, int(mn), _ptr(out), _threads())
    return out
