"""The trainer (lt_zoo.training.trainer, CLI train/train.py) end to end on the embedded digits data.

Every run is in-process (``trainer.main(argv)``) at 8x8 input, batch 64 and 1-2 epochs, so one run costs
a few seconds.  Stage-1 runs are cached per session: the ce and gcl runs double as the stage-1
directories of the stage-2 tests, and the 2-epoch ce / cbn runs as the uninterrupted references of
the resume tests.
"""
import contextlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import timm
import lt_zoo  # noqa: F401  (registers the lt_zoo models with timm)
from lt_zoo import data as ltdata
from lt_zoo.export import export_model
from lt_zoo.training import loop as loop_module
from lt_zoo.training import trainer
from lt_zoo.training.config import SCHEMA, load_config
from lt_zoo.training.run_dir import RunDirBusyError

ROOT = Path(__file__).resolve().parents[1]

DIGITS = ROOT / 'train' / 'configs' / 'digits'
FAST = ['--batch_size', '64', '--progress', 'false', '--input_size', '8', '--deterministic', 'true',
        '--num_workers', '0']
STAGE1 = ['ce', 'ce_balanced', 'focal', 'class_balanced', 'logit_adjust', 'balanced_softmax', 'ldam_drw', 'gcl',
          'nbn', 'cbn']
STAGE2_PARENT = {'crt': 'ce', 'lws': 'ce', 'tau_norm': 'ce', 'fsa': 'ce', 'gcl_crt': 'gcl'}
# ce and cbn: 2 epochs, the uninterrupted references of the resume tests; ldam_drw: 2 epochs with the
# deferred re-weighting switched on at epoch 1, so both of its phases run.
EPOCHS = {'ce': 2, 'cbn': 2, 'ldam_drw': 2}
EXTRA = {'ldam_drw': ['--loss_kwargs', '{max_m: 0.5, s: 30.0, drw_epoch: 1}'], 'fsa': ['--fsa_iterations', '5']}
OUTPUTS = ('config.yaml', 'eval.json', 'per_class_accuracy.png', 'model.safetensors', 'config.json')


