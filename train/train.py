#!/usr/bin/env python
"""Train any lt_zoo method with Accelerate: one CPU, one GPU or many.

    accelerate launch train/train.py --config train/configs/digits/cbn.yaml [--key value ...]
    python train/train.py --config ...            # single process
    python train/train.py --help                  # every key, its default and meaning

Stage 1 trains representation + classifier (any model, any loss, optional CBN dual path).
Stage 2 starts from a stage-1 run directory: classifier re-training (crt), learnable weight scaling
(lws), tau-normalisation (tau_norm) or Feature Space Augmentation phase II (fsa).
The trainer itself is lt_zoo.training.trainer; the keys are in lt_zoo.training.config.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config_module():
    """lt_zoo/training/config.py loaded on its own: it needs only PyYAML, while importing the lt_zoo
    package loads torch and timm (seconds to tens of seconds), which --help and config errors must not wait for."""
    spec = importlib.util.spec_from_file_location('_lt_zoo_train_config', ROOT / 'lt_zoo' / 'training' / 'config.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _config_module().load_config(argv)  # --help, unknown keys and bad values answer here, before torch loads
    from lt_zoo.training.trainer import main as train_main
    return train_main(argv)


if __name__ == '__main__':
    try:
        main()
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as err:  # bad input: one line, no traceback
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
