#!/usr/bin/env python
"""Train any lt_zoo method with Accelerate: one CPU, one GPU or many.

    accelerate launch train/train.py --config train/configs/digits_cbn_dual.yaml [--key value ...]
    python train/train.py --config ...            # single process

Stage 1 trains representation + classifier (any model, any loss, optional CBN dual path).
Stage 2 starts from a stage-1 run directory: classifier re-training (crt), learnable weight scaling
(lws), tau-normalisation (tau_norm) or Feature Space Augmentation phase II (fsa).
Every config key, its default and meaning: lt_zoo/training/config.py (or --help).
"""
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import timm
import lt_zoo
from lt_zoo import data as ltdata
from lt_zoo.decoupling import LearnableWeightScaling, tau_normalize_
from lt_zoo.export import export_model, load_exported, read_export_config
from lt_zoo.fsa import FeatureSpaceAugmenter, FsaBatchSampler
from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
from lt_zoo.layers.cosine_classifier import CosineClassifier
from lt_zoo.losses import create_loss, list_losses
from lt_zoo.metrics import evaluate
from lt_zoo.plots import plot_per_class_accuracy
from lt_zoo.samplers import create_sampler, list_samplers
from lt_zoo.training.config import load_config
from lt_zoo.training.dual_path import DualPathLoss, DualPathModel, dual_path_keys
from lt_zoo.training.mixup import mixed_loss, mixup_batch
from lt_zoo.training.run_dir import (TrainState, checkpoint_dirs, commit_checkpoint, prepare_run_dir,
                                     resolve_resume, truncate_metrics)


# ----------------------------------------------------------------------------------------------- data
def build_data(cfg):
    """Splits -> long-tailed (or balanced) training subset -> class counts, channels, normalisation."""
    splits = ltdata.load_splits(cfg['dataset'], data_dir=cfg['data_dir'], data_files=cfg['data_files'],
                                image_column=cfg['image_column'], label_column=cfg['label_column'],
                                train_split=cfg['train_split'], test_split=cfg['test_split'])
    train, lt = splits.train, None
    if cfg['imbalance_factor'] > 1 or cfg['balanced_subset']:
        train, lt = ltdata.make_long_tailed(splits.train, splits.label_column, cfg['imbalance_factor'],
                                            profile=cfg['lt_profile'], seed=cfg['lt_seed'],
                                            selection=cfg['lt_selection'])
        if cfg['balanced_subset']:  # same total size, every class equal: the upper reference of the benchmark
            per_class = sum(lt.counts) // len(lt.counts)
            train, lt = ltdata.make_long_tailed(splits.train, splits.label_column, 1.0, seed=cfg['lt_seed'],
                                                selection=cfg['lt_selection'], n_max=per_class)
    labels = ltdata.label_array(train, splits.label_column)
    counts = ltdata.class_counts(labels, splits.num_classes)
    if (counts == 0).any():
        raise ValueError(f"training classes {np.flatnonzero(counts == 0).tolist()} have no images "
                         f"(class counts {counts.tolist()})")
    in_chans = cfg['in_chans'] or (1 if train[0][splits.image_column].mode in ('L', '1', 'I', 'I;16') else 3)
    lt_record = lt.to_dict() if lt is not None else {'imbalance_factor': 1.0, 'counts': counts.tolist()}
    return dict(splits=splits, train=train, labels=labels, counts=counts, in_chans=in_chans, lt=lt_record)


