"""lt_zoo.training.checkpoint on a tiny model: exact round trips, truncation, pickles never executed, rotation."""
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file

from lt_zoo.training.checkpoint import (MANIFEST, CheckpointError, find_resume_checkpoint, load_checkpoint,
                                        save_checkpoint, validate_checkpoint)
from lt_zoo.training.run_dir import checkpoint_dirs


@pytest.fixture
def accelerator():
    """A CPU Accelerator; the process-wide Accelerate singletons and RNG streams are restored afterwards."""
    from accelerate.state import AcceleratorState, GradientState
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])


def make(accelerator, opt='sgd', seed=0):
    """A prepared tiny model (with BN buffers), optimizer and per-step scheduler."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    if opt == 'sgd':
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9 ** s)
    return accelerator.prepare(model, optimizer, scheduler)


def train_steps(model, optimizer, scheduler, n):
    """n steps whose data comes from the global torch RNG, so a wrong RNG restore changes the result."""
    for _ in range(n):
        x = torch.randn(6, 3)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def draws():
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def saved(accelerator, tmp_path, epoch=1, **kw):
    model, optimizer, scheduler = make(accelerator)
    train_steps(model, optimizer, scheduler, 3)
    ckpt = save_checkpoint(accelerator, tmp_path / 'run', epoch, model=model, optimizer=optimizer,
                           scheduler=scheduler, state={'epoch': epoch, 'best': 0.5}, keep=kw.get('keep', 2))
    return ckpt, model, optimizer


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
def test_resume_continues_bit_exactly(accelerator, tmp_path, opt):
    model, optimizer, scheduler = make(accelerator, opt)
    train_steps(model, optimizer, scheduler, 3)
    ckpt = save_checkpoint(accelerator, tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                           state={'epoch': 1, 'note': [1, 2.5, None]}, keep=2)
    train_steps(model, optimizer, scheduler, 4)
    want_params, want_draws, want_lr = params(model), draws(), scheduler.get_last_lr()
    want_opt = optimizer.state_dict()

    torch.manual_seed(123)  # scramble everything the checkpoint must restore
    np.random.seed(5)
    random.seed(7)
    model2, optimizer2, scheduler2 = make(accelerator, opt, seed=99)
    state = load_checkpoint(accelerator, ckpt, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert state == {'epoch': 1, 'note': [1, 2.5, None]}
    train_steps(model2, optimizer2, scheduler2, 4)
    got = params(model2)
    assert got.keys() == want_params.keys()
    for k in want_params:
        assert torch.equal(got[k], want_params[k]), k
    assert draws() == want_draws
    assert scheduler2.get_last_lr() == want_lr
    got_opt = optimizer2.state_dict()
    assert got_opt['param_groups'] == want_opt['param_groups']  # tuples (AdamW betas) stay tuples
    for i, s in want_opt['state'].items():
        for k, v in s.items():
            assert torch.equal(got_opt['state'][i][k], v), (i, k)


def test_sequential_schedule_with_milestones_continues_exactly(accelerator, tmp_path):
    """Warm-up then step decay, as the trainer builds it: MultiStepLR's milestones are a Counter."""
    def build():
        model = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.2, 1.0, total_iters=3),
            torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.1)], milestones=[3])
        return accelerator.prepare(model, optimizer, scheduler)

    def lrs(optimizer, scheduler, n):
        out = []
        for _ in range(n):
            optimizer.step()
            scheduler.step()
            out.append(scheduler.get_last_lr()[0])
        return out
    model, optimizer, scheduler = build()
    lrs(optimizer, scheduler, 1)  # resumed during the warm-up: the switch restarts MultiStepLR by step(0)
    ckpt = save_checkpoint(accelerator, tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                           state={}, keep=1)
    want = lrs(optimizer, scheduler, 9)
    model2, optimizer2, scheduler2 = build()
    load_checkpoint(accelerator, ckpt, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert lrs(optimizer2, scheduler2, 9) == want
    assert len(set(want)) == 4  # end of the warm-up, then 0.1 and the decays at milestones 2 and 4


def test_momentum_buffers_and_step_are_stored_exactly(accelerator, tmp_path):
    ckpt, _, optimizer = saved(accelerator, tmp_path)
    tensors = load_file(ckpt / 'optimizer.safetensors')
    bufs = [s['momentum_buffer'] for s in optimizer.state_dict()['state'].values()]
    assert len(tensors) == len(bufs) == 6
    for got, want in zip([tensors[f'optimizer.state.{i}.momentum_buffer'] for i in range(6)], bufs):
        assert torch.equal(got, want)
    assert json.loads((ckpt / 'trainer_state.json').read_text())['state'] == {'epoch': 1, 'best': 0.5}


def test_only_json_and_safetensors_are_written(accelerator, tmp_path):
    ckpt, *_ = saved(accelerator, tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        MANIFEST, 'model.safetensors', 'optimizer.json', 'optimizer.safetensors', 'rng_rank0.json',
        'scheduler.json', 'trainer_state.json']
    assert not list(ckpt.parent.glob('.tmp_*'))


def test_state_must_be_json(accelerator, tmp_path):
    model, optimizer, scheduler = make(accelerator)
    with pytest.raises(TypeError, match='plain JSON'):
        save_checkpoint(accelerator, tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                        state={'epoch': object()}, keep=2)
    assert not (tmp_path / 'checkpoints').exists()


# ------------------------------------------------------------------------------------- rotation, naming
def test_rotation_keeps_newest_and_drops_abandoned_epochs(accelerator, tmp_path):
    model, optimizer, scheduler = make(accelerator)
    run = tmp_path / 'run'
    for epoch in (1, 2, 3, 4):
        save_checkpoint(accelerator, run, epoch, model=model, optimizer=optimizer, scheduler=scheduler,
                        state={'epoch': epoch}, keep=2)
    assert [p.name for p in checkpoint_dirs(run)] == ['epoch_0003', 'epoch_0004']
    # resumed from epoch 3 and saved epoch 3 again: epoch 4 belongs to the abandoned continuation
    save_checkpoint(accelerator, run, 3, model=model, optimizer=optimizer, scheduler=scheduler,
                    state={'epoch': 3, 'again': True}, keep=2)
    assert [p.name for p in checkpoint_dirs(run)] == ['epoch_0003']
    assert json.loads((run / 'checkpoints/epoch_0003/trainer_state.json').read_text())['state']['again']
    assert sorted(os.listdir(run / 'checkpoints')) == ['epoch_0003']  # no .tmp_ or .old_ left


def test_stale_temporary_folder_of_a_killed_save_is_replaced(accelerator, tmp_path):
    stale = tmp_path / 'run/checkpoints/.tmp_epoch_0001'
    stale.mkdir(parents=True)
    (stale / 'optimizer.bin').write_bytes(b'half')
    ckpt, *_ = saved(accelerator, tmp_path)
    validate_checkpoint(ckpt)
    assert not stale.exists()


# --------------------------------------------------------------------------------- truncation, corruption
FILES = ['model.safetensors', 'optimizer.safetensors', 'optimizer.json', 'scheduler.json', 'trainer_state.json',
         'rng_rank0.json', MANIFEST]


@pytest.mark.parametrize('name', FILES)
def test_truncated_file_is_named_and_nothing_is_restored(accelerator, tmp_path, name):
    ckpt, *_ = saved(accelerator, tmp_path)
    path = ckpt / name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    for check in (lambda: validate_checkpoint(ckpt), lambda: find_resume_checkpoint(tmp_path / 'run', 'latest'),
                  lambda: find_resume_checkpoint(tmp_path / 'run', str(ckpt))):
        with pytest.raises(CheckpointError) as e:
            check()
        msg = str(e.value)
        assert str(ckpt) in msg and repr(name) in msg and '--resume PATH' in msg and '--overwrite' in msg
    model, optimizer, scheduler = make(accelerator, seed=7)
    before, rng = params(model), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(accelerator, ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and not optimizer.state_dict()['state']


def test_flipped_byte_is_detected(accelerator, tmp_path):
    ckpt, *_ = saved(accelerator, tmp_path)
    data = bytearray((ckpt / 'model.safetensors').read_bytes())
    data[-1] ^= 0xFF  # same size, still parses: only the hash tells
    (ckpt / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'model.safetensors': content differs"):
        validate_checkpoint(ckpt)


def test_missing_file_and_missing_folder(accelerator, tmp_path):
    ckpt, *_ = saved(accelerator, tmp_path)
    (ckpt / 'scheduler.json').unlink()
    with pytest.raises(CheckpointError, match=r"'scheduler.json': missing"):
        validate_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"not a directory"):
        find_resume_checkpoint(tmp_path / 'run', str(tmp_path / 'nope'))


def test_corrupt_latest_lists_the_earlier_checkpoints(accelerator, tmp_path):
    model, optimizer, scheduler = make(accelerator)
    for epoch in (1, 2):
        save_checkpoint(accelerator, tmp_path, epoch, model=model, optimizer=optimizer, scheduler=scheduler,
                        state={'epoch': epoch}, keep=2)
    (tmp_path / 'checkpoints/epoch_0002/model.safetensors').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r"epoch_0002.*Earlier checkpoints: \[.*epoch_0001'\]"):
        find_resume_checkpoint(tmp_path, 'latest')
    assert find_resume_checkpoint(tmp_path, str(tmp_path / 'checkpoints/epoch_0001')).name == 'epoch_0001'


def test_model_mismatch_is_a_checkpoint_error(accelerator, tmp_path):
    ckpt, *_ = saved(accelerator, tmp_path)
    other = accelerator.prepare(nn.Sequential(nn.Linear(3, 5)))
    with pytest.raises(CheckpointError, match=r"'model.safetensors': does not fit this run's model"):
        load_checkpoint(accelerator, ckpt, model=other, optimizer=None, scheduler=None)


# -------------------------------------------------------------------------------------- resume requests
def test_not_resuming_returns_none(tmp_path):
    assert find_resume_checkpoint(tmp_path / 'run', None) is None


def test_resume_without_checkpoint_names_the_folder_and_leaves_it_alone(tmp_path):
    """Issue: a finished run with its checkpoints deleted was silently restarted by --resume and overwritten."""
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    for name, text in (('eval.json', '{"top1": 0.9}'), ('metrics.jsonl', '{"epoch": 1}\n'), ('config.yaml', 'a: 1\n')):
        (run / name).write_text(text)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=rf"{run}.*no complete checkpoint.*--overwrite"):
        find_resume_checkpoint(run, 'latest')
    with pytest.raises(CheckpointError, match=r"does not exist.*--overwrite"):
        find_resume_checkpoint(tmp_path / 'absent', 'latest')
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_accelerate_save_state_checkpoint_is_refused(accelerator, tmp_path):
    model, optimizer, scheduler = make(accelerator)
    old = tmp_path / 'run/checkpoints/epoch_0001'
    accelerator.save_state(str(old))
    with pytest.raises(CheckpointError, match=r"Accelerate's save_state \(pickles"):
        find_resume_checkpoint(tmp_path / 'run', 'latest')


