"""One GPU session in one prepared command: GPU throughput and the papers' 200-epoch rows.

A lent GPU machine (docs/benchmark.md#a-gpu-session-in-one-command) has PyTorch, timm and Accelerate
but not Hugging Face ``datasets``, no internet and no Fashion-MNIST, and a session gets about 15
minutes of it, start-up included.  So everything it needs travels with the working tree, and one
command does the work:

    python benchmarks/gpu_session.py prepare                    # here: fills .device/ (git-ignored)
    python3 benchmarks/gpu_session.py run --out "$OUT"         # there: the device command, carry .device

``prepare`` downloads the wheels of the packages the device image lacks, for its Python 3.12, at the
versions installed here (``datasets`` and its ``dill`` and ``multiprocess``; ``timm``, since the image's
may be older than lt_zoo needs), copies Fashion-MNIST's four IDX files, ignores ``.device/`` through
``.git/info/exclude`` and prints the command and the carry list.

``prepare --base REV`` also extracts ``lt_zoo/`` of git revision REV into ``.device/base`` (the device
copy of the tree has no git history), for the layer comparison's ``--base``.

``run`` installs the wheels into /tmp/site, puts the IDX files where the loader looks first, prints the
versions it found, runs the GPU checks of ``--checks`` in this order: ``layer``
(``benchmarks/gpu_layer_speed.py --kernels triton pointwise gemm --triton_tiles 32x32w4 64x16w8 --top 3
--profile 10``, with ``--base .device/base`` when staged; at most three minutes), ``exactness`` (``benchmarks/gpu_exactness.py``, the
layer's own kernel and 'triton'; at most three) and ``speed`` (``benchmarks/gpu_speed.py --models bn cbn_m4
--cbn_kernels triton auto``, at most ``--speed_minutes``), then the benchmark
runner at ``--epochs`` for ``--rows`` and ``--seeds`` until ``--minutes`` are spent, rebuilds that
budget's tables and packs every result file into ``$OUT/results.tar.gz``.  Unpack it in the repository
root (``tar -xzf <files_at>/results.tar.gz``): finished pairs land as records under
``benchmarks/results/fmnist_lt_e<N>_runs/``, unfinished ones as their metrics.jsonl under
``.device/progress/``.  Pairs already recorded are skipped, as everywhere in the runner, so the next
session continues where this one stopped.

Standard library only: ``run`` starts before the wheels are installed.
"""
import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = os.path.join(ROOT, '.device')
WHEELS = os.path.join(STAGE, 'whl')
FMNIST_STAGE = os.path.join(STAGE, 'fashion-mnist')
# where lt_zoo's Fashion-MNIST loader looks first (Debian's dataset-fashion-mnist)
FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
FMNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
                't10k-labels-idx1-ubyte.gz')
# what the device image lacks (docs/benchmark.md#a-gpu-session-in-one-command), wheels at this machine's versions
DEVICE_PACKAGES = ('datasets', 'dill', 'multiprocess', 'timm')
DEVICE_PYTHON = '3.12'
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64',
             'manylinux1_x86_64')
# the working tree travels with its carried paths up to 64 MiB (the device tool's limit)
TRAVEL_LIMIT = 64 * 2 ** 20
# the cheap rows first, so that a short session still records a comparison: BN, the CBN layer, CE
DEFAULT_ROWS = ('balanced_softmax', 'bs_aa', 'bs_aa_cbn', 'ce')
# the GPU checks: (name, command after the interpreter, limit in s; None: --speed_minutes, extra environment).
# Limits from the H200 sessions of 2026-12-04: exactness ran in 28 s, a layer compiles in seconds, the
# whole CBN network in 124 s on one host and in over 300 s on another (docs/benchmark.md).
CHECKS = (
    # lt_zoo's Triton passes first: the formulation no GPU has timed yet (docs/compound_bn_numerics.md)
    # (and at two other tiles, which compile without spilling: python benchmarks/triton_resources.py --tiles)
    ('layer', ['benchmarks/gpu_layer_speed.py', '--kernels', 'triton', 'pointwise', 'gemm', '--triton_tiles', '32x32w4',
               '64x16w8', '--top', '3', '--profile', '10'], 180, {}),
    # float64 reference on the CPU: LT_ZOO_NATIVE=0, so no C++ build there
    ('exactness', ['benchmarks/gpu_exactness.py'], 180, {'LT_ZOO_NATIVE': '0'}),
    ('speed', ['benchmarks/gpu_speed.py', '--models', 'bn', 'cbn_m4', '--cbn_kernels', 'triton', 'auto'], None, {}),
)
BASE = os.path.join(STAGE, 'base')


