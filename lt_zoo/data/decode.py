"""Decoding one stored image value into a PIL image, with errors that say which image failed."""
from __future__ import annotations

from typing import Any, Optional

import datasets
import PIL.Image

__all__ = ["ImageReadError", "decode_image", "describe_image_value"]

# One decoder instance: datasets' own Image.decode_example handles local paths, embedded bytes,
# hub URLs and EXIF orientation, so lt_zoo decodes exactly as `ds[i]` would.
_DECODER = datasets.Image()


class ImageReadError(ValueError):
    """An image file or blob could not be decoded.

    `index` is the dataset row when known (filled in by `TransformedDataset`), `path` the file (None
    for images embedded as bytes), `position` the row's position inside the decoded batch. The message
    is the only positional argument, so torch's DataLoader can re-raise it from a worker as `cls(msg)`.
    """

    def __init__(self, message: str, *, path: Optional[str] = None, index: Optional[int] = None,
                 position: Optional[int] = None, cause: Optional[BaseException] = None):
        super().__init__(message)
        self.path, self.index, self.position, self.cause = path, index, position, cause

    @classmethod
    def build(cls, path: Optional[str], cause: Optional[BaseException], *, index: Optional[int] = None,
              position: Optional[int] = None) -> "ImageReadError":
        where = f"index {index}" if index is not None else (
            f"batch position {position}" if position is not None else "unknown index")
        what = f"file {path!r}" if path else "embedded image bytes"
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else "unreadable"
        return cls(f"cannot read image at {where} ({what}): {reason}", path=path, index=index,
                   position=position, cause=cause)

    def with_index(self, index: int) -> "ImageReadError":
        return ImageReadError.build(self.path, self.cause, index=index, position=self.position)

    def __reduce__(self):
        return (_rebuild_image_read_error, (str(self), self.path, self.index, self.position))


def _rebuild_image_read_error(message, path, index, position):
    return ImageReadError(message, path=path, index=index, position=position)


def describe_image_value(value: Any) -> Optional[str]:
    """The file path of a stored image value (dict with 'path'/'bytes', str path, or PIL image)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "filename", None) or None


def decode_image(value: Any, *, index: Optional[int] = None, position: Optional[int] = None) -> PIL.Image.Image:
    """Decode a datasets Image value (PIL image, path string or {'bytes', 'path'} dict) to PIL.

    Raises ImageReadError naming the path (and index/position when given) instead of a bare PIL error.
    """
    if isinstance(value, PIL.Image.Image):
        return value
    try:
        return _DECODER.decode_example(value)
    except Exception as err:  # PIL raises several unrelated types (OSError, SyntaxError, ValueError)
        raise ImageReadError.build(describe_image_value(value), err, index=index, position=position) from err