# ------------------------------------------------------------------------------------------- helpers
def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def _isolated_globals():
    """A run sets process-wide state (Accelerate singletons, deterministic mode, RNG seeds): undo it."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    _reset_accelerate()
    try:
        yield
    finally:
        _reset_accelerate()
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])


def train_main(argv):
    with _isolated_globals():
        return trainer.main([str(a) for a in argv])


def argv_for(method, out, stage1_dir=None, epochs=None):
    argv = ['--config', DIGITS / f'{method}.yaml', *FAST, '--output_dir', out,
            '--epochs', epochs or EPOCHS.get(method, 1), *EXTRA.get(method, [])]
    if stage1_dir is not None:
        argv += ['--stage1_dir', stage1_dir]
    return [str(a) for a in argv]


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory):
    """method -> (run_dir, argv, returned evaluation); each digits method trains once per session."""
    root = tmp_path_factory.mktemp('digits_runs')
    cache = {}

    def get(method):
        if method not in cache:
            parent = get(STAGE2_PARENT[method])[0] if method in STAGE2_PARENT else None
            argv = argv_for(method, root / method, stage1_dir=parent)
            cache[method] = (root / method, argv, train_main(argv))
        return cache[method]
    return get


@lru_cache(maxsize=None)
def _digits_test_split():
    splits = ltdata.load_splits('digits')
    return splits.test, splits.image_column, splits.label_column


def reloaded_predictions(run_dir):
    """Reload the export with plain timm and predict the digits test split from its own data config."""
    model = timm.create_model('local-dir:' + str(run_dir), pretrained=True).eval()
    cfg = timm.data.resolve_model_data_config(model)
    test, image_col, label_col = _digits_test_split()
    tf = ltdata.create_transform('eval', input_size=cfg['input_size'][1], in_chans=cfg['input_size'][0],
                                 mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'])
    ds = ltdata.attach_transform(test, tf, image_col, label_col)
    preds, ys = [], []
    with torch.no_grad():  # batch 64 and test order as the run's own evaluation
        for x, y in torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False, collate_fn=ltdata.collate):
            preds.append(model(x).argmax(1))
            ys.append(y)
    return model, torch.cat(preds).numpy(), torch.cat(ys).numpy()


def read_metrics(run_dir):
    path = Path(run_dir) / 'metrics.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def classifier_split(run_dir):
    """(trunk tensors, head tensors) of an export, split by the classifier name in its config.json."""
    head = json.loads((Path(run_dir) / 'config.json').read_text())['pretrained_cfg']['classifier'] + '.'
    sd = load_file(str(Path(run_dir) / 'model.safetensors'))
    return ({k: v for k, v in sd.items() if not k.startswith(head)},
            {k[len(head):]: v for k, v in sd.items() if k.startswith(head)})


def _mean_or_none(values):
    return float(np.mean(values)) if len(values) else None


def check_run_outputs(run_dir, argv, result, method):
    """The outputs every finished run writes, each checked against an independent expectation."""
    run_dir = Path(run_dir)
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), f'{name} missing in {sorted(os.listdir(run_dir))}'
    cfg = load_config(argv)

    # config.yaml is the resolved config: every key, the file's and the command line's values.
    saved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert saved == cfg and set(saved) == set(SCHEMA)

    # eval.json
    ev = json.loads((run_dir / 'eval.json').read_text())
    assert ev['top1'] == result['top1'] and ev['method'] == cfg['method'] and ev['stage'] == cfg['stage']
    counts = np.array(ev['class_counts'])
    if cfg['balanced_subset']:  # same total as the long tail, every class equal
        assert counts.tolist() == [494 // 10] * 10
    else:  # Cao et al. exponential profile with imbalance factor 10: n_i = floor(n_0 * 10^(-i/9))
        assert counts.tolist() == [int(counts[0] * 0.1 ** (i / 9)) for i in range(10)]
        assert counts[-1] == counts[0] // 10 and ev['train_images'] == counts.sum() == 494
        assert ev['long_tail']['counts'] == counts.tolist() and ev['long_tail']['imbalance_factor'] == 10
    assert isinstance(ev['long_tail']['indices_hash'], str) and len(ev['long_tail']['indices_hash']) >= 8
    acc = np.array(ev['per_class_acc'], dtype=np.float64)
    assert acc.shape == (10,) and ev['balanced_acc'] == pytest.approx(acc.mean(), abs=1e-12)
    many, few = counts > cfg['many_threshold'], counts < cfg['few_threshold']
    for key, mask in (('many', many), ('medium', ~many & ~few), ('few', few)):
        want = _mean_or_none(acc[mask])
        assert (ev[key] is None) if want is None else ev[key] == pytest.approx(want, abs=1e-12), key
    assert 0.0 <= ev['ece'] <= 1.0 and ev['world_size'] == 1
    assert ev['test_images'] == len(_digits_test_split()[0])

    # The export reloads through plain timm and reproduces the evaluation image for image.
    model, pred, y = reloaded_predictions(run_dir)
    assert model.num_classes == 10 and model.pretrained_cfg['architecture'] == ev['model']
    assert len(y) == ev['test_images']
    assert (pred == y).mean() == pytest.approx(ev['top1'], abs=1e-12)
    np.testing.assert_allclose([(pred[y == c] == c).mean() for c in range(10)], acc, atol=1e-12)
    exported = json.loads((run_dir / 'config.json').read_text())
    assert exported['model_args']['num_classes'] == 10 and exported['model_args']['in_chans'] == 1
    assert exported['pretrained_cfg']['input_size'] == [1, 8, 8] and exported['label_names'] == list('0123456789')

    png = (run_dir / 'per_class_accuracy.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and png[12:16] == b'IHDR' and png[-8:-4] == b'IEND'
    width, height = int.from_bytes(png[16:20], 'big'), int.from_bytes(png[20:24], 'big')
    assert width > 100 and height > 100

    # metrics.jsonl: one line per trained epoch; the last one evaluated the model that was exported.
    lines = read_metrics(run_dir)
    trains = cfg['stage'] != 'tau_norm'  # FSA phase II goes through the same epoch loop
    assert [r['epoch'] for r in lines] == (list(range(1, cfg['epochs'] + 1)) if trains else [])
    if trains:
        assert all(math.isfinite(r['train_loss']) and math.isfinite(r['lr']) for r in lines)
        assert lines[-1]['test_top1'] == pytest.approx(ev['top1'], abs=1e-12)
    return cfg, ev, lines


# ----------------------------------------------------------------------------------- every method runs
@pytest.mark.slow
@pytest.mark.parametrize('method', STAGE1)
def test_stage1_method_runs_and_writes_outputs(method, digits_run):
    run_dir, argv, result = digits_run(method)
    cfg, ev, lines = check_run_outputs(run_dir, argv, result, method)
    assert ev['model'] == cfg['model']
    assert cfg['epochs'] == EPOCHS.get(method, 1) and cfg['input_size'] == 8
    if method == 'cbn':  # the logged total is the dual-path objective of the logged terms
        for r in lines:
            assert set(r) >= {'train_cls_compound_strong', 'train_cls_split_strong', 'train_consistency_weak',
                              'train_consistency_strong'}
            want = (r['train_cls_compound_strong'] + r['train_cls_split_strong']
                    + 0.1 * (r['train_consistency_weak'] + r['train_consistency_strong']))
            assert r['train_loss'] == pytest.approx(want, rel=1e-6)
            assert -1.0 <= r['train_consistency_weak'] <= 1.0
            priors = [layer['prior'] for layer in r['cbn'].values()]  # every CBN layer's summary, every epoch
            assert len(priors) == 31 and all(sum(p) == pytest.approx(1.0, abs=1e-5) for p in priors)
        sd = load_file(str(run_dir / 'model.safetensors'))
        assert any(k.endswith('running_prior') for k in sd)


@pytest.mark.slow
@pytest.mark.parametrize('method', sorted(STAGE2_PARENT))
def test_stage2_method_runs_and_keeps_the_trunk(method, digits_run):
    run_dir, argv, result = digits_run(method)
    parent_dir = digits_run(STAGE2_PARENT[method])[0]
    cfg, ev, _ = check_run_outputs(run_dir, argv, result, method)
    parent_arch = json.loads((parent_dir / 'config.json').read_text())['architecture']
    assert ev['model'] == parent_arch

    trunk, head = classifier_split(run_dir)
    trunk1, head1 = classifier_split(parent_dir)
    assert trunk.keys() == trunk1.keys() and head.keys() == head1.keys()
    for k in trunk:  # every stage-2 mode freezes the representation, BN statistics included
        assert torch.equal(trunk[k], trunk1[k]), k
    w, w1 = head['weight'].double(), head1['weight'].double()
    if method == 'tau_norm':  # W_c / ||W_c||^1 and no bias (Kang et al.)
        np.testing.assert_allclose(w.numpy(), (w1 / w1.norm(dim=1, keepdim=True)).numpy(), rtol=1e-6, atol=1e-7)
        assert not head['bias'].any()
    elif method == 'lws':  # each class row only rescaled: W_c' = s_c W_c, b_c' = s_c b_c
        s = (w * w1).sum(1) / (w1 * w1).sum(1)
        np.testing.assert_allclose(w.numpy(), (s[:, None] * w1).numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(head['bias'].double().numpy(), (s * head1['bias'].double()).numpy(),
                                   rtol=1e-5, atol=1e-7)
        assert (s > 0).all() and not torch.allclose(s, torch.ones_like(s))
    else:  # crt (re-initialised), gcl_crt and fsa (fine-tuned): the head did change
        assert not torch.allclose(w, w1)


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.parametrize('method', ['ce', 'cbn'])
def test_stop_and_resume_equals_uninterrupted_run(method, digits_run, tmp_path, monkeypatch):
    ref_dir, ref_argv, _ = digits_run(method)  # 2 epochs, uninterrupted, deterministic
    out = tmp_path / 'run'
    argv = argv_for(method, out)
    # The first process's clock runs 1000 s per reading, so its epoch visibly took >= 1000 s.
    ticks = itertools.count()
    monkeypatch.setattr(loop_module, 'time', types.SimpleNamespace(time=lambda: 1000.0 * next(ticks)))
    assert train_main(argv + ['--stop_after_epoch', '1']) is None
    monkeypatch.undo()
    assert [p.name for p in (out / 'checkpoints').iterdir()] == ['epoch_0001']
    assert not (out / 'model.safetensors').exists() and not (out / 'eval.json').exists()
    assert [r['epoch'] for r in read_metrics(out)] == [1]
    earlier = json.loads((out / 'checkpoints' / 'epoch_0001' / 'trainer_state.json').read_text())['state']
    assert earlier['epoch'] == 1 and earlier['elapsed_s'] >= 1000

    train_main(argv + ['--resume'])
    _assert_same_run(out, ref_dir)
    # wall_time_s counts the first process's epoch too; the resumed process itself took well under 1000 s
    ev, ref_ev = json.loads((out / 'eval.json').read_text()), json.loads((ref_dir / 'eval.json').read_text())
    assert ev['resumed_at_epoch'] == 1 and ref_ev['resumed_at_epoch'] == 0
    assert earlier['elapsed_s'] < ev['wall_time_s'] < earlier['elapsed_s'] + 1000


def _assert_same_run(out, ref_dir):
    a, b = load_file(str(out / 'model.safetensors')), load_file(str(ref_dir / 'model.safetensors'))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines, ref = read_metrics(out), read_metrics(ref_dir)
    assert [r['epoch'] for r in lines] == [1, 2]
    for r, q in zip(lines, ref):  # same losses and test metrics, epoch by epoch (time differs)
        assert {k: v for k, v in r.items() if k != 'time_s'} == {k: v for k, v in q.items() if k != 'time_s'}


@pytest.mark.slow
def test_sigkill_then_resume_completes_identically(digits_run, tmp_path):
    ref_dir, _, _ = digits_run('ce')
    out = tmp_path / 'killed'
    argv = argv_for('ce', out)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train' / 'train.py'), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / 'checkpoints' / 'epoch_0001').is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, 'no epoch-1 checkpoint within 240 s'
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not (out / 'model.safetensors').exists()
    train_main(argv + ['--resume'])
    _assert_same_run(out, ref_dir)
    assert not list((out / 'checkpoints').glob('.tmp_*'))


@pytest.mark.slow
def test_last_epoch_is_evaluated_once(tmp_path, monkeypatch):
    """The final report reuses the last epoch's evaluation instead of predicting the test split again."""
    from lt_zoo.training import evaluation
    calls, real = [], evaluation.predict
    monkeypatch.setattr(evaluation, 'predict', lambda *a, **k: calls.append(1) or real(*a, **k))
    result = train_main(argv_for('ce', tmp_path / 'run', epochs=2) + ['--eval_every', '1'])
    assert len(calls) == 2  # epochs 1 and 2, not a third time at the end
    assert read_metrics(tmp_path / 'run')[-1]['test_top1'] == result['top1']