def _tree_bytes() -> int:
    files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b'\0')
    return sum(os.path.getsize(os.path.join(ROOT, f.decode())) for f in files
               if f and os.path.isfile(os.path.join(ROOT, f.decode())))


def stage_base(rev: str, dest: str = BASE) -> str:
    """``lt_zoo/`` of git revision ``rev`` in ``dest`` (replaced), with the revision in ``dest``/REV."""
    archive = subprocess.run(['git', 'archive', rev, 'lt_zoo'], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"gpu_session.py prepare: error: --base {rev!r} is not a git revision here "
                 f"({archive.stderr.decode().strip()})")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    subprocess.run(['tar', '-x', '-C', dest], input=archive.stdout, check=True)
    with open(os.path.join(dest, 'REV'), 'w') as f:
        f.write(rev + '\n')
    return dest


def prepare(args) -> None:
    src = args.fmnist_dir
    missing = [f for f in FMNIST_FILES if not os.path.isfile(os.path.join(src, f))]
    if missing:
        sys.exit(f"gpu_session.py prepare: error: --fmnist_dir {src!r} lacks {', '.join(missing)}; expected "
                 f"Fashion-MNIST's four IDX files (apt-get install dataset-fashion-mnist puts them in {FMNIST_DIR})")
    versions = {}
    for name in DEVICE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"gpu_session.py prepare: error: {name} is not installed here; run bash .ci/setup first")
    if args.base:
        stage_base(args.base)
    shutil.rmtree(WHEELS, ignore_errors=True)
    os.makedirs(WHEELS)
    cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--disable-pip-version-check', '--no-deps',
           '--only-binary=:all:', '--python-version', DEVICE_PYTHON, '--implementation', 'cp', '-d', WHEELS]
    for p in PLATFORMS:
        cmd += ['--platform', p]
    subprocess.run(cmd + [f'{n}=={v}' for n, v in versions.items()], check=True)
    os.makedirs(FMNIST_STAGE, exist_ok=True)
    for f in FMNIST_FILES:
        shutil.copy2(os.path.join(src, f), os.path.join(FMNIST_STAGE, f))
    exclude = os.path.join(ROOT, '.git', 'info', 'exclude')
    if os.path.isdir(os.path.dirname(exclude)):
        lines = open(exclude).read().splitlines() if os.path.exists(exclude) else []
        if '/.device/' not in lines:
            with open(exclude, 'a') as fh:
                fh.write('/.device/\n')
    staged = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(STAGE) for f in fs)
    total = _tree_bytes() + staged
    print(f"staged {len(os.listdir(WHEELS))} wheels ({', '.join(f'{n} {v}' for n, v in versions.items())}) and "
          f"Fashion-MNIST in .device/: {staged / 2 ** 20:.1f} MiB; with the working tree {total / 2 ** 20:.1f} MiB "
          f"of the {TRAVEL_LIMIT // 2 ** 20} MiB that may travel")
    if total > TRAVEL_LIMIT:
        sys.exit('gpu_session.py prepare: error: the working tree and .device/ exceed what may travel; remove '
                 'untracked files from the working tree')
    print('device command:  python3 benchmarks/gpu_session.py run --out "$OUT"\ncarry:           [".device"]')


def _run_logged(cmd, log_path, env, timeout_s):
    """Run cmd in its own process group with output to log_path; on timeout kill the whole group (the
    runner's trainings too).  Returns the exit code, or None when the time ran out."""
    with open(log_path, 'a') as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.write(f"(stopped after {timeout_s:.0f} s: the session's budget)\n")
            return None


