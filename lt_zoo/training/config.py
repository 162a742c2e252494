"""Training configuration: typed sections, every key with its default and one-line meaning.

A run is configured by a YAML file (``--config``, with optional ``base:`` inheritance) plus
``--key value`` overrides; both use the flat key names below, and unknown keys are refused with the
list of valid ones.  :func:`load_config` returns the validated flat dict (saved as ``config.yaml`` in
the run directory); :func:`sections` turns it into one dataclass per concern, and each part of the
trainer receives only its own section.  Defaults follow the CIFAR-LT recipes of the papers each line
names (see the repository's docs/training.md).

This module imports only the standard library and PyYAML, so ``train/train.py --help`` and config
errors answer before torch is loaded.
"""
import argparse
import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

__all__ = ['DEFAULTS', 'SCHEMA', 'SECTIONS', 'STAGES', 'METHODS', 'TRAINING_STAGES', 'TrainConfig', 'sections',
           'load_config', 'read_config_file', 'validate_config', 'describe_keys', 'build_parser']

STAGES = ('stage1', 'crt', 'lws', 'tau_norm', 'fsa')
TRAINING_STAGES = ('stage1', 'crt', 'lws', 'fsa')  # stages that run the epoch loop (tau_norm does not train)

# compound_bn_functional.KERNELS, written out: this module loads without torch (train.py --help); a test
# checks that the two agree.
CBN_KERNELS = ('auto', 'gemm', 'pointwise', 'native', 'triton')

# Method labels name the recipe in run outputs and model cards (tags, citation).
METHODS = ('ce', 'ce_balanced', 'focal', 'class_balanced', 'ldam_drw', 'logit_adjust', 'balanced_softmax',
           'gcl', 'nbn', 'cbn', 'crt', 'lws', 'tau_norm', 'fsa')


