"""GPU throughput of timm ResNet-50 with BN, NBN and CBN: training step and eval, eager and compiled.

    python benchmarks/gpu_speed.py [--batch 128] [--size 224] [--reps 20] [--warmup 5] [--modes eager compiled]
                                   [--models bn nbn cbn_m4] [--cbn_kernels auto] [--profile 0]

Models: ``timm.create_model('resnet50')``, ``'resnet50_nbn'``, ``'resnet50_cbn'`` (M = 4), 1000 classes,
channels_last, bf16 autocast, synthetic data (batch x 3 x size x size on the GPU, no loader).  Training
step = forward + cross-entropy + backward + SGD step; eval = forward under ``inference_mode``.  Each model
is built, run once (the first step: cuDNN's autotuning, and the compilation under ``torch.compile``), then
timed with CUDA events over ``--warmup`` + ``--reps`` alternating training and eval steps, the median
kept; the results files are rewritten after every model, so a run stopped by a time limit keeps what it
measured.  ``--cbn_kernels`` times ``resnet50_cbn`` once per CompoundBatchNorm2d ``kernel`` attribute
('auto': the formulation the layer picks; 'gemm', 'pointwise' and 'triton' force one,
docs/compound_bn_numerics.md).
``--compile_mode`` passes torch.compile's ``mode``.  ``--profile K`` adds, per model, the K GPU kernels
that take the most time in one profiled training step.
Writes benchmarks/results/gpu_speed.json and .md (relative paths, the command line recorded).  Without
CUDA it exits with a one-line error.

``--device cpu`` runs the same code paths on the CPU (bf16 autocast there, wall-clock timing) as a dry
run of this script before GPU time is spent on it; its numbers are not a GPU measurement.  With
``LT_ZOO_NATIVE=0`` CBN then takes the formulation CUDA takes (no native CPU kernel).
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
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {'bn': ('resnet50', {}), 'nbn': ('resnet50_nbn', {}), 'cbn_m4': ('resnet50_cbn', {'num_components': 4})}
KERNELS = ('auto', 'gemm', 'pointwise', 'triton')
# torch.compile modes worth comparing for a layer that launches many small kernels per call
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune-no-cudagraphs')


def _steps(model, opt, x, y):
    kind = x.device.type

    def train():
        model.train()
        with torch.autocast(kind, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def evaluate():
        model.eval()
        with torch.inference_mode(), torch.autocast(kind, dtype=torch.bfloat16):
            model(x)
    return train, evaluate


def timed_ms(fn, device: str) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU, wall clock on the CPU (dry runs)."""
    if device == 'cpu':
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def model_keys(models, cbn_kernels):
    """Row keys in the order of ``models``, BN first: 'cbn_m4' stands for one row per kernel ('cbn_m4' for
    'auto', 'cbn_m4_<kernel>' for the others)."""
    keys = []
    for m in sorted(models, key=lambda m: m != 'bn'):
        keys += [m] if m != 'cbn_m4' else ['cbn_m4' if k == 'auto' else f'cbn_m4_{k}' for k in cbn_kernels]
    return keys


def build(key: str, device: str) -> torch.nn.Module:
    import timm
    import lt_zoo  # noqa: F401  (registers resnet50_nbn / resnet50_cbn)
    from lt_zoo.layers.compound_bn import set_cbn_kernel
    arch, kw = MODELS['cbn_m4' if key.startswith('cbn_m4') else key]
    model = timm.create_model(arch, num_classes=1000, **kw)
    set_cbn_kernel(model, key[len('cbn_m4_'):] if key.startswith('cbn_m4_') else 'auto')
    return model.to(device, memory_format=torch.channels_last)