def pack(root: str, out: str, epochs: int) -> str:
    """$OUT/results.tar.gz, paths relative to root: gpu_speed.*, the tables of budget ``epochs`` with their
    curves, its records, and the metrics.jsonl of every pair in ``runs/bench_e<epochs>`` without a record
    (as .device/progress/e<epochs>/<row>/seed<k>/metrics.jsonl)."""
    results = os.path.join(root, 'benchmarks', 'results')
    runs = os.path.join(root, 'runs', f'bench_e{epochs}')
    paths = ([p for name in ('gpu_speed', 'gpu_exactness', 'gpu_layer_speed')
              for p in glob.glob(os.path.join(results, f'{name}.*'))]
             + glob.glob(os.path.join(results, f'*_e{epochs}.*'))
             + glob.glob(os.path.join(results, f'*_e{epochs}_curves.png')))
    records = os.path.join(results, f'fmnist_lt_e{epochs}_runs')
    archive = os.path.join(out, 'results.tar.gz')
    with tarfile.open(archive, 'w:gz') as tar:
        for p in sorted(paths) + ([records] if os.path.isdir(records) else []):
            tar.add(p, arcname=os.path.relpath(p, root))
        # progress of unfinished pairs: their metrics, where no record was written
        for m in sorted(glob.glob(os.path.join(runs, '*', 'seed*', 'metrics.jsonl'))):
            row, seed = m.split(os.sep)[-3:-1]
            if not os.path.exists(os.path.join(records, row, seed, 'eval.json')):
                tar.add(m, arcname=os.path.join('.device', 'progress', f'e{epochs}', row, seed, 'metrics.jsonl'))
    return archive


