"""Epoch checkpoints without pickles: written atomically, validated before a resume touches anything.

Layout of ``RUN/checkpoints/epoch_0003/``::

    model.safetensors          the unwrapped model's state_dict
    optimizer.json             optimizer state_dict (param_groups, per-parameter state), tensors referenced
    optimizer.safetensors        by name and stored here (momentum buffers, Adam moments, ...)
    scheduler.json             LR scheduler state_dict (plus scheduler.safetensors if it holds tensors)
    scaler.json                fp16 GradScaler state, when Accelerate uses one
    trainer_state.json         the trainer's own ``state`` dict, the epoch and Accelerate's accumulation step
    rng_rank0.json ...         per process rank: python ``random``, numpy, torch CPU and CUDA generator states
    manifest.json              written last: format, epoch, world size, byte size and SHA-256 of every file

A checkpoint is written into ``checkpoints/.tmp_epoch_0003``, fsynced and renamed into place, so a kill
at any moment leaves either the complete checkpoint or none (the temporary folder is ignored and
replaced by the next save).  A resume first checks the manifest (every file present, of the recorded
size and hash, nothing unlisted), then parses every file, and only then restores anything: a corrupt
checkpoint is reported by folder and file before the run directory changes.  Nothing is ever
unpickled: JSON and safetensors only, so a crafted pickle in a checkpoint folder is never executed.

Why not Accelerate's ``save_state`` with ``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)``: it pickles the optimizer, scheduler and RNG states (``optimizer.bin``,
``scheduler.bin``, ``random_states_<rank>.pkl``) and ``load_state`` unpickles them; it writes straight
into the final ``checkpoint_<i>`` folder, so a kill mid-save leaves a half checkpoint that
``load_state()`` then picks as the latest; and ``total_limit`` deletes old checkpoints before the new
one exists.  What it stores that matters here is kept: model, optimizer, scheduler, GradScaler, the
accumulation step and every process's RNG streams (its dataloader sampler state is only written for
iterable datasets and stateful dataloaders, which the trainer does not use).  Other accelerators'
generators (XPU, MLU, ...) are not saved.  Multi-node runs need a shared file system, as with Accelerate.
"""
import json
import os
import random
import shutil
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..file_hash import sha256_file as _sha256
from .run_dir import CHECKPOINTS, checkpoint_dirs, checkpoint_epoch, checkpoint_name

__all__ = ['CheckpointError', 'save_checkpoint', 'load_checkpoint', 'validate_checkpoint', 'find_resume_checkpoint',
           'FORMAT', 'MANIFEST']

FORMAT = 'lt_zoo-checkpoint-1'
MANIFEST = 'manifest.json'
MODEL = 'model.safetensors'
TRAINER = 'trainer_state.json'
# JSON markers of the tree encoding; a Counter is MultiStepLR's milestones (missing keys must read as 0)
_TENSOR, _TUPLE, _ITEMS, _COUNTER = '__tensor__', '__tuple__', '__items__', '__counter__'
_MARKERS = {_TENSOR, _TUPLE, _ITEMS, _COUNTER}
# What Accelerate's save_state leaves (pickles): recognised to explain, never loaded.
_ACCELERATE_FILES = ('optimizer.bin', 'scheduler.bin', 'scaler.pt', 'pytorch_model.bin', 'sampler.bin')


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder, the file and what to do."""


def _error(ckpt_dir, file: Optional[str], problem: str) -> CheckpointError:
    where = f"checkpoint {str(ckpt_dir)!r}" + (f", file {file!r}" if file else '')
    return CheckpointError(f"{where}: {problem}; resume from an earlier checkpoint with --resume PATH "
                           f"(see {Path(ckpt_dir).parent}) or start the run again with --overwrite")


def _rng_name(rank: int) -> str:
    return f'rng_rank{rank}.json'


# -------------------------------------------------------------------------------- tree <-> JSON + tensors
def _encode(obj: Any, tensors: Dict[str, torch.Tensor], path: str) -> Any:
    """A state_dict as JSON: tensors move to ``tensors`` under their path, tuples and non-string keys are marked."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f'{path}.{i}') for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, Counter):
        return {_COUNTER: _encode(dict(obj), tensors, path)}
    if isinstance(obj, dict):
        if type(obj) not in (dict, OrderedDict):
            raise TypeError(f"{path} is a {type(obj).__name__}, which a checkpoint cannot restore as such")
        if all(isinstance(k, str) for k in obj) and not _MARKERS & set(obj):
            return {k: _encode(v, tensors, f'{path}.{k}') for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors, f'{path}.key{i}'), _encode(v, tensors, f'{path}.{k}')]
                         for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"{path} is a {type(obj).__name__}, which a checkpoint cannot store without pickling "
                    f"(JSON values and tensors only)")


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if len(obj) == 1 and _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if len(obj) == 1 and _COUNTER in obj:
            return Counter(_decode(obj[_COUNTER], tensors))
        if len(obj) == 1 and _ITEMS in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _write_json(path: Path, obj: Any) -> None:
    # allow_nan: a diverged run's lr or loss scale is still worth checkpointing exactly
    path.write_text(json.dumps(obj, allow_nan=True))