def _key(default: Any, help: str):
    """A config key: its default (copied per instance when mutable) and its one-line meaning."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={'help': help})
    return field(default=default, metadata={'help': help})


@dataclass
class RunConfig:
    method: str = _key('ce', f'recipe label recorded in outputs and model cards; one of {METHODS}')
    stage: str = _key('stage1', f'stage1 (representation + classifier) or a stage-2 mode: {STAGES[1:]}')
    output_dir: str = _key('runs/run', 'run directory (refused if it exists, unless resume or overwrite)')
    seed: int = _key(0, 'seed of model init, augmentation and samplers')
    deterministic: bool = _key(False, 'torch.use_deterministic_algorithms(True) for bit-exact resumes')
    overwrite: bool = _key(False, 'replace an existing run directory')
    resume: Optional[str] = _key(None, "'latest' or a checkpoint directory to continue from")
    stop_after_epoch: Optional[int] = _key(None, 'end this process after saving epoch N (pre-emption; '
                                                 'continue with resume)')
    cpu: bool = _key(False, 'force CPU even when a GPU is present')
    compile: bool = _key(False, 'torch.compile the trained module, any stage (results agree with eager within '
                                'fp32 tolerance); pair it with channels_last on CPU, where inductor stores '
                                'activations channels_last anyway (docs/compound_bn_numerics.md#decision-kernel)')
    cbn_kernel: str = _key('auto', "formulation of every CompoundBatchNorm2d: 'auto' (native C++ on CPU), 'gemm', "
                                   "'pointwise', 'native' or 'triton' (CUDA Triton passes, opt-in); results agree to "
                                   "rounding (docs/compound_bn_numerics.md#decision-kernel)")
    channels_last: bool = _key(False, 'train and evaluate in channels_last memory format (faster convolutions on '
                                      'CPUs and GPUs; same results within fp32 rounding)')


@dataclass
class DataConfig:
    dataset: str = _key('digits', "built-in 'digits'/'fashion_mnist', a Hub name, or "
                                  "imagefolder/parquet/arrow/disk/listfile")
    data_dir: Optional[str] = _key(None, 'folder for imagefolder/disk/listfile sources')
    data_files: Any = _key(None, 'files for parquet/arrow sources: a path or {train: ..., test: ...}')
    image_column: Optional[str] = _key(None, 'image column (detected: image/img)')
    label_column: Optional[str] = _key(None, 'label column (detected: label/labels/fine_label)')
    train_split: str = _key('train', 'split used for training')
    test_split: str = _key('test', 'split used for evaluation (balanced test set)')
    imbalance_factor: float = _key(100.0, 'n_max / n_min of the long-tailed subset; 1 keeps the data as it is '
                                          '(Cao et al.)')
    lt_profile: str = _key('exp', "'exp' (Cao et al. CIFAR-LT) or 'step'")
    lt_selection: str = _key('cao2019', "'cao2019' (np.random.seed + shuffle, LDAM-DRW) or 'rng'")
    lt_seed: int = _key(0, 'seed of the subset selection (0: LDAM-DRW/GCL/NBN code)')
    balanced_subset: bool = _key(False, 'train on a class-balanced subset of the same total size as the LT subset')
    input_size: int = _key(32, 'square input side in pixels (CIFAR: 32)')
    in_chans: Optional[int] = _key(None, 'input channels; default: 1 for grayscale datasets, else 3')
    hflip: bool = _key(True, 'random horizontal flip in the weak view')
    pad: int = _key(4, 'padding of the random crop (CIFAR: 4)')
    train_crop: str = _key('pad', "'pad' (CIFAR pad-and-crop) or 'random_resized' (ImageNet RandomResizedCrop)")
    crop_pct: float = _key(1.0, 'eval centre-crop fraction (ImageNet: 0.875 = resize 256, crop 224)')
    strong_aug: str = _key('autoaugment', "strong view policy: 'autoaugment' (CIFAR10 policy) or 'randaugment'")
    normalize: str = _key('dataset', "'dataset' (mean/std of the training split) or 'model' (the model's "
                                     "pretrained cfg)")
    num_workers: int = _key(0, 'DataLoader workers')
    train_aug: str = _key('weak', "single-view training augmentation: 'weak' (pad-crop + flip) or 'strong' (the "
                                  "weak view plus the strong_aug policy: the 'BS + AutoAugment' baseline of Cheng "
                                  "et al. ACM MM'22, Table 2); the dual path makes its own two views")
    data_cache: str = _key('pil', "'pil' (decode and transform every image with PIL, every epoch) or 'tensors' "
                                  "(decode once into uint8 tensors, cached on disk, batched augmentation: the same "
                                  "transforms, several times faster on small images; docs/data.md)")


@dataclass
class ModelConfig:
    model: Optional[str] = _key(None, 'timm model name, required in stage 1 (import lt_zoo registers the lt_zoo '
                                      'ones); stage 2 uses the stage-1 architecture and a given name must match it')
    model_kwargs: Dict[str, Any] = _key({}, 'extra model options, e.g. {num_components: 4} or {nbn_scope: all}')


@dataclass
class OptimConfig:
    epochs: int = _key(200, 'training epochs (GCL/LDAM CIFAR recipe: 200)')
    batch_size: int = _key(128, 'per-process batch size (CBN paper: 128)')
    lr: float = _key(0.1, 'peak learning rate (LDAM/GCL: 0.1)')
    momentum: float = _key(0.9, 'SGD momentum')
    nesterov: bool = _key(False, 'Nesterov momentum')
    weight_decay: float = _key(2e-4, 'SGD weight decay (LDAM/GCL CIFAR: 2e-4)')
    warmup_epochs: int = _key(5, 'linear warm-up epochs (LDAM/GCL: 5)')
    scheduler: str = _key('cosine', "'cosine' to 0, 'step' (x0.1 at each lr_steps epoch) or 'constant'")
    lr_steps: List[int] = _key([160, 180], 'epochs of the x0.1 steps for the step scheduler (LDAM/GCL)')
    gradient_accumulation_steps: int = _key(1, 'micro-batches per optimizer step')
    mixed_precision: str = _key('no', "'no', 'bf16' or 'fp16' (Accelerate)")
    grad_clip: Optional[float] = _key(None, 'max gradient norm, or none')


@dataclass
class LossConfig:
    loss: str = _key('ce', 'loss name from lt_zoo.losses.list_losses()')
    loss_kwargs: Dict[str, Any] = _key({}, 'loss options (e.g. {tau: 1.0}); class counts are passed automatically')
    sampler: str = _key('instance', 'sampler name from lt_zoo.samplers.list_samplers()')
    sampler_kwargs: Dict[str, Any] = _key({}, 'sampler options (e.g. {beta: 0.9999})')
    mixup_alpha: float = _key(0.0, 'mixup Beta(alpha, alpha); 0 = off (GCL stage 1 and 2: 1.0)')


@dataclass
class DualPathConfig:  # CBN dual-path learning (Cheng et al. ACM MM'22 §3.4; docs/compound_bn.md)
    dual_path: bool = _key(False, 'CBN dual-path learning: weak and strong views through the compound and '
                                  'split paths')
    dual_cls_views: List[str] = _key(['strong'], "views whose logits get the classification loss "
                                                 "('weak', 'strong')")
    dual_cls_paths: List[str] = _key(['compound', 'split'], 'paths whose logits get the classification loss')
    consistency_weight: float = _key(0.1, 'weight of the stop-gradient cosine consistency (CBN paper: constants '
                                          '0.1)')
    consistency_views: List[str] = _key(['weak', 'strong'], 'views on which the compound and split paths are '
                                                            'made consistent')
    dual_stat_updates: str = _key('all', "forwards of a dual-path step that update CBN running statistics: 'all' "
                                         "(every (path, view) forward) or 'once' (one forward per path, the weak view "
                                         "where it is computed); the paper is silent, docs/compound_bn.md")


@dataclass
class Stage2Config:
    stage1_dir: Optional[str] = _key(None, 'run directory of the stage-1 model (model.safetensors + config.json)')
    reinit_classifier: bool = _key(False, 'cRT: re-initialise the classifier (Kang et al.) instead of starting '
                                          'from stage 1 (GCL)')
    tau: float = _key(1.0, 'tau-normalisation exponent (Kang et al.: tuned, 1.0 is a common default)')
    fsa_tau_s: float = _key(0.8, 'FSA CAM threshold of class-specific features (unofficial configs; paper silent)')
    fsa_tau_g: float = _key(0.2, 'FSA CAM threshold of class-generic features (unofficial configs; paper silent)')
    fsa_num_confusing: int = _key(3, 'FSA N_f = N_a confusing classes per tail sample (paper §5.1: 3)')
    fsa_head_ratio: float = _key(0.9, 'FSA h_r, sample share of the head classes (paper §5.4: 0.9)')
    fsa_tail_per_batch: int = _key(16, 'FSA N_t real tail samples per phase-II batch (paper: 16 -> batch 128)')
    fsa_iterations: int = _key(6400, 'FSA phase-II iterations in all, spread over the epochs (paper CIFAR: 6,400)')
    fsa_lr: float = _key(0.001, 'FSA phase-II fixed learning rate (paper: 0.001)')


@dataclass
class LogConfig:
    eval_every: int = _key(1, 'evaluate on the test split every N epochs (the last epoch always)')
    many_threshold: int = _key(100, 'many-shot: more than this many training images (OLTR/Kang et al.)')
    few_threshold: int = _key(20, 'few-shot: fewer than this many training images')
    log_with: Optional[str] = _key(None, "Accelerate tracker, e.g. 'tensorboard'")
    save_checkpoints: bool = _key(True, 'save the training state every epoch (needed for resume)')
    keep_checkpoints: int = _key(2, 'number of epoch checkpoints kept')
    progress: bool = _key(True, 'tqdm progress bar on the main process')


# section name -> dataclass; the flat key space is the union of their fields (names are unique).
SECTIONS = {'run': RunConfig, 'data': DataConfig, 'model': ModelConfig, 'optim': OptimConfig,
            'loss': LossConfig, 'dual_path': DualPathConfig, 'stage2': Stage2Config, 'log': LogConfig}


@dataclass
class TrainConfig:
    """One run's configuration, one typed section per concern."""
    run: RunConfig
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    loss: LossConfig
    dual_path: DualPathConfig
    stage2: Stage2Config
    log: LogConfig