def build_loaders(cfg, data, mean, std, two_view: bool, sampler):
    common = dict(input_size=cfg['input_size'], in_chans=data['in_chans'], mean=mean, std=std)
    aug = dict(pad=cfg['pad'], hflip=cfg['hflip'], train_crop=cfg['train_crop'], **common)
    weak = ltdata.create_transform('weak', **aug)
    train_tf = ltdata.TwoView(weak, ltdata.create_transform('strong', strong=cfg['strong_aug'], **aug)) \
        if two_view else weak
    cols = (data['splits'].image_column, data['splits'].label_column)
    train_ds = ltdata.attach_transform(data['train'], train_tf, *cols)
    test_ds = ltdata.attach_transform(data['splits'].test,
                                      ltdata.create_transform('eval', crop_pct=cfg['crop_pct'], **common), *cols)
    loader = dict(batch_size=cfg['batch_size'], num_workers=cfg['num_workers'], collate_fn=ltdata.collate)
    train_dl = DataLoader(train_ds, sampler=sampler, drop_last=False, **loader)
    test_dl = DataLoader(test_ds, shuffle=False, **loader)
    return train_dl, test_dl


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg, data, accelerator):
    """Stage 1: a fresh model.  Stage 2: the stage-1 export, checked against this run's data."""
    num_classes = data['splits'].num_classes
    if cfg['stage'] == 'stage1':
        if not cfg['model']:
            raise ValueError("stage1 needs a model, e.g. --model resnet32 (see timm.list_models('resnet32*'))")
        model = timm.create_model(cfg['model'], num_classes=num_classes, in_chans=data['in_chans'],
                                  **cfg['model_kwargs'])
    else:
        exported = read_export_config(cfg['stage1_dir'])
        for key, want in (('num_classes', num_classes), ('in_chans', data['in_chans'])):
            have = exported.get('model_args', {}).get(key, exported.get(key))
            if have is not None and have != want:
                raise ValueError(f"stage-1 checkpoint {cfg['stage1_dir']!r} has {key}={have}, but this run's data "
                                 f"needs {key}={want}")
        if cfg['model'] is not None and cfg['model'] != exported['architecture']:
            raise ValueError(f"config model {cfg['model']!r} does not match the stage-1 architecture "
                             f"{exported['architecture']!r}")
        model = load_exported(cfg['stage1_dir'])
    head = model.get_classifier()
    loss_cls = create_loss(cfg['loss'], data['counts'].tolist(), **cfg['loss_kwargs'])
    if getattr(loss_cls, 'expects_cosine', False) and not isinstance(head, CosineClassifier):
        raise ValueError(f"loss {cfg['loss']!r} works on cosine similarities and needs a cosine head "
                         f"(a '_gcl' model), but {model.pretrained_cfg.get('architecture')!r} has "
                         f"{type(head).__name__}")
    has_cbn = any(isinstance(m, CompoundBatchNorm2d) for m in model.modules())
    if cfg['dual_path'] and not has_cbn:
        raise ValueError(f"dual_path needs a CBN model (e.g. resnet32_cbn); "
                         f"{model.pretrained_cfg.get('architecture')!r} has no CompoundBatchNorm2d")
    if cfg['stage'] in ('lws', 'tau_norm') and isinstance(head, CosineClassifier):
        raise ValueError(f"stage {cfg['stage']!r} rescales class weights, which a cosine head normalises away")
    return model, loss_cls


def logits_for_loss(model, logits, loss_fn):
    """Cosine-input losses (GCL, LDAM) get cos = logits / s of the cosine head."""
    if getattr(loss_fn, 'expects_cosine', False):
        return logits / _head(model).scale
    return logits


def _head(model):
    head = model.get_classifier()
    return head.classifier if isinstance(head, LearnableWeightScaling) else head


