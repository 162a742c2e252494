#!/usr/bin/env python
"""Accuracy benchmark on Fashion-MNIST-LT (imbalance factor 100): every method, same budget and seed.

Runs ``train/train.py`` once per method with ``train/configs/fmnist_lt/<method>.yaml`` (ResNet-32 variants,
the epochs of ``fmnist_lt/_base.yaml`` for every stage-1 method), then writes a results table:

    benchmarks/results/fmnist_lt.json   per method: top-1, balanced accuracy, many/medium/few, ECE, wall time
    benchmarks/results/fmnist_lt.md     the same as a markdown table, plus the gap closed vs CE
    benchmarks/results/fmnist_lt_runs/<method>/   each run's eval.json, config.yaml, metrics.jsonl, config.json

    python benchmarks/fmnist_lt.py [--methods ce balanced_softmax ...] [--jobs 2] [--epochs N]

``--jobs 2`` runs two trainings at a time (one thread each); stage-2 methods wait for their stage 1.
Wall times are measured under that concurrency and say so in the table.  CE on a class-balanced subset
of the same total size (``ce_balanced``) is the upper reference.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'train' / 'configs' / 'fmnist_lt'
RESULTS = ROOT / 'benchmarks' / 'results'
# method -> (label in the table, the stage-1 method it starts from)
METHODS = {
    'ce': ('CE', None),
    'balanced_softmax': ('Balanced Softmax', None),
    'logit_adjust': ('Logit-adjusted CE', None),
    'ldam_drw': ('LDAM-DRW', None),
    'gcl': ('GCL stage 1', None),
    'gcl_crt': ('GCL + cRT (CBEN)', 'gcl'),
    'nbn': ('NBN (CE)', None),
    'cbn': ('CBN + dual path (BS)', None),
    'fsa': ('FSA (phase II on CE)', 'ce'),
    'ce_balanced': ('CE on a balanced subset (reference)', None),
}
DEFAULT = ['ce', 'balanced_softmax', 'ldam_drw', 'gcl', 'gcl_crt', 'nbn', 'cbn', 'fsa', 'ce_balanced']


def run_method(method, args, log_dir):
    cmd = [sys.executable, 'train/train.py', '--config', str((CONFIGS / f'{method}.yaml').relative_to(ROOT)),
           '--output_dir', f'{args.runs}/{method}', '--overwrite', '--progress', 'false',
           '--eval_every', str(args.eval_every)]
    if args.epochs is not None and METHODS[method][1] is None:
        cmd += ['--epochs', str(args.epochs)]
    if METHODS[method][1] is not None:
        cmd += ['--stage1_dir', f'{args.runs}/{METHODS[method][1]}']
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.time()
    with open(log_dir / f'{method}.log', 'w') as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f'{method}: exit {rc} after {time.time() - start:.0f} s ({" ".join(cmd[1:])})', flush=True)
    if rc != 0:
        raise RuntimeError(f'{method} failed; see {log_dir / (method + ".log")}')
    return method


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--methods', nargs='+', default=DEFAULT, choices=sorted(METHODS))
    ap.add_argument('--jobs', type=int, default=2, help='trainings run at the same time')
    ap.add_argument('--threads', type=int, default=1, help='torch threads per training')
    ap.add_argument('--epochs', type=int, default=None, help='override the stage-1 epochs of every method')
    ap.add_argument('--eval_every', type=int, default=4)
    ap.add_argument('--runs', default='runs/fmnist_lt', help='parent of the run directories')
    ap.add_argument('--report_only', action='store_true', help='only rebuild the table from existing runs')
    args = ap.parse_args()
    log_dir = ROOT / args.runs / 'logs'
    log_dir.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        first = [m for m in args.methods if METHODS[m][1] is None]
        second = [m for m in args.methods if METHODS[m][1] is not None]
        # the dual-path CBN run is the longest (four passes per step): start it first; then the stage-1
        # runs that stage-2 methods need, so their dependants can start early
        first.sort(key=lambda m: (m != 'cbn', m not in {METHODS[s][1] for s in second}))
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {m: pool.submit(run_method, m, args, log_dir) for m in first}
            later = []
            for m in second:
                dep = futures.get(METHODS[m][1])
                if dep is not None:
                    later.append(pool.submit(lambda m=m, dep=dep: (dep.result(), run_method(m, args, log_dir))))
                else:
                    later.append(pool.submit(run_method, m, args, log_dir))
            for f in list(futures.values()) + later:
                f.result()
    write_report(args)


def write_report(args):
    rows = []
    for m in args.methods:
        path = ROOT / args.runs / m / 'eval.json'
        if not path.exists():
            raise FileNotFoundError(f'{path} is missing: run the benchmark for {m!r} first')
        ev = json.loads(path.read_text())
        rows.append(dict(method=m, label=METHODS[m][0], top1=ev['top1'], balanced_acc=ev['balanced_acc'],
                         many=ev['many'], medium=ev['medium'], few=ev['few'], ece=ev['ece'],
                         wall_time_s=ev['wall_time_s'], command=ev['command'], train_images=ev['train_images'],
                         indices_hash=ev['long_tail'].get('indices_hash')))
    by = {r['method']: r for r in rows}
    gap = None
    if 'ce' in by and 'ce_balanced' in by:
        lo, hi = by['ce']['balanced_acc'], by['ce_balanced']['balanced_acc']
        for r in rows:
            r['gap_closed'] = (r['balanced_acc'] - lo) / (hi - lo) if hi > lo else None
        gap = hi - lo
    meta = dict(dataset='Fashion-MNIST-LT (exp profile, imbalance factor 100, Cao et al. selection, seed 0)',
                python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                jobs=args.jobs, threads_per_job=args.threads, command=' '.join(['python'] + sys.argv))
    RESULTS.mkdir(parents=True, exist_ok=True)
    for m in args.methods:  # the runs' own records, so every published number has a committed source
        keep = RESULTS / 'fmnist_lt_runs' / m
        keep.mkdir(parents=True, exist_ok=True)
        for name in ('eval.json', 'config.yaml', 'metrics.jsonl', 'config.json'):
            if (ROOT / args.runs / m / name).exists():  # stages without epochs (fsa, tau_norm) log no metrics
                shutil.copyfile(ROOT / args.runs / m / name, keep / name)
    (RESULTS / 'fmnist_lt.json').write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    pct = lambda v: '-' if v is None else f'{100 * v:.2f}'
    lines = ['# Fashion-MNIST-LT benchmark', '',
             f"{meta['dataset']}; ResNet-32 variants; balanced 10,000-image test set. "
             f"Produced by `{meta['command']}` on {meta['cpu_count']} CPU cores "
             f"({meta['jobs']} runs at a time, {meta['threads_per_job']} thread(s) each).", '',
             '| method | top-1 | balanced acc | many | medium | few | ECE | gap closed | wall time (s) |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        gc = r.get('gap_closed')
        lines.append(f"| {r['label']} | {pct(r['top1'])} | {pct(r['balanced_acc'])} | {pct(r['many'])} | "
                     f"{pct(r['medium'])} | {pct(r['few'])} | {pct(r['ece'])} | "
                     f"{'-' if gc is None else f'{100 * gc:.0f}%'} | {r['wall_time_s']:.0f} |")
    if gap is not None:
        lines += ['', f"Gap closed = (balanced acc - CE) / (CE on the balanced subset - CE); the gap is "
                      f"{100 * gap:.2f} points of balanced accuracy."]
    lines += ['', 'Commands (from each run\'s eval.json):', '']
    lines += [f"- {r['label']}: `{r['command']}`" for r in rows]
    (RESULTS / 'fmnist_lt.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