def _schema() -> Dict[str, Tuple[Any, str]]:
    out: Dict[str, Tuple[Any, str]] = {}
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[f.name] = (default, f.metadata['help'])
    return out


SCHEMA: Dict[str, Tuple[Any, str]] = _schema()  # key: (default, meaning), in section order
DEFAULTS: Dict[str, Any] = {k: v[0] for k, v in SCHEMA.items()}


def sections(cfg: Dict[str, Any]) -> TrainConfig:
    """A validated flat config -> :class:`TrainConfig` (each section a fresh copy)."""
    cfg = copy.deepcopy(cfg)
    return TrainConfig(**{name: cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})
                          for name, cls in SECTIONS.items()})


_CHOICES = {
    'stage': STAGES, 'method': METHODS, 'lt_profile': ('exp', 'step'), 'lt_selection': ('cao2019', 'rng'),
    'strong_aug': ('autoaugment', 'randaugment'), 'normalize': ('dataset', 'model'),
    'scheduler': ('cosine', 'step', 'constant'), 'mixed_precision': ('no', 'bf16', 'fp16'),
    'train_crop': ('pad', 'random_resized'), 'train_aug': ('weak', 'strong'), 'data_cache': ('pil', 'tensors'),
    'dual_stat_updates': ('all', 'once'), 'cbn_kernel': CBN_KERNELS,
}
_VIEWS, _PATHS = ('weak', 'strong'), ('compound', 'split')
_BOOLS = ('deterministic', 'overwrite', 'cpu', 'compile', 'channels_last', 'balanced_subset', 'hflip', 'nesterov', 'dual_path',
          'reinit_classifier', 'save_checkpoints', 'progress')

