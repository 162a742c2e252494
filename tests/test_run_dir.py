"""lt_zoo.training.run_dir: refusing to clobber a run, listing checkpoints, keeping metrics.jsonl consistent."""
import json
import shutil
from pathlib import Path

import pytest

from lt_zoo.training.checkpoint import CheckpointError
from lt_zoo.training.run_dir import (checkpoint_dirs, checkpoint_epoch, checkpoint_name, prepare_run_dir,
                                    truncate_metrics)


def _records(path):
    return [json.loads(line)['epoch'] for line in path.read_text().splitlines()]


def test_truncate_metrics_keeps_epochs_up_to_the_checkpoint(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text(''.join(json.dumps({'epoch': e, 'loss': 1.0 / e}) + '\n' for e in (1, 2, 3)))
    truncate_metrics(path, 2)
    assert _records(path) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ['metrics.jsonl']  # replaced in place, no temp file left


def test_truncate_metrics_drops_a_half_written_last_line(tmp_path):
    """A kill while appending epoch 3's line left it cut; that used to raise a raw JSONDecodeError."""
    path = tmp_path / 'metrics.jsonl'
    path.write_text(json.dumps({'epoch': 1}) + '\n' + json.dumps({'epoch': 2}) + '\n{"epoch": 3, "lo')
    truncate_metrics(path, 2)
    assert _records(path) == [1, 2]


def test_time_before_a_resume_is_read_past_a_half_written_last_line(tmp_path):
    """A checkpoint without elapsed_s takes the earlier epochs' time from metrics.jsonl, which a kill may
    have left with a cut last line; it is read before the resume truncates the file."""
    from lt_zoo.training.loop import _epoch_seconds
    from lt_zoo.training.run_dir import read_metrics
    path = tmp_path / 'metrics.jsonl'
    path.write_text(''.join(json.dumps({'epoch': e, 'time_s': 10.0 * e}) + '\n' for e in (1, 2, 3)) + '{"epoch": 4, "ti')
    assert [r['epoch'] for r in read_metrics(path)] == [1, 2, 3]
    assert _epoch_seconds(path, 2) == 30.0 and _epoch_seconds(path, 3) == 60.0
    assert read_metrics(tmp_path / 'absent.jsonl') == [] and _epoch_seconds(tmp_path / 'absent.jsonl', 2) == 0.0


def test_truncate_metrics_names_a_corrupt_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    text = json.dumps({'epoch': 1}) + '\nnot json\n' + json.dumps({'epoch': 2}) + '\n'
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{path}:2 is not a metrics record"):
        truncate_metrics(path, 2)
    assert path.read_text() == text


def test_checkpoint_dirs_ignore_temporary_and_foreign_folders(tmp_path):
    root = tmp_path / 'checkpoints'
    for name in (checkpoint_name(10), checkpoint_name(2), '.tmp_epoch_0011', '.old_epoch_0002', 'epoch_12',
                 'notes'):
        (root / name).mkdir(parents=True)
    (root / 'epoch_0003').write_text('a file, not a checkpoint')
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ['epoch_0002', 'epoch_0010']
    assert checkpoint_dirs(tmp_path / 'absent') == []


def test_checkpoint_epoch_inverts_checkpoint_name_and_refuses_other_folders(tmp_path):
    for epoch in (0, 7, 200, 12345):
        assert checkpoint_epoch(tmp_path / checkpoint_name(epoch)) == epoch
    for name in ('.tmp_epoch_0011', 'epoch_12', 'epoch_0003x', 'notes'):
        with pytest.raises(ValueError, match=repr(name)[1:-1]):
            checkpoint_epoch(tmp_path / name)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'eval.json').write_text('{}')
    with pytest.raises(FileExistsError, match='--resume to continue it or --overwrite'):
        prepare_run_dir(str(run), resume=None, overwrite=False)
    prepare_run_dir(str(run), resume='latest', overwrite=False)
    assert (run / 'eval.json').exists()
    prepare_run_dir(str(run), resume=None, overwrite=True)
    assert run.is_dir() and not any(run.iterdir())


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(ValueError, match='exists and is not a directory'):
        prepare_run_dir(str(tmp_path / 'f'), resume=None, overwrite=True)
    assert (tmp_path / 'f').read_text() == 'x'


# ------------------------------------------------------------------ through the trainer: resume refusals
ROOT = Path(__file__).resolve().parents[1]
FAST = ['--config', ROOT / 'train/configs/digits/ce.yaml', '--batch_size', '64', '--progress', 'false',
        '--input_size', '8', '--num_workers', '0']


