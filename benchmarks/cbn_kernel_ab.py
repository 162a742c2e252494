#!/usr/bin/env python
"""Did a change to the native CBN kernel make it faster?  Its passes against the kernel of a git revision,
timed round-robin in one process.

    python benchmarks/cbn_kernel_ab.py --base 077ffbd
    python benchmarks/cbn_kernel_ab.py --base HEAD --components 4 --out /tmp/ab   # an uncommitted change

Two runs of benchmarks/cbn_pass_bound.py one after the other differ by 10-20% on a machine that runs
anything else (and on a quiet one, by what the CPU's clock did in between), which hides the few percent a
kernel change buys.  Here the working tree's library and the library built from
``lt_zoo/layers/csrc/compound_bn_cpu.cpp`` at ``--base`` (same compiler and flags) take turns: each
timing round runs every pass of one cell on the base, then on this tree, so a load change hits both.
Passes and maps are those of cbn_pass_bound.py (ResNet-32 at 16x16 input, batch 64, contiguous and
channels_last); the base must have the same entry points (compound_bn_native._SIGNATURES).

Writes benchmarks/results/cbn_kernel_ab.json and .md (``--out`` to change), with the command line.
"""
import argparse
import ctypes
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import torch
from cbn_pass_bound import RESNET32_16, TRAIN_PASSES, calibrated_reps, native, pass_calls  # benchmarks/ on sys.path
from machine import ROOT, cpu_model, write_results

CBN_PASSES = ('eval',) + TRAIN_PASSES
SOURCE = 'lt_zoo/layers/csrc/compound_bn_cpu.cpp'


def build_base(rev: str, workdir: str) -> str:
    """The kernel library of ``rev``'s source, built with the flags the package uses; -> its path."""
    src = os.path.join(workdir, 'base.cpp')
    show = subprocess.run(['git', 'show', f'{rev}:{SOURCE}'], cwd=ROOT, capture_output=True, text=True)
    if show.returncode != 0:
        raise SystemExit(f'--base {rev!r}: git cannot show {SOURCE} there ({show.stderr.strip()})')
    with open(src, 'w') as f:
        f.write(show.stdout)
    lib = os.path.join(workdir, 'base.so')
    cxx = os.environ.get('CXX', 'c++')
    proc = subprocess.run([cxx, *native._FLAGS, src, '-o', lib], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'building the kernel of {rev} failed: {proc.stderr.strip()[-2000:]}')
    return lib


@contextmanager
def using(handle):
    """compound_bn_native's calls go to ``handle`` (a ctypes library) inside the block."""
    saved = native._lib, native._fns
    native._lib, native._fns = handle, {}
    try:
        yield
    finally:
        native._lib, native._fns = saved


def measure(args, base_lib) -> dict:
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit('the native CBN kernel is not available here (no C++ compiler, or LT_ZOO_NATIVE=0)')
    libs = {'base': ctypes.CDLL(base_lib), 'this': native._lib}
    cells = []
    for m in args.components:
        for c, side, layers in RESNET32_16:
            for fmt in args.memory_formats:
                calls = pass_calls(args.batch, c, side, m, channels_last=fmt == 'channels_last')
                for name in CBN_PASSES:
                    with using(libs['this']):
                        reps = calibrated_reps(calls[name], args.min_time)
                    best = {k: float('inf') for k in libs}
                    for _ in range(args.rounds):
                        for k, handle in libs.items():
                            with using(handle):
                                t = time.perf_counter()
                                for _ in range(reps):
                                    calls[name]()
                                best[k] = min(best[k], (time.perf_counter() - t) / reps)
                    cells.append(dict(m=m, pass_=name, channels=c, side=side, layers=layers, memory_format=fmt,
                                      base_us=best['base'] * 1e6, this_us=best['this'] * 1e6))
                    print(f"M={m} {name:14s} {c}x{side}x{side} {fmt:13s} this/base "
                          f"{best['this'] / best['base']:.3f}", flush=True)
    return dict(command='python benchmarks/cbn_kernel_ab.py ' + ' '.join(sys.argv[1:]), base=args.base,
                torch=torch.__version__, cpu=cpu_model(), machine=platform.machine(), threads=args.threads,
                batch=args.batch, min_time=args.min_time, rounds=args.rounds,
                date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), cells=cells)


def network(cells: list) -> list:
    """Per M and memory format: each pass, and the training passes together, summed over ResNet-32's 31
    norm layers (ms).  A pass the change did not touch reads the noise of the comparison."""
    rows = []
    for m in sorted({c['m'] for c in cells}):
        for fmt in sorted({c['memory_format'] for c in cells}):
            mine = [c for c in cells if c['m'] == m and c['memory_format'] == fmt]
            for part, names in [(p, (p,)) for p in CBN_PASSES] + [('training (the four above)', TRAIN_PASSES)]:
                base = sum(c['base_us'] * c['layers'] for c in mine if c['pass_'] in names) / 1e3
                this = sum(c['this_us'] * c['layers'] for c in mine if c['pass_'] in names) / 1e3
                rows.append(dict(m=m, memory_format=fmt, part=part, base_ms=base, this_ms=this))
    return rows


def write_markdown(res: dict, path: str) -> None:
    lines = [f"# Native CBN kernel: this tree against {res['base']}", '',
             f"Command: `{res['command']}`.  torch {res['torch']}, CPU {res['cpu']}, {res['threads']} thread(s), "
             f"batch {res['batch']}, {res['date']}.  Best of {res['rounds']} rounds of at least "
             f"{res['min_time']} s each, the two libraries taking turns within every round.", '',
             '## The passes summed over ResNet-32\'s 31 norm layers (16x16 input)', '',
             '| M | layout | pass | base ms | this ms | this / base |', '|---|---|---|---|---|---|']
    lines += [f"| {r['m']} | {r['memory_format']} | {r['part']} | {r['base_ms']:.2f} | {r['this_ms']:.2f} | "
              f"{r['this_ms'] / r['base_ms']:.3f} |" for r in res['network']]
    lines += ['', '## Each pass', '', '| M | pass | C x H x W | layout | base us | this us | this / base |',
              '|---|---|---|---|---|---|---|']
    lines += [f"| {c['m']} | {c['pass_']} | {c['channels']}x{c['side']}x{c['side']} | {c['memory_format']} | "
              f"{c['base_us']:.1f} | {c['this_us']:.1f} | {c['this_us'] / c['base_us']:.3f} |" for c in res['cells']]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--base', required=True, help='git revision whose kernel source is the baseline')
    ap.add_argument('--components', type=int, nargs='+', default=[2, 4])
    ap.add_argument('--memory_formats', nargs='+', default=['contiguous', 'channels_last'],
                    choices=['contiguous', 'channels_last'])
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--min_time', type=float, default=0.1, help='seconds per library and timing round')
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'cbn_kernel_ab'))
    args = ap.parse_args(argv)
    bad = [f'{k} must be >= 1, got {v}' for k, v in (('--threads', args.threads), ('--rounds', args.rounds),
                                                     ('--batch', args.batch)) if v < 1]
    bad += [f'--components must be 1..64, got {m}' for m in args.components if not 1 <= m <= 64]
    if args.min_time <= 0:
        bad.append(f'--min_time must be > 0, got {args.min_time}')
    if bad:
        ap.error('; '.join(bad))
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(args, build_base(args.base, tmp))
    res['network'] = network(res['cells'])
    write_results(res, args.out, write_markdown)


if __name__ == '__main__':
    main()
