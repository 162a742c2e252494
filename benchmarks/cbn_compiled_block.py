"""Where a compiled CBN training step spends its time on CPU: one conv -> norm -> ReLU -> conv -> norm block.

    python benchmarks/cbn_compiled_block.py                  # C = 16, 16x16 maps, batch 64, 1 thread
    python benchmarks/cbn_compiled_block.py --channels 32 --size 8

Cells: norm (``bn``: nn.BatchNorm2d, ``cbn``: CompoundBatchNorm2d, M = 4) x memory format of the block and
its input (``contiguous``, ``channels_last``) x inductor's ``layout_optimization`` (``on``, the default,
which on a CPU with mkldnn stores every convolution's activations channels_last whatever the traced
layout; ``off``).  Each cell compiles the block's training step (forward + backward of a scalar loss) in a
fresh process, times ``--steps`` steps after warm-up, and splits one profiled window into convolutions
(mkldnn library calls) and inductor's generated code.  Cells run in ``--rounds`` alternating rounds; the
lowest median per cell is reported, since load on this machine only ever adds time.

The CBN layer traces its broadcast view from the strides dynamo sees
(docs/compound_bn_numerics.md#decision-kernel); a contiguous block under ``layout_optimization: on`` is
the case where that view and the stored layout disagree.

Writes benchmarks/results/cbn_compiled_block.json and .md (``--out``), with the command line.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone

from machine import cpu_model, write_results  # benchmarks/machine.py (the script folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NORMS = ('bn', 'cbn')
FORMATS = ('contiguous', 'channels_last')
LAYOUT_OPT = ('on', 'off')


def cell(norm: str, fmt: str, layout_opt: str, channels: int, size: int, batch: int, steps: int) -> dict:
    """Time one cell in this process (called in a fresh child by :func:`main`)."""
    import time
    import torch
    import torch._inductor.config as inductor_config
    import torch.nn as nn
    from torch.profiler import ProfilerActivity, profile
    sys.path.insert(0, ROOT)
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    inductor_config.layout_optimization = layout_opt == 'on'
    torch.manual_seed(0)
    make = nn.BatchNorm2d if norm == 'bn' else CompoundBatchNorm2d
    block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), make(channels), nn.ReLU(),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False), make(channels)).train()
    x = torch.randn(batch, channels, size, size)
    if fmt == 'channels_last':
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(block, fullgraph=True)

    def step():
        compiled(x).square().mean().backward()
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    ev = prof.key_averages()
    ms = lambda pred: sum(e.self_cpu_time_total for e in ev if pred(e.key)) / 10 / 1e3
    return dict(norm=norm, memory_format=fmt, layout_optimization=layout_opt, compile_s=round(compile_s, 1),
                median_ms=sorted(times)[len(times) // 2] * 1e3,
                convolution_ms=ms(lambda k: 'convolution' in k),
                generated_code_ms=ms(lambda k: k.startswith('## Call CompiledFxGraph')))


def write_markdown(res: dict, path: str) -> None:
    bn = {(r['memory_format'], r['layout_optimization']): r for r in res['cells'] if r['norm'] == 'bn'}
    lines = ['# Compiled CBN on CPU: one conv-norm-ReLU-conv-norm block', '',
             f"Command: `{res['command']}`.  torch {res['torch']}, CPU {res['cpu']}, {res['threads']} thread, "
             f"{res['date']}.  Block of {res['channels']} channels on {res['size']}x{res['size']} maps, batch "
             f"{res['batch']}; training step = forward + backward; lowest median of {res['rounds']} rounds x "
             f"{res['steps']} steps; ms per step.  Ratios are to BN in the same memory format and layout setting.",
             '', '| norm | memory format | inductor layout_optimization | step ms | x BN | convolutions ms | '
                 'generated code ms | x BN |', '|---|---|---|---|---|---|---|---|']
    for r in res['cells']:
        b = bn[(r['memory_format'], r['layout_optimization'])]
        lines.append(f"| {r['norm']} | {r['memory_format']} | {r['layout_optimization']} | {r['median_ms']:.2f} | "
                     f"{r['median_ms'] / b['median_ms']:.2f} | {r['convolution_ms']:.2f} | "
                     f"{r['generated_code_ms']:.2f} | {r['generated_code_ms'] / b['generated_code_ms']:.2f} |")
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--channels', type=int, default=16)
    ap.add_argument('--size', type=int, default=16, help='map height and width')
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'cbn_compiled_block'))
    ap.add_argument('--cell', nargs=3, metavar=('NORM', 'FORMAT', 'LAYOUT_OPT'), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ('channels', 'size', 'batch', 'steps', 'rounds'):
        if getattr(args, name) < 1:
            ap.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    if args.cell:  # child process: one cell, JSON on the last line of stdout
        import torch
        torch.set_num_threads(1)
        print(json.dumps(cell(*args.cell, args.channels, args.size, args.batch, args.steps)))
        return
    grid = [(n, f, lo) for f in FORMATS for lo in LAYOUT_OPT for n in NORMS]
    best = {}
    for rnd in range(args.rounds):
        for key in (grid if rnd % 2 == 0 else grid[::-1]):
            cmd = [sys.executable, __file__, '--cell', *key] + [
                f'--{k}={getattr(args, k)}' for k in ('channels', 'size', 'batch', 'steps')]
            env = dict(os.environ, OMP_NUM_THREADS='1')
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f'cell {key} failed:\n{proc.stderr[-3000:]}')
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {rnd}: {' '.join(key)}: {r['median_ms']:.2f} ms", flush=True)
            if key not in best or r['median_ms'] < best[key]['median_ms']:
                best[key] = r
    import torch
    res = dict(command=shlex.join(['python', 'benchmarks/cbn_compiled_block.py'] + (sys.argv[1:] if argv is None else argv)),
               torch=torch.__version__, cpu=cpu_model(), threads=1, python=platform.python_version(),
               date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), channels=args.channels,
               size=args.size, batch=args.batch, steps=args.steps, rounds=args.rounds,
               cells=[best[k] for k in grid])
    write_results(res, args.out, write_markdown)


if __name__ == '__main__':
    main()
