"""train/train.py under 2-process CPU DDP (Accelerate MULTI_CPU / gloo) with CBN dual-path learning.

``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`` is the combination that
gives real gloo DDP on a CPU-only machine (docs/training.md#decision-distributed-training).  The layer-level
2-process equivalence of CBN's statistics is tested with the layer; here the whole trainer runs.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import timm
import lt_zoo  # noqa: F401  (registers resnet32_cbn with timm)
from lt_zoo import data as ltdata
from lt_zoo.training.config import load_config
from lt_zoo.training.dual_path import dual_path_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'train' / 'configs' / 'digits' / 'cbn.yaml'
PER_PROCESS_BATCH = 32
pytestmark = pytest.mark.slow  # two processes, minutes on CPU


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp') / 'cbn'
    argv = ['--config', str(CONFIG), '--epochs', '1', '--batch_size', str(PER_PROCESS_BATCH), '--progress', 'false',
            '--input_size', '8', '--num_workers', '0', '--output_dir', str(out)]
    accelerate = Path(sys.executable).with_name('accelerate')
    env = dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    proc = subprocess.run([str(accelerate), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
                           str(ROOT / 'train' / 'train.py'), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return out, load_config(argv), proc


def test_two_process_cbn_run_completes(ddp_run):
    out, cfg, _ = ddp_run
    for name in ('config.yaml', 'metrics.jsonl', 'eval.json', 'per_class_accuracy.png', 'model.safetensors',
                 'config.json'):
        assert (out / name).is_file(), name
    assert [p.name for p in (out / 'checkpoints').iterdir()] == ['epoch_0001']
    ev = json.loads((out / 'eval.json').read_text())
    assert ev['world_size'] == 2 and ev['model'] == 'resnet32_cbn' and ev['method'] == 'cbn'
    # gather_for_metrics: every test image exactly once, although 540 does not split into equal shards of 32
    splits = ltdata.load_splits('digits')
    assert ev['num_samples'] == ev['test_images'] == len(splits.test) == 540
    lines = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in lines] == [1]  # written once, by the main process only
    assert all(math.isfinite(v) for k, v in lines[0].items() if k.startswith('train_'))


def test_exported_cbn_statistics_are_finite_and_from_sharded_batches(ddp_run):
    out, cfg, _ = ddp_run
    sd = load_file(str(out / 'model.safetensors'))
    priors = {k: v for k, v in sd.items() if k.endswith('running_prior')}
    assert len(priors) == 31  # resnet32: stem + 15 blocks x 2 norms, all CBN
    for k, v in sd.items():
        assert torch.isfinite(v.double()).all(), k
    for k, prior in priors.items():
        layer = k[:-len('running_prior')]
        assert (prior > 0).all() and float(prior.sum()) == pytest.approx(1.0, abs=1e-5), k
        assert (sd[layer + 'running_var'] > 0).all(), layer
    # Each rank takes every other batch: 494 images in batches of 32 -> 16 batches, 8 steps per rank,
    # each step one statistics update per (path, view) forward of the dual path.
    passes = len(dual_path_keys(cfg['dual_cls_views'], cfg['dual_cls_paths'], cfg['consistency_views'],
                                cfg['consistency_weight']))
    steps_per_rank = math.ceil(math.ceil(494 / PER_PROCESS_BATCH) / 2)
    for k, v in sd.items():
        if k.endswith('num_batches_tracked'):
            assert int(v) == passes * steps_per_rank == 32, k


def test_rank0_export_reproduces_the_gathered_evaluation(ddp_run):
    """The 2-rank evaluation (half the test batches on each rank) equals rank 0's exported model on all
    of them: both ranks held the same weights and CBN statistics."""
    out, _, _ = ddp_run
    ev = json.loads((out / 'eval.json').read_text())
    model = timm.create_model('local-dir:' + str(out), pretrained=True).eval()
    assert model.num_classes == 10
    data_cfg = timm.data.resolve_model_data_config(model)
    splits = ltdata.load_splits('digits')
    tf = ltdata.create_transform('eval', input_size=data_cfg['input_size'][1], in_chans=data_cfg['input_size'][0],
                                 mean=data_cfg['mean'], std=data_cfg['std'])
    ds = ltdata.attach_transform(splits.test, tf, splits.image_column, splits.label_column)
    preds, ys = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(ds, batch_size=PER_PROCESS_BATCH, collate_fn=ltdata.collate):
            preds.append(model(x).argmax(1))
            ys.append(y)
    pred, y = torch.cat(preds).numpy(), torch.cat(ys).numpy()
    assert (pred == y).mean() == pytest.approx(ev['top1'], abs=1e-12)
    np.testing.assert_allclose([(pred[y == c] == c).mean() for c in range(10)], ev['per_class_acc'], atol=1e-12)
