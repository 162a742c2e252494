"""The run directory: refuse to clobber it, list its epoch checkpoints, keep metrics.jsonl consistent.

Layout::

    RUN/config.yaml              resolved config
    RUN/metrics.jsonl            one JSON line per epoch
    RUN/checkpoints/epoch_0003/  epoch checkpoint (lt_zoo.training.checkpoint: safetensors + JSON)
    RUN/eval.json                final evaluation
    RUN/per_class_accuracy.png   per-class accuracy against training count
    RUN/model.safetensors, RUN/config.json   timm export (lt_zoo.export)
    PARENT/.RUN.lock             held while a process writes RUN (:func:`run_dir_lock`)
"""
import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, List, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two trainings into one directory are not detected
    fcntl = None

__all__ = ['prepare_run_dir', 'checkpoint_dirs', 'checkpoint_name', 'checkpoint_epoch', 'read_metrics', 'truncate_metrics',
           'run_dir_lock', 'run_dir_holder', 'RunDirBusyError', 'CHECKPOINTS']

CHECKPOINTS = 'checkpoints'
_CKPT = re.compile(r'^epoch_(\d{4,})$')


def checkpoint_name(epoch: int) -> str:
    """Folder name of the checkpoint taken after ``epoch`` epochs: ``epoch_0003``."""
    return f'epoch_{epoch:04d}'


def checkpoint_epoch(ckpt) -> int:
    """Epochs done by the checkpoint folder ``ckpt`` (the inverse of :func:`checkpoint_name`)."""
    m = _CKPT.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{str(ckpt)!r} is not a checkpoint folder; expected a name like {checkpoint_name(3)!r}")
    return int(m.group(1))


def checkpoint_dirs(run_dir: str) -> List[Path]:
    """Complete epoch checkpoints, oldest first (incomplete ones live under a temporary name)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)),
                  key=checkpoint_epoch)


class RunDirBusyError(RuntimeError):
    """Another live process is writing the run directory."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``run_dir`` for the duration of a training.

    Two trainings into one directory (two benchmark runners, a resume started while the run still
    runs) would interleave checkpoints and metrics.  The lock is a file beside the directory,
    ``PARENT/.NAME.lock``, because ``--overwrite`` replaces the directory itself; the kernel drops it
    when the holder exits, however it exits.  Raises :class:`RunDirBusyError` naming the holder's pid.
    ``enabled=False`` (non-main ranks of a distributed launch; they do not own the directory) is a no-op.
    """
    if not enabled or fcntl is None:
        yield
        return
    lock = _lock_path(run_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
            raise RunDirBusyError(f"run directory {str(run_dir)!r} is being written by another process (pid "
                                  f"{holder}, lock {str(lock)!r}); wait for it to finish or choose another "
                                  f"--output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock_path(run_dir: str) -> Path:
    path = Path(run_dir).absolute()
    return path.parent / f'.{path.name}.lock'


def run_dir_holder(run_dir: str, locks: str = '/proc/locks') -> Optional[int]:
    """The pid of the live process that holds ``run_dir``'s lock (:func:`run_dir_lock`), else None.

    Read from the kernel's lock table (Linux ``/proc/locks``), so asking takes no lock and never makes a
    training that starts at that moment fail as busy.  None where the table is not readable (not Linux)."""
    try:
        st = _lock_path(run_dir).stat()
        table = Path(locks).read_text()
    except OSError:
        return None
    # a line: "1: FLOCK  ADVISORY  WRITE 23768 fe:00:5743326 0 EOF" (waiters carry a "->" before FLOCK)
    where = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
    for fields in (line.split() for line in table.splitlines()):
        if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[5] == where:
            return int(fields[4])
    return None


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


def _metric_lines(path: Path) -> List[tuple]:
    """(line, record) of every metrics line; a half-written last line (a kill during the write, always
    after the last checkpoint) is dropped, any other unreadable line is an error naming the file and line."""
    lines = Path(path).read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record['epoch']
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1} is not a metrics record ({e}); fix or remove that line") from None
        out.append((line, record))
    return out


def read_metrics(path: Path) -> List[dict]:
    """The records of a run's metrics.jsonl, one per epoch in file order ([] without the file)."""
    return [r for _, r in _metric_lines(path)] if Path(path).exists() else []


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only metric lines of epochs <= last_epoch (a resumed run rewrites the later ones).

    A half-written last line is dropped and any other unreadable line is an error (``read_metrics``).
    The file is replaced atomically.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = [line for line, record in _metric_lines(path) if record['epoch'] <= last_epoch]
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(''.join(ln + '\n' for ln in kept))
    os.replace(tmp, path)
