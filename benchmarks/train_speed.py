#!/usr/bin/env python
"""Training and evaluation throughput on Fashion-MNIST-LT: model-only step vs the trainer's data paths.

    python benchmarks/train_speed.py [--sizes 16 28] [--threads 1 2] [--steps 6] [--warmup 2]

Data: Fashion-MNIST, long-tailed at imbalance factor 100 (14,886 training images, 1 channel), test set
10,000 images; images resized once to each input size. Per input size, thread count and model
(ResNet-32 and ResNet-32-CBN, batch 128, SGD + cross-entropy), one training step is timed for:

    model_only      pre-made random tensors (the ceiling)
    tensor_loader   TensorLoader over decode_split tensors + batched weak view (pad 4 crop + flip)
    pil_loader      today's path: DataLoader(attach_transform(PIL weak view), num_workers=0) (ResNet-32 only)
    model_only_cl   model-only in channels_last (ResNet-32 only: does the memory format help?)

The variants are run round-robin, one step each per repetition, so a load change on the (shared) CPU
hits all of them alike; img/s = batch / median step time, where a loader step includes fetching the
batch. Also measured: decoding (cold, and from the safetensors cache), data-only throughput of each
view (weak, two-view with AutoAugment for the CBN dual path) and evaluation throughput (tensor path:
batch 1024 under inference_mode; PIL path: batch 128 under no_grad, as the trainer today).
Writes benchmarks/results/train_speed.json and .md.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py (the script folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 128
EVAL_BATCH = 1024
TARGET = 0.90  # the trainer's data path must reach 90% of model-only throughput


def load_data():
    """Fashion-MNIST-LT (IF 100, the trainer's defaults) + test split, and the timings of each piece."""
    from lt_zoo import data as ltdata
    t = time.perf_counter()
    splits = ltdata.load_splits('fashion_mnist')
    train, _ = ltdata.make_long_tailed(splits.train, splits.label_column, 100)
    times = {'load_splits_s': time.perf_counter() - t}
    t = time.perf_counter()
    mean, std = ltdata.dataset_mean_std(train, splits.image_column, 1)
    times['dataset_mean_std_s'] = time.perf_counter() - t
    return splits, train, mean, std, times


def decode(splits, train, size, cache_dir):
    """decode_split of train + test: cold (empty cache folder) then warm (read back)."""
    from lt_zoo.data import decode_split
    out, times = {}, {}
    for label in ('cold', 'warm'):
        t = time.perf_counter()
        out = {name: decode_split(ds, input_size=size, in_chans=1, cache_dir=cache_dir)
               for name, ds in (('train', train), ('test', splits.test))}
        times[f'decode_{label}_s'] = time.perf_counter() - t
    return out, times


def make_step(model, opt):
    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def cycling(make_iter):
    """Batches forever: a fresh pass (next epoch) whenever one ends."""
    epoch = 0
    while True:
        for batch in make_iter(epoch):
            yield batch
        epoch += 1


def time_training(args, size, threads, model_name, decoded, train, splits, mean, std):
    import timm
    from torch.utils.data import DataLoader
    from lt_zoo import data as ltdata
    from lt_zoo.samplers import create_sampler

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    labels = decoded['train'].labels
    sampler = create_sampler('instance', labels.numpy(), seed=0)
    weak = ltdata.create_batch_transform('weak', mean=mean, std=std, pad=4, hflip=True)
    tensor_dl = ltdata.TensorLoader(decoded['train'].images, labels, batch_size=BATCH, sampler=sampler,
                                    transform=weak, seed=0)

    def tensor_pass(epoch):
        tensor_dl.set_epoch(epoch)
        return iter(tensor_dl)

    variants = {}

    def add(name, model, batches, channels_last=False):
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        variants[name] = (make_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)), batches,
                          channels_last)

    def create():
        return timm.create_model(model_name, num_classes=10, in_chans=1)

    x0 = torch.randn(BATCH, 1, size, size)
    y0 = torch.randint(0, 10, (BATCH,))
    add('model_only', create(), None)
    add('tensor_loader', create(), cycling(tensor_pass))
    if model_name == 'resnet32':
        pil_sampler = create_sampler('instance', labels.numpy(), seed=0)
        pil_tf = ltdata.create_transform('weak', input_size=size, in_chans=1, mean=mean, std=std, pad=4)
        pil_ds = ltdata.attach_transform(train, pil_tf, splits.image_column, splits.label_column)
        pil_dl = DataLoader(pil_ds, sampler=pil_sampler, batch_size=BATCH, collate_fn=ltdata.collate)

        def pil_pass(epoch):
            pil_sampler.set_epoch(epoch)
            return iter(pil_dl)
        add('pil_loader', create(), cycling(pil_pass))
        add('model_only_cl', create(), None, channels_last=True)
    times = {k: [] for k in variants}
    for rep in range(args.warmup + args.steps):
        for name, (step, batches, channels_last) in variants.items():
            start = time.perf_counter()
            x, y = (x0, y0) if batches is None else next(batches)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            step(x, y)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    rows = []
    base = BATCH / statistics.median(times['model_only'])
    for name, ts in times.items():
        ips = BATCH / statistics.median(ts)
        rows.append({'size': size, 'threads': threads, 'model': model_name, 'variant': name,
                     'img_per_s': round(ips, 1), 'img_per_s_mean': round(BATCH * len(ts) / sum(ts), 1),
                     'vs_model_only': round(ips / base, 3), 'steps': len(ts)})
    return rows