# --------------------------------------------------------------------------------------- error cases
SENTINEL = 'an earlier run\n'


@pytest.fixture
def guarded_dir(tmp_path, monkeypatch):
    """An existing run directory that a refused run must leave alone; training must never start."""
    run_dir = tmp_path / 'existing_run'
    run_dir.mkdir()
    (run_dir / 'eval.json').write_text(SENTINEL)

    def no_training(*args, **kwargs):
        raise AssertionError('training started although the configuration is invalid')
    monkeypatch.setattr(trainer, 'train_epochs', no_training)
    return run_dir


def assert_refused(argv, exc, match, run_dir):
    with pytest.raises(exc, match=match):
        train_main(argv)
    assert sorted(os.listdir(run_dir)) == ['eval.json'] and (run_dir / 'eval.json').read_text() == SENTINEL


def _export_untrained(tmp_path, name, **kwargs):
    folder = tmp_path / f'stage1_{name}'
    export_model(timm.create_model(name, **kwargs), str(folder))
    return folder


BAD_OPTIONS = [  # (extra argv on digits/ce.yaml, exception, message pattern)
    (['--method', 'softmax_plus'], ValueError, r"invalid method 'softmax_plus'.*'balanced_softmax'"),
    (['--loss', 'cross_entropy'], ValueError, r"unknown loss 'cross_entropy'.*'balanced_softmax'.*'ldam'"),
    (['--sampler', 'balanced'], ValueError, r"unknown sampler 'balanced'; valid: .*'cben', 'class_balanced'"),
    (['--epoch', '3'], ValueError, r"unknown config key 'epoch'.*did you mean \['epochs'.*valid keys:.*'lr'"),
    (['--epochs', '-1'], ValueError, r"epochs must be an integer >= 0, got -1"),
    (['--epochs', '0'], ValueError, r"stage 'stage1' trains, so epochs must be >= 1, got 0"),
    (['--momentum', '1.5'], ValueError, r"momentum must be a finite number in \[0, 1\), got 1.5"),
    (['--loss_kwargs', '{gamma: 2.0}'], ValueError, r"unknown option\(s\) \['gamma'\] for loss 'ce'"),
    (['--sampler_kwargs', '{beta: 0.9}'], ValueError, r"unknown option\(s\) \['beta'\] for sampler 'instance'"),
    (['--imbalance_factor', '0.5'], ValueError, r"imbalance_factor must be a finite number in \[1, inf\), got 0.5"),
    (['--mixed_precision', 'fp8'], ValueError, r"invalid mixed_precision 'fp8'.*'bf16'"),
    (['--loss', 'gcl'], ValueError, r"loss 'gcl' works on cosine similarities.*'resnet32' has Linear"),
    (['--loss', 'ldam'], ValueError, r"loss 'ldam' works on cosine similarities.*cosine head"),
    (['--dual_path', 'true'], ValueError, r"dual_path needs a CBN model.*'resnet32'"),
    (['--stage', 'crt'], ValueError, r"stage 'crt' needs stage1_dir"),
    (['--model', 'null'], ValueError, r"stage1 needs a model, e.g. --model resnet32"),
    (['--stop_after_epoch', '1', '--save_checkpoints', 'false'], ValueError, r"stop_after_epoch needs save_checkpoints"),
    # an option measured not to train from scratch is refused with the measurement
    (['--model', 'resnet20_cbn', '--model_kwargs', '{"responsibility_grad": true}'], ValueError,
     r"responsibility_grad: true does not train from scratch.*41.1% balanced accuracy"),
]


