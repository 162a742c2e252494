"""The five training stages, one function each, chosen from :data:`STAGES` by the ``stage`` key.

Each takes a :class:`StageContext` and returns the :class:`~lt_zoo.training.loop.StagePlan` the shared
epoch loop runs, or None for a stage that does not train (tau_norm).  See docs/training.md and
docs/decoupling.md (cRT, LWS, tau-norm; Kang et al. ICLR'20), docs/fsa.md (Chu et al. ECCV'20) and
docs/compound_bn.md (the CBN dual path, Cheng et al. ACM MM'22).
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from ..decoupling import LearnableWeightScaling, tau_normalize_
from ..fsa import FeatureSpaceAugmenter, FsaBatchSampler
from .config import TrainConfig
from .dual_path import DualPathLoss, DualPathModel
from .loop import StagePlan
from .loss_inputs import LossInputs, needs_cosine
from .mixup import mixed_loss, mixup_batch

__all__ = ['StageContext', 'STAGES', 'stage1', 'crt', 'lws', 'tau_norm', 'fsa']


@dataclass
class StageContext:
    cfg: TrainConfig
    accelerator: Any
    model: nn.Module          # the network (timm model)
    loss_fn: nn.Module        # the classification loss (class counts inside)
    train_dl: Any             # prepared (sharded) training loader
    train_dl_local: Any       # the same loader before Accelerate (every process sees all batches)
    sampler: Any
    num_classes: int
    finish: Optional[Callable[[], None]] = None  # set by a stage: turn the trained model into the exported one


def _mixed_step(loss_fn, alpha: float, features_of: Callable = None):
    """Plain or mixup step: x (or frozen features of x) mixed, then the loss input, then the mixed loss.
    Mixup draws from the global RNG, which the checkpoints save and restore."""
    def step(module, batch):
        x, y = batch
        if features_of is not None:
            x = features_of(x)
        x, y_a, y_b, lam = mixup_batch(x, y, alpha)
        return {'loss': mixed_loss(loss_fn, module(x), y_a, y_b, lam)}
    return step


def stage1(ctx: StageContext) -> StagePlan:
    """Representation + classifier: any model and loss, optional mixup, or the CBN dual path."""
    dual, model = ctx.cfg.dual_path, ctx.model
    inputs = LossInputs(model, cosine=needs_cosine(ctx.loss_fn))
    if dual.dual_path:
        dual_loss = DualPathLoss(ctx.loss_fn, dual.dual_cls_views, dual.dual_cls_paths, dual.consistency_views,
                                 dual.consistency_weight)
        module = DualPathModel(inputs, ctx.num_classes, dual_loss.required_outputs, dual.dual_stat_updates)

        def step(wrapped, batch):
            (x_weak, x_strong), y = batch
            return dual_loss(wrapped(x_weak, x_strong, y), y)
    else:
        module, step = inputs, _mixed_step(ctx.loss_fn, ctx.cfg.loss.mixup_alpha)
    return StagePlan(module=module, params=list(model.parameters()), step=step, loader=ctx.train_dl,
                     sampler=ctx.sampler, loss_fn=ctx.loss_fn, eval_model=model, network=model,
                     optim=ctx.cfg.optim, compiled=inputs)


def _freeze_all_but(model: nn.Module, params) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def _classifier_plan(ctx: StageContext, params) -> StagePlan:
    """cRT / LWS: frozen trunk in eval mode (BN/CBN statistics frozen), only ``params`` of the head learn."""
    model = ctx.model
    _freeze_all_but(model, params)
    model.to(ctx.accelerator.device)

    @torch.no_grad()
    def features_of(x):
        model.eval()
        return model.forward_head(model.forward_features(x), pre_logits=True)
    module = LossInputs(model.get_classifier(), cosine=needs_cosine(ctx.loss_fn), head_only=True)
    return StagePlan(module=module, params=list(params), step=_mixed_step(ctx.loss_fn, ctx.cfg.loss.mixup_alpha,
                                                                          features_of),
                     loader=ctx.train_dl, sampler=ctx.sampler, loss_fn=ctx.loss_fn, eval_model=model, network=model,
                     optim=ctx.cfg.optim)


def crt(ctx: StageContext) -> StagePlan:
    """Classifier re-training (Kang et al.): the whole head, optionally re-initialised, on frozen features."""
    head = ctx.model.get_classifier()
    if ctx.cfg.stage2.reinit_classifier:
        head.reset_parameters()
    return _classifier_plan(ctx, list(head.parameters()))


def lws(ctx: StageContext) -> StagePlan:
    """Learnable weight scaling (Kang et al.): only a per-class scale f_c of the frozen head learns; the
    scales are folded into a plain Linear afterwards."""
    model = ctx.model
    name = model.pretrained_cfg.get('classifier', 'fc')
    setattr(model, name, LearnableWeightScaling(getattr(model, name)))
    ctx.finish = lambda: setattr(model, name, getattr(model, name).to_linear())
    return _classifier_plan(ctx, [model.get_classifier().scales])


def tau_norm(ctx: StageContext) -> None:
    """tau-normalisation (Kang et al.): W_c / ||W_c||^tau, no training."""
    tau_normalize_(ctx.model.get_classifier(), ctx.cfg.stage2.tau)
    return None


class _FsaEpochs:
    """FSA phase-II batches as epochs: ``fsa_iterations`` in all, epoch e gets iterations
    [floor(e n / E), floor((e + 1) n / E)); ``set_epoch`` picks the epoch's count and draw."""

    def __init__(self, batches: FsaBatchSampler, total: int, epochs: int, device):
        self.batches, self.total, self.epochs, self.device = batches, total, epochs, device
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)
        self.batches.num_batches = (epoch + 1) * self.total // self.epochs - epoch * self.total // self.epochs

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for f, y in self.batches:
            yield f.to(self.device), y.to(self.device)