def _write_tree(folder: Path, name: str, obj: Any) -> None:
    """``name.json`` (+ ``name.safetensors`` when ``obj`` holds tensors)."""
    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, name)
    if tensors:
        save_file(tensors, folder / f'{name}.safetensors')
    _write_json(folder / f'{name}.json', {'tensors': bool(tensors), 'tree': tree})


def _read_tree(folder: Path, name: str) -> Any:
    doc = _read_json(folder, f'{name}.json')
    tensors = _read_tensors(folder, f'{name}.safetensors') if doc.get('tensors') else {}
    try:
        return _decode(doc['tree'], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise _error(folder, f'{name}.json', f"malformed state ({type(e).__name__}: {e})") from None


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text())
    except FileNotFoundError:
        raise _error(folder, name, 'missing') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(folder, name, f"unreadable or truncated JSON ({e})") from None


def _read_tensors(folder: Path, name: str) -> Dict[str, torch.Tensor]:
    try:
        return load_file(folder / name)
    except FileNotFoundError:
        raise _error(folder, name, 'missing') from None
    except Exception as e:  # SafetensorError (truncated, not a safetensors file), OSError
        raise _error(folder, name, f"not a readable safetensors file ({e})") from None


# ------------------------------------------------------------------------------------------ RNG streams
def _rng_state() -> Dict[str, Any]:
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state = {'python': [version, list(keys), gauss],
             'numpy': [name, mt.tolist(), int(pos), int(has_gauss), float(cached)],
             'torch': torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state['cuda'] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    version, keys, gauss = state['python']
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state['torch'], dtype=torch.uint8))
    if 'cuda' in state and torch.cuda.is_available():
        for device, s in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), device)