@pytest.mark.parametrize('extra,exc,match', BAD_OPTIONS, ids=[' '.join(b[0]) for b in BAD_OPTIONS])
def test_bad_option_fails_before_training_and_spares_run_dir(extra, exc, match, guarded_dir):
    # --overwrite: the directory would be deleted if the check came after the run directory was prepared
    argv = ['--config', DIGITS / 'ce.yaml', *FAST, '--output_dir', guarded_dir, '--overwrite', *extra]
    assert_refused(argv, exc, match, guarded_dir)


def test_stage2_needs_stage1_dir(guarded_dir):
    assert_refused(['--config', DIGITS / 'lws.yaml', *FAST, '--output_dir', guarded_dir, '--stage1_dir', 'null'],
                   ValueError, r"stage 'lws' needs stage1_dir", guarded_dir)


def test_stage1_dir_must_be_a_finished_run(guarded_dir, tmp_path):
    stopped = tmp_path / 'stopped_stage1'  # what a run stopped before its export leaves behind
    (stopped / 'checkpoints' / 'epoch_0001').mkdir(parents=True)
    (stopped / 'config.yaml').write_text('method: ce\n')
    (stopped / 'metrics.jsonl').write_text('{"epoch": 1}\n')
    assert_refused(argv_for('crt', guarded_dir, stage1_dir=stopped) + ['--overwrite'], FileNotFoundError,
                   r"not an exported lt_zoo/timm model: missing \['model.safetensors'", guarded_dir)


