"""Training configuration: every key, its default and what it means, in one table.

A run is configured by a YAML file (``--config``) plus ``--key value`` overrides on the command line;
unknown keys are refused with the list of valid ones.  The resolved config is saved in the run
directory as ``config.yaml`` so that the run can be repeated and resumed.
"""
import argparse
import copy
import difflib
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

__all__ = ['DEFAULTS', 'STAGES', 'METHODS', 'load_config', 'read_config_file', 'validate_config', 'describe_keys']

STAGES = ('stage1', 'crt', 'lws', 'tau_norm', 'fsa')

# Method labels name the recipe in run outputs and model cards (tags, citation).
METHODS = ('ce', 'ce_balanced', 'focal', 'class_balanced', 'ldam_drw', 'logit_adjust', 'balanced_softmax',
           'gcl', 'nbn', 'cbn', 'crt', 'lws', 'tau_norm', 'fsa')

# key: (default, description).  Defaults follow the CIFAR-LT recipes cited in METHODS.md unless noted.
SCHEMA: Dict[str, Tuple[Any, str]] = {
    # run
    'method': ('ce', f'recipe label recorded in outputs and model cards; one of {METHODS}'),
    'stage': ('stage1', f'stage1 (representation + classifier) or a stage-2 mode: {STAGES[1:]}'),
    'output_dir': ('runs/run', 'run directory (refused if it exists, unless resume or overwrite)'),
    'seed': (0, 'seed of model init, augmentation and samplers'),
    'deterministic': (False, 'torch.use_deterministic_algorithms(True) for bit-exact resumes'),
    'overwrite': (False, 'replace an existing run directory'),
    'resume': (None, "'latest' or a checkpoint directory to continue from"),
    'stop_after_epoch': (None, 'end this process after saving epoch N (pre-emption; continue with resume)'),
    'cpu': (False, 'force CPU even when a GPU is present'),
    # data
    'dataset': ('digits', "built-in 'digits'/'fashion_mnist', a Hub name, or imagefolder/parquet/arrow/disk/listfile"),
    'data_dir': (None, 'folder for imagefolder/disk/listfile sources'),
    'data_files': (None, 'files for parquet/arrow sources: a path or {train: ..., test: ...}'),
    'image_column': (None, 'image column (detected: image/img)'),
    'label_column': (None, 'label column (detected: label/labels/fine_label)'),
    'train_split': ('train', 'split used for training'),
    'test_split': ('test', 'split used for evaluation (balanced test set)'),
    'imbalance_factor': (100.0, 'n_max / n_min of the long-tailed subset; 1 keeps the data as it is (Cao et al.)'),
    'lt_profile': ('exp', "'exp' (Cao et al. CIFAR-LT) or 'step'"),
    'lt_selection': ('cao2019', "'cao2019' (np.random.seed + shuffle, LDAM-DRW) or 'rng'"),
    'lt_seed': (0, 'seed of the subset selection (0: LDAM-DRW/GCL/NBN code)'),
    'balanced_subset': (False, 'train on a class-balanced subset of the same total size as the LT subset'),
    'input_size': (32, 'square input side in pixels (CIFAR: 32)'),
    'in_chans': (None, 'input channels; default: 1 for grayscale datasets, else 3'),
    'hflip': (True, 'random horizontal flip in the weak view'),
    'pad': (4, 'padding of the random crop (CIFAR: 4)'),
    'train_crop': ('pad', "'pad' (CIFAR pad-and-crop) or 'random_resized' (ImageNet RandomResizedCrop)"),
    'crop_pct': (1.0, 'eval centre-crop fraction (ImageNet: 0.875 = resize 256, crop 224)'),
    'strong_aug': ('autoaugment', "strong view policy: 'autoaugment' (CIFAR10 policy) or 'randaugment'"),
    'normalize': ('dataset', "'dataset' (mean/std of the training split) or 'model' (the model's pretrained cfg)"),
    'num_workers': (0, 'DataLoader workers'),
    # model
    'model': (None, 'timm model name, required in stage 1 (import lt_zoo registers the lt_zoo ones); '
                    'stage 2 uses the stage-1 architecture and a given name must match it'),
    'model_kwargs': ({}, 'extra model options, e.g. {num_components: 4} or {nbn_scope: all}'),
    # optimisation
    'epochs': (200, 'training epochs (GCL/LDAM CIFAR recipe: 200)'),
    'batch_size': (128, 'per-process batch size (CBN paper: 128)'),
    'lr': (0.1, 'peak learning rate (LDAM/GCL: 0.1)'),
    'momentum': (0.9, 'SGD momentum'),
    'nesterov': (False, 'Nesterov momentum'),
    'weight_decay': (2e-4, 'SGD weight decay (LDAM/GCL CIFAR: 2e-4)'),
    'warmup_epochs': (5, 'linear warm-up epochs (LDAM/GCL: 5)'),
    'scheduler': ('cosine', "'cosine' to 0, 'step' (x0.1 at each lr_steps epoch) or 'constant'"),
    'lr_steps': ([160, 180], 'epochs of the x0.1 steps for the step scheduler (LDAM/GCL)'),
    'gradient_accumulation_steps': (1, 'micro-batches per optimizer step'),
    'mixed_precision': ('no', "'no', 'bf16' or 'fp16' (Accelerate)"),
    'grad_clip': (None, 'max gradient norm, or none'),
    # loss and sampling
    'loss': ('ce', 'loss name from lt_zoo.losses.list_losses()'),
    'loss_kwargs': ({}, 'loss options (e.g. {tau: 1.0}); class counts are passed automatically'),
    'sampler': ('instance', 'sampler name from lt_zoo.samplers.list_samplers()'),
    'sampler_kwargs': ({}, 'sampler options (e.g. {beta: 0.9999})'),
    'mixup_alpha': (0.0, 'mixup Beta(alpha, alpha); 0 = off (GCL stage 1 and 2: 1.0)'),
    # CBN dual path (METHODS.md §6a)
    'dual_path': (False, 'CBN dual-path learning: weak and strong views through the compound and split paths'),
    'dual_cls_views': (['strong'], "views whose logits get the classification loss ('weak', 'strong')"),
    'dual_cls_paths': (['compound', 'split'], "paths whose logits get the classification loss"),
    'consistency_weight': (0.1, 'weight of the stop-gradient cosine consistency (CBN paper: constants 0.1)'),
    'consistency_views': (['weak', 'strong'], 'views on which the compound and split paths are made consistent'),
    # stage 2
    'stage1_dir': (None, 'run directory of the stage-1 model (model.safetensors + config.json)'),
    'reinit_classifier': (False, 'cRT: re-initialise the classifier (Kang et al.) instead of starting from stage 1 (GCL)'),
    'tau': (1.0, 'tau-normalisation exponent (Kang et al.: tuned, 1.0 is a common default)'),
    'fsa_tau_s': (0.8, 'FSA CAM threshold of class-specific features (unofficial configs; paper silent)'),
    'fsa_tau_g': (0.2, 'FSA CAM threshold of class-generic features (unofficial configs; paper silent)'),
    'fsa_num_confusing': (3, 'FSA N_f = N_a confusing classes per tail sample (paper §5.1: 3)'),
    'fsa_head_ratio': (0.9, 'FSA h_r, sample share of the head classes (paper §5.4: 0.9)'),
    'fsa_tail_per_batch': (16, 'FSA N_t real tail samples per phase-II batch (paper: 16 -> batch 128)'),
    'fsa_iterations': (6400, 'FSA phase-II iterations (paper CIFAR: 6,400)'),
    'fsa_lr': (0.001, 'FSA phase-II fixed learning rate (paper: 0.001)'),
    # evaluation and logging
    'eval_every': (1, 'evaluate on the test split every N epochs (the last epoch always)'),
    'many_threshold': (100, 'many-shot: more than this many training images (OLTR/Kang et al.)'),
    'few_threshold': (20, 'few-shot: fewer than this many training images'),
    'log_with': (None, "Accelerate tracker, e.g. 'tensorboard'"),
    'save_checkpoints': (True, 'save the Accelerate state every epoch (needed for resume)'),
    'keep_checkpoints': (2, 'number of epoch checkpoints kept'),
    'progress': (True, 'tqdm progress bar on the main process'),
}