def make_optimizer(cfg, params, steps_per_epoch, epochs):
    opt = torch.optim.SGD(params, lr=cfg['lr'], momentum=cfg['momentum'], nesterov=cfg['nesterov'],
                          weight_decay=cfg['weight_decay'])
    warm = cfg['warmup_epochs'] * steps_per_epoch
    total = max(1, epochs * steps_per_epoch)

    def factor(step):  # per optimizer step; warm-up as LDAM/GCL (lr * e / 5), then the schedule
        if step < warm:
            return (step + 1) / warm
        if cfg['scheduler'] == 'cosine':
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        if cfg['scheduler'] == 'step':
            return 0.1 ** sum(step >= s * steps_per_epoch for s in cfg['lr_steps'])
        return 1.0
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(accelerator, model, loader, progress):
    model.eval()
    outs, ys = [], []
    for x, y in tqdm(loader, desc='eval', leave=False, disable=not progress):
        logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits.float(), y))
        outs.append(logits.cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def evaluate_model(cfg, accelerator, model, loader, counts, progress):
    logits, y = predict(accelerator, model, loader, progress)
    return evaluate(logits, y, counts.tolist(), many_threshold=cfg['many_threshold'],
                    few_threshold=cfg['few_threshold'])


# ------------------------------------------------------------------------------------------- training
def train_epochs(cfg, accelerator, run_dir, model, step_fn, params, train_dl, sampler, test_dl, counts, loss_fn,
                 eval_model=None):
    """The epoch loop shared by stage 1, cRT and LWS: step, evaluate, log, checkpoint, resume.

    ``model`` is what trains (the network, its dual-path wrapper, or only the head in stage 2);
    ``eval_model`` maps images to logits (default: ``model``).
    """
    steps_per_epoch = math.ceil(len(train_dl) / cfg['gradient_accumulation_steps'])
    optimizer, scheduler = make_optimizer(cfg, params, steps_per_epoch, cfg['epochs'])
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    ckpt = resolve_resume(run_dir, cfg['resume'])
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state.load(ckpt)
        accelerator.print(f'resumed from {ckpt} (epoch {state.epoch} done)')
    metrics_path = Path(run_dir) / 'metrics.jsonl'
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, state.epoch)
    progress = cfg['progress'] and accelerator.is_local_main_process
    result = None
    for epoch in range(state.epoch, cfg['epochs']):
        # The prepared loader re-sets the sampler's epoch from its own pass counter, which restarts at 0
        # in a resumed process: set both, or epoch e after a resume replays epoch 0's draw.
        train_dl.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loss_fn.set_epoch(epoch)
        model.train()
        start, sums, n = time.time(), {}, 0
        bar = tqdm(train_dl, desc=f'epoch {epoch + 1}/{cfg["epochs"]}', disable=not progress, leave=False)
        for batch in bar:
            with accelerator.accumulate(model):
                terms = step_fn(model, batch)
                accelerator.backward(terms['loss'])
                if cfg['grad_clip'] and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg['grad_clip'])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
            bar.set_postfix(loss=f"{sums['loss'] / n:.3f}")
        record = {'epoch': epoch + 1, 'lr': scheduler.get_last_lr()[0], 'time_s': round(time.time() - start, 2),
                  **{f'train_{k}': v / max(n, 1) for k, v in sums.items()}}
        if (epoch + 1) % cfg['eval_every'] == 0 or epoch + 1 == cfg['epochs']:
            result = evaluate_model(cfg, accelerator, eval_model or model, test_dl, counts, progress)
            record.update({f'test_{k}': result[k] for k in ('top1', 'balanced_acc', 'many', 'medium', 'few', 'ece')})
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch + 1)
        if accelerator.is_main_process:
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        accelerator.print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in record.items()
                                   if v is not None))
        state.epoch = epoch + 1
        if cfg['save_checkpoints']:
            save_checkpoint(accelerator, run_dir, state, cfg['keep_checkpoints'])
        if cfg['stop_after_epoch'] is not None and state.epoch >= cfg['stop_after_epoch'] and state.epoch < cfg['epochs']:
            accelerator.print(f'stopping after epoch {state.epoch} (stop_after_epoch); continue with --resume')
            return None
    return accelerator.unwrap_model(model)


def save_checkpoint(accelerator, run_dir, state, keep):
    """Accelerate state into a temporary folder, then renamed: a kill never leaves a half checkpoint."""
    epoch = state.epoch
    root = Path(run_dir) / 'checkpoints'
    tmp = root / f'.tmp_epoch_{epoch:04d}'
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(tmp)
        commit_checkpoint(tmp, run_dir, epoch, keep)
    accelerator.wait_for_everyone()


def stage1_step_fn(cfg, model, loss_fn, num_classes, mix_gen):
    """The per-batch loss of stage 1: plain, mixup, or the CBN dual path."""
    if cfg['dual_path']:
        dual_loss = DualPathLoss(loss_fn, cfg['dual_cls_views'], cfg['dual_cls_paths'], cfg['consistency_views'],
                                 cfg['consistency_weight'])

        def step(wrapped, batch):
            (x_weak, x_strong), y = batch
            return dual_loss(wrapped(x_weak, x_strong, y), y)
        return step

    def step(wrapped, batch):
        x, y = batch
        x, y_a, y_b, lam = mixup_batch(x, y, cfg['mixup_alpha'], mix_gen)
        logits = logits_for_loss(model, wrapped(x), loss_fn)
        return {'loss': mixed_loss(loss_fn, logits, y_a, y_b, lam)}
    return step


def classifier_step_fn(model, loss_fn, cfg, mix_gen):
    """cRT / LWS: frozen trunk in eval mode (BN/CBN statistics frozen), only the head learns."""
    def step(head, batch):
        x, y = batch
        with torch.no_grad():
            model.eval()
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
        feats, y_a, y_b, lam = mixup_batch(feats, y, cfg['mixup_alpha'], mix_gen)
        logits = logits_for_loss(model, head(feats), loss_fn)
        return {'loss': mixed_loss(loss_fn, logits, y_a, y_b, lam)}
    return step


