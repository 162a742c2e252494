"""Per-layer GPU cost of Compound BN against BN on ResNet-50's norm-layer shapes, per CBN formulation:
the quick way to compare formulations on a GPU (one layer compiles in seconds, the whole network in
minutes; benchmarks/gpu_speed.py gives the network figures).

    python benchmarks/gpu_layer_speed.py [--kernels gemm pointwise triton] [--modes eager compiled] [--top 5]
                                         [--base REV_OR_DIR] [--base_kernels gemm pointwise] [--profile 8]

Shapes: the inputs of ResNet-50's 53 norm layers at ``--size`` (timm ``resnet50``, read with forward
hooks), batch ``--batch``, bf16 and channels_last as a conv under bf16 autocast hands them over.  The
``--top`` shapes with the most elements (count x C x H x W) are timed; the share of the network's
norm-layer elements they hold is reported.  Per shape and variant (BN = ``nn.BatchNorm2d``; CBN M = 4 with
its ``kernel`` attribute set to each of ``--kernels``): a training call (forward and backward with an
upstream gradient) and an eval call (``inference_mode``), eager or ``torch.compile(fullgraph=True)``,
median of ``--reps`` after ``--warmup``, timed with CUDA events.  ``network ms``: the sum over the timed
shapes of (layers of that shape) x (ms per call).

``--base`` times the CBN of another revision of lt_zoo beside this tree's: a git revision (its ``lt_zoo/``
is extracted with ``git archive``) or a folder holding an ``lt_zoo/`` package (on a machine without the
repository's history, extract it here first: ``git archive REV lt_zoo | tar -x -C .device/base``).  The
base runs in a child process with that package first on ``sys.path``, timing ``--base_kernels``; its rows are
named ``base:<kernel>``.
``--compile_mode`` passes torch.compile's ``mode``.  ``--profile K`` lists, for the largest shape, the K
GPU kernels taking the most time in one compiled training call of each variant.  ``--triton_tiles PxCwW
...`` adds a ``triton@PxCwW`` variant per spec: kernel 'triton' with every pass's tile set to P positions
x C channels and W warps (compound_bn_triton's module attributes, restored afterwards), for tuning the
tiles no GPU has timed yet.

Writes benchmarks/results/gpu_layer_speed.json and .md.  Without CUDA it exits with a one-line error;
``--device cpu`` is a dry run of the script (with ``LT_ZOO_NATIVE=0`` CBN takes CUDA's formulations).
"""
import argparse
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch
from gpu_speed import COMPILE_MODES, profile_kernels, sync, timed_ms  # benchmarks/ is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ('gemm', 'pointwise', 'triton')
BASE_KERNELS = ('gemm', 'pointwise')  # what revisions before 'triton' have
COMPONENTS = 4


def resnet50_norm_shapes(size: int) -> collections.Counter:
    """Counter of the (C, H, W) inputs of timm resnet50's BatchNorm2d layers at size x size."""
    import timm
    model = timm.create_model('resnet50').eval()
    shapes = collections.Counter()
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.update([tuple(inp[0].shape[1:])]))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def pick_shapes(shapes: collections.Counter, top: int):
    """The ``top`` shapes with the most elements over all their layers, and the share of elements they hold."""
    numel = {s: n * s[0] * s[1] * s[2] for s, n in shapes.items()}
    chosen = sorted(numel, key=lambda s: -numel[s])[:top]
    return chosen, sum(numel[s] for s in chosen) / sum(numel.values())


_TILES = re.compile(r'^(\d+)x(\d+)w(\d+)$')


def parse_tiles(spec: str):
    """'PxCwW' -> (P, C, W): powers of two, P and C in 16..256, W in 1..16; None if not of that form."""
    m = _TILES.match(spec)
    if m is None:
        return None
    p, c, w = map(int, m.groups())
    ok = all(v & (v - 1) == 0 for v in (p, c, w)) and 16 <= p <= 256 and 16 <= c <= 256 and 1 <= w <= 16
    return (p, c, w) if ok else None


@contextlib.contextmanager
def triton_tiles(variant: str):
    """For 'triton@PxCwW': every Triton pass of lt_zoo at that tile within the block; else nothing."""
    if not variant.startswith('triton@'):
        yield
        return
    from lt_zoo.layers import compound_bn_triton as cbt
    p, c, w = parse_tiles(variant.split('@', 1)[1])
    names = ('_BLOCK_P', '_BLOCK_C', '_COMBINE_P', '_COMBINE_C', '_MOMENT_P', '_MOMENT_C', '_WARPS')
    saved = {n: getattr(cbt, n) for n in names}
    for n, v in zip(names, (p, c, p, c, p, c, w)):
        setattr(cbt, n, v)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(cbt, n, v)


