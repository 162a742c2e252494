"""Train and evaluate one configured run, top to bottom (Accelerate: one CPU, one GPU or many).

    validate config -> find the resume checkpoint -> data -> model + loss      (nothing written yet)
    -> run directory + config.yaml -> loaders -> the stage's plan -> epoch loop
    -> final evaluation (the last epoch's, not repeated) -> eval.json, plot, timm export

Each step receives only its config section (lt_zoo.training.config).  See docs/training.md.
"""
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from ..export import export_model
from ..layers import compound_bn_triton as cbn_triton
from ..layers.compound_bn import set_cbn_kernel
from ..losses import list_losses
from ..plots import plot_per_class_accuracy
from ..samplers import create_sampler, list_samplers
from . import checkpoint as ckpt
from .config import load_config, sections, validate_config
from .data import build_data, build_loaders, normalization
from .evaluation import evaluate_model
from .loop import train_epochs
from .model import build_model
from .run_dir import prepare_run_dir, run_dir_lock
from .stages import STAGES, StageContext

__all__ = ['run', 'main', 'print_table', 'repo_relative']

REPO_ROOT = Path(__file__).resolve().parents[2]
_PATH_KEYS = ('output_dir', 'stage1_dir', 'data_dir', 'resume')


def repo_relative(value: Any) -> Any:
    """A path inside the repository as a relative path (run records stay valid in any checkout)."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    try:
        return os.path.relpath(value, REPO_ROOT) if Path(value).resolve().is_relative_to(REPO_ROOT) else value
    except (OSError, ValueError):
        return value


def record_command(script: str, argv: List[str]) -> str:
    """``script argv...`` with repository paths made relative (eval.json 'command').

    Shell-quoted, so an override that holds JSON (``--model_kwargs '{"num_components": 2}'``) pastes back
    into a shell as the same argv.
    """
    return shlex.join([script] + [str(repo_relative(a)) for a in argv])


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """Command-line entry: parse ``--config``/overrides, train, return the final evaluation dict."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(argv)
    return run(cfg, command=record_command('train/train.py', argv))[0]


def _check_names(cfg: Dict[str, Any]) -> None:
    if cfg['loss'] not in list_losses():
        raise ValueError(f"unknown loss {cfg['loss']!r}; valid: {list_losses()}")
    if cfg['sampler'] not in list_samplers():
        raise ValueError(f"unknown sampler {cfg['sampler']!r}; valid: {list_samplers()}")


def _check_trainable(cfg: Dict[str, Any]) -> None:
    """Refuse model options measured not to train from scratch, with the measurement (a config that is valid
    for a layer, and for fine-tuning, but not for a fresh network)."""
    kwargs = cfg['model_kwargs']
    if cfg['stage'] == 'stage1' and kwargs.get('responsibility_grad') and not kwargs.get('pretrained'):
        raise ValueError(
            "model_kwargs responsibility_grad: true does not train from scratch: back-propagating through the "
            "E-step's posteriors made the loss jump to 475 and 229 (epochs 4 and 8) on Fashion-MNIST-LT, and the "
            "run ended at 41.1% balanced accuracy against 84.2% without it (benchmark row cbn_rgrad, "
            "docs/compound_bn.md#decision-responsibility-gradient). Use responsibility_grad: false (the "
            "default), or fine-tune trained weights with it (model_kwargs pretrained: true)")


def run(cfg: Dict[str, Any], command: str = 'train/train.py') -> Tuple[Optional[dict], Optional[nn.Module]]:
    """Train and evaluate one run (a flat config, as :func:`load_config` returns it).

    Returns (final evaluation dict, trained model on CPU); both None when the run stopped early
    (stop_after_epoch).  Bad input raises before anything in the run directory is written, and so does
    a run directory that another live training holds (:func:`~lt_zoo.training.run_dir.run_dir_lock`).
    """
    cfg = validate_config(dict(cfg))
    _check_names(cfg)
    _check_trainable(cfg)
    # one owner per directory: rank 0 of a distributed launch (RANK is unset in a single process)
    with run_dir_lock(cfg['output_dir'], enabled=int(os.environ.get('RANK', '0')) == 0):
        return _train(cfg, command)


