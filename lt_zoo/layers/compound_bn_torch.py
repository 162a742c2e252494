"""The C++ CPU kernel of ``lt_zoo::cbn_cpp_eval_running``: csrc/compound_bn_torch.cpp, built on first use.

A compiled CBN network in eval calls one custom op per layer.  Its Python kernel
(``lt_zoo::cbn_native_eval_running``, compound_bn_ops.py) converts arguments and calls the native pass
through ctypes; on a small map that fixed cost is most of the call.  This module builds the same kernel in
C++ against torch's headers with ``torch.utils.cpp_extension`` (needs ninja and a C++ compiler), which
registers it for the CPU dispatch key of ``lt_zoo::cbn_cpp_eval_running`` and points it at the native
library's entry points.  compound_bn_ops.eval_running then traces that op instead
(benchmarks/cbn_op_overhead.py measures the two per call).

The build (once; seconds) lands in ``$LT_ZOO_KERNEL_CACHE/torch_ops`` (default ``~/.cache/lt_zoo/kernels``),
keyed by the source, torch's version and the native library.  ``LT_ZOO_NATIVE=0``, a missing native
library, no ninja or a failed build turn it off with one warning; compiled graphs then call the Python
kernel, with the same results.
"""
import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import compound_bn_native as _native

__all__ = ['available', 'build_directory']

_SRC = Path(__file__).with_name('csrc') / 'compound_bn_torch.cpp'
_lock = threading.Lock()
_state: Optional[bool] = None


def _key(library: Path) -> str:
    return hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode() + str(library).encode()).hexdigest()[:16]


def build_directory(library: Path) -> Path:
    """Where the extension for this source, torch and the native library file ``library`` is built."""
    return library.parent / 'torch_ops' / _key(library)


def _build() -> None:
    from torch.utils import cpp_extension
    if shutil.which('ninja') is None:
        try:  # the pip package (a dependency of lt_zoo) puts its binary outside PATH when no env is activated
            import ninja
            os.environ['PATH'] = ninja.BIN_DIR + os.pathsep + os.environ.get('PATH', '')
        except ImportError:
            pass
    cpp_extension.verify_ninja_availability()  # RuntimeError naming ninja, before any work
    # the library this process loaded: its source on disk may have changed since (and library_path with it)
    library = _native.loaded_path()
    path = build_directory(library)
    path.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=f'lt_zoo_cbn_torch_{_key(library)}', sources=[str(_SRC)], build_directory=str(path),
                       extra_cflags=['-O2'], is_python_module=False, verbose=False)
    torch.ops.lt_zoo.cbn_cpp_set_library(str(library))


def available() -> bool:
    """True when the C++ kernel is registered (building it on the first call) and not turned off."""
    global _state
    with _lock:
        if _state is None:
            if not _native.available():
                _state = False  # LT_ZOO_NATIVE=0, or the native library's own warning said why
                return False
            try:
                _build()
                _state = True
            except (RuntimeError, OSError, ImportError) as e:
                _state = False
                warnings.warn(f'lt_zoo: the C++ eval op of CompoundBatchNorm2d is off ({str(e)[-500:]}); compiled '
                              f'graphs call its Python kernel (same results, more time per call)', RuntimeWarning,
                              stacklevel=3)
        return _state