def make_layer(variant: str, channels: int, device: str) -> torch.nn.Module:
    """'bn', a CBN kernel name or 'triton@PxCwW'."""
    if variant == 'bn':
        return torch.nn.BatchNorm2d(channels).to(device)
    from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
    layer = CompoundBatchNorm2d(channels, COMPONENTS).to(device)
    layer.kernel = variant.split('@', 1)[0]
    return layer


def time_layer(variant: str, shape, mode: str, args, profile: int = 0) -> dict:
    dev = args.device
    torch._dynamo.reset()  # a fresh cache per layer: the recompile limit would otherwise fall back to eager
    layer = make_layer(variant, shape[0], dev)
    fn = torch.compile(layer, fullgraph=True, mode=args.compile_mode) if mode == 'compiled' else layer
    x = torch.randn(args.batch, *shape, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)

    def train():
        layer.train()
        xr = x.detach().requires_grad_()
        with torch.autocast(dev, dtype=torch.bfloat16):
            y = fn(xr)
        y.backward(g)

    def evaluate():
        layer.eval()
        with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
            fn(x)
    t = time.perf_counter()
    train()
    evaluate()
    sync(dev)
    row = {'first_call_s': time.perf_counter() - t}
    for name, call in (('train', train), ('eval', evaluate)):
        ts = [timed_ms(call, dev) for _ in range(args.warmup + args.reps)][args.warmup:]
        row[f'{name}_ms'] = statistics.median(ts)
    if profile:
        row['profile'] = profile_kernels(train, profile, dev)
    return row


def measure(variants, shapes, args, out: dict, on_row=lambda: None) -> dict:
    """Fill ``out`` as {mode: {variant: {'C,H,W': row}}} for ``shapes``, calling ``on_row`` after each row."""
    for mode in args.modes:
        for variant in variants:
            for i, shape in enumerate(shapes):
                with triton_tiles(variant):
                    row = time_layer(variant, shape, mode, args,
                                     profile=args.profile if i == 0 and mode == 'compiled' else 0)
                out.setdefault(mode, {}).setdefault(variant, {})[','.join(map(str, shape))] = row
                on_row()
                print(f"{mode} {variant} {shape}: train {row['train_ms']:.3f} ms, eval {row['eval_ms']:.3f} ms, "
                      f"first call {row['first_call_s']:.1f} s", flush=True)
    return out


def base_tree(base: str, workdir: str) -> str:
    """A folder holding the ``lt_zoo`` package of ``base`` (a folder already, or a git revision)."""
    if os.path.isdir(os.path.join(base, 'lt_zoo')):
        return os.path.abspath(base)
    archive = subprocess.run(['git', 'archive', base, 'lt_zoo'], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"gpu_layer_speed.py: error: --base {base!r} is neither a folder with an lt_zoo/ package nor a git "
                 f"revision here ({archive.stderr.decode().strip()})")
    subprocess.run(['tar', '-x', '-C', workdir], input=archive.stdout, check=True)
    return workdir


def summarise(res: dict, counts: dict) -> None:
    """Per mode and variant: network ms (layers x ms over the timed shapes), and x BN where BN was timed."""
    for mode, variants in res['modes'].items():
        for variant, rows in variants.items():
            for phase in ('train', 'eval'):
                total = sum(counts[k] * r[f'{phase}_ms'] for k, r in rows.items())
                res['summary'].setdefault(mode, {}).setdefault(variant, {})[f'{phase}_network_ms'] = total
        bn = res['summary'].get(mode, {}).get('bn')
        for variant, s in res['summary'].get(mode, {}).items():
            for phase in ('train', 'eval'):
                s[f'{phase}_x_bn'] = s[f'{phase}_network_ms'] / bn[f'{phase}_network_ms'] if bn else None


