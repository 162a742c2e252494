"""On-disk cache of built datasets under ~/.cache/lt_zoo, keyed by a hash of the source files."""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

import datasets

__all__ = ["default_cache_dir", "files_digest", "cached_dataset_dict"]

# Bump when the layout of a cached dataset changes, so stale caches are not reused.
CACHE_FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    """$LT_ZOO_CACHE, else $XDG_CACHE_HOME/lt_zoo, else ~/.cache/lt_zoo."""
    if os.environ.get("LT_ZOO_CACHE"):
        return Path(os.environ["LT_ZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lt_zoo"


def files_digest(paths: Iterable[str | os.PathLike], extra: str = "") -> str:
    """sha256 over the files' bytes (in the given order) plus `extra`; first 16 hex digits."""
    h = hashlib.sha256(f"{CACHE_FORMAT_VERSION}|{extra}".encode())
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def cached_dataset_dict(name: str, key: str, build: Callable[[], datasets.DatasetDict],
                        cache_dir: Optional[str | os.PathLike] = None) -> datasets.DatasetDict:
    """Load `<cache_dir>/<name>-<key>` if present, else `build()`, save it there and load it back.

    Loading back gives memory-mapped Arrow files (cheap to share with DataLoader workers). The save goes
    to a temporary folder renamed into place, so an interrupted build never leaves a half cache. An
    unwritable cache folder only warns and returns the in-memory build. A cache that exists but cannot be
    read (a truncated or damaged Arrow file) is derived data: it is named in a warning, removed and rebuilt.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-{key}"
    if (target / "dataset_dict.json").is_file():
        try:
            return datasets.load_from_disk(str(target))
        except Exception as err:  # pyarrow / datasets raise many types for damaged files
            warnings.warn(f"lt_zoo: the cached {name} at {target} is unreadable ({type(err).__name__}: {err}); "
                          f"rebuilding it")
            shutil.rmtree(target, ignore_errors=True)
    built = build()
    tmp = root / f".{name}-{key}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        built.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"lt_zoo: cannot cache {name} under {root} ({err}); using the in-memory build")
        return built
    return datasets.load_from_disk(str(target))
