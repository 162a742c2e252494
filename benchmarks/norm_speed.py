"""Speed of BN, NBN and CBN in CIFAR ResNet-32 on CPU: training step and eval forward.

    python benchmarks/norm_speed.py [--batch 128] [--reps 10] [--warmup 3] [--threads 1]

Models: ``timm.create_model('resnet32')``, ``'resnet32_nbn'``, ``'resnet32_cbn'`` with
num_components = 2 and 4, plus ResNet-32 with every norm replaced by ``nn.Identity`` (the cost of
everything but the norm layers, to attribute time).  Input: batch x 3 x 32 x 32 (CIFAR), 10 classes.
Training step = forward + cross-entropy + backward + SGD step; eval = forward under ``no_grad``.
Models are timed round-robin (one step of each per repetition) so that load changes hit all alike;
the medians of wall-clock and of process CPU time are reported (CPU time is the robust one when
other processes share the cores).  Writes benchmarks/results/norm_speed.json and .md, with a
per-layer table (one norm layer, fwd+bwd and eval, at the three ResNet-32 stage shapes) and the top
operators of a profiled CBN training step.
"""
import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {'train': 1.5, 'eval': 1.3}  # CBN (M=4) vs BN on this CPU (paper: 1.33x training time, GPU)


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def build_models(num_classes=10):
    import timm
    import lt_zoo  # noqa: F401  (registers the lt_zoo entrypoints)
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    models = {
        'no_norm': timm.create_model('resnet32', num_classes=num_classes),
        'bn': timm.create_model('resnet32', num_classes=num_classes),
        'nbn': timm.create_model('resnet32_nbn', num_classes=num_classes),
        'cbn_m2': timm.create_model('resnet32_cbn', num_classes=num_classes, num_components=2),
        'cbn_m4': timm.create_model('resnet32_cbn', num_classes=num_classes, num_components=4),
    }
    norm_types = (nn.modules.batchnorm._BatchNorm, CompoundBatchNorm2d)
    for parent in list(models['no_norm'].modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, norm_types):
                setattr(parent, name, nn.Identity())
    return models


def time_models(models, x, y, reps, warmup):
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    samples = {k: {'train_wall': [], 'train_cpu': [], 'eval_wall': [], 'eval_cpu': []} for k in models}
    for rep in range(warmup + reps):
        for k, m in models.items():
            m.train()
            w, c = time.perf_counter(), time.process_time()
            loss = F.cross_entropy(m(x), y)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            tw, tc = time.perf_counter() - w, time.process_time() - c
            m.eval()
            w, c = time.perf_counter(), time.process_time()
            with torch.no_grad():
                m(x)
            ew, ec = time.perf_counter() - w, time.process_time() - c
            if rep >= warmup:
                for key, v in zip(('train_wall', 'train_cpu', 'eval_wall', 'eval_cpu'), (tw, tc, ew, ec)):
                    samples[k][key].append(v)
    return {k: {key: statistics.median(v) for key, v in s.items()} for k, s in samples.items()}


def layer_table(reps, batch):
    """One norm layer at each ResNet-32 stage shape: ms per fwd+bwd (train) and per eval forward."""
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    rows = []
    for c, s in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(batch, c, s, s)
        g = torch.randn_like(x)
        layers = {'bn': nn.BatchNorm2d(c), 'cbn_m2': CompoundBatchNorm2d(c, 2), 'cbn_m4': CompoundBatchNorm2d(c, 4)}
        row = {'shape': [batch, c, s, s]}
        for name, layer in layers.items():
            xr = x.clone().requires_grad_()

            def train_step():
                layer.train()
                layer(xr).backward(g)

            def eval_step():
                layer.eval()
                with torch.no_grad():
                    layer(x)
            for label, fn in (('train_ms', train_step), ('eval_ms', eval_step)):
                for _ in range(2):
                    fn()
                ts = []
                for _ in range(reps):
                    t = time.process_time()
                    fn()
                    ts.append(time.process_time() - t)
                row[f'{name}_{label}'] = 1e3 * statistics.median(ts)
        rows.append(row)
    return rows