def profile_kernels(train, top: int, device: str) -> list:
    """The ``top`` GPU kernels by self time in one training step: name, calls, ms, share of the step's
    kernel time."""
    from torch.profiler import ProfilerActivity, profile
    activity = ProfilerActivity.CUDA if device == 'cuda' else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        train()
        sync(device)
    attr = 'self_device_time_total' if device == 'cuda' else 'self_cpu_time_total'
    rows = [(e.key, e.count, getattr(e, attr) / 1e3) for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    total = sum(r[2] for r in rows)
    rows.sort(key=lambda r: -r[2])
    return [{'kernel': k[:120], 'calls': n, 'ms': ms, 'share': ms / total} for k, n, ms in rows[:top]]


def run_model(key: str, mode: str, args, x, y) -> dict:
    from torch._dynamo.utils import counters
    dev = args.device
    model = build(key, dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train, evaluate = _steps(torch.compile(model, mode=args.compile_mode) if mode == 'compiled' else model, opt, x, y)
    if dev == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    breaks = sum(counters['graph_break'].values())
    t = time.perf_counter()
    train()
    evaluate()
    sync(dev)
    first = time.perf_counter() - t
    print(f"{mode} {key}: first training step and eval {first:.1f} s", flush=True)
    row = {'first_step_s': first, 'graph_breaks': sum(counters['graph_break'].values()) - breaks,  # 0 in eager
           'max_memory_gib': torch.cuda.max_memory_allocated() / 2 ** 30 if dev == 'cuda' else None}
    times = {'train': [], 'eval': []}
    for rep in range(args.warmup + args.reps):
        tr, ev = timed_ms(train, dev), timed_ms(evaluate, dev)
        if rep >= args.warmup:
            times['train'].append(tr)
            times['eval'].append(ev)
    for phase, ts in times.items():
        row[f'{phase}_ms'] = statistics.median(ts)
        row[f'{phase}_img_s'] = 1e3 * args.batch / row[f'{phase}_ms']
    if args.profile:
        row['profile'] = profile_kernels(train, args.profile, dev)
    del model, opt, train, evaluate
    if dev == 'cuda':
        torch.cuda.empty_cache()
    return row


def relative_to_bn(rows: dict) -> None:
    """train_x_bn / eval_x_bn of every row, in place, once BN's row is there (time per step over BN's)."""
    if 'bn' not in rows:
        return
    for v in rows.values():
        for phase in ('train', 'eval'):
            v[f'{phase}_x_bn'] = v[f'{phase}_ms'] / rows['bn'][f'{phase}_ms']


def write_markdown(res, path):
    env = res['environment']
    timing = 'CUDA-event' if res.get('device', 'cuda') == 'cuda' else 'wall-clock (a CPU dry run, not a measurement)'
    lines = ['# Norm-layer speed: ResNet-50 on GPU', '',
             f"Command: `{res['command']}`.  {env['gpu']}, torch {env['torch']}, {env['date']}.  Batch "
             f"{res['batch']}, {res['size']}x{res['size']}, bf16 autocast, channels_last, synthetic data, median "
             f"of {res['reps']} repetitions after {res['warmup']} warm-up, {timing} timing.  `x BN`: time per "
             f"step over BN's (the inverse of the img/s ratio).", '',
             '| mode | model | train img/s | train x BN | eval img/s | eval x BN | first step s '
             '| peak GiB (first step) '
             '| graph breaks |', '|---|---|---|---|---|---|---|---|---|']
    fmt = lambda v, k: '-' if v.get(k) is None else f'{v[k]:.2f}'  # noqa: E731
    for mode, models in res['modes'].items():
        for k, v in models.items():
            lines.append(f"| {mode} | {k} | {v['train_img_s']:.0f} | {fmt(v, 'train_x_bn')} | {v['eval_img_s']:.0f} | "
                         f"{fmt(v, 'eval_x_bn')} | {v['first_step_s']:.1f} | {fmt(v, 'max_memory_gib')} | "
                         f"{v['graph_breaks']} |")
    for run, err in res.get('errors', {}).items():
        lines.append(f"| {run.replace('/', ' | ')} | failed: {err.splitlines()[0][:200]} |||||||")
    for mode, models in res['modes'].items():
        for k, v in models.items():
            if v.get('profile'):
                lines += ['', f'## Kernels of one training step: {mode} {k}', '', '| kernel | calls | ms | share |',
                          '|---|---|---|---|']
                lines += [f"| `{p['kernel']}` | {p['calls']} | {p['ms']:.2f} | {100 * p['share']:.1f}% |"
                          for p in v['profile']]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--reps', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--modes', nargs='+', default=['eager', 'compiled'], choices=['eager', 'compiled'])
    ap.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS),
                    help='bn comes first whenever it is named: the ratios are relative to it')
    ap.add_argument('--cbn_kernels', nargs='+', default=['auto'], choices=KERNELS,
                    help="CompoundBatchNorm2d.kernel of the cbn_m4 rows ('auto': the layer's own choice)")
    ap.add_argument('--compile_mode', default='default', choices=COMPILE_MODES,
                    help="torch.compile's mode: 'reduce-overhead' replays CUDA graphs (no launch cost per kernel)")
    ap.add_argument('--profile', type=int, default=0, help='list this many top GPU kernels per model (0: none)')
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                    help="cpu: a dry run of the code paths (not a measurement); give it a small --size and --out")
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'gpu_speed'),
                    help='output path without extension, relative to the repository root')
    args = ap.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('gpu_speed.py: error: no CUDA device visible to torch; run benchmarks/norm_speed.py for the CPU')
    if args.profile < 0:
        sys.exit(f'gpu_speed.py: error: --profile {args.profile}; expected a number of kernels >= 0')
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    res = {'command': 'python benchmarks/gpu_speed.py ' + ' '.join(sys.argv[1:]), 'batch': args.batch,
           'size': args.size, 'reps': args.reps, 'warmup': args.warmup, 'modes': {}, 'device': args.device,
           'environment': {'gpu': torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (dry run)',
                           'torch': torch.__version__, 'python': platform.python_version(),
                           'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}}
    out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    failed = []
    for mode in args.modes:
        rows = res['modes'].setdefault(mode, {})
        for key in model_keys(args.models, args.cbn_kernels):
            try:
                rows[key] = run_model(key, mode, args, x, y)
            except Exception as e:  # noqa: BLE001  (the other rows still count; the error is recorded)
                print(f"{mode} {key}: FAILED: {type(e).__name__}: {e}", flush=True)
                res.setdefault('errors', {})[f'{mode}/{key}'] = f'{type(e).__name__}: {str(e)[:2000]}'
                failed.append(f'{mode}/{key}')
                continue
            relative_to_bn(rows)
            with open(out + '.json', 'w') as f:  # after every model: a time limit keeps what was measured
                json.dump(res, f, indent=2)
            write_markdown(res, out + '.md')
            v = rows[key]
            print(f"{mode:8s} {key:12s} train {v['train_img_s']:.0f} img/s ({v.get('train_x_bn', float('nan')):.2f}x"
                  f" BN)  eval {v['eval_img_s']:.0f} img/s ({v.get('eval_x_bn', float('nan')):.2f}x BN)", flush=True)
    if failed:
        sys.exit(f"gpu_speed.py: error: {', '.join(failed)} failed (the messages are in {out}.json under 'errors')")


if __name__ == '__main__':
    main()