DEFAULTS: Dict[str, Any] = {k: v[0] for k, v in SCHEMA.items()}

_CHOICES = {
    'stage': STAGES, 'method': METHODS, 'lt_profile': ('exp', 'step'), 'lt_selection': ('cao2019', 'rng'),
    'strong_aug': ('autoaugment', 'randaugment'), 'normalize': ('dataset', 'model'),
    'scheduler': ('cosine', 'step', 'constant'), 'mixed_precision': ('no', 'bf16', 'fp16'),
    'train_crop': ('pad', 'random_resized'),
}
_VIEWS, _PATHS = ('weak', 'strong'), ('compound', 'split')


def describe_keys() -> str:
    """Markdown table of every key, its default and description."""
    rows = ['| key | default | meaning |', '|---|---|---|']
    rows += [f'| `{k}` | `{v[0]!r}` | {v[1]} |' for k, v in SCHEMA.items()]
    return '\n'.join(rows)


def _unknown_key_error(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, SCHEMA, n=3)
    hint = f' (did you mean {close}?)' if close else ''
    return ValueError(f"unknown config key {key!r} in {where}{hint}; valid keys: {sorted(SCHEMA)}")


# YAML 1.1 reads an exponent without a dot (1e-3) as a string; on the command line it means a float.
_EXP_FLOAT = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+')


