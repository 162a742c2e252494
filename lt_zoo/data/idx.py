"""Reader for the IDX format of (Fashion-)MNIST: big-endian header, then a dense array.

Layout (LeCun's MNIST page): bytes 0-1 zero, byte 2 element type (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), byte 3 number of dimensions d, then d big-endian uint32 sizes,
then the data in C order. Files may be gzip-compressed (Debian's dataset-fashion-mnist ships .gz).

Why not torchvision's ``read_sn3_pascalvincent_tensor``: it opens the path as plain bytes (Debian's
files are .gz), checks the header with ``assert`` (gone under ``python -O``, and the message names no
file) and never compares the payload size with the header, so a truncated file becomes a short tensor
instead of an error. This reader keeps those three behaviours (tests/test_data_builtin.py).
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional, Sequence

import numpy as np

__all__ = ["read_idx"]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; truncation is EOFError
        raise ValueError(f"corrupt IDX file {path!r}: cannot read it ({type(err).__name__}: {err})") from err


def read_idx(path: str | os.PathLike, *, expect_ndim: Optional[int] = None,
             expect_dtype: Optional[str] = None, expect_shape_tail: Optional[Sequence[int]] = None) -> np.ndarray:
    """Parse one IDX file into a native-endian numpy array of shape (n0, n1, ...).

    The magic number (two zero bytes, a known type code, the dimension count) and the payload size are
    checked; any mismatch raises ValueError naming the file. `expect_*` add checks on the result
    (e.g. ndim 3, uint8, 28x28 for image files).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path!r}")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"corrupt IDX file {path!r}: bad magic number {raw[:4].hex() or '(empty)'} "
                         f"(expected 0000 + type code in {sorted(hex(k) for k in _IDX_DTYPES)} + ndim)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"corrupt IDX file {path!r}: header declares {ndim} dimensions but the file has "
                         f"{len(raw)} bytes")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"corrupt IDX file {path!r}: shape {shape} of {dtype} needs {expected} bytes, "
                         f"file has {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    arr = arr.astype(dtype.newbyteorder("="), copy=False)
    if expect_ndim is not None and arr.ndim != expect_ndim:
        raise ValueError(f"IDX file {path!r} has {arr.ndim} dimensions {shape}; expected {expect_ndim}")
    if expect_dtype is not None and arr.dtype != np.dtype(expect_dtype):
        raise ValueError(f"IDX file {path!r} holds {arr.dtype}; expected {expect_dtype}")
    if expect_shape_tail is not None and tuple(arr.shape[1:]) != tuple(expect_shape_tail):
        raise ValueError(f"IDX file {path!r} has item shape {arr.shape[1:]}; expected {tuple(expect_shape_tail)}")
    return arr