def run_fsa(cfg, accelerator, model, train_dl, counts):
    """FSA phase II (METHODS.md §5): cached pre-pool features, online tail augmentation, FC only."""
    device = accelerator.device
    model.to(device).eval()
    feats, labels = [], []
    with torch.no_grad():
        for x, y in tqdm(train_dl, desc='fsa features', disable=not accelerator.is_local_main_process):
            feats.append(model.forward_features(x.to(device)).float().cpu())
            labels.append(y)
    bank = FeatureSpaceAugmenter.from_classifier(
        torch.cat(feats), torch.cat(labels), model.get_classifier().cpu(), head_ratio=cfg['fsa_head_ratio'],
        num_confusing=cfg['fsa_num_confusing'], tau_s=cfg['fsa_tau_s'], tau_g=cfg['fsa_tau_g'])
    model.to(device)
    batches = FsaBatchSampler(bank, num_tail=cfg['fsa_tail_per_batch'], num_batches=cfg['fsa_iterations'],
                              seed=cfg['seed'] * 1000 + accelerator.process_index)
    head = model.get_classifier()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(head.parameters(), lr=cfg['fsa_lr'], momentum=cfg['momentum'])
    head_ddp, optimizer = accelerator.prepare(head, optimizer)
    ce = nn.CrossEntropyLoss()
    total = 0.0
    bar = tqdm(batches, desc='fsa phase II', disable=not (cfg['progress'] and accelerator.is_local_main_process))
    for i, (f, y) in enumerate(bar):
        logits = head_ddp(model.forward_head(f.to(device), pre_logits=True))
        loss = ce(logits, y.to(device))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach())
        bar.set_postfix(loss=f'{total / (i + 1):.3f}')
    accelerator.print(f'fsa phase II: {len(batches)} iterations of batch {batches.batch_size}, '
                      f'mean loss {total / max(1, len(batches)):.4f}, tail classes {bank.tail_classes.tolist()}')
    return model


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    """Command-line entry: parse ``--config``/overrides, train, return the final evaluation dict."""
    cfg = load_config(argv)
    cfg['command'] = ' '.join(['train/train.py'] + (list(argv) if argv is not None else sys.argv[1:]))
    return run(cfg)[0]