# (key, lowest, highest, low_open, high_open) for integers and for reals: one table, one message format.
_INT_RANGES = [('epochs', 0, None), ('batch_size', 1, None), ('gradient_accumulation_steps', 1, None),
               ('eval_every', 1, None), ('keep_checkpoints', 1, None), ('fsa_num_confusing', 1, None),
               ('fsa_tail_per_batch', 1, None), ('fsa_iterations', 1, None), ('num_workers', 0, None),
               ('input_size', 1, None), ('seed', 0, None), ('lt_seed', 0, None), ('pad', 0, None),
               ('warmup_epochs', 0, None), ('many_threshold', 0, None), ('few_threshold', 0, None)]
_REAL_RANGES = [('lr', 0.0, None, True, False), ('momentum', 0.0, 1.0, False, True),
                ('weight_decay', 0.0, None, False, False), ('mixup_alpha', 0.0, None, False, False),
                ('consistency_weight', 0.0, None, False, False), ('imbalance_factor', 1.0, None, False, False),
                ('crop_pct', 0.0, 1.0, True, False), ('fsa_tau_s', 0.0, 1.0, False, False),
                ('fsa_tau_g', 0.0, 1.0, False, False), ('fsa_head_ratio', 0.0, 1.0, True, True),
                ('fsa_lr', 0.0, None, True, False), ('tau', None, None, False, False)]


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
        # keys with string choices keep the text: YAML 1.1 would read `--mixed_precision no` as false
        out[key] = text if key in _CHOICES else _parse_value(text)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_ranges(cfg: Dict[str, Any]) -> None:
    for key, low, high in _INT_RANGES:
        v = cfg[key]
        if not _is_int(v) or v < low or (high is not None and v > high):
            raise ValueError(f"{key} must be an integer >= {low}, got {v!r}")
    for key, low, high, low_open, high_open in _REAL_RANGES:
        v = cfg[key]
        bad = not _is_real(v) or (low is not None and (v <= low if low_open else v < low)) \
            or (high is not None and (v >= high if high_open else v > high))
        if bad:
            lo = '-inf' if low is None else f'{low:g}'
            hi = 'inf' if high is None else f'{high:g}'
            interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
            raise ValueError(f"{key} must be a finite number in {interval}, got {v!r}")
    for key in _BOOLS:
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg['grad_clip'] is not None and not (_is_real(cfg['grad_clip']) and cfg['grad_clip'] > 0):
        raise ValueError(f"grad_clip must be a number > 0 or null, got {cfg['grad_clip']!r}")
    if cfg['stop_after_epoch'] is not None and not (_is_int(cfg['stop_after_epoch']) and cfg['stop_after_epoch'] >= 1):
        raise ValueError(f"stop_after_epoch must be an integer >= 1 or null, got {cfg['stop_after_epoch']!r}")
    if not isinstance(cfg['lr_steps'], list) or not all(_is_int(s) and s >= 1 for s in cfg['lr_steps']):
        raise ValueError(f"lr_steps must be a list of epochs >= 1, got {cfg['lr_steps']!r}")
    if cfg['few_threshold'] > cfg['many_threshold']:
        raise ValueError(f"few_threshold ({cfg['few_threshold']}) must not exceed many_threshold "
                         f"({cfg['many_threshold']})")