def _train(argv):
    """trainer.main in-process, with the Accelerate singletons reset around it."""
    from accelerate.state import AcceleratorState, GradientState
    from lt_zoo.training import trainer
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return trainer.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A finished 1-epoch digits run with its epoch-1 checkpoint."""
    out = tmp_path_factory.mktemp('finished') / 'run'
    _train([*FAST, '--epochs', '1', '--output_dir', out])
    assert (out / 'checkpoints' / 'epoch_0001').is_dir() and (out / 'eval.json').is_file()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / 'run'
    shutil.copytree(finished_run, dst)
    return dst


@pytest.mark.slow
def test_resume_with_nothing_to_resume_leaves_the_run_untouched(run_copy):
    """Issue: with its checkpoints deleted, --epochs 2 --resume restarted the run and replaced its outputs."""
    shutil.rmtree(run_copy / 'checkpoints')
    before = _snapshot(run_copy)
    with pytest.raises(CheckpointError, match=rf"{run_copy}.*nothing to resume.*--overwrite"):
        _train([*FAST, '--epochs', '2', '--output_dir', run_copy, '--resume'])
    assert _snapshot(run_copy) == before


@pytest.mark.slow
@pytest.mark.parametrize('name', ['model.safetensors', 'optimizer.safetensors', 'optimizer.json', 'rng_rank0.json'])
def test_truncated_checkpoint_is_named_before_the_run_changes(run_copy, name):
    """Issue: a truncated checkpoint file gave a raw loader error after config.yaml had been rewritten."""
    ckpt = run_copy / 'checkpoints' / 'epoch_0001'
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[:len(data) // 2])
    before = _snapshot(run_copy)
    with pytest.raises(CheckpointError) as info:
        _train([*FAST, '--epochs', '2', '--output_dir', run_copy, '--resume'])
    msg = str(info.value)
    assert str(ckpt) in msg and repr(name) in msg and '--resume PATH' in msg and '--overwrite' in msg
    assert _snapshot(run_copy) == before


def test_run_dir_lock_refuses_a_second_writer_and_is_released_on_exit(tmp_path):
    import os
    from lt_zoo.training.run_dir import RunDirBusyError, run_dir_lock
    run = tmp_path / 'runs' / 'ce'
    with run_dir_lock(str(run)):
        assert (tmp_path / 'runs' / '.ce.lock').read_text() == str(os.getpid())
        # a second open of the lock file is a second owner, even in this process
        with pytest.raises(RunDirBusyError, match=rf"'{run}' is being written by another process \(pid "
                                                  rf"{os.getpid()}, lock .*\.ce\.lock'\); wait for it"):
            with run_dir_lock(str(run)):
                pass
        with run_dir_lock(str(run), enabled=False):  # a non-main rank does not take it
            pass
        with run_dir_lock(str(tmp_path / 'runs' / 'other')):  # another directory is another lock
            pass
    with run_dir_lock(str(run)):  # released when the holder left
        pass
    assert not run.exists()  # the lock lives beside the run directory, which it never creates


def test_run_dir_holder_names_the_live_process_holding_the_lock(tmp_path):
    import os
    import subprocess
    import sys
    from lt_zoo.training.run_dir import run_dir_holder, run_dir_lock
    run = tmp_path / 'runs' / 'ce'
    assert run_dir_holder(str(run)) is None  # never locked: no lock file
    holder = subprocess.Popen([sys.executable, '-c', 'import sys\nfrom lt_zoo.training.run_dir import run_dir_lock\n'
                               f'with run_dir_lock({str(run)!r}):\n    print("held", flush=True)\n    sys.stdin.read()'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == 'held'
        assert run_dir_holder(str(run)) == holder.pid
        assert run_dir_holder(str(tmp_path / 'runs' / 'other')) is None
        assert run_dir_holder(str(run), locks=str(tmp_path / 'no_lock_table')) is None  # not Linux
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert run_dir_holder(str(run)) is None  # the lock file stays, the lock went with its holder
    with run_dir_lock(str(run)):  # and asking took no lock: the directory is free to train
        assert run_dir_holder(str(run)) == os.getpid()
    # the table's other lines: another file, and a waiter ("->") on this one, are not holders
    st = (tmp_path / 'runs' / '.ce.lock').stat()
    here = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
    table = tmp_path / 'locks'
    table.write_text(f'1: FLOCK  ADVISORY  WRITE 11 00:00:{st.st_ino + 1} 0 EOF\n'
                     f'1: -> FLOCK  ADVISORY  WRITE 12 {here} 0 EOF\n')
    assert run_dir_holder(str(run), locks=str(table)) is None
    table.write_text(table.read_text() + f'2: FLOCK  ADVISORY  WRITE 13 {here} 0 EOF\n')
    assert run_dir_holder(str(run), locks=str(table)) == 13
