"""The trainer's parts on their own: the LR schedule against its closed form, the stage table,
the loss-input wrapper (heads own their scale), FSA's epoch split, repository-relative run records,
the CLI's fast --help, and torch.compile agreeing with eager training."""
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
import lt_zoo  # noqa: F401  (registers the lt_zoo models with timm)
from lt_zoo.losses import create_loss
from lt_zoo.training import stages
from lt_zoo.training.config import OptimConfig, STAGES as STAGE_NAMES
from lt_zoo.training.dual_path import DualPathLoss, DualPathModel
from lt_zoo.training.loss_inputs import LossInputs
from lt_zoo.training.schedule import make_optimizer
from lt_zoo.training.trainer import REPO_ROOT, record_command, repo_relative

ROOT = Path(__file__).resolve().parents[1]


def _closed_form(cfg, S, t):
    """f(t) written independently of lt_zoo.training.schedule (float64, from the definitions)."""
    W, T = cfg['warmup_epochs'] * S, cfg['epochs'] * S
    if t < W:
        return (t + 1) / W
    if cfg['scheduler'] == 'cosine':
        return (1 + math.cos(math.pi * min(1.0, (t - W) / max(1, T - W)))) / 2
    if cfg['scheduler'] == 'step':
        return 0.1 ** len([s for s in cfg['lr_steps'] if t >= s * S])
    return 1.0


@pytest.mark.parametrize('scheduler,warmup,steps', [('cosine', 5, []), ('cosine', 0, []), ('step', 5, [160, 180]),
                                                    ('step', 2, [1, 3]), ('constant', 3, []), ('step', 0, [4])])
def test_schedule_matches_the_closed_form_at_every_step(scheduler, warmup, steps):
    epochs, S, lr = 200 if steps == [160, 180] else 6, 7, 0.1
    cfg = dict(epochs=epochs, warmup_epochs=warmup, scheduler=scheduler, lr_steps=steps)
    opt, sched = make_optimizer(OptimConfig(lr=lr, **cfg), [nn.Parameter(torch.zeros(1))], S)
    for t in range(epochs * S):
        assert opt.param_groups[0]['lr'] == pytest.approx(lr * _closed_form(cfg, S, t), rel=1e-9, abs=1e-15), t
        opt.step()
        sched.step()


def test_every_stage_has_its_function():
    assert set(stages.STAGES) == set(STAGE_NAMES)
    assert all(stages.STAGES[name].__name__ == name for name in STAGE_NAMES)