def write_markdown(res: dict, path: str) -> None:
    env = res['environment']
    lines = ['# Norm layers of ResNet-50 on GPU: CBN formulations against BN', '',
             f"Command: `{res['command']}`.  {env['gpu']}, torch {env['torch']}, {env['date']}.  Batch {res['batch']}, "
             f"{res['size']}x{res['size']} input, bf16 maps in channels_last, M = {COMPONENTS}; median of "
             f"{res['reps']} "
             f"calls after {res['warmup']}.  The {len(res['shapes'])} timed shapes hold "
             f"{100 * res['covered']:.0f}% of the network's norm-layer elements; `network ms` = layers x ms over them.",
             '', '| mode | variant | train network ms | train x BN | eval network ms | eval x BN |',
             '|---|---|---|---|---|---|']
    fmt = lambda v: '-' if v is None else f'{v:.2f}'  # noqa: E731
    for mode, variants in res['summary'].items():
        for variant, s in variants.items():
            lines.append(f"| {mode} | {variant} | {s['train_network_ms']:.2f} | {fmt(s['train_x_bn'])} | "
                         f"{s['eval_network_ms']:.2f} | {fmt(s['eval_x_bn'])} |")
    lines += ['', '| mode | variant | shape (C,H,W) x layers | train ms | eval ms | first call s |',
              '|---|---|---|---|---|---|']
    for mode, variants in res['modes'].items():
        for variant, rows in variants.items():
            for k, r in rows.items():
                lines.append(f"| {mode} | {variant} | {k} x {res['counts'][k]} | {r['train_ms']:.3f} | "
                             f"{r['eval_ms']:.3f} | "
                             f"{r['first_call_s']:.1f} |")
    for mode, variants in res['modes'].items():
        for variant, rows in variants.items():
            for k, r in rows.items():
                if r.get('profile'):
                    lines += ['', f'## Kernels of one training call: {mode} {variant}, {k}', '',
                              '| kernel | calls | ms |', '|---|---|---|']
                    lines += [f"| `{p['kernel']}` | {p['calls']} | {p['ms']:.3f} |" for p in r['profile']]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--kernels', nargs='+', default=list(KERNELS), choices=KERNELS,
                    help='CBN formulations to time (CompoundBatchNorm2d.kernel)')
    ap.add_argument('--modes', nargs='+', default=['eager', 'compiled'], choices=['eager', 'compiled'])
    ap.add_argument('--top', type=int, default=5, help='time this many of the 12 shapes, the largest first')
    ap.add_argument('--base', default=None, help='also time the CBN of this git revision or lt_zoo folder')
    ap.add_argument('--base_kernels', nargs='+', default=list(BASE_KERNELS), choices=KERNELS,
                    help='the formulations timed for --base (ones that revision has)')
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--reps', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--compile_mode', default='default', choices=COMPILE_MODES,
                    help="torch.compile's mode: 'reduce-overhead' replays CUDA graphs (no launch cost per kernel)")
    ap.add_argument('--profile', type=int, default=0, help='top GPU kernels of the largest shape, compiled (0: none)')
    ap.add_argument('--triton_tiles', nargs='*', default=[], metavar='PxCwW',
                    help="extra 'triton' variants with every pass at P positions x C channels, W warps (e.g. 64x32w4)")
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'], help='cpu: a dry run of this script')
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'gpu_layer_speed'),
                    help='output path without extension, relative to the repository root')
    ap.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # JSON path: a --base child writes here
    args = ap.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('gpu_layer_speed.py: error: no CUDA device visible to torch; run benchmarks/norm_speed.py for the CPU')
    if args.top < 1 or args.reps < 1 or args.warmup < 0 or args.profile < 0:
        sys.exit(f'gpu_layer_speed.py: error: --top {args.top}, --reps {args.reps}, --warmup {args.warmup}, --profile '
                 f'{args.profile}; expected top >= 1, reps >= 1, warmup >= 0, profile >= 0')
    bad = [t for t in args.triton_tiles if parse_tiles(t) is None]
    if bad:
        sys.exit(f'gpu_layer_speed.py: error: --triton_tiles {" ".join(bad)}: expected PxCwW with P and C powers of '
                 f'two in 16..256 and W a power of two in 1..16 (e.g. 64x32w4)')
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    if args.worker:
        with open(args.worker, 'w') as f:
            json.dump(measure(args.kernels, pick_shapes(resnet50_norm_shapes(args.size), args.top)[0], args, {}), f)
        return
    workdir = tempfile.mkdtemp()
    base = base_tree(args.base, workdir) if args.base else None  # refuses a bad --base before any timing
    counts = resnet50_norm_shapes(args.size)
    shapes, covered = pick_shapes(counts, args.top)
    res = {'command': 'python benchmarks/gpu_layer_speed.py ' + ' '.join(sys.argv[1:]), 'batch': args.batch,
           'size': args.size, 'reps': args.reps, 'warmup': args.warmup, 'device': args.device,
           'shapes': [list(s) for s in shapes], 'covered': covered,
           'counts': {','.join(map(str, s)): counts[s] for s in shapes}, 'modes': {}, 'summary': {},
           'environment': {'gpu': torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (dry run)',
                           'torch': torch.__version__, 'python': platform.python_version(),
                           'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}}
    out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    def save():  # after every timed layer: a time limit keeps what was measured
        res['summary'] = {}
        summarise(res, res['counts'])
        with open(out + '.json', 'w') as f:
            json.dump(res, f, indent=2)
        write_markdown(res, out + '.md')

    try:
        measure(['bn', *args.kernels, *(f'triton@{t}' for t in args.triton_tiles)], shapes, args, res['modes'], save)
        if base:
            child = os.path.join(workdir, 'base.json')
            path = os.pathsep.join([base] + [p for p in [os.environ.get('PYTHONPATH')] if p])
            subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--kernels', *args.base_kernels,
                            '--worker', child],
                           env=dict(os.environ, PYTHONPATH=path), check=True)
            with open(child) as f:
                for mode, variants in json.load(f).items():
                    for variant, rows in variants.items():
                        res['modes'].setdefault(mode, {})[f'base:{variant}'] = rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    save()
    print(open(out + '.md').read())


if __name__ == '__main__':
    main()