def _train(cfg: Dict[str, Any], command: str) -> Tuple[Optional[dict], Optional[nn.Module]]:
    c = sections(cfg)
    run_dir = c.run.output_dir
    resume_from = ckpt.find_resume_checkpoint(run_dir, c.run.resume)
    if c.run.deterministic:
        torch.use_deterministic_algorithms(True)
    # CBN all-reduces its EM statistics inside forward, so rank 0's buffer broadcast changes nothing there.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=True)
    accelerator = Accelerator(mixed_precision=c.optim.mixed_precision, cpu=c.run.cpu,
                              gradient_accumulation_steps=c.optim.gradient_accumulation_steps,
                              log_with=c.log.log_with, project_dir=run_dir, kwargs_handlers=[ddp])
    set_seed(c.run.seed)
    if c.run.cbn_kernel == 'triton' and not cbn_triton.runs_on(accelerator.device):
        raise ValueError(f"cbn_kernel 'triton' runs on CUDA, but this run's device is {accelerator.device}; "
                         f"use 'auto'")

    data = build_data(c.data)
    model, loss_fn = build_model(c.run, c.model, c.stage2, c.loss, c.dual_path, data)
    if set_cbn_kernel(model, c.run.cbn_kernel) == 0 and c.run.cbn_kernel != 'auto':
        accelerator.print(f"cbn_kernel {c.run.cbn_kernel!r}: the model has no CompoundBatchNorm2d, nothing to set")
    mean, std = normalization(c.data, data, model, fresh_model=c.run.stage == 'stage1')
    tensors = c.data.data_cache == 'tensors'
    # Accelerate shards prepared DataLoaders; a TensorLoader is not prepared, so its sampler shards itself.
    shard = dict(num_replicas=accelerator.num_processes, rank=accelerator.process_index) if tensors else {}
    sampler = create_sampler(c.loss.sampler, data['labels'], seed=c.run.seed, **shard, **c.loss.sampler_kwargs)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, resume=c.run.resume, overwrite=c.run.overwrite)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(Path(run_dir) / 'config.yaml', 'w') as f:
            yaml.safe_dump({k: repo_relative(v) if k in _PATH_KEYS else v for k, v in cfg.items()}, f,
                           sort_keys=False)
    if c.log.log_with:
        accelerator.init_trackers(Path(run_dir).name, {k: v for k, v in cfg.items()
                                                       if isinstance(v, (int, float, str, bool))})
    num_classes = data['splits'].num_classes
    accelerator.print(f"{c.run.method} / {c.run.stage}: "
                      f"{c.model.model if c.run.stage == 'stage1' else c.stage2.stage1_dir} on {c.data.dataset} "
                      f"({len(data['train'])} training images, counts {data['counts'].tolist()})")

    train_dl_local, test_dl = build_loaders(c.data, data, mean, std, batch_size=c.optim.batch_size,
                                            two_view=c.dual_path.dual_path, sampler=sampler, seed=c.run.seed,
                                            rank=accelerator.process_index, device=accelerator.device)
    train_dl = train_dl_local
    if not tensors:
        train_dl, test_dl = accelerator.prepare(train_dl_local, test_dl)
    if c.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.num_processes > 1:  # Accelerate never converts BN to SyncBN; CBN/NBN are not _BatchNorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    progress = c.log.progress and accelerator.is_local_main_process
    start = time.time()

    ctx = StageContext(cfg=c, accelerator=accelerator, model=model, loss_fn=loss_fn, train_dl=train_dl,
                       train_dl_local=train_dl_local, sampler=sampler, num_classes=num_classes)
    plan = STAGES[c.run.stage](ctx)
    final, resumed_at, earlier_s = None, 0, 0.0
    if plan is not None:
        result = train_epochs(plan, accelerator=accelerator, run_dir=run_dir, epochs=c.optim.epochs, log=c.log,
                              test_dl=test_dl, counts=data['counts'], resume_from=resume_from,
                              stop_after_epoch=c.run.stop_after_epoch, compile=c.run.compile, progress=progress)
        if result.module is None:
            return None, None
        final, resumed_at, earlier_s = result.final_eval, result.resumed_at, result.earlier_s
        if ctx.finish is not None:  # the exported model differs from the evaluated one (LWS folded): evaluate it
            ctx.finish()
            final = None
    model = accelerator.unwrap_model(model).to(accelerator.device)
    if final is None:  # no training (tau_norm), or a resume of a run whose epochs were all done
        final = evaluate_model(c.log, accelerator, model, test_dl, data['counts'], progress)

    if accelerator.is_main_process:
        arch = model.pretrained_cfg.get('architecture')
        final.update(method=c.run.method, stage=c.run.stage, model=arch, dataset=c.data.dataset,
                     class_names=list(data['splits'].class_names), class_counts=data['counts'].tolist(),
                     long_tail=data['lt'], train_images=int(len(data['train'])),
                     test_images=int(len(data['splits'].test)), world_size=accelerator.num_processes, command=command,
                     # a resumed run counts its earlier processes' epochs too (checkpoint state elapsed_s)
                     wall_time_s=round(time.time() - start + earlier_s, 1), resumed_at_epoch=resumed_at)
        with open(Path(run_dir) / 'eval.json', 'w') as f:
            json.dump(final, f, indent=2)
        plot_per_class_accuracy(final['per_class_acc'], data['counts'].tolist(),
                                str(Path(run_dir) / 'per_class_accuracy.png'),
                                class_names=list(data['splits'].class_names),
                                title=f"{c.run.method} ({arch}): balanced acc {final['balanced_acc']:.3f}")
        data_config = dict(input_size=(data['in_chans'], c.data.input_size, c.data.input_size), mean=tuple(mean),
                           std=tuple(std), crop_pct=c.data.crop_pct, interpolation='bilinear')
        model = model.cpu().to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
        export_model(model, run_dir, class_names=data['splits'].class_names, data_config=data_config)
        print_table(final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final, model.cpu()


def print_table(result: Dict[str, Any]) -> None:
    """The evaluation as a markdown table (percent, 2 decimals)."""
    fmt = lambda v: '-' if v is None else f'{100 * v:.2f}'  # noqa: E731
    rows = [('top-1', result['top1']), ('balanced acc', result['balanced_acc']), ('many-shot', result['many']),
            ('medium-shot', result['medium']), ('few-shot', result['few']), ('ECE', result['ece'])]
    print('\n| metric | % |\n|---|---|')
    for name, v in rows:
        print(f'| {name} | {fmt(v)} |')