def profile_cbn(model, x, y, top=12):
    from torch.profiler import ProfilerActivity, profile
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    events = [e for e in prof.key_averages() if e.key.startswith('aten::')]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{'op': e.key, 'calls': e.count, 'self_ms': e.self_cpu_time_total / 1e3,
             'share': e.self_cpu_time_total / total} for e in events[:top]]


def write_markdown(res, path):
    env, m = res['environment'], res['models']
    bn = m['bn']
    lines = [
        '# Norm-layer speed: ResNet-32 (CIFAR, 3x32x32), CPU',
        '',
        f"Generated by `benchmarks/norm_speed.py` on {env['date']}: torch {env['torch']}, "
        f"{env['threads']} thread(s), CPU {env['cpu']} ({env['cpu_count']} logical cores), "
        f"load average {env['load_before'][0]:.2f} before / {env['load_after'][0]:.2f} after. "
        f"Batch {res['batch']}, median of {res['reps']} repetitions after {res['warmup']} warm-up, models "
        f"timed round-robin.",
        '',
        'img/s from the median wall-clock time; ratios vs BN from wall-clock and from process CPU time '
        '(the CPU-time ratio is the robust one on a shared machine).',
        '',
        '| model | train img/s | train x BN (wall) | train x BN (cpu) '
        '| eval img/s | eval x BN (wall) | eval x BN (cpu) |',
        '|---|---|---|---|---|---|---|',
    ]
    for k, v in m.items():
        lines.append(f"| {k} | {v['train_img_s']:.0f} | {v['train_wall'] / bn['train_wall']:.2f} | "
                     f"{v['train_cpu'] / bn['train_cpu']:.2f} | {v['eval_img_s']:.0f} | "
                     f"{v['eval_wall'] / bn['eval_wall']:.2f} | {v['eval_cpu'] / bn['eval_cpu']:.2f} |")
    t = res['targets']
    lines += [
        '',
        f"Targets (CBN M=4 vs BN): training <= {t['train']}x, eval <= {t['eval']}x "
        f"(paper: 1.33x training time on GPU).  Reached (CPU time): training "
        f"{m['cbn_m4']['train_cpu'] / bn['train_cpu']:.2f}x, eval {m['cbn_m4']['eval_cpu'] / bn['eval_cpu']:.2f}x.",
        '',
        '## Where the time goes',
        '',
        'Norm-layer cost = model time minus the same ResNet-32 with every norm replaced by Identity '
        '(CPU time per batch, ms):',
        '',
        '| model | train: all | train: norm layers | eval: all | eval: norm layers |',
        '|---|---|---|---|---|',
    ]
    base = m['no_norm']
    for k in ('bn', 'nbn', 'cbn_m2', 'cbn_m4'):
        v = m[k]
        lines.append(f"| {k} | {1e3 * v['train_cpu']:.0f} | {1e3 * (v['train_cpu'] - base['train_cpu']):.0f} | "
                     f"{1e3 * v['eval_cpu']:.0f} | {1e3 * (v['eval_cpu'] - base['eval_cpu']):.0f} |")
    lines += ['', 'One norm layer, CPU ms (median):', '',
              '| input | BN train | CBN-2 train | CBN-4 train | BN eval | CBN-2 eval | CBN-4 eval |',
              '|---|---|---|---|---|---|---|']
    for r in res['layers']:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['bn_train_ms']:.2f} | {r['cbn_m2_train_ms']:.2f} | "
                     f"{r['cbn_m4_train_ms']:.2f} | {r['bn_eval_ms']:.2f} | {r['cbn_m2_eval_ms']:.2f} | "
                     f"{r['cbn_m4_eval_ms']:.2f} |")
    lines += ['', 'Top aten operators of one profiled CBN (M=4) training step (self CPU time; convolutions are '
              'mkldnn_convolution / convolution_backward, CBN is the bmm/mm/baddbmm and elementwise ops):', '',
              '| op | calls | self ms | share |', '|---|---|---|---|']
    for p in res['profile_cbn_m4_train']:
        lines.append(f"| {p['op']} | {p['calls']} | {p['self_ms']:.1f} | {100 * p['share']:.1f}% |")
    if res.get('notes'):
        lines += ['', '## Notes', ''] + [f'- {n}' for n in res['notes']]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


