#!/usr/bin/env python
"""The README's main job on the embedded default data (CPU, a few minutes at most).

1. trains resnet32_cbn with CBN dual-path learning on long-tailed digits (train/configs/digits/cbn.yaml),
2. prints the evaluation table (top-1, balanced accuracy, many/medium/few-shot, ECE),
3. exports model.safetensors + config.json and reloads them through plain ``timm.create_model``,
4. checks that the reloaded model's test predictions are identical to the trained model's.

    python train/demo.py [--output_dir runs/demo] [--key value ...]   (any train.py override)
"""
import os
import sys

import torch

import timm
import lt_zoo  # noqa: F401  (registers resnet32_cbn with timm)
from lt_zoo import data as ltdata
from lt_zoo.training.config import load_config
from lt_zoo.training.trainer import record_command, run

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'digits', 'cbn.yaml')


def test_logits(model, data_cfg, cfg):
    """Logits of ``model`` on the digits test split, preprocessed as timm's data config ``data_cfg`` says."""
    in_chans, size = data_cfg['input_size'][0], data_cfg['input_size'][1]
    splits = ltdata.load_splits(cfg['dataset'])
    tf = ltdata.create_transform('eval', input_size=size, in_chans=in_chans, mean=data_cfg['mean'],
                                 std=data_cfg['std'])
    ds = ltdata.attach_transform(splits.test, tf, splits.image_column, splits.label_column)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=ltdata.collate)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in loader])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--output_dir' not in argv:
        argv += ['--output_dir', 'runs/demo']
    if '--resume' not in argv and '--overwrite' not in argv:
        argv += ['--overwrite']
    cfg = load_config(['--config', CONFIG] + argv)
    final, model = run(cfg, command=record_command('train/demo.py', argv))
    run_dir = cfg['output_dir']

    reloaded = timm.create_model('local-dir:' + os.path.abspath(run_dir), pretrained=True)
    print(f"\nreloaded {reloaded.pretrained_cfg['architecture']} from {run_dir}/model.safetensors "
          f"via timm.create_model('local-dir:...')")
    # preprocessing from the exported config.json alone, as a user of the checkpoint would do it
    data_cfg = timm.data.resolve_model_data_config(reloaded)
    a, b = test_logits(model, data_cfg, cfg), test_logits(reloaded, data_cfg, cfg)
    same = int((a.argmax(1) == b.argmax(1)).sum())
    diff = float((a - b).abs().max())
    print(f'identical predictions: {same}/{len(a)} test images, max |logit difference| = {diff:.3g}')
    if same != len(a) or diff > 1e-5:
        raise SystemExit('the reloaded checkpoint does not reproduce the trained model')
    return final


if __name__ == '__main__':
    main()
