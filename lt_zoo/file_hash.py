"""SHA-256 of a file, read in 1 MiB blocks (checkpoint manifests, export weight hashes)."""
import hashlib
import os
from typing import Union

__all__ = ['sha256_file']


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex digest of the file's bytes."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()