def test_stage1_class_count_must_match_data(guarded_dir, tmp_path):
    five = _export_untrained(tmp_path, 'resnet32', num_classes=5, in_chans=1)
    assert_refused(argv_for('crt', guarded_dir, stage1_dir=five) + ['--overwrite'], ValueError,
                   r"has num_classes=5, but this run's data needs num_classes=10", guarded_dir)


def test_stage1_architecture_must_match_a_given_model(guarded_dir, tmp_path):
    plain = _export_untrained(tmp_path, 'resnet32', num_classes=10, in_chans=1)
    assert_refused(argv_for('crt', guarded_dir, stage1_dir=plain) + ['--overwrite', '--model', 'resnet32_nbn'],
                   ValueError, r"config model 'resnet32_nbn' does not match the stage-1 architecture 'resnet32'",
                   guarded_dir)


@pytest.mark.parametrize('method', ['lws', 'tau_norm'])
def test_weight_rescaling_refuses_cosine_head(method, guarded_dir, tmp_path):
    cosine = _export_untrained(tmp_path, 'resnet32_gcl', num_classes=10, in_chans=1)
    assert_refused(argv_for(method, guarded_dir, stage1_dir=cosine) + ['--overwrite'], ValueError,
                   rf"stage '{method}' rescales class weights.*cosine head", guarded_dir)


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, monkeypatch):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'model.safetensors').write_bytes(b'weights of an earlier run')
    (run_dir / 'metrics.jsonl').write_text('{"epoch": 1}\n')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}
    monkeypatch.setattr(trainer, 'train_epochs', lambda *a, **k: pytest.fail('training started'))
    with pytest.raises(FileExistsError, match=r"already exists; pass --resume to continue it or --overwrite"):
        train_main(argv_for('ce', run_dir))
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()} == before