# ------------------------------------------------------------------------------------ pickles never run
class _Marker:
    """Unpickling this creates the marker file (what a malicious checkpoint would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), 'w'))


@pytest.mark.parametrize('name', ['random_states_0.pkl', 'optimizer.bin', 'scheduler.bin'])
def test_crafted_pickle_beside_a_checkpoint_is_refused_unread(accelerator, tmp_path, name):
    ckpt, *_ = saved(accelerator, tmp_path)
    marker = tmp_path / 'pwned'
    (ckpt / name).write_bytes(pickle.dumps(_Marker(marker)))
    model, optimizer, scheduler = make(accelerator)
    with pytest.raises(CheckpointError, match=rf"'{name}': not written by lt_zoo"):
        load_checkpoint(accelerator, ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not marker.exists()


@pytest.mark.parametrize('name', ['model.safetensors', 'optimizer.safetensors', 'rng_rank0.json'])
def test_crafted_pickle_with_a_matching_manifest_is_never_executed(accelerator, tmp_path, name):
    """Even when the manifest is forged to match, every loader is a safetensors/JSON parser."""
    ckpt, *_ = saved(accelerator, tmp_path)
    marker = tmp_path / 'pwned'
    payload = pickle.dumps(_Marker(marker))
    (ckpt / name).write_bytes(payload)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    import hashlib
    manifest['files'][name] = {'bytes': len(payload), 'sha256': hashlib.sha256(payload).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    validate_checkpoint(ckpt)  # the forgery passes the integrity check ...
    model, optimizer, scheduler = make(accelerator)
    with pytest.raises(CheckpointError, match=rf"{ckpt}.*'{name}'"):  # ... but not the loaders
        load_checkpoint(accelerator, ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not marker.exists()