def run(args) -> None:
    start = time.monotonic()
    if not args.out:
        sys.exit('gpu_session.py run: error: --out is empty; expected the device tool\'s $OUT folder')
    if not os.path.isdir(args.out):
        sys.exit(f'gpu_session.py run: error: --out {args.out!r} is not a folder')
    if args.minutes <= 1 or not 0 <= args.speed_minutes < args.minutes:
        sys.exit(f'gpu_session.py run: error: --minutes {args.minutes} and --speed_minutes {args.speed_minutes}; '
                 f'expected minutes > 1 and 0 <= speed_minutes < minutes')
    if args.epochs < 1:
        sys.exit(f'gpu_session.py run: error: --epochs {args.epochs}; expected a positive number of epochs')
    log = os.path.join(args.out, 'session.log')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    wheels = sorted(glob.glob(os.path.join(WHEELS, '*.whl')))
    if wheels:
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                        '--no-cache-dir', '--upgrade', '--target', '/tmp/site'] + wheels, check=True)
        env['PYTHONPATH'] = os.pathsep.join(['/tmp/site', ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    else:
        env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    staged = [f for f in FMNIST_FILES if os.path.isfile(os.path.join(FMNIST_STAGE, f))]
    if not all(os.path.isfile(os.path.join(FMNIST_DIR, f)) for f in FMNIST_FILES):
        if len(staged) != len(FMNIST_FILES):
            sys.exit(f'gpu_session.py run: error: Fashion-MNIST is neither in {FMNIST_DIR} nor staged in .device/; '
                     f'run `python benchmarks/gpu_session.py prepare` here and carry .device')
        os.makedirs(FMNIST_DIR, exist_ok=True)
        for f in FMNIST_FILES:
            shutil.copy2(os.path.join(FMNIST_STAGE, f), os.path.join(FMNIST_DIR, f))
    probe = ("import torch, timm, datasets, accelerate, lt_zoo; "
             "print('torch', torch.__version__, '| timm', timm.__version__, '| datasets', datasets.__version__, "
             "'| accelerate', accelerate.__version__, '| cuda:', torch.cuda.get_device_name() "
             "if torch.cuda.is_available() else 'none')")
    found = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=env, capture_output=True, text=True)
    print(found.stdout.strip() or found.stderr.strip().splitlines()[-1], flush=True)
    if found.returncode:
        sys.exit('gpu_session.py run: error: the packages above do not import; see the message')

    # the runner checks the row ids and prints what it will train, before any device minute goes to speed
    plan = [sys.executable, 'benchmarks/fmnist_lt.py', '--epochs', str(args.epochs), '--runs_only', *args.rows,
            '--seeds', *map(str, args.seeds), '--jobs', str(args.jobs), '--threads', str(args.threads)]
    checked = subprocess.run(plan + ['--plan'], cwd=ROOT, env=env, capture_output=True, text=True)
    print(checked.stdout.strip() or checked.stderr.strip(), flush=True)
    if checked.returncode:
        sys.exit(f'gpu_session.py run: error: the runner refused --rows {" ".join(args.rows)} / --seeds '
                 f'{" ".join(map(str, args.seeds))} (above)')

    for name, cmd, limit, extra in CHECKS:
        if name not in args.checks or (name == 'speed' and args.speed_minutes <= 0):
            continue
        if name == 'layer' and os.path.isdir(os.path.join(BASE, 'lt_zoo')):
            cmd = cmd + ['--base', BASE]
        limit = args.speed_minutes * 60 if limit is None else limit
        rc = _run_logged([sys.executable, *cmd], log, dict(env, **extra), limit)
        print(f'{cmd[0]}: exit {rc}' if rc is not None else f'{cmd[0]}: stopped after {limit:.0f} s', flush=True)
    left = args.minutes * 60 - (time.monotonic() - start) - 60  # a minute for the tables and the archive
    if left >= 60:
        rc = _run_logged(plan, log, env, left)
        print(f'runner: exit {rc}' if rc is not None else 'runner: stopped at --minutes', flush=True)
    else:
        print(f'runner: skipped, {max(left, 0):.0f} s of --minutes left after the checks', flush=True)
    _run_logged([sys.executable, 'benchmarks/fmnist_lt.py', '--epochs', str(args.epochs), '--report_only'], log, env,
                60)
    archive = pack(ROOT, args.out, args.epochs)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    print(f'{archive}: {len(names)} entries; unpack in the repository root with tar -xzf', flush=True)
    with open(log) as fh:  # the tail comes back in the tool's output even when the files do not
        print(''.join(fh.readlines()[-40:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest='step', required=True)
    p = sub.add_parser('prepare', help='here: stage wheels and Fashion-MNIST in .device/')
    p.add_argument('--fmnist_dir', default=FMNIST_DIR, help='where Fashion-MNIST\'s IDX files are here')
    p.add_argument('--base', default=None, help='git revision whose lt_zoo/ the layer check times beside this '
                   'tree\'s (staged in .device/base)')
    r = sub.add_parser('run', help='on the GPU machine: throughput, then the rows at --epochs until --minutes')
    r.add_argument('--out', default=os.environ.get('OUT', ''), help='folder for session.log and results.tar.gz '
                   '($OUT of the device tool)')
    r.add_argument('--minutes', type=float, default=10.0, help='wall-clock budget of the whole command (the '
                   'device tool allows 10 per command and 15 per session, start-up included)')
    r.add_argument('--checks', nargs='*', default=[c[0] for c in CHECKS], choices=[c[0] for c in CHECKS],
                   help='GPU checks before the training rows (none: train only)')
    r.add_argument('--speed_minutes', type=float, default=4.0, help='at most this much of it for gpu_speed.py '
                   '(0: skip it)')
    r.add_argument('--epochs', type=int, default=200, help='the budget (200: the papers\')')
    r.add_argument('--rows', nargs='+', default=list(DEFAULT_ROWS), help='run ids of benchmarks/fmnist_lt.py')
    r.add_argument('--seeds', nargs='+', type=int, default=[0])
    r.add_argument('--jobs', type=int, default=4, help='trainings at the same time (one GPU, 16 cores)')
    r.add_argument('--threads', type=int, default=4, help='CPU threads per training (augmentation, loading)')
    args = ap.parse_args()
    prepare(args) if args.step == 'prepare' else run(args)


if __name__ == '__main__':
    main()
