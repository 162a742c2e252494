"""Read and check a training run directory (train/train.py output) before anything is published.

A run directory holds ``eval.json``, ``config.yaml`` (resolved training config), the timm export
``model.safetensors`` + ``config.json``, and usually ``per_class_accuracy.png`` and ``metrics.jsonl``
(layout: lt_zoo/training/run_dir.py).  Checks run in this order and raise before any work is done:
missing files (all named at once), a pickle checkpoint in place of safetensors, eval.json keys, and
agreement between eval.json and config.json.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from ..export import CONFIG_NAME, WEIGHTS_NAME, read_export_config

__all__ = ['RunRecord', 'read_run_dir', 'REQUIRED_FILES', 'EVAL_KEYS', 'PICKLE_SUFFIXES']

EVAL_NAME = 'eval.json'
TRAIN_CONFIG_NAME = 'config.yaml'
PLOT_NAME = 'per_class_accuracy.png'
METRICS_NAME = 'metrics.jsonl'
REQUIRED_FILES = (EVAL_NAME, TRAIN_CONFIG_NAME, WEIGHTS_NAME, CONFIG_NAME)
# eval.json keys the card and the checks read (train/train.py writes these and more)
EVAL_KEYS = ('top1', 'balanced_acc', 'many', 'medium', 'few', 'ece', 'per_class_acc', 'method', 'stage', 'model',
             'dataset', 'class_names', 'class_counts', 'long_tail', 'train_images', 'test_images', 'command')
# torch.save / pickle checkpoints: never loaded, never published
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pth.tar', '.ckpt', '.pkl')


@dataclass(frozen=True)
class RunRecord:
    """A checked run directory: its eval.json, training config and timm export config."""
    path: Path
    eval: Dict[str, Any]
    train_config: Dict[str, Any]
    export_config: Dict[str, Any]
    plot: Optional[Path]
    metrics: Optional[Path]

    @property
    def architecture(self) -> str:
        return self.export_config['architecture']


def _pickles(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))


def _parse(file: Path, load):
    """``load(open(file))`` with an error naming the file when it is truncated or corrupt."""
    try:
        with open(file) as f:
            return load(f)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{file} is unreadable (truncated or corrupt): {' '.join(str(e).split())}") from None


def read_run_dir(run_dir: str) -> RunRecord:
    """Check ``run_dir`` and read its records; raises FileNotFoundError / ValueError naming the problem."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist or is not a directory")
    missing = [n for n in REQUIRED_FILES if not (path / n).is_file()]
    pickles = _pickles(path)
    if WEIGHTS_NAME in missing and pickles:
        raise ValueError(f"{str(run_dir)!r} has pickle checkpoint(s) {pickles} but no {WEIGHTS_NAME}: lt_zoo publishes "
                         f"safetensors only and never unpickles a checkpoint; re-export the model with "
                         f"lt_zoo.export.export_model")
    if missing:
        raise FileNotFoundError(f"run directory {str(run_dir)!r} is missing {missing} (a train/train.py run has "
                                f"{list(REQUIRED_FILES)})")
    ev = _parse(path / EVAL_NAME, json.load)
    train_config = _parse(path / TRAIN_CONFIG_NAME, yaml.safe_load)
    if not isinstance(ev, dict):
        raise ValueError(f"{path / EVAL_NAME} is not a JSON object; expected the eval.json of train/train.py")
    absent = [k for k in EVAL_KEYS if k not in ev]
    if absent:
        raise ValueError(f"{path / EVAL_NAME} lacks key(s) {absent}; expected the eval.json of train/train.py")
    if not isinstance(train_config, dict):
        raise ValueError(f"{path / TRAIN_CONFIG_NAME} is not a YAML mapping of config keys")
    export_config = read_export_config(os.fspath(path))
    if ev['model'] != export_config['architecture']:
        raise ValueError(f"eval.json model {ev['model']!r} differs from config.json architecture "
                         f"{export_config['architecture']!r}; the run directory mixes two runs")
    sizes = {'config.json num_classes': export_config.get('num_classes'), 'eval.json class_names': len(ev['class_names']),
             'eval.json class_counts': len(ev['class_counts']), 'eval.json per_class_acc': len(ev['per_class_acc'])}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{str(run_dir)!r}: class numbers disagree: {sizes}")
    plot, metrics = path / PLOT_NAME, path / METRICS_NAME
    return RunRecord(path=path, eval=ev, train_config=train_config, export_config=export_config,
                     plot=plot if plot.is_file() else None, metrics=metrics if metrics.is_file() else None)
