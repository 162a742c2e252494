"""SGD and its per-step learning-rate schedule, built from torch's own schedulers.

lr(t) = lr * f(t) after t optimizer steps, with W = warmup_epochs * S warm-up steps, T = epochs * S:

    f(t) = (t + 1) / W                                  t < W   (linear warm-up of LDAM-DRW / GCL)
    f(t) = 0.5 (1 + cos(pi (t - W) / (T - W)))          cosine
    f(t) = 0.1 ** #{s in lr_steps : t >= s S}           step
    f(t) = 1                                            constant

``S`` counts scheduler ticks per epoch: Accelerate's prepared scheduler ticks once per process for
every optimizer step, so S = optimizer steps per epoch x number of processes.
"""
from typing import Iterable, Tuple

import torch
from torch.optim.lr_scheduler import (ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR,
                                      SequentialLR)

from .config import OptimConfig

__all__ = ['make_optimizer', 'make_scheduler', 'lr_factor']


def lr_factor(cfg: OptimConfig, steps_per_epoch: int, step: int) -> float:
    """The closed form f(t) of the module docstring (for tests and documentation)."""
    import math
    warm, total = cfg.warmup_epochs * steps_per_epoch, max(1, cfg.epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.scheduler == 'cosine':
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    if cfg.scheduler == 'step':
        return 0.1 ** sum(step >= s * steps_per_epoch for s in cfg.lr_steps)
    return 1.0


def make_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRScheduler:
    """The schedule f(t) as torch schedulers: LinearLR warm-up, then CosineAnnealingLR / MultiStepLR."""
    warm, total = cfg.warmup_epochs * steps_per_epoch, max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == 'cosine':
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=0.0)
    elif cfg.scheduler == 'step':  # milestones count from the end of the warm-up; steps inside it have passed
        passed = sum(s * steps_per_epoch <= warm for s in cfg.lr_steps)
        main = MultiStepLR(optimizer, milestones=[s * steps_per_epoch - warm for s in cfg.lr_steps
                                                  if s * steps_per_epoch > warm], gamma=0.1)
        if passed:
            for group in optimizer.param_groups:
                group['lr'] *= 0.1 ** passed
            main.base_lrs = [b * 0.1 ** passed for b in main.base_lrs]
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=max(1, warm - 1))
    return SequentialLR(optimizer, [warmup, main], milestones=[warm])


def make_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], steps_per_epoch: int
                   ) -> Tuple[torch.optim.Optimizer, LRScheduler]:
    """SGD (lr, momentum, nesterov, weight_decay of ``cfg``) and its scheduler, stepped per optimizer step."""
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    return opt, make_scheduler(cfg, opt, steps_per_epoch)
