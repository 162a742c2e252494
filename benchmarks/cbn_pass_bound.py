"""Are the native CBN passes bound by memory or by arithmetic on this CPU?  And what does that leave for a
compiled network?

    python benchmarks/cbn_pass_bound.py                      # 1 thread, M = 1, 2, 4
    python benchmarks/cbn_pass_bound.py --threads 2 --out benchmarks/results/cbn_pass_bound_2t

Each native pass of lt_zoo/layers/csrc/compound_bn_cpu.cpp (``eval``; the training forward's
``estep_moments`` and ``combine``; the backward's ``grad_moments`` and ``combine`` with a gradient) runs
on the three layer shapes of ResNet-32 at 16x16 input (16 channels at 16x16, 32 at 8x8, 64 at 4x4) with
batch 16, 64 and 256, against BN's own forward (``F.batch_norm``, eval) on the same map.  The result is
time per map element and its ratio to BN's.  BN's pass reads and writes the map once, which is also each
CBN pass's memory traffic (the output pass reads R as well, M/C of the map): where a CBN pass takes k
times BN's time on the same map, at least (k - 1)/k of it is arithmetic, and fewer passes over memory
would not remove it.

A layout table repeats the passes at the largest M and batch 64 on channels_last maps (N, H, W, C in
memory: each tile of T positions is then a transpose), as a ratio to the contiguous map; under
``torch.compile`` inductor hands the layer channels_last activations whatever the model's layout.

A further table times one whole layer (``CompoundBatchNorm2d`` M = 4, ``nn.BatchNorm2d``: forward and
backward in training, forward in eval) on a 2x64x2x2 map, where the passes cost next to nothing: the fixed
cost of a layer call, paid 31 times per ResNet-32 step whatever the map size.

The last table adds the passes up over ResNet-32's 31 norm layers at batch 64 (the benchmarks' batch): what one training step and
one eval spend in them alone, with no Python, no statistics and no allocation around them.  That is a
lower bound on CBN's layer cost in any integration of these passes, compiled or not.

Writes benchmarks/results/cbn_pass_bound.json and .md (``--out`` to change), with the command line.
"""
import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from machine import cpu_model, write_results  # benchmarks/machine.py (the script folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from lt_zoo.layers import compound_bn_native as native  # noqa: E402

# ResNet-32 at 16x16 input: (channels, map side, norm layers of that shape)
RESNET32_16 = ((16, 16, 11), (32, 8, 10), (64, 4, 10))
PASSES = ('bn_forward', 'eval', 'estep_moments', 'combine', 'grad_moments', 'combine_grad')
TRAIN_PASSES = ('estep_moments', 'combine', 'grad_moments', 'combine_grad')


def calibrated_reps(fn, min_time: float) -> int:
    """How many calls of ``fn`` take about ``min_time`` seconds (after one warm-up call)."""
    fn()
    reps = 1
    while True:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        took = time.perf_counter() - t
        if took >= min_time / 4:
            return max(1, int(reps * min_time / max(took, 1e-9)))
        reps *= 2