def _parse_value(text: str) -> Any:
    """A command-line value as YAML (numbers, booleans, null, lists and dicts in flow style)."""
    if _EXP_FLOAT.fullmatch(text.strip()):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith('--'):
            raise ValueError(f"expected --key value, got {item!r}")
        key = item[2:].replace('-', '_')
        if '=' in key:
            key, text = key.split('=', 1)
            i += 1
        elif i + 1 < len(items) and not items[i + 1].startswith('--'):
            text = items[i + 1]
            i += 2
        else:  # a bare flag: --overwrite, --resume (= latest)
            text = 'latest' if key == 'resume' else 'true'
            i += 1
        if key not in SCHEMA:
            raise _unknown_key_error(key, 'command line')
        out[key] = _parse_value(text)
    return out


def validate_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Type- and choice-check a full config; returns it.  Errors name the key, value and expectation."""
    for key in cfg:
        if key not in SCHEMA:
            raise _unknown_key_error(key, 'config')
    for key, choices in _CHOICES.items():
        if cfg[key] not in choices:
            raise ValueError(f"invalid {key} {cfg[key]!r}; expected one of {choices}")
    for key in ('epochs', 'batch_size', 'gradient_accumulation_steps', 'eval_every', 'keep_checkpoints',
                'fsa_num_confusing', 'fsa_tail_per_batch', 'fsa_iterations', 'num_workers', 'input_size'):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {cfg[key]!r}")
    for key in ('batch_size', 'gradient_accumulation_steps', 'eval_every', 'input_size'):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]!r}")
    for key in ('lr', 'weight_decay', 'momentum', 'mixup_alpha', 'consistency_weight', 'imbalance_factor'):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise ValueError(f"{key} must be a non-negative number, got {cfg[key]!r}")
    if cfg['imbalance_factor'] < 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {cfg['imbalance_factor']!r}")
    for key in ('model_kwargs', 'loss_kwargs', 'sampler_kwargs'):
        if not isinstance(cfg[key], dict):
            raise ValueError(f"{key} must be a mapping, got {cfg[key]!r}")
    for key, valid in (('dual_cls_views', _VIEWS), ('consistency_views', _VIEWS), ('dual_cls_paths', _PATHS)):
        bad = [v for v in cfg[key] if v not in valid]
        if not isinstance(cfg[key], list) or bad:
            raise ValueError(f"{key} must be a list drawn from {valid}, got {cfg[key]!r}")
    if cfg['in_chans'] not in (None, 1, 3):
        raise ValueError(f"in_chans must be 1, 3 or null, got {cfg['in_chans']!r}")
    if cfg['stop_after_epoch'] is not None and not cfg['save_checkpoints']:
        raise ValueError('stop_after_epoch needs save_checkpoints: true, or the run could not be resumed')
    if cfg['stage'] != 'stage1' and not cfg['stage1_dir']:
        raise ValueError(f"stage {cfg['stage']!r} needs stage1_dir (a stage-1 run directory)")
    if cfg['resume'] is not None and cfg['overwrite']:
        raise ValueError('resume and overwrite exclude each other')
    return cfg


def load_config(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``--config FILE [--key value ...]`` -> validated config dict (defaults filled in)."""
    parser = argparse.ArgumentParser(description='Train an lt_zoo model (any stage, any method).',
                                     epilog='Every config key can be given as --key value. Keys:\n'
                                            + '\n'.join(f'  {k}: {v[1]}' for k, v in SCHEMA.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='YAML config file')
    args, rest = parser.parse_known_args(argv)
    cfg = copy.deepcopy(DEFAULTS)
    if args.config:
        cfg.update(read_config_file(args.config))
    cfg.update(_parse_overrides(rest))
    return validate_config(cfg)


def read_config_file(path: str, _seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Keys of a YAML config file, after merging the files named by its optional ``base`` key.

    ``base`` (a path or a list of paths, relative to the file) lets a method config reuse a dataset
    recipe: bases are applied in order, then the file's own keys.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if path in _seen:
        raise ValueError(f"config files include each other in a loop: {list(_seen) + [path]}")
    with open(path) as f:
        file_cfg = yaml.safe_load(f) or {}
    if not isinstance(file_cfg, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys, got {type(file_cfg).__name__}")
    bases = file_cfg.pop('base', [])
    merged: Dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged.update(read_config_file(os.path.join(os.path.dirname(path), base), _seen + (path,)))
    for key in file_cfg:
        if key not in SCHEMA:
            raise _unknown_key_error(key, path)
    merged.update(file_cfg)
    return merged
