"""Decode a split once into uint8 tensors (N, C, H, W) + int64 labels, optionally cached on disk.

Small datasets (Fashion-MNIST, CIFAR, digits) fit in memory many times over once decoded, so the
per-image PIL work of every epoch (decode, convert, resize, to tensor) can be done once. The
geometry is exactly the eval pipeline of `create_transform('eval', ...)` (mode conversion, resize to
input_size, optional centre crop), so normalising these tensors gives the PIL path's eval input.

The disk cache is a safetensors file named by a sha256 over the split's stored Arrow data (image +
label columns, after any `select`) and the decode options; it is written atomically and checked on
read (tensor names, dtypes, shapes, key and a payload checksum). Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import datasets
import numpy as np
import pyarrow as pa
import torch
from torchvision.transforms import v2

from .cache import default_cache_dir
from .columns import label_array, resolve_columns
from .decode import ImageReadError, decode_image
from .transforms import create_transform

__all__ = ["DecodedSplit", "TensorCacheError", "decode_split", "split_digest", "default_tensor_cache_dir",
           "save_decoded", "load_decoded"]

# Bump when the decoded layout or the decode geometry changes, so stale files are never reused.
TENSOR_CACHE_VERSION = "1"
_DECODE_BATCH = 1000
# What create_transform appends after the PIL geometry of every pipeline.
_FLOAT_TAIL = (v2.ToImage, v2.ToDtype, v2.Normalize, v2.ToPureTensor)


class TensorCacheError(ValueError):
    """A tensor cache file is unreadable, corrupt or does not match what was asked for."""


@dataclass(frozen=True)
class DecodedSplit:
    """images uint8 (N, C, H, W), contiguous; labels int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 ({self.images.shape[0]},); got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_tensor_cache_dir() -> Path:
    """`default_cache_dir() / 'tensors'` (so $LT_ZOO_CACHE moves it too)."""
    return default_cache_dir() / "tensors"