def _check_combinations(cfg: Dict[str, Any]) -> None:
    """Refuse key combinations the trainer does not implement, saying what is supported."""
    stage = cfg['stage']
    if stage in TRAINING_STAGES and cfg['epochs'] < 1:
        raise ValueError(f"stage {stage!r} trains, so epochs must be >= 1, got {cfg['epochs']}")
    if stage in TRAINING_STAGES and cfg['warmup_epochs'] and cfg['warmup_epochs'] >= cfg['epochs']:
        raise ValueError(f"warmup_epochs ({cfg['warmup_epochs']}) must be < epochs ({cfg['epochs']})")
    if cfg['stop_after_epoch'] is not None and not cfg['save_checkpoints']:
        raise ValueError('stop_after_epoch needs save_checkpoints: true, or the run could not be resumed')
    if stage != 'stage1' and not cfg['stage1_dir']:
        raise ValueError(f"stage {stage!r} needs stage1_dir (a stage-1 run directory)")
    if cfg['resume'] is not None and cfg['overwrite']:
        raise ValueError('resume and overwrite exclude each other')
    if cfg['dual_path'] and stage != 'stage1':
        raise ValueError(f"dual_path is a stage-1 method; stage {stage!r} trains only the classifier on "
                         f"frozen features: set dual_path: false")
    if cfg['dual_path'] and cfg['mixup_alpha'] > 0:
        raise ValueError(f"mixup_alpha={cfg['mixup_alpha']} with dual_path is not implemented (the dual path "
                         f"classifies two augmented views, unmixed); use mixup_alpha: 0 or dual_path: false")
    if cfg['dual_path'] and cfg['train_aug'] != 'weak':
        raise ValueError(f"train_aug={cfg['train_aug']!r} with dual_path is not implemented: the dual path makes "
                         f"its own weak and strong views (strong_aug picks the policy); use train_aug: weak")
    if not cfg['dual_path'] and cfg['dual_stat_updates'] != 'all':
        raise ValueError(f"dual_stat_updates={cfg['dual_stat_updates']!r} needs dual_path: true")
    if cfg['data_cache'] == 'tensors' and cfg['train_crop'] != 'pad':
        raise ValueError(f"data_cache: tensors implements train_crop: pad only (CIFAR pad-and-crop), got "
                         f"{cfg['train_crop']!r}; use data_cache: pil for random_resized")
    if cfg['data_cache'] == 'tensors' and cfg['num_workers']:
        raise ValueError(f"data_cache: tensors needs no DataLoader workers (batches are sliced from memory), got "
                         f"num_workers={cfg['num_workers']}; use num_workers: 0")
    kwargs = cfg['model_kwargs']
    if (stage == 'stage1' and kwargs.get('train_stats') == 'running' and not kwargs.get('pretrained')):
        raise ValueError("model_kwargs train_stats: running does not train from scratch: with the running "
                         "statistics as constants nothing keeps activations normalised, the mismatch compounds "
                         "through depth and the loss becomes NaN within tens of steps at lr 0.1 "
                         "(docs/compound_bn_numerics.md). Use train_stats: batch (the default), or start from "
                         "trained weights (model_kwargs pretrained: true) to fine-tune with it")
    if stage in ('tau_norm', 'fsa'):
        what = 'tau_norm rescales the trained classifier without training' if stage == 'tau_norm' else \
            'FSA phase II draws its own class-balanced batches and trains with cross-entropy (Chu et al.)'
        used = {k: cfg[k] for k in ('sampler', 'sampler_kwargs', 'mixup_alpha', 'loss', 'loss_kwargs')
                if cfg[k] != DEFAULTS[k]}
        if used:
            raise ValueError(f"stage {stage!r} does not use {sorted(used)} ({what}); got {used}, supported: "
                             f"the defaults {({k: DEFAULTS[k] for k in used})}")
    if stage == 'fsa' and cfg['fsa_iterations'] < cfg['epochs']:
        raise ValueError(f"fsa_iterations ({cfg['fsa_iterations']}) are spread over the epochs, so they must be "
                         f">= epochs ({cfg['epochs']})")