def _seconds(fn, min_time: float, rounds: int) -> float:
    """Best over ``rounds`` of the mean time of ``fn`` over at least ``min_time`` seconds."""
    reps = calibrated_reps(fn, min_time)
    best = float('inf')
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def pass_calls(n: int, c: int, side: int, m: int, channels_last: bool = False) -> dict:
    """{pass: a call of it} on one random map (N, C, side, side) with M = m components."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, side, side, generator=g).contiguous(memory_format=fmt)
    gy = torch.randn(n, c, side, side, generator=g).contiguous(memory_format=fmt)
    shift = torch.randn(c, generator=g) * 0.1
    w1, w2 = torch.randn(m, c, generator=g) * 0.1, -0.5 - torch.rand(m, c, generator=g)
    const = torch.randn(m, generator=g)
    A, B, D = (torch.randn(m, c, generator=g) for _ in range(3))
    R, _ = native.estep_moments(x, m, (w1, w2, const), None, shift)
    rm, rv = torch.zeros(c), torch.ones(c)
    return {
        'bn_forward': lambda: F.batch_norm(x, rm, rv, training=False),
        'eval': lambda: native.folded_eval(x, (w1, w2, const), A, D, shift),
        'estep_moments': lambda: native.estep_moments(x, m, (w1, w2, const), None, shift),
        'combine': lambda: native.combine(x, None, R, A, None, D, shift),
        'grad_moments': lambda: native.grad_moments(x, gy, R, shift),
        'combine_grad': lambda: native.combine(x, gy, R, A, B, D, shift),
    }


def fixed_costs(args) -> dict:
    """{layer: {'train_us', 'eval_us'}}: one layer call on a 2x64x2x2 map (the passes' work negligible)."""
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 2, 2, generator=g).requires_grad_()
    gy = torch.randn(2, 64, 2, 2, generator=g)
    out = {}
    for name, layer in (('bn', torch.nn.BatchNorm2d(64)), ('cbn_m4', CompoundBatchNorm2d(64, num_components=4))):
        def train(layer=layer):
            layer.train()
            layer(x).backward(gy)

        def evaluate(layer=layer):
            layer.eval()
            with torch.no_grad():
                layer(x)
        out[name] = dict(train_us=_seconds(train, args.min_time, args.rounds) * 1e6,
                         eval_us=_seconds(evaluate, args.min_time, args.rounds) * 1e6)
    return out


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit('the native CBN kernel is not available here (no C++ compiler, or LT_ZOO_NATIVE=0)')
    cells = []
    for m in args.components:
        for c, side, _ in RESNET32_16:
            for n in args.batches:
                calls = pass_calls(n, c, side, m)
                elems = n * c * side * side
                for name in PASSES:
                    if name == 'bn_forward' and m != args.components[0]:
                        continue  # BN has no components: once per shape
                    s = _seconds(calls[name], args.min_time, args.rounds)
                    cells.append(dict(m=None if name == 'bn_forward' else m, pass_=name, channels=c, side=side,
                                      batch=n, elements=elems, us=s * 1e6, ns_per_element=s * 1e9 / elems))
                    print(f"M={m} {name:14s} {n:3d}x{c}x{side}x{side}: {s * 1e9 / elems:6.3f} ns/element", flush=True)
    layout = []
    n, m = (64 if 64 in args.batches else args.batches[0]), max(args.components)
    for c, side, _ in RESNET32_16:
        calls = {fmt: pass_calls(n, c, side, m, channels_last=fmt == 'channels_last')
                 for fmt in ('contiguous', 'channels_last')}
        for name in PASSES:
            us = {fmt: _seconds(calls[fmt][name], args.min_time, args.rounds) * 1e6 for fmt in calls}
            layout.append(dict(m=m, pass_=name, channels=c, side=side, batch=n, contiguous_us=us['contiguous'],
                               channels_last_us=us['channels_last']))
            print(f"M={m} {name:14s} {n:3d}x{c}x{side}x{side}: channels_last / contiguous "
                  f"{us['channels_last'] / us['contiguous']:.2f}", flush=True)
    return dict(fixed_us=fixed_costs(args), layout=layout, command='python benchmarks/cbn_pass_bound.py ' + ' '.join(sys.argv[1:]), torch=torch.__version__,
                cpu=cpu_model(), machine=platform.machine(), threads=args.threads, min_time=args.min_time,
                rounds=args.rounds, date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), cells=cells)


def network_totals(res: dict, n: int = 64) -> list:
    """Per M: the passes summed over ResNet-32's norm layers at batch ``n`` (ms per step); [] without it."""
    if n not in {c['batch'] for c in res['cells']}:
        return []
    at = {(c['m'], c['pass_'], c['channels']): c['us'] for c in res['cells'] if c['batch'] == n}
    rows = []
    for m in sorted({c['m'] for c in res['cells'] if c['m'] is not None}):
        total = lambda names, mm: sum(at[(mm, p, ch)] * layers for p in names for ch, _, layers in RESNET32_16) / 1e3
        rows.append(dict(m=m, batch=n, train_ms=total(TRAIN_PASSES, m), eval_ms=total(('eval',), m),
                         bn_forward_ms=total(('bn_forward',), None)))
    return rows


