"""Speed of BN, NBN and CBN in CIFAR ResNet-32 on CPU: training step and eval forward.

    python benchmarks/norm_speed.py                       # full grid (slow: compiled models compile minutes)
    python benchmarks/norm_speed.py --quick               # smaller batch/reps, eager only
    python benchmarks/norm_speed.py --sizes 16 --threads 2 --modes eager compiled

Grid: input map size (--sizes, 32 = CIFAR, 16 = the 16x16 protocol) x torch threads (--threads) x mode
(--modes: eager, compiled = ``torch.compile`` of the whole model) x memory format (--memory_formats:
contiguous, channels_last = model and input converted).  Models: ``resnet32``, ``resnet32_nbn``,
``resnet32_cbn`` (M = 4; M = 2 and a no-norm ResNet-32 in eager, to attribute time).  Training step =
forward + cross-entropy + backward + SGD step; eval = forward under ``no_grad``.  Models are timed
round-robin (one step of each per repetition) so load changes hit all alike; medians of wall-clock and
of process CPU time are reported (CPU time is the robust one on a shared machine).  Also: one norm
layer at the three ResNet-32 stage shapes, and the top operators of a profiled CBN training step.

Resumable: every finished grid cell is written to the JSON at once and skipped on the next run
(--fresh starts over), so a long run can be split or re-run cell by cell on a quiet machine.
Writes benchmarks/results/norm_speed.json and .md (the command line is recorded, relative paths only).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn as nn
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py (the script folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# CBN (M=4) vs BN (issue "Compound BN at close to BN's cost"); paper: 1.33x training time on GPU.
TARGETS = {'eager': 1.3, 'compiled': 1.15}


def build_models(mode: str, num_classes=10):
    import timm
    import lt_zoo  # noqa: F401  (registers the lt_zoo entrypoints)
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d, set_cbn_kernel
    models = {
        'bn': timm.create_model('resnet32', num_classes=num_classes),
        'nbn': timm.create_model('resnet32_nbn', num_classes=num_classes),
        'cbn_m4': timm.create_model('resnet32_cbn', num_classes=num_classes, num_components=4),
        # the layer's default since benchmark protocol v4 (the targets name M = 4)
        'cbn_m2': timm.create_model('resnet32_cbn', num_classes=num_classes, num_components=2),
    }
    if mode == 'compiled':
        # the same CBN network traced as broadcasts and sums (what CUDA compiles), beside the native custom ops
        models['cbn_m4_pointwise'] = timm.create_model('resnet32_cbn', num_classes=num_classes, num_components=4)
        set_cbn_kernel(models['cbn_m4_pointwise'], 'pointwise')
    if mode == 'eager':
        # the same CBN network on the GEMM formulation: what the native C++ kernel gains, round-robin
        models['cbn_m4_gemm'] = timm.create_model('resnet32_cbn', num_classes=num_classes, num_components=4)
        set_cbn_kernel(models['cbn_m4_gemm'], 'gemm')
    # every mode: what the network costs without norm layers, the floor of each norm's cost (compiled too,
    # where it bounds what any CBN integration could reach; benchmarks/cbn_pass_bound.py)
    models['no_norm'] = timm.create_model('resnet32', num_classes=num_classes)
    norm_types = (nn.modules.batchnorm._BatchNorm, CompoundBatchNorm2d)
    for parent in list(models['no_norm'].modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, norm_types):
                setattr(parent, name, nn.Identity())
    return models


def _train_step(model, opt, x, y):
    model.train()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _eval_step(model, x):
    model.eval()
    with torch.no_grad():
        model(x)


def time_models(models, x, y, reps, warmup, compiled: bool):
    """Round-robin medians; compiled models are warmed (compiled) first and the compile time kept."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    if compiled:  # every model shares CifarResNet.forward: one compiled entry per model and mode, not 8 in all
        for name in ('recompile_limit', 'cache_size_limit'):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    runners = {k: torch.compile(m, dynamic=False) if compiled else m for k, m in models.items()}
    compile_s = {}
    for k, m in runners.items():
        t = time.perf_counter()
        _train_step(m, opts[k], x, y)
        _eval_step(m, x)
        compile_s[k] = time.perf_counter() - t
    samples = {k: {'train_wall': [], 'train_cpu': [], 'eval_wall': [], 'eval_cpu': []} for k in models}
    for rep in range(warmup + reps):
        for k, m in runners.items():
            w, c = time.perf_counter(), time.process_time()
            _train_step(m, opts[k], x, y)
            tw, tc = time.perf_counter() - w, time.process_time() - c
            w, c = time.perf_counter(), time.process_time()
            _eval_step(m, x)
            ew, ec = time.perf_counter() - w, time.process_time() - c
            if rep >= warmup:
                for key, v in zip(('train_wall', 'train_cpu', 'eval_wall', 'eval_cpu'), (tw, tc, ew, ec)):
                    samples[k][key].append(v)
    out = {k: {key: statistics.median(v) for key, v in s.items()} for k, s in samples.items()}
    if compiled:  # where the compiled step's time goes: the custom ops, the generated kernels, the convolutions
        for k in ('bn', 'cbn_m4'):
            if k in runners:
                out[k]['profile'] = profile_step(runners[k], opts[k], x, y, aten_only=False)
    for k, v in out.items():
        v['train_img_s'] = x.shape[0] / v['train_wall']
        v['eval_img_s'] = x.shape[0] / v['eval_wall']
        if compiled:
            v['first_step_s'] = compile_s[k]
    return out


