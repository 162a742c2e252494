"""One norm layer, the CBN kernel formulations against BN: eager and torch.compile, training and eval.

    python benchmarks/cbn_kernel_speed.py                 # ResNet-32 shapes at 32x32 and 16x16 input, 1 thread
    python benchmarks/cbn_kernel_speed.py --threads 2 --reps 60

Variants per layer shape (N, C, H, W) of CIFAR ResNet-32 (16/32/64 channels at 1, 1/2, 1/4 of the input):
``bn`` (``F.batch_norm``), ``cbn_gemm`` (batched GEMMs, analytic backward), ``cbn_native`` (the same
math and backward as C++ passes: the eager default on CPU; eager only) and ``cbn_pointwise`` (broadcasts
and sums, differentiated by autograd: what the layer uses under torch.compile; compiled only), CBN with
M = 4.  Training step = forward + backward of the input and the affine parameters; eval = forward
under ``no_grad``.  Every variant runs one step per repetition, round-robin, so load changes hit all
alike; the median wall-clock is reported with the ratio to BN of the same mode.  docs/compound_bn_numerics.md#decision-kernel explains the kernels.

Writes benchmarks/results/cbn_kernel_speed.json and .md (``--out`` to change), with the command line.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from machine import cpu_model, write_results  # benchmarks/machine.py (the script folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from lt_zoo.layers import compound_bn_functional as cbf  # noqa: E402

M = 4
VARIANTS = ('bn', 'cbn_gemm', 'cbn_pointwise', 'cbn_native')


def layer_shapes(sizes, batch):
    """The three stage shapes of CIFAR ResNet-32 for each input size."""
    return [(batch, c, s // f, s // f) for s in sizes for c, f in ((16, 1), (32, 2), (64, 4))]


def make_fn(variant: str, training: bool):
    def bn(x, w, b, prior, mean, var):
        return F.batch_norm(x, mean[0], var[0], w[0], b[0], training, 0.1, 1e-5)

    def cbn(x, w, b, prior, mean, var):
        return cbf.compound_batch_norm(x, prior, mean, var, w, b, training, 1e-5,
                                       kernel=variant.split('_')[1])[0]
    return bn if variant == 'bn' else cbn


def measure(shape, mode: str, training: bool, reps: int, warmup: int) -> dict:
    """Median ms per step of every variant (round-robin) for one shape, mode and phase."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2 + 1
    gy = torch.randn(shape, generator=gen)
    wt = torch.ones(M, c, requires_grad=True)
    bs = torch.zeros(M, c, requires_grad=True)
    state = (torch.full((M,), 1.0 / M), 1 + 0.3 * torch.randn(M, c, generator=gen), torch.full((M, c), 4.0))
    fns = {}
    for v in VARIANTS:
        if mode == 'eager' and v == 'cbn_pointwise':
            continue  # materialises (N, M, C, H, W) temporaries: never used eagerly
        if mode == 'compiled' and v == 'cbn_native':
            continue  # eager only: compiled, the layer calls the native passes as custom ops (or traces pointwise)
        f = make_fn(v, training)
        fns[v] = torch.compile(f, fullgraph=True, dynamic=False) if mode == 'compiled' else f

    def step(f):
        if training:
            xr = x.detach().requires_grad_()
            f(xr, wt, bs, *state).backward(gy)
        else:
            with torch.no_grad():
                f(x, wt, bs, *state)

    for f in fns.values():
        for _ in range(warmup):
            step(f)
    times = {v: [] for v in fns}
    for _ in range(reps):
        for v, f in fns.items():
            t = time.perf_counter()
            step(f)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    return {v: dict(ms=round(ms, 4), x_bn=round(ms / med['bn'], 3)) for v, ms in med.items()}


def network_profile(size: int, batch: int, steps: int = 5) -> dict:
    """ms per compiled ResNet-32 training step by kind of work (torch.profiler self CPU time):
    convolutions (library calls, identical work in both) vs inductor's generated code (norms, ReLU,
    residual adds, loss), for resnet32 and resnet32_cbn."""
    import timm
    import lt_zoo  # noqa: F401  (registers the entrypoints)
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for name in ('resnet32', 'resnet32_cbn'):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        cm = torch.compile(model)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

        def step():
            opt.zero_grad()
            F.cross_entropy(cm(x), y).backward()
            opt.step()
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        ev = prof.key_averages()
        ms = lambda pred: round(sum(e.self_cpu_time_total for e in ev if pred(e.key)) / steps / 1e3, 2)
        out[name] = dict(convolution_ms=ms(lambda k: 'convolution' in k),
                         generated_code_ms=ms(lambda k: k.startswith('## Call CompiledFxGraph')),
                         total_ms=ms(lambda k: True))
    return out