NOTES = [
    'CBN hot path (lt_zoo/layers/compound_bn.py): E-step, M-step and the mixed scale/shift are (batched) '
    'GEMMs with M on one side ((x-s)^2 W2 + x W1, R^T X, R^T X^2, R [A|B]); no P x M x C tensor.  The default '
    'path is one autograd.Function with an analytic BN-style backward; the squares buffer is reused as '
    'the output and products accumulate in place (baddbmm_/addmm_); under no_grad the squares come from '
    'one mse_loss pass on the raw input; channels_last input is a free (P, C) view; the softmax runs over '
    'the component dim of an (N, M, L) or (M, P) tensor (over a last dim of size M it is ~20x slower on '
    'CPU); posteriors below 1e-30 are zeroed (subnormals).',
    'Optimisation log (CPU time, 1 thread, CBN M=4 vs BN, ResNet-32 batch 128): plain autograd version '
    '1.56x train / 1.74x eval -> fused Function with analytic backward 1.48x / 1.68x -> Function returns '
    'a non-view 4-D tensor (timm blocks apply ReLU in place on the norm output; on a view of the output '
    'autograd added a CopySlices node: 3 full-size copies + a zero fill per layer in backward) 1.26x / '
    '1.57x -> eval/no-grad path in raw coordinates with (x-s)^2 from one mse_loss pass, E-step constant '
    'folded into the GEMM 1.25x / 1.45x.',
    'Why eval stays above 1.3x: per layer, eval CBN touches the activations ~10 times ((x-s)^2, two E-step '
    'GEMM reads, scale GEMM write, multiply, shift GEMM) against 2 for BN eval, plus ~30 small (M x C) ops '
    '(~0.2 ms per layer).  ResNet-32 has narrow 16-64 channel convolutions, so its norm layers are ~10% of '
    'the eval time with BN; 5x that cost gives ~1.4x.  Reaching 1.3x needs a fused kernel (one read of x, '
    'one write of y); torch.compile of the same math compiled in ~50 s per shape and was not faster here.',
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--reps', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default=os.path.join(HERE, 'results', 'norm_speed'))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    models = build_models()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    timing = time_models(models, x, y, args.reps, args.warmup)
    for k, v in timing.items():
        v['train_img_s'] = args.batch / v['train_wall']
        v['eval_img_s'] = args.batch / v['eval_wall']
    layers = layer_table(max(5, args.reps), args.batch)
    prof = profile_cbn(models['cbn_m4'], x, y)
    res = {
        'environment': {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'cpu': cpu_model(),
                        'cpu_count': os.cpu_count(), 'load_before': load_before, 'load_after': os.getloadavg(),
                        'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                        'python': platform.python_version()},
        'batch': args.batch, 'input': [3, 32, 32], 'reps': args.reps, 'warmup': args.warmup,
        'targets': TARGETS, 'models': timing,
        'ratios_vs_bn': {k: {'train_wall': v['train_wall'] / timing['bn']['train_wall'],
                             'train_cpu': v['train_cpu'] / timing['bn']['train_cpu'],
                             'eval_wall': v['eval_wall'] / timing['bn']['eval_wall'],
                             'eval_cpu': v['eval_cpu'] / timing['bn']['eval_cpu']} for k, v in timing.items()},
        'layers': layers, 'profile_cbn_m4_train': prof, 'notes': NOTES,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(res, f, indent=2)
    write_markdown(res, args.out + '.md')
    for k, v in res['ratios_vs_bn'].items():
        print(f"{k:8s} train {v['train_cpu']:.2f}x  eval {v['eval_cpu']:.2f}x  (cpu time vs BN)")


if __name__ == '__main__':
    main()