def time_data_only(args, size, decoded, train, splits, mean, std):
    """Images/s of producing training batches alone (no model), one thread."""
    from torch.utils.data import DataLoader
    from lt_zoo import data as ltdata
    from lt_zoo.samplers import create_sampler

    torch.set_num_threads(1)
    labels = decoded['train'].labels
    rows = []
    for view in ('weak', 'two_view'):
        two = view == 'two_view'
        sampler = create_sampler('instance', labels.numpy(), seed=0)
        tensor_dl = ltdata.TensorLoader(decoded['train'].images, labels, batch_size=BATCH, sampler=sampler,
                                        transform=ltdata.create_batch_transform('weak', mean=mean, std=std,
                                                                                two_view=two))
        aug = dict(input_size=size, in_chans=1, mean=mean, std=std, pad=4)
        weak = ltdata.create_transform('weak', **aug)
        pil_tf = ltdata.TwoView(weak, ltdata.create_transform('strong', **aug)) if two else weak
        pil_dl = DataLoader(ltdata.attach_transform(train, pil_tf, splits.image_column, splits.label_column),
                            sampler=sampler, batch_size=BATCH, collate_fn=ltdata.collate)
        for path, dl in (('tensor', tensor_dl), ('pil', pil_dl)):
            it = iter(dl)
            next(it)
            start = time.perf_counter()
            n = sum(len(next(it)[1]) for _ in range(args.data_batches))
            rows.append({'size': size, 'view': view, 'path': path,
                         'img_per_s': round(n / (time.perf_counter() - start), 1)})
    return rows


def time_eval(args, size, threads, decoded, splits, mean, std):
    """Eval throughput of ResNet-32 over the first eval_images test images: tensor path vs PIL path."""
    import timm
    from torch.utils.data import DataLoader
    from lt_zoo import data as ltdata

    torch.set_num_threads(threads)
    model = timm.create_model('resnet32', num_classes=10, in_chans=1).eval()
    n = min(args.eval_images, len(decoded['test']))
    tensor_dl = ltdata.TensorLoader(decoded['test'].images[:n], decoded['test'].labels[:n], batch_size=EVAL_BATCH,
                                    transform=ltdata.create_batch_transform('eval', mean=mean, std=std))
    pil_tf = ltdata.create_transform('eval', input_size=size, in_chans=1, mean=mean, std=std)
    pil_dl = DataLoader(ltdata.attach_transform(splits.test.select(range(n)), pil_tf, splits.image_column,
                                                splits.label_column), batch_size=BATCH, collate_fn=ltdata.collate)
    rows = []
    for path, dl, ctx in (('tensor', tensor_dl, torch.inference_mode), ('pil', pil_dl, torch.no_grad)):
        with ctx():
            model(next(iter(dl))[0][:8])  # warm-up
            start = time.perf_counter()
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in dl)
            dt = time.perf_counter() - start
        rows.append({'size': size, 'threads': threads, 'path': path, 'images': n, 'img_per_s': round(n / dt, 1),
                     'full_test_set_s': round(len(splits.test) * dt / n, 1), 'correct': correct})
    return rows