def write_markdown(res: dict, path: str) -> None:
    lines = ['# CBN kernels vs BN: one norm layer (CPU)', '',
             f"Command: `{res['command']}`.  torch {res['torch']}, CPU {res['cpu']} ({res['cpu_count']} logical "
             f"cores), {res['threads']} thread(s), {res['date']}.  M = {M}; median of {res['reps']} round-robin "
             f"steps after {res['warmup']} warm-up; load average at the start {res['load_avg']}.", '',
             'Ratios are to BN in the same mode (compiled CBN vs compiled BN).  `cbn_native` is the eager default '
             'on CPU (C++ passes, lt_zoo/layers/compound_bn_native.py), `cbn_gemm` its fallback without a compiler, '
             '`cbn_pointwise` what the layer uses under torch.compile '
             '(docs/compound_bn_numerics.md#decision-kernel).', '',
             '| shape (N, C, H, W) | mode | phase | BN ms | CBN gemm ms | x BN | CBN native ms | x BN | '
             'CBN pointwise ms | x BN |',
             '|---|---|---|---|---|---|---|---|---|---|']
    cell = lambda t: f"{t['ms']:.3f} | {t['x_bn']:.2f}" if t else '- | -'
    for r in res['rows']:
        t = r['times']
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['mode']} | {r['phase']} | {t['bn']['ms']:.3f} | "
                     f"{cell(t['cbn_gemm'])} | {cell(t.get('cbn_native'))} | {cell(t.get('cbn_pointwise'))} |")
    if res.get('network_profile'):
        lines += ['', f"Compiled ResNet-32 training step, {res['network_profile_size']}x{res['network_profile_size']} "
                      f"input, batch {res['batch']}: self CPU ms per step by kind of work (torch.profiler):", '',
                  '| model | convolutions | generated code (norms, ReLU, adds, loss) | all |', '|---|---|---|---|']
        lines += [f"| `{m}` | {p['convolution_ms']:.1f} | {p['generated_code_ms']:.1f} | {p['total_ms']:.1f} |"
                  for m, p in res['network_profile'].items()]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', type=int, nargs='+', default=[32, 16], help='ResNet-32 input sizes')
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--modes', nargs='+', default=['eager', 'compiled'], choices=['eager', 'compiled'])
    ap.add_argument('--reps', type=int, default=40)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--network_profile', type=int, default=16, metavar='SIZE',
                    help='also profile a compiled ResNet-32 training step at this input size (0: skip)')
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'cbn_kernel_speed'))
    args = ap.parse_args(argv)
    for name in ('sizes', 'batch', 'threads', 'reps'):
        vals = getattr(args, name)
        if any(v < 1 for v in (vals if isinstance(vals, list) else [vals])):
            ap.error(f'--{name} must be >= 1, got {vals}')
    if args.network_profile < 0:
        ap.error(f'--network_profile must be an input size >= 1 or 0 (skip), got {args.network_profile}')
    if any(s % 4 for s in args.sizes):
        ap.error(f'--sizes must be multiples of 4 (ResNet-32 halves the map twice), got {args.sizes}')
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one graph per shape, phase and variant
    res = dict(command='python benchmarks/cbn_kernel_speed.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
               torch=torch.__version__, cpu=cpu_model(), cpu_count=os.cpu_count(), threads=args.threads,
               python=platform.python_version(), reps=args.reps, warmup=args.warmup,
               load_avg=round(os.getloadavg()[0], 2), date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
               batch=args.batch, rows=[])
    for shape in layer_shapes(args.sizes, args.batch):
        for mode in args.modes:
            for training in (True, False):
                times = measure(shape, mode, training, args.reps, args.warmup)
                row = dict(shape=list(shape), mode=mode, phase='train' if training else 'eval', times=times)
                res['rows'].append(row)
                print(f"{shape} {mode} {row['phase']}: " + ', '.join(f"{v} {t['x_bn']:.2f}x" for v, t in times.items()),
                      flush=True)
    if args.network_profile:
        res['network_profile_size'] = args.network_profile
        res['network_profile'] = network_profile(args.network_profile, args.batch)
        print(res['network_profile'], flush=True)
    write_results(res, args.out, write_markdown)


if __name__ == '__main__':
    main()
