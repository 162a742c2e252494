"""What one call of the compiled CBN eval op costs: its Python kernel against its C++ kernel.

    python benchmarks/cbn_op_overhead.py

A compiled CBN network in eval calls one custom op per norm layer (31 in ResNet-32).  Both kernels of that
op run the same native pass (lt_zoo/layers/csrc/compound_bn_cpu.cpp, fold and E-step and output in one
call); they differ in what surrounds it:

- ``lt_zoo::cbn_native_eval_running``: the dispatcher calls Python (lt_zoo/layers/compound_bn_ops.py),
  which converts the arguments and calls the pass through ctypes;
- ``lt_zoo::cbn_cpp_eval_running``: the dispatcher calls C++ (lt_zoo/layers/csrc/compound_bn_torch.cpp),
  which calls the pass directly;
- ``compound_bn_native.eval_running``: the ctypes wrapper alone, called from Python without the dispatcher.

Timed on a 2x64x2x2 map, where the pass costs next to nothing (the fixed cost of a call), and on the
three channels_last map shapes of ResNet-32 at 16x16 input, batch 64 (what inductor hands the op),
summed over the network's 31 layers: the time one compiled eval forward spends in the op.  M = 4, float32,
1 thread, best of ``--rounds`` rounds of at least ``--min_time`` seconds, the kernels taking turns.

Writes benchmarks/results/cbn_op_overhead.json and .md (``--out`` to change), with the command line.
"""
import argparse
import platform
import sys
import time
from datetime import datetime, timezone

import torch
from cbn_pass_bound import RESNET32_16, calibrated_reps  # benchmarks/ (the script folder is on sys.path)
from machine import ROOT, cpu_model, write_results

sys.path.insert(0, ROOT)
from lt_zoo.layers import compound_bn_native, compound_bn_ops, compound_bn_torch  # noqa: E402

KERNELS = ('python_op', 'cpp_op', 'ctypes_wrapper')


def calls(n: int, c: int, side: int, m: int) -> dict:
    """{kernel: one eval call} on a random channels_last map (n, c, side, side), M = m, from a running state."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    state = (torch.full((m,), 1 / m), 0.3 * torch.randn(m, c, generator=g), 0.5 + torch.rand(m, c, generator=g),
             torch.randn(m, c, generator=g), torch.randn(m, c, generator=g))
    return {
        'python_op': lambda: compound_bn_ops.eval_running_py(x, *state, 1e-5, 1.0, False),
        'cpp_op': lambda: compound_bn_ops.eval_running_cpp(x, *state, 1e-5, 1.0, False),
        'ctypes_wrapper': lambda: compound_bn_native.eval_running(x, *state, 1e-5, 1.0, False),
    }


def timed(fns: dict, args) -> dict:
    """{kernel: seconds per call}, the kernels in turn within each of args.rounds rounds."""
    reps = {k: calibrated_reps(fn, args.min_time) for k, fn in fns.items()}  # once, not every round
    best = {k: float('inf') for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[k]):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t) / reps[k])
    return best


def write_markdown(res: dict, path: str) -> None:
    lines = [
        '# The compiled CBN eval op per call: Python kernel against C++ kernel', '',
        f"Command: `{res['command']}`.  torch {res['torch']}, CPU {res['cpu']}, {res['threads']} thread(s), "
        f"M = {res['components']}, float32, channels_last maps, {res['date']}.  Best of {res['rounds']} rounds of "
        f"at least {res['min_time']} s each, the kernels taking turns.", '',
        '`python_op`: lt_zoo::cbn_native_eval_running (Python kernel); `cpp_op`: lt_zoo::cbn_cpp_eval_running '
        '(C++ kernel, what a compiled layer calls when it builds); `ctypes_wrapper`: compound_bn_native.eval_running '
        'called from Python, no dispatcher.  All three run the same native pass.', '',
        '| map | python_op us | cpp_op us | ctypes_wrapper us | python_op - cpp_op us |', '|---|---|---|---|---|']
    for row in res['maps']:
        us = {k: 1e6 * row[k] for k in KERNELS}
        lines.append(f"| {row['map']} | {us['python_op']:.1f} | {us['cpp_op']:.1f} | {us['ctypes_wrapper']:.1f} | "
                     f"{us['python_op'] - us['cpp_op']:.1f} |")
    t = res['resnet32']
    lines += ['', '## Summed over ResNet-32 at 16x16 input (31 norm layers, batch 64): one compiled eval forward', '',
              '| python_op ms | cpp_op ms | saved ms |', '|---|---|---|',
              f"| {1e3 * t['python_op']:.2f} | {1e3 * t['cpp_op']:.2f} | {1e3 * (t['python_op'] - t['cpp_op']):.2f} |"]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--components', type=int, default=4)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--min_time', type=float, default=0.2, help='seconds per kernel and timing round')
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--out', default='benchmarks/results/cbn_op_overhead')
    args = ap.parse_args(argv)
    if args.components < 1 or args.threads < 1 or args.rounds < 1 or args.min_time <= 0:
        ap.error(f'--components, --threads and --rounds must be >= 1 and --min_time > 0, got {args.components}, '
                 f'{args.threads}, {args.rounds}, {args.min_time}')
    if not compound_bn_torch.available():
        sys.exit('cbn_op_overhead: the C++ eval op did not build (see the warning above); nothing to compare')
    torch.set_num_threads(args.threads)
    maps, total = [], dict.fromkeys(KERNELS, 0.0)
    for n, c, side, layers in ((2, 64, 2, 0),) + tuple((64, c, s, k) for c, s, k in RESNET32_16):
        row = dict(map=f'{n}x{c}x{side}x{side}', layers=layers, **timed(calls(n, c, side, args.components), args))
        maps.append(row)
        print(row)
        for k in KERNELS:
            total[k] += layers * row[k]
    res = dict(command='python benchmarks/cbn_op_overhead.py' + ''.join(f' {a}' for a in (argv or sys.argv[1:])),
               torch=torch.__version__, cpu=cpu_model(), machine=platform.machine(), threads=args.threads,
               components=args.components, rounds=args.rounds, min_time=args.min_time,
               date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), maps=maps, resnet32=total)
    write_results(res, args.out, write_markdown)
    return res


if __name__ == '__main__':
    main()