def layer_table(reps, batch, size):
    """One norm layer at each ResNet-32 stage shape: CPU ms per fwd+bwd (train) and per eval forward."""
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    rows = []
    for c, s in ((16, size), (32, size // 2), (64, size // 4)):
        x = torch.randn(batch, c, s, s)
        g = torch.randn_like(x)
        layers = {'bn': nn.BatchNorm2d(c), 'cbn_m2': CompoundBatchNorm2d(c, 2), 'cbn_m4': CompoundBatchNorm2d(c, 4)}
        row = {'shape': [batch, c, s, s]}
        fns = {}
        for name, layer in layers.items():
            def train_step(layer=layer):
                layer.train()
                layer(x.clone().requires_grad_()).backward(g)

            def eval_step(layer=layer):
                layer.eval()
                with torch.no_grad():
                    layer(x)
            fns[f'{name}_train_ms'], fns[f'{name}_eval_ms'] = train_step, eval_step
        times = {k: [] for k in fns}
        for rep in range(2 + reps):  # round-robin here too
            for k, fn in fns.items():
                t = time.process_time()
                fn()
                if rep >= 2:
                    times[k].append(time.process_time() - t)
        row.update({k: 1e3 * statistics.median(v) for k, v in times.items()})
        rows.append(row)
    return rows


PROFILE_STEPS = 3  # profiled training steps per compiled model, after 2 unprofiled ones


def profile_step(runner, opt, x, y, top=12, aten_only=True, steps=PROFILE_STEPS):
    """Top operators by self CPU time of a training step of ``runner`` (the model or its compiled form),
    averaged over ``steps`` profiled steps: aten ops only, or every event (custom ops, inductor's
    generated code as "## Call CompiledFxGraph ...", optimizer).  Share: of all events' self time."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        _train_step(runner, opt, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            _train_step(runner, opt, x, y)
    every = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in every)
    events = sorted((e for e in every if not aten_only or e.key.startswith('aten::')),
                    key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{'op': e.key, 'calls': e.count // steps, 'self_ms': e.self_cpu_time_total / 1e3 / steps,
             'share': e.self_cpu_time_total / total} for e in events[:top]]


def profile_cbn(model, x, y, top=12):
    return profile_step(model, torch.optim.SGD(model.parameters(), lr=0.01), x, y, top, steps=1)


def _ratio(m, model, key):
    return m[model][key] / m['bn'][key]


# NBN is the control of every cell: BN's passes plus O(C) work per layer, so its ratio to BN measures the
# cell's noise (on a quiet machine it reads 0.98-1.01x; a sitting on a busy cloud host read 0.93-1.03x).
CONTROL_TOLERANCE = 0.03


def disturbed_cells(res):
    """[(cell, nbn train ratio, nbn eval ratio)] of the cells whose NBN/BN CPU-time ratio is off by more
    than CONTROL_TOLERANCE in training or eval."""
    out = []
    for cell, r in res['cells'].items():
        m = r['models']
        if 'nbn' in m and 'bn' in m:
            t, e = _ratio(m, 'nbn', 'train_cpu'), _ratio(m, 'nbn', 'eval_cpu')
            if max(abs(t - 1), abs(e - 1)) > CONTROL_TOLERANCE:
                out.append((cell, t, e))
    return out


def write_markdown(res, path):
    env = res['environment']
    lines = [
        '# Norm-layer speed: CIFAR ResNet-32, CPU',
        '',
        f"Command: `{res['command']}`.  torch {env['torch']}, CPU {env['cpu']} ({env['cpu_count']} logical "
        f"cores), last cell {env['date']}.  Batch {res['batch']}, median of {res['reps']} repetitions after "
        f"{res['warmup']} warm-up, models timed round-robin.  Ratios vs BN from process CPU time (robust on a "
        'shared machine) and wall-clock; img/s from wall-clock.',
        '',
        f"Targets, CBN M=4 vs BN: eager <= {TARGETS['eager']}x, compiled <= {TARGETS['compiled']}x (training "
        'step and eval).  NBN should stay 1.00x.',
        '',
        '| cell | load avg | model | train img/s | train x BN (cpu) | train x BN (wall) | eval img/s '
        '| eval x BN (cpu) | eval x BN (wall) | first step s |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for cell, r in res['cells'].items():
        m = r['models']
        for k in m:
            lines.append(
                f"| {cell} | {r['load_before']:.1f} | {k} | {m[k]['train_img_s']:.0f} | "
                f"{_ratio(m, k, 'train_cpu'):.2f} | {_ratio(m, k, 'train_wall'):.2f} | {m[k]['eval_img_s']:.0f} | "
                f"{_ratio(m, k, 'eval_cpu'):.2f} | {_ratio(m, k, 'eval_wall'):.2f} | "
                f"{m[k].get('first_step_s', float('nan')):.1f} |")
    disturbed = disturbed_cells(res)
    if disturbed:
        lines += ['', f'Disturbed cells: NBN does BN\'s map-sized work, yet reads outside '
                  f'{1 - CONTROL_TOLERANCE:.2f}-{1 + CONTROL_TOLERANCE:.2f}x BN (CPU time) in '
                  + '; '.join(f'{c} (training {t:.2f}x, eval {e:.2f}x)' for c, t, e in disturbed)
                  + '.  Ratios of those cells carry about that much noise; re-run them.']
    lines += ['', '## Where the time goes', '',
              'Norm-layer cost = model CPU time minus the same ResNet-32 with every norm replaced by Identity '
              '(ms per batch):', '',
              '| cell | model | train: all | train: norm layers | eval: all | eval: norm layers |',
              '|---|---|---|---|---|---|']
    for cell, r in res['cells'].items():
        m = r['models']
        if 'no_norm' not in m:
            continue
        base = m['no_norm']
        for k in ('bn', 'nbn', 'cbn_m2', 'cbn_m4', 'cbn_m4_gemm', 'cbn_m4_pointwise'):
            if k not in m:
                continue
            v = m[k]
            lines.append(f"| {cell} | {k} | {1e3 * v['train_cpu']:.0f} | "
                         f"{1e3 * (v['train_cpu'] - base['train_cpu']):.0f} | {1e3 * v['eval_cpu']:.0f} | "
                         f"{1e3 * (v['eval_cpu'] - base['eval_cpu']):.0f} |")
    lines += ['', 'One norm layer (eager, CPU ms, median, round-robin):', '',
              '| threads | input | BN train | CBN-2 train | CBN-4 train | BN eval | CBN-2 eval | CBN-4 eval |',
              '|---|---|---|---|---|---|---|---|']
    for key, rows in res['layers'].items():
        for r in rows:
            lines.append(f"| {key} | {'x'.join(map(str, r['shape']))} | {r['bn_train_ms']:.2f} | "
                         f"{r['cbn_m2_train_ms']:.2f} | {r['cbn_m4_train_ms']:.2f} | {r['bn_eval_ms']:.2f} | "
                         f"{r['cbn_m2_eval_ms']:.2f} | {r['cbn_m4_eval_ms']:.2f} |")
    for cell, r in res['cells'].items():
        m = r['models']
        if 'profile' not in m.get('cbn_m4', {}) or 'profile' not in m.get('bn', {}):
            continue
        lines += ['', f'Compiled training step, {cell}: top operators by self CPU time (ms per step, mean of '
                  f'{PROFILE_STEPS} profiled steps; `lt_zoo::` are the CBN custom ops, "Call CompiledFxGraph" is '
                  'inductor\'s generated code, convolutions are mkldnn_convolution / convolution_backward):', '',
                  '| model | op | calls | self ms | share |', '|---|---|---|---|---|']
        for k in ('bn', 'cbn_m4'):
            for p in m[k]['profile']:
                lines.append(f"| {k} | {p['op'][:60]} | {p['calls']} | {p['self_ms']:.2f} | {100 * p['share']:.1f}% |")
    if res.get('profile'):
        lines += ['', f"Top aten operators of one profiled eager CBN (M=4) training step ({res['profile']['cell']}; "
                  'self CPU time; convolutions are mkldnn_convolution / convolution_backward; the native CBN '
                  'passes count as self time of _ConstantAssignmentNorm and its backward, the rest of CBN is '
                  'small (M, C) ops):', '', '| op | calls | self ms | share |',
                  '|---|---|---|---|']
        for p in res['profile']['ops']:
            lines.append(f"| {p['op']} | {p['calls']} | {p['self_ms']:.1f} | {100 * p['share']:.1f}% |")
    lines += ['', '## Notes', ''] + [f'- {n}' for n in NOTES]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


NOTES = [
    'The machine these numbers come from may be shared (see "load avg" per cell: with more runnable '
    'processes than cores, wall-clock ratios are noise and even CPU-time ratios drift, since caches and '
    'memory bandwidth are shared).  Re-run on a quiet machine for the record; cells resume.',
    '`cbn_m2` is the CBN layer\'s default M since benchmark protocol v4; `cbn_m4` (the paper\'s M, which the '
    'targets name) and `cbn_m2` run the eager default kernel on CPU, the native C++ kernel '
    '(lt_zoo/layers/compound_bn_native.py: '
    'E-step with moments, output, backward sums and input gradient, one pass each over the map, OpenMP over '
    'images); `cbn_m4_gemm` is the same network on the batched-GEMM formulation it replaced (the fallback '
    'without a C++ compiler), timed in the same round-robin.',
    'The GEMM formulation makes ~12 passes over the P x C map in forward and ~13 in backward, against ~3 + '
    '~4 for BN; its expansions are GEMMs with inner dimension K = M = 4, which MKL runs at about a third of '
    'the speed of an elementwise pass, and its (M, C) statistics are ~130 small torch ops per layer and '
    'step.  The native passes do BN\'s memory traffic plus O(M C) flops per vector, and the statistics '
    'are one C++ call each.',
    'Compiled, `cbn_m4` calls the native passes as torch.library custom ops on CPU '
    '(lt_zoo/layers/compound_bn_ops.py); `cbn_m4_pointwise` is the same network traced as broadcasts and '
    'sums, what CUDA compiles (costs per layer in benchmarks/results/cbn_kernel_speed.md and '
    'cbn_compiled_block.md).',
]


def environment():
    return {'torch': torch.__version__, 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
            'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), 'python': platform.python_version()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=[32, 16], help='input map sizes (32: CIFAR)')
    ap.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--modes', nargs='+', default=['eager', 'compiled'], choices=['eager', 'compiled'])
    ap.add_argument('--memory_formats', nargs='+', default=['contiguous'], choices=['contiguous', 'channels_last'],
                    help='memory format of the models and inputs (channels_last: the layout-aware CBN kernels)')
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--reps', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--quick', action='store_true', help='batch 64, 4 reps, 1 warm-up, eager only')
    ap.add_argument('--fresh', action='store_true', help='ignore cells already in the JSON')
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'norm_speed'),
                    help='output path without extension, relative to the repository root')
    args = ap.parse_args()
    if args.quick:
        args.batch, args.reps, args.warmup, args.modes = 64, 4, 1, ['eager']
    out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
    res = None
    if not args.fresh and os.path.exists(out + '.json'):
        with open(out + '.json') as f:
            res = json.load(f)
        if (res.get('batch'), res.get('reps'), res.get('warmup')) != (args.batch, args.reps, args.warmup):
            res = None  # different settings: cells would not be comparable
    if res is None or 'cells' not in res:
        res = {'batch': args.batch, 'reps': args.reps, 'warmup': args.warmup, 'targets': TARGETS,
               'cells': {}, 'layers': {}}
    res['command'] = 'python benchmarks/norm_speed.py ' + ' '.join(sys.argv[1:])
    torch.manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            x0 = torch.randn(args.batch, 3, size, size)
            y = torch.randint(0, 10, (args.batch,))
            for mode, fmt in [(m, f) for m in args.modes for f in args.memory_formats]:
                cell = f'{size}x{size} {threads}t {mode}' + (' channels_last' if fmt == 'channels_last' else '')
                if cell in res['cells']:
                    print(f'{cell}: done already (--fresh to redo)')
                    continue
                load = os.getloadavg()[0]
                models = build_models(mode)
                x = x0
                if fmt == 'channels_last':
                    models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
                    x = x0.contiguous(memory_format=torch.channels_last)
                timing = time_models(models, x, y, args.reps, args.warmup, mode == 'compiled')
                res['cells'][cell] = {'models': timing, 'load_before': load, 'load_after': os.getloadavg()[0]}
                if mode == 'eager' and 'profile' not in res:
                    res['profile'] = {'cell': cell, 'ops': profile_cbn(models['cbn_m4'], x, y)}
                res['environment'] = environment()
                _save(res, out)
                m = timing
                print(f"{cell}: cbn_m4 train {_ratio(m, 'cbn_m4', 'train_cpu'):.2f}x eval "
                      f"{_ratio(m, 'cbn_m4', 'eval_cpu'):.2f}x, nbn train {_ratio(m, 'nbn', 'train_cpu'):.2f}x "
                      f"(cpu time vs BN, load {load:.1f})")
            key = f'{threads}t {size}x{size}'
            if key not in res['layers']:
                res['layers'][key] = layer_table(max(5, args.reps), args.batch, size)
                _save(res, out)


def _save(res, out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + '.json', 'w') as f:
        json.dump(res, f, indent=2)
    write_markdown(res, out + '.md')


if __name__ == '__main__':
    main()