def run(cfg):
    """Train and evaluate one configured run; returns (final evaluation dict, trained model on CPU).

    The final evaluation is None (and the model None) when the run stopped early (stop_after_epoch).
    """
    command = cfg.pop('command', 'train/train.py')
    if cfg['loss'] not in list_losses():
        raise ValueError(f"unknown loss {cfg['loss']!r}; valid: {list_losses()}")
    if cfg['sampler'] not in list_samplers():
        raise ValueError(f"unknown sampler {cfg['sampler']!r}; valid: {list_samplers()}")
    if cfg['deterministic']:
        torch.use_deterministic_algorithms(True)
    run_dir = cfg['output_dir']
    # CBN all-reduces its EM statistics inside forward, so rank 0's buffer broadcast changes nothing there.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=True)
    accelerator = Accelerator(mixed_precision=cfg['mixed_precision'], cpu=cfg['cpu'],
                              gradient_accumulation_steps=cfg['gradient_accumulation_steps'],
                              log_with=cfg['log_with'], project_dir=run_dir, kwargs_handlers=[ddp])
    set_seed(cfg['seed'])

    # Everything that can fail on bad input happens before the run directory is touched.
    data = build_data(cfg)
    model, loss_fn = build_model(cfg, data, accelerator)
    if cfg['stage'] == 'stage1' and cfg['normalize'] == 'dataset':
        mean, std = ltdata.dataset_mean_std(data['train'], data['splits'].image_column, data['in_chans'])
    else:
        mean, std = ltdata.mean_std_from_timm(model, data['in_chans'])
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, resume=cfg['resume'], overwrite=cfg['overwrite'])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(Path(run_dir) / 'config.yaml', 'w') as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    if cfg['log_with']:
        accelerator.init_trackers(Path(run_dir).name, {k: v for k, v in cfg.items()
                                                       if isinstance(v, (int, float, str, bool))})
    num_classes = data['splits'].num_classes
    accelerator.print(f"{cfg['method']} / {cfg['stage']}: {cfg['model'] if cfg['stage'] == 'stage1' else cfg['stage1_dir']}"
                      f" on {cfg['dataset']} ({len(data['train'])} training images, counts {data['counts'].tolist()})")

    sampler_name = cfg['sampler']
    sampler = create_sampler(sampler_name, data['labels'], seed=cfg['seed'], **cfg['sampler_kwargs'])
    train_dl_local, test_dl = build_loaders(cfg, data, mean, std, two_view=cfg['dual_path'], sampler=sampler)
    train_dl, test_dl = accelerator.prepare(train_dl_local, test_dl)
    if accelerator.num_processes > 1:  # Accelerate never converts BN to SyncBN; CBN/NBN are not _BatchNorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    mix_gen = None  # mixup draws from the global RNG, which Accelerate checkpoints and restores
    start = time.time()

    if cfg['stage'] == 'stage1':
        wrapped = model
        if cfg['dual_path']:
            keys = dual_path_keys(cfg['dual_cls_views'], cfg['dual_cls_paths'], cfg['consistency_views'],
                                  cfg['consistency_weight'])
            wrapped = DualPathModel(model, num_classes, keys)
        step = stage1_step_fn(cfg, model, loss_fn, num_classes, mix_gen)
        trained = train_epochs(cfg, accelerator, run_dir, wrapped, step, list(model.parameters()), train_dl,
                               sampler, test_dl, data['counts'], loss_fn)
        if trained is None:
            return None, None
        model = trained.model if cfg['dual_path'] else trained
    elif cfg['stage'] in ('crt', 'lws'):
        if cfg['stage'] == 'lws':
            model.fc = LearnableWeightScaling(model.fc)
        elif cfg['reinit_classifier']:
            model.get_classifier().reset_parameters()
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.get_classifier()
        params = [p for n, p in head.named_parameters() if cfg['stage'] == 'crt' or 'scale' in n]
        for p in params:
            p.requires_grad_(True)
        model.to(accelerator.device)
        step = classifier_step_fn(model, loss_fn, cfg, mix_gen)
        trained = train_epochs(cfg, accelerator, run_dir, head, step, params, train_dl, sampler, test_dl,
                               data['counts'], loss_fn, eval_model=model)
        if trained is None:
            return None, None
        if cfg['stage'] == 'lws':
            model.fc = model.fc.to_linear()
    elif cfg['stage'] == 'tau_norm':
        tau_normalize_(model.get_classifier(), cfg['tau'])
    elif cfg['stage'] == 'fsa':
        model = run_fsa(cfg, accelerator, model, train_dl_local, data['counts'])

    # ---------------------------------------------------------------- final evaluation and export
    model = accelerator.unwrap_model(model).to(accelerator.device)
    final = evaluate_model(cfg, accelerator, model, test_dl, data['counts'],
                           cfg['progress'] and accelerator.is_local_main_process)
    if accelerator.is_main_process:
        final.update(method=cfg['method'], stage=cfg['stage'], model=model.pretrained_cfg.get('architecture'),
                     dataset=cfg['dataset'], class_names=list(data['splits'].class_names),
                     class_counts=data['counts'].tolist(), long_tail=data['lt'],
                     train_images=int(len(data['train'])), test_images=int(len(data['splits'].test)),
                     wall_time_s=round(time.time() - start, 1), world_size=accelerator.num_processes,
                     command=command)
        with open(Path(run_dir) / 'eval.json', 'w') as f:
            json.dump(final, f, indent=2)
        plot_per_class_accuracy(final['per_class_acc'], data['counts'].tolist(), str(Path(run_dir) / 'per_class_accuracy.png'),
                                class_names=list(data['splits'].class_names),
                                title=f"{cfg['method']} ({model.pretrained_cfg.get('architecture')}): balanced acc "
                                      f"{final['balanced_acc']:.3f}")
        data_config = dict(input_size=(data['in_chans'], cfg['input_size'], cfg['input_size']), mean=tuple(mean),
                           std=tuple(std), crop_pct=cfg['crop_pct'], interpolation='bilinear')
        export_model(model.cpu(), run_dir, class_names=data['splits'].class_names, data_config=data_config)
        print_table(final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final, model.cpu()


def print_table(result):
    fmt = lambda v: '-' if v is None else f'{100 * v:.2f}'
    rows = [('top-1', result['top1']), ('balanced acc', result['balanced_acc']), ('many-shot', result['many']),
            ('medium-shot', result['medium']), ('few-shot', result['few']), ('ECE', result['ece'])]
    print('\n| metric | % |\n|---|---|')
    for name, v in rows:
        print(f'| {name} | {fmt(v)} |')


if __name__ == '__main__':
    main()
