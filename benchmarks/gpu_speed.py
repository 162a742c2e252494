"""GPU throughput of timm ResNet-50 with BN, NBN and CBN: training step and eval, eager and compiled.

    python benchmarks/gpu_speed.py [--batch 128] [--size 224] [--reps 20] [--warmup 5] [--modes eager compiled]

Models: ``timm.create_model('resnet50')``, ``'resnet50_nbn'``, ``'resnet50_cbn'`` (M = 4), 1000 classes,
channels_last, bf16 autocast, synthetic data (batch x 3 x size x size on the GPU, no loader).  Training
step = forward + cross-entropy + backward + SGD step; eval = forward under ``inference_mode``.  Per
mode the models are timed round-robin with CUDA events (one step of each per repetition); the first
step (compilation for ``torch.compile``) is timed separately.  Writes benchmarks/results/gpu_speed.json
and .md (relative paths, the command line recorded).  Without CUDA it exits with a one-line error.

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


def _ms(fn, device: str) -> float:
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


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def run_mode(mode: str, args) -> dict:
    import timm
    from torch._dynamo.utils import counters
    import lt_zoo  # noqa: F401  (registers resnet50_nbn / resnet50_cbn)
    dev = args.device
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    runners = {}
    for key, (arch, kw) in MODELS.items():
        model = timm.create_model(arch, num_classes=1000, **kw).to(dev, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runners[key] = _steps(torch.compile(model) if mode == 'compiled' else model, opt, x, y)
    out = {k: {'train_ms': [], 'eval_ms': []} for k in runners}
    for key, (train, evaluate) in runners.items():
        if dev == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        breaks = sum(counters['graph_break'].values())
        t = time.perf_counter()
        train()
        evaluate()
        _sync(dev)
        out[key]['first_step_s'] = time.perf_counter() - t
        out[key]['graph_breaks'] = sum(counters['graph_break'].values()) - breaks  # 0 in eager
        print(f"{mode} {key}: first training step and eval {out[key]['first_step_s']:.1f} s", flush=True)
        out[key]['max_memory_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == 'cuda' else None
    for rep in range(args.warmup + args.reps):
        for key, (train, evaluate) in runners.items():
            tr, ev = _ms(train, dev), _ms(evaluate, dev)
            if rep >= args.warmup:
                out[key]['train_ms'].append(tr)
                out[key]['eval_ms'].append(ev)
    res = {}
    for key, v in out.items():
        tr, ev = statistics.median(v['train_ms']), statistics.median(v['eval_ms'])
        res[key] = {'train_ms': tr, 'eval_ms': ev, 'train_img_s': 1e3 * args.batch / tr,
                    'eval_img_s': 1e3 * args.batch / ev, 'first_step_s': v['first_step_s'],
                    'max_memory_gib': v['max_memory_gib'], 'graph_breaks': v['graph_breaks']}
    for key in res:
        res[key]['train_x_bn'] = res[key]['train_ms'] / res['bn']['train_ms']
        res[key]['eval_x_bn'] = res[key]['eval_ms'] / res['bn']['eval_ms']
    return res


def write_markdown(res, path):
    env = res['environment']
    lines = ['# Norm-layer speed: ResNet-50 on GPU', '',
             f"Command: `{res['command']}`.  {env['gpu']}, torch {env['torch']}, {env['date']}.  Batch "
             f"{res['batch']}, {res['size']}x{res['size']}, bf16 autocast, channels_last, synthetic data, median "
             f"of {res['reps']} repetitions after {res['warmup']} warm-up, round-robin, "
             f"{'CUDA-event' if res.get('device', 'cuda') == 'cuda' else 'wall-clock (a CPU dry run, not a measurement)'} "
             f"timing.", '',
             '| mode | model | train img/s | train x BN | eval img/s | eval x BN | first step s | peak GiB (first step) | graph breaks |',
             '|---|---|---|---|---|---|---|---|---|']
    for mode, models in res['modes'].items():
        for k, v in models.items():
            lines.append(f"| {mode} | {k} | {v['train_img_s']:.0f} | {v['train_x_bn']:.2f} | {v['eval_img_s']:.0f} | "
                         f"{v['eval_x_bn']:.2f} | {v['first_step_s']:.1f} | "
                         f"{'-' if v['max_memory_gib'] is None else format(v['max_memory_gib'], '.1f')} | "
                         f"{v['graph_breaks']} |")
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--reps', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--modes', nargs='+', default=['eager', 'compiled'], choices=['eager', 'compiled'])
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'],
                    help="cpu: a dry run of the code paths (not a measurement); give it a small --size and --out")
    ap.add_argument('--out', default=os.path.join('benchmarks', 'results', 'gpu_speed'),
                    help='output path without extension, relative to the repository root')
    args = ap.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('gpu_speed.py: error: no CUDA device visible to torch; run benchmarks/norm_speed.py for the CPU')
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    res = {'command': 'python benchmarks/gpu_speed.py ' + ' '.join(sys.argv[1:]), 'batch': args.batch,
           'size': args.size, 'reps': args.reps, 'warmup': args.warmup, 'modes': {},
           'device': args.device,
           'environment': {'gpu': torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (dry run)', 'torch': torch.__version__,
                           'python': platform.python_version(),
                           'date': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}}
    out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for mode in args.modes:
        res['modes'][mode] = run_mode(mode, args)
        with open(out + '.json', 'w') as f:  # after every mode: a compile failure keeps the eager numbers
            json.dump(res, f, indent=2)
        write_markdown(res, out + '.md')
        for k, v in res['modes'][mode].items():
            print(f"{mode:8s} {k:7s} train {v['train_img_s']:.0f} img/s ({v['train_x_bn']:.2f}x BN)  "
                  f"eval {v['eval_img_s']:.0f} img/s ({v['eval_x_bn']:.2f}x BN)")


if __name__ == '__main__':
    main()