def validate_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Type-, range- and choice-check a full config; returns it.  Errors name the key, value and expectation."""
    for key in cfg:
        if key not in SCHEMA:
            raise _unknown_key_error(key, 'config')
    if cfg['mixed_precision'] is False:  # `mixed_precision: no` in a YAML file (YAML 1.1 reads no as false)
        cfg['mixed_precision'] = 'no'
    for key, choices in _CHOICES.items():
        if cfg[key] not in choices:
            raise ValueError(f"invalid {key} {cfg[key]!r}; expected one of {choices}")
    for key in ('model_kwargs', 'loss_kwargs', 'sampler_kwargs'):
        if not isinstance(cfg[key], dict):
            raise ValueError(f"{key} must be a mapping, got {cfg[key]!r}")
    for key, valid in (('dual_cls_views', _VIEWS), ('consistency_views', _VIEWS), ('dual_cls_paths', _PATHS)):
        if not isinstance(cfg[key], list) or any(v not in valid for v in cfg[key]):
            raise ValueError(f"{key} must be a list drawn from {valid}, got {cfg[key]!r}")
    if cfg['in_chans'] not in (None, 1, 3):
        raise ValueError(f"in_chans must be 1, 3 or null, got {cfg['in_chans']!r}")
    _check_ranges(cfg)
    _check_combinations(cfg)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    """``--config`` plus the help text listing every key with its default and meaning."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f'{name}:')
        lines += [f'  --{f.name} (default {SCHEMA[f.name][0]!r}): {SCHEMA[f.name][1]}' for f in dataclasses.fields(cls)]
    return argparse.ArgumentParser(description='Train an lt_zoo model (any stage, any method).',
                                   epilog='Every config key can be given as --key value (or in the YAML file):\n'
                                          + '\n'.join(lines),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def load_config(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``--config FILE [--key value ...]`` -> validated flat config dict (defaults filled in)."""
    parser = build_parser()
    parser.add_argument('--config', help='YAML config file (keys as below; base: FILE inherits)')
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