def test_cosine_loss_gets_the_heads_cosines_not_rescaled_logits():
    torch.manual_seed(0)
    net = timm.create_model('resnet32_gcl', num_classes=10, in_chans=1).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        cos = LossInputs(net, cosine=True)(x)
        feats = net.forward_head(net.forward_features(x), pre_logits=True)
        w = net.get_classifier().weight
        want = (feats / feats.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(cos, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(LossInputs(net, cosine=False)(x), net(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cosine-input loss needs a head with \.cosine\(\).*Linear"):
        LossInputs(timm.create_model('resnet32', num_classes=10, in_chans=1), cosine=True)


def test_dual_path_model_produces_exactly_what_the_loss_reads():
    torch.manual_seed(0)
    net = timm.create_model('resnet32_cbn', num_classes=10, in_chans=1)
    loss = DualPathLoss(create_loss('ce', [5] * 10), cls_views=['strong'], cls_paths=['split'],
                        consistency_views=['weak'], consistency_weight=0.1)
    assert loss.required_outputs == ['compound_weak', 'split_strong', 'split_weak']
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    out = DualPathModel(net, 10, loss.required_outputs).train()(torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8),
                                                               torch.arange(8))
    assert sorted(out) == loss.required_outputs and len(calls) == 3  # one network forward per required output
    assert set(loss(out, torch.arange(8))) == {'cls_split_strong', 'consistency_weak', 'loss'}


@pytest.mark.parametrize('total,epochs', [(200, 30), (5, 1), (7, 7), (6400, 200)])
def test_fsa_iterations_are_spread_over_the_epochs(total, epochs):
    class Batches:
        def set_epoch(self, e):
            self.epoch = e
    loader = stages._FsaEpochs(Batches(), total, epochs, 'cpu')
    counts = []
    for e in range(epochs):
        loader.set_epoch(e)
        counts.append(loader.batches.num_batches)
    assert sum(counts) == total and max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_run_records_use_repository_relative_paths(tmp_path):
    inside = str(REPO_ROOT / 'runs' / 'digits' / 'ce')
    assert repo_relative(inside) == os.path.join('runs', 'digits', 'ce')
    assert repo_relative(str(tmp_path)) == str(tmp_path)  # outside the repository: left absolute
    assert repo_relative('runs/x') == 'runs/x' and repo_relative(3) == 3
    cmd = record_command('train/train.py', ['--config', str(REPO_ROOT / 'train' / 'configs' / 'digits' / 'ce.yaml'),
                                            '--epochs', '2'])
    assert cmd == 'train/train.py --config train/configs/digits/ce.yaml --epochs 2'
    # JSON overrides are quoted: the recorded command splits back into the argv it ran with
    argv = ['--model_kwargs', '{"num_components": 2}', '--dual_cls_views', '["strong"]']
    assert shlex.split(record_command('train/train.py', argv)) == ['train/train.py'] + argv


def test_cli_help_lists_defaults_without_loading_torch():
    code = ("import runpy, sys; sys.argv = ['train/train.py', '--help']\n"
            "try:\n    runpy.run_path('train/train.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported for --help'\n")
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--epochs (default 200): training epochs" in proc.stdout and '--lr (default 0.1)' in proc.stdout


def test_cli_refuses_bad_values_without_loading_torch():
    code = ("import runpy, sys; sys.argv = ['train/train.py', '--epochs', '0', '--model', 'resnet32']\n"
            "try:\n    runpy.run_path('train/train.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 2, e.code\n"
            "else:\n    raise AssertionError('not refused')\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "error: stage 'stage1' trains, so epochs must be >= 1, got 0"  # one line


# ----------------------------------------------------------------------------------------- torch.compile
# 494 training images (digits, imbalance factor 10) in 13 batches of 38: no smaller last batch, so every
# path compiles once (a smaller batch would compile each graph again, dynamic in the batch size).
_BATCH = 38


def _digits_run(tmp_path, name, config, *extra):
    """Train one epoch through the CLI entry point; -> (state_dict, metrics.jsonl record, eval.json)."""
    import json
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file
    from lt_zoo.training import trainer
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path / name
    argv = ['--config', str(ROOT / 'train' / 'configs' / 'digits' / f'{config}.yaml'), '--output_dir', str(out),
            '--epochs', '1', '--batch_size', str(_BATCH), '--input_size', '8', '--progress', 'false',
            '--save_checkpoints', 'false', '--imbalance_factor', '10', *extra]
    try:
        trainer.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    record = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    return load_file(str(out / 'model.safetensors')), record, json.loads((out / 'eval.json').read_text())


def _assert_agree(eager, compiled):
    (w_e, rec_e, ev_e), (w_c, rec_c, ev_c) = eager, compiled
    assert ev_e['train_images'] % _BATCH == 0, 'the premise of a single compile per path'
    train_keys = [k for k in rec_e if k.startswith('train_')]
    assert 'train_loss' in train_keys and train_keys == [k for k in rec_c if k.startswith('train_')]
    for k in train_keys:  # the epoch means of every loss term
        assert rec_c[k] == pytest.approx(rec_e[k], rel=1e-4, abs=1e-5), k
    assert w_e.keys() == w_c.keys()
    for k in w_e:  # parameters and running buffers (BN, NBN and CBN statistics)
        torch.testing.assert_close(w_c[k].double(), w_e[k].double(), rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize('config,extra', [('ce', ['--model', 'resnet20']), ('nbn', ['--model', 'resnet20_nbn']),
                                          ('cbn', ['--model', 'resnet20_cbn', '--dual_path', 'false']),
                                          ('cbn', ['--model', 'resnet20_cbn'])],
                         ids=['bn', 'nbn', 'cbn', 'cbn_dual_path'])
def test_compiled_training_agrees_with_eager(config, extra, tmp_path):
    """One epoch (13 steps) at 8x8 on digits, same seed: compiled and eager agree to fp32 tolerance in
    the loss terms, the weights and the running statistics.  The dual path (4 network forwards per step,
    2 through the split path) compiles one graph per path."""
    torch._dynamo.reset()
    # Each block starts as the identity (zero init of its last norm; with shortcut 'B', as option A
    # refuses it): with every residual branch on from the start, the float32 rounding differences of two
    # kernel schedules grow to ~1e-3 of the loss within 13 steps, which would hide a real mismatch.
    extra = [*extra, '--model_kwargs', '{"zero_init_last": true, "shortcut": "B"}']
    eager = _digits_run(tmp_path, 'eager', config, *extra)
    compiled = _digits_run(tmp_path, 'compiled', config, *extra, '--compile', 'true')
    _assert_agree(eager, compiled)


def test_cbn_kernel_key_sets_every_compound_bn_layer_of_the_trained_model(tmp_path):
    """``cbn_kernel`` reaches every CompoundBatchNorm2d of the model the run trains, and config.yaml
    records it (the formulations themselves: tests/test_compound_bn_kernels.py, _triton.py)."""
    import yaml
    from accelerate.state import AcceleratorState, GradientState
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    from lt_zoo.training import trainer
    from lt_zoo.training.config import load_config
    out = tmp_path / 'gemm'
    cfg = load_config(['--config', str(ROOT / 'train' / 'configs' / 'digits' / 'cbn.yaml'), '--output_dir', str(out),
                       '--epochs', '1', '--input_size', '8', '--progress', 'false', '--save_checkpoints', 'false',
                       '--dual_path', 'false', '--cbn_kernel', 'gemm'])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        _, model = trainer.run(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    kernels = [m.kernel for m in model.modules() if isinstance(m, CompoundBatchNorm2d)]
    assert len(kernels) > 10 and set(kernels) == {'gemm'}
    assert yaml.safe_load((out / 'config.yaml').read_text())['cbn_kernel'] == 'gemm'


def test_cbn_kernel_choices_of_the_config_are_the_layers_kernels():
    from lt_zoo.layers.compound_bn_functional import KERNELS
    from lt_zoo.training.config import CBN_KERNELS
    assert CBN_KERNELS == KERNELS


def test_cbn_kernel_triton_is_refused_on_a_cpu_run_before_anything_is_written(tmp_path, monkeypatch):
    from lt_zoo.layers import compound_bn_triton
    from lt_zoo.training import trainer
    monkeypatch.setattr(compound_bn_triton, 'interpreting', lambda: False)  # kernels built for a GPU
    out = tmp_path / 'run'
    with pytest.raises(ValueError, match=r"cbn_kernel 'triton' runs on CUDA, but this run's device is cpu"):
        trainer.main(['--config', str(ROOT / 'train' / 'configs' / 'digits' / 'cbn.yaml'), '--output_dir', str(out),
                      '--cpu', 'true', '--cbn_kernel', 'triton', '--progress', 'false'])
    assert not out.exists()


@pytest.mark.slow
def test_compiled_stage2_agrees_with_eager(tmp_path):
    """cRT on the frozen features of an eager stage-1 network: compiled and eager heads agree."""
    torch._dynamo.reset()
    parent = tmp_path / 'eager'
    _digits_run(tmp_path, 'eager', 'ce', '--model', 'resnet20')
    eager = _digits_run(tmp_path, 'crt', 'crt', '--stage1_dir', str(parent))
    compiled = _digits_run(tmp_path, 'crt_compiled', 'crt', '--stage1_dir', str(parent), '--compile', 'true')
    _assert_agree(eager, compiled)
