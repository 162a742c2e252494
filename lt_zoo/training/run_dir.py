"""The run directory: refuse to clobber it, list its epoch checkpoints, keep metrics.jsonl consistent.

Layout::

    RUN/config.yaml              resolved config
    RUN/metrics.jsonl            one JSON line per epoch
    RUN/checkpoints/epoch_0003/  epoch checkpoint (lt_zoo.training.checkpoint: safetensors + JSON)
    RUN/eval.json                final evaluation
    RUN/per_class_accuracy.png   per-class accuracy against training count
    RUN/model.safetensors, RUN/config.json   timm export (lt_zoo.export)
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

__all__ = ['prepare_run_dir', 'checkpoint_dirs', 'checkpoint_name', 'truncate_metrics', 'CHECKPOINTS']

CHECKPOINTS = 'checkpoints'
_CKPT = re.compile(r'^epoch_(\d{4,})$')


def checkpoint_name(epoch: int) -> str:
    """Folder name of the checkpoint taken after ``epoch`` epochs: ``epoch_0003``."""
    return f'epoch_{epoch:04d}'


def checkpoint_dirs(run_dir: str) -> List[Path]:
    """Complete epoch checkpoints, oldest first (incomplete ones live under a temporary name)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)),
                  key=lambda p: int(_CKPT.match(p.name).group(1)))


def prepare_run_dir(run_dir: str, *, resume: Optional[str], overwrite: bool) -> None:
    """Refuse an existing, non-empty run directory unless resuming or explicitly overwriting.

    Called after the config, the data and the resume checkpoint were validated, so bad input never
    deletes a previous run.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {run_dir!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if resume is None and not overwrite:
            raise FileExistsError(f"run directory {run_dir!r} already exists; pass --resume to continue it or "
                                  f"--overwrite to replace it")
        if overwrite:
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only metric lines of epochs <= last_epoch (a resumed run rewrites the later ones).

    A half-written last line (a kill during the write, always after the last checkpoint) is dropped;
    any other unreadable line is an error naming the file and line.  The file is replaced atomically.
    """
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            epoch = json.loads(line)['epoch']
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1} is not a metrics record ({e}); fix or remove that line") from None
        if epoch <= last_epoch:
            kept.append(line)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(''.join(ln + '\n' for ln in kept))
    os.replace(tmp, path)

