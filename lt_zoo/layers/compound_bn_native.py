"""The native CPU kernel of Compound BN: csrc/compound_bn_cpu.cpp, built on first use, called via ctypes.

Each map-sized step of the eager layer is one pass over the map here, where the GEMM formulation of
``compound_bn_functional`` makes several (docs/compound_bn_numerics.md#decision-kernel):

- :func:`estep_moments`: posteriors R (N, M, L) and the sums (M, 2 + 2C) of Eq. 7-10;
- :func:`combine`: x (R^T A) [+ g (R^T B)] + R^T D, the output and the input gradient;
- :func:`grad_moments`: R^T g and R^T (g x), the sums of the analytic backward;
- :func:`folded_eval`: E-step and output in one pass.

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

__all__ = ['available', 'supports', 'estep_moments', 'combine', 'grad_moments', 'folded_eval', 'library_path',
           'tile_positions']

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


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel takes this map: a 4-D CPU float32/float64 tensor, contiguous or channels_last."""
    return (x.device.type == 'cpu' and x.dtype in _SUFFIX and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)))


def tile_positions(dtype: torch.dtype) -> int:
    """Positions per tile of the built library: one vector register of this CPU (16 float32 with AVX-512,
    8 with AVX2, 4 with SSE; half as many float64)."""
    return int(_fn('tile_positions', dtype)())


# Argument types of the entry points (P: a pointer, I: int64, i: int), declared once so that a call
# passes plain Python ints: a pass over a 4x4 map is a few microseconds, and per-call wrapping of
# arguments into ctypes objects cost as much.
_SIGNATURES = {
    'estep_moments': 'PPIIIiPPPIPPPi',
    'combine': 'PPPIIIiPIIPPPPi',
    'grad_moments': 'PPPIIIiPIIPPi',
    'eval': 'PPIIIiPPPIPPPi',
    'tile_positions': '',
}
_CTYPES = {'P': ctypes.c_void_p, 'I': ctypes.c_int64, 'i': ctypes.c_int}
_fns = {}


def _fn(name: str, dtype: torch.dtype):
    fn = _fns.get((name, dtype))
    if fn is None:
        fn = getattr(_load(), f'cbn_{name}_{_SUFFIX[dtype]}')
        fn.argtypes = [_CTYPES[k] for k in _SIGNATURES[name]]
        fn.restype = ctypes.c_int64 if name == 'tile_positions' else None
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