# ------------------------------------------------------------------ the tensor data path and CLI errors
@pytest.mark.slow
@pytest.mark.parametrize('method,extra', [
    ('balanced_softmax', ['--train_aug', 'strong', '--channels_last', 'true']),  # CBN Table 2's 'BS + AA'
    ('cbn', ['--dual_stat_updates', 'once']),
])
def test_tensor_data_path_trains_and_exports(method, extra, tmp_path):
    out = tmp_path / method
    argv = argv_for(method, out, epochs=1) + ['--data_cache', 'tensors'] + extra
    result = train_main(argv)
    cfg, ev, lines = check_run_outputs(out, argv, result, method)
    assert cfg['data_cache'] == 'tensors' and len(lines) == 1
    if method == 'cbn':  # 8 steps of 'once': one running update per path per step -> 2 per step
        steps = math.ceil(494 / 64)
        state = load_file(str(out / 'model.safetensors'))
        tracked = {int(v) for k, v in state.items() if k.endswith('num_batches_tracked')}
        assert tracked == {2 * steps}


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / 'never'
    proc = subprocess.run([sys.executable, str(ROOT / 'train' / 'train.py'), '--config', str(DIGITS / 'ce.yaml'),
                           '--epochs', '0', '--output_dir', str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: stage 'stage1' trains, so epochs must be >= 1, got 0"]
    assert not out.exists()


def test_run_dir_held_by_a_live_training_is_refused_before_any_work(guarded_dir, monkeypatch):
    """A second training into the same directory (a resume started while the run still runs, two
    benchmark runners) is refused before data is built, even with --overwrite; the holder's pid is named."""
    import subprocess
    import sys
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from lt_zoo.training.run_dir import run_dir_lock\n'
                               'with run_dir_lock(sys.argv[1]):\n    print("held", flush=True); time.sleep(120)',
         str(guarded_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == 'held'

        def no_data(*args, **kwargs):
            raise AssertionError('data was built for a run that cannot own its directory')
        monkeypatch.setattr(trainer, 'build_data', no_data)
        assert_refused(['--config', DIGITS / 'ce.yaml', *FAST, '--output_dir', guarded_dir, '--overwrite'],
                       RunDirBusyError, rf"being written by another process \(pid {holder.pid},", guarded_dir)
    finally:
        holder.kill()
        holder.wait()