# ------------------------------------------------------------------------------------------- file safety
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Swap the complete ``tmp`` folder in as ``final``; a previous ``final`` is replaced only after that."""
    old = final.with_name(f'.old_{final.name}')
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- public
def save_checkpoint(accelerator, run_dir, epoch: int, *, model, optimizer, scheduler, state: dict,
                    keep: int) -> Path:
    """Save ``RUN/checkpoints/epoch_NNNN`` (``epoch`` epochs done) atomically; call it on every process.

    The main process writes the shared files, every process its RNG file.  Afterwards the ``keep`` newest
    checkpoints remain, and none of a later epoch: after a resume from an earlier checkpoint those belong
    to the abandoned continuation (``metrics.jsonl`` drops their lines the same way).
    Returns the checkpoint folder.
    """
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (checkpoints kept), got {keep!r}")
    try:
        trainer = json.dumps({'epoch': epoch, 'accelerator_step': int(accelerator.step), 'state': state},
                             allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint state must be plain JSON (it is the trainer's state dict): {e}") from None
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(epoch)
    tmp = root / f'.tmp_{final.name}'
    # without torch.compile's wrapper: the state_dict keys then do not depend on the compile option
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a process killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    rng_file = tmp / _rng_name(accelerator.process_index)
    _write_json(rng_file, _rng_state())
    _fsync(rng_file)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(unwrapped, str(tmp / MODEL), force_contiguous=True)
        if optimizer is not None:
            _write_tree(tmp, 'optimizer', optimizer.state_dict())
        if scheduler is not None:
            _write_tree(tmp, 'scheduler', scheduler.state_dict())
        if getattr(accelerator, 'scaler', None) is not None:
            _write_tree(tmp, 'scaler', accelerator.scaler.state_dict())
        (tmp / TRAINER).write_text(trainer)
        files = {}
        for p in sorted(tmp.iterdir()):
            _fsync(p)
            files[p.name] = {'bytes': p.stat().st_size, 'sha256': _sha256(p)}
        _write_json(tmp / MANIFEST, {'format': FORMAT, 'epoch': epoch,
                                     'num_processes': accelerator.num_processes, 'files': files})
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        _commit(tmp, final)
        done = checkpoint_dirs(run_dir)
        stale = ([p for p in done if checkpoint_epoch(p) > epoch]
                 + [p for p in done if checkpoint_epoch(p) <= epoch][:-keep])
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def validate_checkpoint(ckpt_dir) -> None:
    """Check that ``ckpt_dir`` is a complete, unmodified lt_zoo checkpoint; reads no state.

    Raises CheckpointError naming the folder and the offending file when the folder is missing, was
    written by Accelerate's pickling ``save_state``, lacks its manifest, or when a file is missing,
    truncated, altered or not listed in the manifest.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise _error(folder, None, 'not a directory')
    if not (folder / MANIFEST).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.name in _ACCELERATE_FILES or p.suffix == '.pkl')
        if pickles:
            raise _error(folder, pickles[0], f"written by Accelerate's save_state (pickles {pickles}), which lt_zoo "
                                             f"refuses to unpickle")
        raise _error(folder, MANIFEST, 'missing (not an lt_zoo checkpoint, or its save did not finish)')
    manifest = _read_json(folder, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT or not isinstance(manifest.get('files'),
                                                                                            dict):
        raise _error(folder, MANIFEST, f"not a {FORMAT} manifest")
    listed = manifest['files']
    for name in sorted(p.name for p in folder.iterdir()):
        if name != MANIFEST and name not in listed:
            raise _error(folder, name, 'not written by lt_zoo (not in manifest.json); remove it')
    for name, meta in listed.items():
        path = folder / name
        if not path.is_file():
            raise _error(folder, name, 'missing')
        size = path.stat().st_size
        if size != meta.get('bytes'):
            raise _error(folder, name, f"{size} bytes instead of {meta.get('bytes')} (truncated or altered)")
        if _sha256(path) != meta.get('sha256'):
            raise _error(folder, name, 'content differs from the SHA-256 recorded in manifest.json (corrupt)')
    for name in (MODEL, TRAINER, _rng_name(0)):
        if name not in listed:
            raise _error(folder, name, 'missing from manifest.json')


def load_checkpoint(accelerator, ckpt_dir, *, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler, GradScaler, Accelerate's step and this process's RNG streams.

    Everything is validated and parsed first, so a bad checkpoint raises CheckpointError before any state
    changes.  Returns the trainer's ``state`` dict given to :func:`save_checkpoint`.
    """
    folder = Path(ckpt_dir)
    validate_checkpoint(folder)
    manifest = _read_json(folder, MANIFEST)
    trainer = _read_json(folder, TRAINER)
    _read_tensors(folder, MODEL)  # parse before anything is restored; load_model reads it again below
    parts = {name: _read_tree(folder, name) for name, obj in (('optimizer', optimizer), ('scheduler', scheduler))
             if obj is not None}
    scaler = getattr(accelerator, 'scaler', None)
    if scaler is not None and 'scaler.json' in manifest['files']:
        parts['scaler'] = _read_tree(folder, 'scaler')
    rank_file = _rng_name(accelerator.process_index)
    rng = _read_json(folder, rank_file) if rank_file in manifest['files'] else None
    if manifest.get('num_processes') != accelerator.num_processes:
        warnings.warn(f"checkpoint {str(folder)!r} was written by {manifest.get('num_processes')} processes, this run "
                      f"has {accelerator.num_processes}: the continuation will not repeat the original run exactly")
    try:
        load_model(accelerator.unwrap_model(model, keep_torch_compile=False), str(folder / MODEL), strict=True)
    except RuntimeError as e:
        raise _error(folder, MODEL, f"does not fit this run's model (was the model config changed?): "
                                    f"{str(e).splitlines()[0]}") from None
    for name, obj in (('optimizer', optimizer), ('scheduler', scheduler), ('scaler', scaler)):
        if name in parts:
            try:
                obj.load_state_dict(parts[name])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise _error(folder, f'{name}.json', f"does not fit this run's {name} ({e})") from None
    accelerator.step = int(trainer.get('accelerator_step', 0))
    if rng is not None:
        try:
            _set_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _error(folder, rank_file, f"malformed RNG state ({e})") from None
    return trainer['state']


def find_resume_checkpoint(run_dir, resume: Optional[str]) -> Optional[Path]:
    """The validated checkpoint to resume ``run_dir`` from: None when ``resume`` is None (not resuming).

    ``resume='latest'`` takes the newest complete checkpoint of the run; any other value is a
    checkpoint folder.  Raises CheckpointError when there is nothing to resume from (the run
    directory is then left as it is) or when the checkpoint is incomplete or corrupt.
    """
    if resume is None:
        return None
    if resume != 'latest':
        validate_checkpoint(resume)
        return Path(resume)
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        what = 'does not exist' if not Path(run_dir).exists() else f"has no complete checkpoint ({CHECKPOINTS}/epoch_NNNN)"
        raise CheckpointError(f"--resume: run directory {str(run_dir)!r} {what}, so there is nothing to resume; "
                              f"pass --overwrite instead of --resume to start the run from scratch (this replaces "
                              f"everything in it)")
    try:
        validate_checkpoint(ckpts[-1])
    except CheckpointError as e:
        earlier = [str(p) for p in ckpts[:-1]]
        raise CheckpointError(f"{e}. Earlier checkpoints: {earlier or 'none'}") from None
    return ckpts[-1]