def write_markdown(res, path):
    lines = [
        '# Training throughput: model-only step vs the data paths (Fashion-MNIST-LT, CPU)', '',
        f"Command: `{res['command']}`  ", f"Date: {res['date']}; CPU: {res['cpu']} ({res['cpu_count']} cores); "
        f"torch {res['torch']}. Batch {BATCH}, SGD step, median of {res['steps']} round-robin steps after "
        f"{res['warmup']} warm-up. {res['note']}", '',
        '## Training step (img/s; ratio to the model-only step)', '',
        '| input | threads | model | model only | tensor loader | PIL loader (today) | model only, channels_last |',
        '|---|---|---|---|---|---|---|']
    groups = {}
    for r in res['train']:
        groups.setdefault((r['size'], r['threads'], r['model']), {})[r['variant']] = r
    for (size, threads, model), g in groups.items():
        cell = lambda v: f"{g[v]['img_per_s']:.0f} ({100 * g[v]['vs_model_only']:.0f}%)" if v in g else '-'
        lines.append(f"| {size}x{size} | {threads} | {model} | {g['model_only']['img_per_s']:.0f} | "
                     f"{cell('tensor_loader')} | {cell('pil_loader')} | {cell('model_only_cl')} |")
    worst = min(r['vs_model_only'] for r in res['train'] if r['variant'] == 'tensor_loader')
    lines += ['', f"Tensor loader, worst ratio over all rows: **{100 * worst:.0f}%** (target {100 * TARGET:.0f}%).", '',
              '## Producing batches alone (img/s, 1 thread, no model)', '',
              '| input | view | tensor path | PIL path | speed-up |', '|---|---|---|---|---|']
    data = {}
    for r in res['data_only']:
        data.setdefault((r['size'], r['view']), {})[r['path']] = r['img_per_s']
    for (size, view), d in data.items():
        lines.append(f"| {size}x{size} | {view} | {d['tensor']:.0f} | {d['pil']:.0f} | {d['tensor'] / d['pil']:.0f}x |")
    lines += ['', f"## Evaluation (ResNet-32, first {res['eval'][0]['images']} test images)", '',
              '| input | threads | path | img/s | projected full test set (s) |', '|---|---|---|---|---|']
    for r in res['eval']:
        lines.append(f"| {r['size']}x{r['size']} | {r['threads']} | {r['path']} | {r['img_per_s']:.0f} | "
                     f"{r['full_test_set_s']} |")
    lines += ['', '## Loading (seconds)', '', '| step | s |', '|---|---|']
    for k, v in res['loading'].items():
        lines.append(f'| {k} | {v:.2f} |')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', type=int, nargs='+', default=[16, 28])
    ap.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--models', nargs='+', default=['resnet32', 'resnet32_cbn'])
    ap.add_argument('--steps', type=int, default=6, help='timed steps per variant (after --warmup)')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--data_batches', type=int, default=8, help='batches timed for data-only throughput')
    ap.add_argument('--eval_images', type=int, default=2048)
    ap.add_argument('--out', default=os.path.join(HERE, 'results'))
    ap.add_argument('--note', default='Measured while other jobs shared the CPU; the ratios are the robust part.')
    args = ap.parse_args()
    import lt_zoo  # noqa: F401  (registers the lt_zoo models)

    cache_dir = tempfile.mkdtemp(prefix='train_speed_cache_')
    try:
        splits, train, mean, std, loading = load_data()
        res = {'command': ' '.join(['python', 'benchmarks/train_speed.py'] + sys.argv[1:]),
               'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), 'cpu': cpu_model(),
               'cpu_count': os.cpu_count(), 'torch': torch.__version__, 'batch': BATCH, 'steps': args.steps,
               'warmup': args.warmup, 'note': args.note, 'train_images': len(train),
               'test_images': len(splits.test), 'mean': mean, 'std': std, 'loading': loading,
               'train': [], 'data_only': [], 'eval': []}
        for size in args.sizes:
            decoded, times = decode(splits, train, size, cache_dir)
            res['loading'].update({f'{k}_{size}px': v for k, v in times.items()})
            print(f'{size}px: decoded {times}', flush=True)
            res['data_only'] += time_data_only(args, size, decoded, train, splits, mean, std)
            for threads in args.threads:
                res['eval'] += time_eval(args, size, threads, decoded, splits, mean, std)
                for model_name in args.models:
                    rows = time_training(args, size, threads, model_name, decoded, train, splits, mean, std)
                    res['train'] += rows
                    print(' '.join(f"{r['variant']}={r['img_per_s']:.0f}({100 * r['vs_model_only']:.0f}%)"
                                   for r in rows), f'[{size}px {threads}t {model_name}]', flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'train_speed.json'), 'w') as f:
        json.dump(res, f, indent=2)
    write_markdown(res, os.path.join(args.out, 'train_speed.md'))
    print(open(os.path.join(args.out, 'train_speed.md')).read())


if __name__ == '__main__':
    main()