def write_markdown(res: dict, path: str) -> None:
    cells = res['cells']
    batches = sorted({c['batch'] for c in cells})
    bn = {(c['channels'], c['batch']): c['ns_per_element'] for c in cells if c['pass_'] == 'bn_forward'}
    lines = ['# Native CBN passes: time per map element against BN', '',
             f"Command: `{res['command']}`.  torch {res['torch']}, CPU {res['cpu']}, {res['threads']} thread(s), "
             f"{res['date']}.  Best of {res['rounds']} rounds of at least {res['min_time']} s each.", '',
             'ns per element of the map (N, C, H, W) by batch N, and in parentheses the ratio to BN\'s forward over '
             'the same map (one read, one write: the memory traffic of each CBN pass). A ratio k means at least '
             '(k - 1)/k of the pass is arithmetic, not memory traffic.', '',
             '| M | pass | C x H x W | ' + ' | '.join(f'N={n}' for n in batches) + ' |',
             '|---|---|---|' + '---|' * len(batches)]
    keys = sorted({(c['m'] or 0, PASSES.index(c['pass_']), c['channels'], c['side']) for c in cells})
    for m, pi, ch, side in keys:
        vals = {c['batch']: c['ns_per_element'] for c in cells
                if (c['m'] or 0) == m and c['pass_'] == PASSES[pi] and c['channels'] == ch}
        shown = [f'{vals[n]:.3f}' + ('' if pi == 0 else f' ({vals[n] / bn[(ch, n)]:.1f}x)') for n in batches]
        lines.append(f"| {m or '-'} | {PASSES[pi]} | {ch}x{side}x{side} | " + ' | '.join(shown) + ' |')
    if res.get('layout'):
        first = res['layout'][0]
        lines += ['', f"## channels_last maps against contiguous ones (M = {first['m']}, batch {first['batch']})", '',
                  '| pass | C x H x W | contiguous us | channels_last us | ratio |', '|---|---|---|---|---|']
        lines += [f"| {r['pass_']} | {r['channels']}x{r['side']}x{r['side']} | {r['contiguous_us']:.0f} | "
                  f"{r['channels_last_us']:.0f} | {r['channels_last_us'] / r['contiguous_us']:.2f}x |"
                  for r in res['layout']]
    fx = res['fixed_us']
    lines += ['', '## Fixed cost of one layer call (2x64x2x2 map, microseconds)', '',
              '| layer | training step (forward + backward) | eval forward |', '|---|---|---|']
    lines += [f"| {k} | {v['train_us']:.0f} | {v['eval_us']:.0f} |" for k, v in fx.items()]
    if res['network']:
        lines += ['', f"## The passes alone over ResNet-32 (16x16 input, batch {res['network'][0]['batch']}, "
                      "31 norm layers)", '',
                  '| M | training passes ms (E-step + moments, output, gradient sums, input gradient) | '
                  'eval pass ms | BN forward ms | 31 x the fixed CBN - BN training call cost, ms |',
                  '|---|---|---|---|---|']
        extra = 31 * (fx['cbn_m4']['train_us'] - fx['bn']['train_us']) / 1e3
        lines += [f"| {r['m']} | {r['train_ms']:.1f} | {r['eval_ms']:.1f} | {r['bn_forward_ms']:.1f} | {extra:.1f} |"
                  for r in res['network']]
        lines += ['', 'What CBN adds to a network in any integration of these passes is at least this, less what '
                      'BN\'s own norm costs there: compare with a compiled BN training step in '
                      '`norm_speed_compiled.md` (README, "CBN speed").']
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--components', type=int, nargs='+', default=[1, 2, 4])
    ap.add_argument('--batches', type=int, nargs='+', default=[16, 64, 256])
    ap.add_argument('--min_time', type=float, default=0.2, help='seconds per timing round')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'cbn_pass_bound'))
    args = ap.parse_args(argv)
    bad = [f'{k} must be >= 1, got {v}' for k, v in (('--threads', args.threads), ('--rounds', args.rounds))
           if v < 1] + [f'--components must be 1..64, got {m}' for m in args.components if not 1 <= m <= 64] + \
          [f'--batches must be >= 1, got {n}' for n in args.batches if n < 1]
    if args.min_time <= 0:
        bad.append(f'--min_time must be > 0, got {args.min_time}')
    if bad:
        ap.error('; '.join(bad))
    res = measure(args)
    res['network'] = network_totals(res)
    write_results(res, args.out, write_markdown)


if __name__ == '__main__':
    main()
