"""The one epoch loop every training stage goes through: step, evaluate, log, checkpoint, resume.

A stage describes what it trains as a :class:`StagePlan`; :func:`train_epochs` runs it.  Per epoch it
writes one line of ``metrics.jsonl`` (train terms, lr, time, test metrics when evaluated, the CBN
layers' prior summary when the network has CBN) and an epoch checkpoint (lt_zoo.training.checkpoint:
safetensors + JSON, atomic).  The last epoch is always evaluated, and that evaluation is returned so
the final report does not evaluate the same weights again.
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..layers.compound_bn import cbn_statistics
from . import checkpoint as ckpt
from .config import LogConfig, OptimConfig
from .evaluation import evaluate_model
from .run_dir import read_metrics, truncate_metrics
from .schedule import make_optimizer

__all__ = ['StagePlan', 'LoopResult', 'train_epochs', 'cbn_summary']

_TEST_KEYS = ('top1', 'balanced_acc', 'many', 'medium', 'few', 'ece')


@dataclass
class StagePlan:
    """What a stage trains.

    module: the trained nn.Module (the network, its dual-path or loss-input wrapper, or the head alone);
        ``step(prepared_module, batch) -> {'loss': scalar, other terms...}``.
    loader / sampler: the (prepared) training batches and the sampler whose ``set_epoch`` picks the draw.
    eval_model: images -> logits for the test evaluation (the network, which shares the module's weights).
    network: the whole network (for the CBN statistics summary).
    optim: the stage's optimisation section (FSA phase II: fixed lr, no weight decay).
    compiled: what ``compile: true`` compiles, in place (``nn.Module.compile``: state_dict keys unchanged;
        evaluation stays eager unless it runs that module, as FSA's head); None: ``module``.  The dual
        path names the network inside its wrapper: ``split_norm`` switches the CBN layers between the
        calls, so the switch stays eager and each path gets its own graph (one network forward each)
        instead of one graph of all forwards.
    """
    module: nn.Module
    params: List[nn.Parameter]
    step: Callable[[nn.Module, Any], Dict[str, torch.Tensor]]
    loader: Any
    sampler: Any
    loss_fn: Any
    eval_model: nn.Module
    network: nn.Module
    optim: OptimConfig
    compiled: Optional[nn.Module] = None


@dataclass
class LoopResult:
    module: Optional[nn.Module]           # the trained module, unwrapped; None when stopped early
    final_eval: Optional[Dict[str, Any]]  # the evaluation of the last epoch; None when stopped early
    resumed_at: int = 0                   # epochs done by earlier processes (0: not resumed)
    earlier_s: float = 0.0                # their wall-clock seconds, up to the checkpoint resumed from


def cbn_summary(network: nn.Module) -> Optional[Dict[str, Any]]:
    """Per CBN layer: priors, starving components, variance range (``cbn_statistics``); None without CBN."""
    stats = cbn_statistics(network)
    return stats or None


def _optimizer_steps(loader, accumulation: int) -> int:
    return math.ceil(len(loader) / accumulation)


def train_epochs(plan: StagePlan, *, accelerator, run_dir, epochs: int, log: LogConfig, test_dl, counts,
                 resume_from: Optional[Path], stop_after_epoch: Optional[int], compile: bool,
                 progress: bool) -> LoopResult:
    """Run ``plan`` for ``epochs`` epochs (continuing from ``resume_from``, a validated checkpoint)."""
    # Accelerate's scheduler ticks num_processes times per optimizer step (see lt_zoo.training.schedule).
    ticks = _optimizer_steps(plan.loader, accelerator.gradient_accumulation_steps) * accelerator.num_processes
    optimizer, scheduler = make_optimizer(plan.optim, plan.params, ticks)
    if compile:
        (plan.module if plan.compiled is None else plan.compiled).compile()
    module, optimizer, scheduler = accelerator.prepare(plan.module, optimizer, scheduler)
    start_epoch, earlier_s = 0, 0.0
    metrics_path = Path(run_dir) / 'metrics.jsonl'
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, model=module, optimizer=optimizer,
                                     scheduler=scheduler)
        start_epoch = int(state['epoch'])
        earlier_s = float(state['elapsed_s']) if 'elapsed_s' in state else _epoch_seconds(metrics_path, start_epoch)
        accelerator.print(f'resumed from {resume_from} (epoch {start_epoch} done)')
    began = time.time()
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, start_epoch)
    result = None
    for epoch in range(start_epoch, epochs):
        # The prepared loader re-sets the sampler's epoch from its own pass counter, which restarts at 0
        # in a resumed process: set both, or epoch e after a resume replays epoch 0's draw.
        if hasattr(plan.loader, 'set_epoch'):
            plan.loader.set_epoch(epoch)
        plan.sampler.set_epoch(epoch)
        plan.loss_fn.set_epoch(epoch)
        module.train()
        start, sums, n = time.time(), {}, 0
        bar = tqdm(plan.loader, desc=f'epoch {epoch + 1}/{epochs}', disable=not progress, leave=False)
        for batch in bar:
            with accelerator.accumulate(module):
                terms = plan.step(module, batch)
                accelerator.backward(terms['loss'])
                if plan.optim.grad_clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(plan.params, plan.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
            bar.set_postfix(loss=f"{sums['loss'] / n:.3f}")
        record = {'epoch': epoch + 1, 'lr': scheduler.get_last_lr()[0], 'time_s': round(time.time() - start, 2),
                  **{f'train_{k}': v / max(n, 1) for k, v in sums.items()}}
        if (epoch + 1) % log.eval_every == 0 or epoch + 1 == epochs:
            result = evaluate_model(log, accelerator, plan.eval_model, test_dl, counts, progress)
            record.update({f'test_{k}': result[k] for k in _TEST_KEYS})
        else:
            result = None
        summary = cbn_summary(plan.network)
        if summary is not None:
            record['cbn'] = summary
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch + 1)
        if accelerator.is_main_process:
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        accelerator.print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in record.items()
                                   if isinstance(v, (int, float))))
        if log.save_checkpoints:
            ckpt.save_checkpoint(accelerator, run_dir, epoch + 1, model=module, optimizer=optimizer,
                                 scheduler=scheduler, keep=log.keep_checkpoints,
                                 state={'epoch': epoch + 1, 'elapsed_s': round(earlier_s + time.time() - began, 2)})
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < epochs:
            accelerator.print(f'stopping after epoch {epoch + 1} (stop_after_epoch); continue with --resume')
            return LoopResult(None, None, start_epoch, earlier_s)
    return LoopResult(accelerator.unwrap_model(module), result, start_epoch, earlier_s)


def _epoch_seconds(metrics_path: Path, epochs: int) -> float:
    """Training seconds of the first ``epochs`` epochs in ``metrics.jsonl`` (their ``time_s``): what a
    checkpoint written before ``elapsed_s`` was stored in its state says of the time spent (a lower bound:
    evaluation and checkpointing are not in ``time_s``)."""
    return float(sum(r.get('time_s', 0.0) for r in read_metrics(metrics_path) if r['epoch'] <= epochs))