def fsa(ctx: StageContext) -> StagePlan:
    """FSA phase II (Chu et al. ECCV'20): pre-pool features of the frozen trunk, online tail-class
    augmentation in feature space, only the FC trains, with a fixed learning rate ``fsa_lr``."""
    s2, acc, model = ctx.cfg.stage2, ctx.accelerator, ctx.model
    model.to(acc.device).eval()
    feats, labels = [], []
    with torch.no_grad():
        for x, y in ctx.train_dl_local:
            feats.append(model.forward_features(x.to(acc.device)).float().cpu())
            labels.append(y)
    bank = FeatureSpaceAugmenter.from_classifier(
        torch.cat(feats), torch.cat(labels), model.get_classifier().cpu(), head_ratio=s2.fsa_head_ratio,
        num_confusing=s2.fsa_num_confusing, tau_s=s2.fsa_tau_s, tau_g=s2.fsa_tau_g)
    model.to(acc.device)
    acc.print(f'fsa phase II: {s2.fsa_iterations} iterations over {ctx.cfg.optim.epochs} epochs, '
              f'tail classes {bank.tail_classes.tolist()}')
    batches = FsaBatchSampler(bank, num_tail=s2.fsa_tail_per_batch, num_batches=s2.fsa_iterations,
                              seed=ctx.cfg.run.seed * 1000 + acc.process_index)
    loader = _FsaEpochs(batches, s2.fsa_iterations, ctx.cfg.optim.epochs, acc.device)
    head = model.get_classifier()
    _freeze_all_but(model, head.parameters())

    def step(trained_head, batch):
        f, y = batch
        return {'loss': ctx.loss_fn(trained_head(model.forward_head(f, pre_logits=True)), y)}
    optim = dataclasses.replace(ctx.cfg.optim, lr=s2.fsa_lr, weight_decay=0.0, nesterov=False, warmup_epochs=0,
                                scheduler='constant')
    return StagePlan(module=head, params=list(head.parameters()), step=step, loader=loader, sampler=loader,
                     loss_fn=ctx.loss_fn, eval_model=model, network=model, optim=optim)


STAGES: Dict[str, Callable[[StageContext], Optional[StagePlan]]] = {
    'stage1': stage1, 'crt': crt, 'lws': lws, 'tau_norm': tau_norm, 'fsa': fsa}