class _HashSink:
    """A write-only file object that feeds a sha256 (for Arrow's IPC writer)."""

    def __init__(self, h):
        self.h, self.closed = h, False

    def write(self, data) -> int:
        self.h.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def split_digest(ds: datasets.Dataset, image_column: str, label_column: str, extra: str = "") -> str:
    """sha256 (first 20 hex digits) of the split's image + label columns as Arrow IPC, plus `extra`.

    Hashes what is stored (PNG bytes, or file paths for path-only image folders; a file edited in
    place under the same path is not noticed), honouring `select()` indices; ~0.4 s for 15k rows.
    """
    h = hashlib.sha256(f"lt_zoo-tensors-{TENSOR_CACHE_VERSION}|{extra}|".encode())
    writer = None
    view = ds.with_format("arrow", columns=[image_column, label_column])
    for table in view.iter(batch_size=4096):
        if writer is None:
            writer = pa.ipc.new_stream(pa.PythonFile(_HashSink(h), mode="w"), table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()
    h.update(f"|rows={len(ds)}".encode())
    return h.hexdigest()[:20]


def _geometry(input_size: int, in_chans: int, interpolation: str, crop_pct: float) -> v2.Compose:
    """The PIL -> PIL part of `create_transform('eval', ...)`: mode conversion, resize, optional centre crop.

    Taken from the eval pipeline itself (not re-implemented) so both paths share one geometry; its
    float tail (to tensor, scale, normalise) costs 8x the geometry per tiny image and is done batched.
    """
    full = create_transform("eval", input_size=input_size, in_chans=in_chans, mean=(0.0,) * in_chans,
                            std=(1.0,) * in_chans, interpolation=interpolation, crop_pct=crop_pct)
    steps = list(full.transforms)
    tail = [type(t) for t in steps[-len(_FLOAT_TAIL):]]
    if tail != list(_FLOAT_TAIL):
        raise RuntimeError(f"create_transform('eval') ends with {tail}; decode_split expects {list(_FLOAT_TAIL)} "
                           f"after the PIL geometry (update lt_zoo.data.tensor_cache)")
    return v2.Compose(steps[:-len(_FLOAT_TAIL)])


def _decode_all(ds: datasets.Dataset, image_column: str, geometry, in_chans: int) -> torch.Tensor:
    view = ds.with_format(None).select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    out = None
    for start in range(0, len(view), _DECODE_BATCH):
        values = view[start: start + _DECODE_BATCH][image_column]
        for offset, value in enumerate(values):
            index = start + offset
            img = decode_image(value, index=index)
            try:
                px = np.array(geometry(img), dtype=np.uint8)  # a writable copy for torch.from_numpy
            except Exception as err:  # a decodable but unusable image still names its row
                raise ImageReadError.build(None, err, index=index) from err
            px = px.reshape(px.shape[0], px.shape[1], in_chans)  # (H, W) for 'L', (H, W, 3) for 'RGB'
            if out is None:
                out = torch.empty((len(view), in_chans, px.shape[0], px.shape[1]), dtype=torch.uint8)
            out[index] = torch.from_numpy(px).permute(2, 0, 1)
    return out


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def save_decoded(decoded: DecodedSplit, path: Union[str, os.PathLike], key: str = "") -> None:
    """Write `decoded` to `path` (safetensors) atomically: a temporary file in the same folder, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": f"lt_zoo-tensors-{TENSOR_CACHE_VERSION}", "key": key,
            "sha256": _checksum(decoded.images, decoded.labels)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({"images": decoded.images.contiguous(), "labels": decoded.labels.contiguous()}, str(tmp),
                  metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_decoded(path: Union[str, os.PathLike], key: Optional[str] = None,
                 shape: Optional[Sequence[int]] = None) -> DecodedSplit:
    """Read and validate a file written by `save_decoded`.

    key: the expected cache key (None: any); shape: the expected (C, H, W) (None: any).
    Raises TensorCacheError naming the file for anything unreadable, corrupt or mismatched.
    """
    from safetensors import safe_open

    path = Path(path)
    hint = "delete it to rebuild the cache"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if names != {"images", "labels"}:
                raise TensorCacheError(f"tensor cache {str(path)!r} holds tensors {sorted(names)}; expected "
                                       f"['images', 'labels']; {hint}")
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except TensorCacheError:
        raise
    except Exception as err:  # safetensors raises SafetensorError / OSError for truncated or garbage files
        raise TensorCacheError(f"cannot read tensor cache {str(path)!r} ({type(err).__name__}: {err}); {hint}") from err
    if meta.get("format") != f"lt_zoo-tensors-{TENSOR_CACHE_VERSION}":
        raise TensorCacheError(f"tensor cache {str(path)!r} has format {meta.get('format')!r}; expected "
                               f"'lt_zoo-tensors-{TENSOR_CACHE_VERSION}'; {hint}")
    if key is not None and meta.get("key") != key:
        raise TensorCacheError(f"tensor cache {str(path)!r} has key {meta.get('key')!r}; expected {key!r}; {hint}")
    try:
        decoded = DecodedSplit(images, labels)
    except ValueError as err:
        raise TensorCacheError(f"tensor cache {str(path)!r}: {err}; {hint}") from err
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise TensorCacheError(f"tensor cache {str(path)!r} has images of shape {tuple(images.shape[1:])}; "
                               f"expected {tuple(shape)}; {hint}")
    if meta.get("sha256") != _checksum(images, labels):
        raise TensorCacheError(f"tensor cache {str(path)!r} fails its checksum (payload corrupt); {hint}")
    return decoded


def decode_split(ds: datasets.Dataset, image_column: Optional[str] = None, label_column: Optional[str] = None, *,
                 input_size: int, in_chans: int, interpolation: str = "bilinear", crop_pct: float = 1.0,
                 cache_dir: Union[str, os.PathLike, None] = None) -> DecodedSplit:
    """Decode every image of `ds` once: uint8 (N, in_chans, H, W) + int64 labels (N,).

    Geometry = `create_transform('eval', input_size, in_chans, interpolation, crop_pct)` before its
    to-float and normalisation (defaults as there: bilinear, crop_pct 1.0 = plain resize when sizes
    differ). cache_dir: folder for `<digest>.safetensors` files (see `split_digest`); None = no disk
    cache. A cached file is validated on read; a bad one raises TensorCacheError naming it.
    """
    image_column, label_column = resolve_columns(ds, image_column, label_column)
    if not isinstance(ds.features[image_column], datasets.Image):
        raise TypeError(f"column {image_column!r} has feature {ds.features[image_column]}; expected datasets.Image")
    if len(ds) == 0:
        raise ValueError("decode_split needs a non-empty dataset")
    # Building the transform validates input_size, in_chans, interpolation and crop_pct up front.
    geometry = _geometry(input_size, in_chans, interpolation, crop_pct)
    path = key = None
    if cache_dir is not None:
        options = json.dumps({"input_size": input_size, "in_chans": in_chans, "interpolation": interpolation,
                              "crop_pct": crop_pct}, sort_keys=True)
        key = split_digest(ds, image_column, label_column, extra=options)
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.is_file():
            return load_decoded(path, key=key)
    labels = torch.tensor(label_array(ds, label_column), dtype=torch.int64)
    decoded = DecodedSplit(_decode_all(ds, image_column, geometry, in_chans), labels)
    if path is not None:
        try:
            save_decoded(decoded, path, key=key)
        except OSError as err:  # an unwritable cache only costs the next run a decode
            warnings.warn(f"lt_zoo: cannot write tensor cache {str(path)!r} ({err}); continuing without it")
    return decoded
