"""The run directory: refuse to clobber it, save epoch checkpoints atomically, find the latest one.

Layout::

    RUN/config.yaml              resolved config
    RUN/metrics.jsonl            one JSON line per epoch
    RUN/checkpoints/epoch_0003/  Accelerate state (model, optimizer, scheduler, RNG, trainer state)
    RUN/eval.json                final evaluation
    RUN/per_class_accuracy.png   per-class accuracy against training count
    RUN/model.safetensors, RUN/config.json   timm export (lt_zoo.export)
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ['prepare_run_dir', 'checkpoint_dirs', 'resolve_resume', 'commit_checkpoint', 'truncate_metrics',
           'TrainState']

_CKPT = re.compile(r'^epoch_(\d{4,})$')


def checkpoint_dirs(run_dir: str) -> List[Path]:
    """Complete epoch checkpoints, oldest first (incomplete ones live under a temporary name)."""
    root = Path(run_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)),
                  key=lambda p: int(_CKPT.match(p.name).group(1)))


def prepare_run_dir(run_dir: str, *, resume: Optional[str], overwrite: bool) -> None:
    """Refuse an existing, non-empty run directory unless resuming or explicitly overwriting.

    Called after the config and data were validated, so a bad option never deletes a previous run.
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


def resolve_resume(run_dir: str, resume: Optional[str]) -> Optional[Path]:
    """'latest' -> newest complete checkpoint of the run (None if the run has none yet); a path -> itself."""
    if resume is None:
        return None
    if resume == 'latest':
        ckpts = checkpoint_dirs(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not path.is_dir() or not (path / TrainState.FILE).exists():
        raise FileNotFoundError(f"resume checkpoint {resume!r} is not an epoch checkpoint directory; "
                                f"available: {[str(p) for p in checkpoint_dirs(run_dir)]}")
    return path


def commit_checkpoint(tmp_dir: Path, run_dir: str, epoch: int, keep: int) -> Path:
    """Move a fully written checkpoint into place and drop the oldest beyond ``keep``."""
    final = Path(run_dir) / 'checkpoints' / f'epoch_{epoch:04d}'
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only metric lines of epochs <= last_epoch (a resumed run rewrites the later ones)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)['epoch'] <= last_epoch]
    path.write_text(''.join(ln + '\n' for ln in lines))


class TrainState:
    """Epoch counter saved as ``trainer_state.json`` beside the Accelerate state (JSON, not a pickle)."""

    FILE = 'trainer_state.json'

    def __init__(self):
        self.epoch = 0  # epochs completed

    def save(self, ckpt_dir: Path) -> None:
        (Path(ckpt_dir) / self.FILE).write_text(json.dumps({'epoch': self.epoch}))

    def load(self, ckpt_dir: Path) -> None:
        self.epoch = int(json.loads((Path(ckpt_dir) / self.FILE).read_text())['epoch'])
