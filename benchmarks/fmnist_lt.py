#!/usr/bin/env python
"""Fashion-MNIST-LT benchmark: every method and the CBN ablation, several seeds, resumable.

The protocol is ``train/configs/fmnist_lt/_base.yaml`` (exponential profile, imbalance factor 100, the
fixed Cao et al. split with ``lt_seed: 0``; input size, epochs and schedule chosen so that CE and Balanced
Softmax plateau, see ``docs/benchmark.md``).  A seed changes initialisation, augmentation and sampling
(the ``seed`` key), never the long-tailed split.

Every (run, seed) pair trains once.  A pair is skipped when its committed record
``benchmarks/results/fmnist_lt_runs/<run>/seed<k>/eval.json`` exists and was made under the same
protocol (the record stores a fingerprint of the resolved config); an interrupted pair resumes from the
latest checkpoint of its run directory; stage-2 runs wait for their stage-1 run of the same seed.

    python benchmarks/fmnist_lt.py                          # everything missing, 2 jobs x 1 thread
    python benchmarks/fmnist_lt.py --tables cbn_ablation --seeds 0 1 2
    python benchmarks/fmnist_lt.py --report_only            # rebuild the tables from the records
    python benchmarks/fmnist_lt.py --plan                   # what is left to train, and what it costs
    python benchmarks/fmnist_lt.py --epochs 200 --jobs 1    # the papers' budget (a GPU): records and tables apart

Outputs: ``benchmarks/results/<table>.json`` and ``.md`` for the tables ``fmnist_lt`` (the method table)
and ``cbn_ablation`` (shaped like Table 2 of Cheng et al., ACM MM'22, plus CBN's open design choices),
and the per-run records (eval.json without the per-class lists' duplicates, config.yaml, metrics.jsonl).
"""
import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path('train/configs/fmnist_lt')
RESULTS = Path('benchmarks/results')
RECORD_FILES = ('eval.json', 'config.yaml', 'metrics.jsonl')

# run id -> (label, method config under train/configs/fmnist_lt, overrides, stage-1 run id or None).
# Overrides are plain config keys (train/train.py --help).
_AA = {'train_aug': 'strong'}  # the single-view AutoAugment baseline of CBN's Table 2


def _protocol_epochs() -> int:
    """The protocol's budget, read from its config (one source: a v4 changes the YAML, not this file)."""
    import yaml
    return int(yaml.safe_load((ROOT / CONFIGS / '_base.yaml').read_text())['epochs'])


# Set by configure(): the budget (the protocol's epochs unless --epochs), the plateau's shorter budget (80%),
# and where records and tables go (another budget keeps its own, suffixed _e<epochs>).
PROTOCOL_EPOCHS = SHORT_EPOCHS = None
BUDGET = None  # None: the protocol's own budget; else the epochs of another one (--epochs)
SUFFIX = ''
RECORDS = RESULTS / 'fmnist_lt_runs'
_RUNS = {
    'ce': ('CE', 'ce.yaml', {}, None),
    'balanced_softmax': ('Balanced Softmax', 'balanced_softmax.yaml', {}, None),
    'logit_adjust': ('Logit-adjusted CE', 'logit_adjust.yaml', {}, None),
    'ldam_drw': ('LDAM-DRW', 'ldam_drw.yaml', {}, None),
    'gcl': ('GCL stage 1', 'gcl.yaml', {}, None),
    'gcl_crt': ('GCL + cRT (CBEN)', 'gcl_crt.yaml', {}, 'gcl'),
    'nbn': ('NBN (CE)', 'nbn.yaml', {}, None),
    'fsa': ('FSA (phase II on CE)', 'fsa.yaml', {}, 'ce'),
    'ce_balanced': ('CE on a balanced subset (reference)', 'ce_balanced.yaml', {}, None),
    # GCL at a short budget: the official recipe keeps mixup (alpha 1) on for 200 epochs; these rows
    # separate the cost of mixup from the cost of the Gaussian clouds
    'ce_mixup': ('CE + mixup (alpha 1)', 'ce.yaml', {'mixup_alpha': 1.0}, None),
    'gcl_nomix': ('GCL stage 1 without mixup', 'variants/gcl_nomix.yaml', {}, None),
    'gcl_nomix_crt': ('GCL without mixup + cRT (CBEN)', 'variants/gcl_nomix_crt.yaml', {}, 'gcl_nomix'),
    # CBN ablation, Table 2 of Cheng et al.: each row adds one part to the one above
    'bs_aa': ('BS + AutoAugment', 'balanced_softmax.yaml', _AA, None),
    'bs_aa_cbn': ('+ CBN', 'balanced_softmax.yaml', dict(_AA, model='resnet32_cbn'), None),
    'bs_aa_cbn_sbn': ('+ split BN path (SBN)', 'cbn.yaml',
                      dict(dual_cls_views=['strong'], consistency_weight=0.0), None),
    'cbn': ('+ dual-path learning (DPL) = CBN', 'cbn.yaml', {}, None),
    # CBN's open design choices, each on the layer alone (bs_aa_cbn) unless it concerns the dual path
    'cbn_m1': ('CBN, M = 1 (equals BN: sanity row)', 'balanced_softmax.yaml',
               dict(_AA, model='resnet32_cbn', model_kwargs={'num_components': 1}), None),
    'cbn_m4': ('CBN, M = 4 (the paper\'s best; the default up to protocol v3)', 'balanced_softmax.yaml',
               dict(_AA, model='resnet32_cbn', model_kwargs={'num_components': 4}), None),
    'cbn_t_channels': ('CBN, temperature = C', 'balanced_softmax.yaml',
                       dict(_AA, model='resnet32_cbn', model_kwargs={'temperature': 'channels'}), None),
    'cbn_dpl_once': ('CBN + DPL, running statistics updated once per step', 'cbn.yaml',
                     {'dual_stat_updates': 'once'}, None),
}
# Options the trainer refuses (measured not to train from scratch): not rows; the evidence is a table of an
# earlier protocol (docs/benchmark.md).
NOT_ROWS = {
    '`train_stats: running` (the running statistics normalise in training)':
        'the loss becomes NaN within tens of steps at lr 0.1 (docs/compound_bn_numerics.md)',
    '`responsibility_grad: true` (gradients through the responsibilities)':
        'under protocol v3 its seed 0 diverged, loss 475 at epoch 4 and 41.1% at the end '
        '(benchmarks/results/v3_25_epochs/cbn_ablation.md)',
}
_TABLES = {
    'fmnist_lt': ['ce', 'balanced_softmax', 'ldam_drw', 'gcl', 'gcl_crt', 'gcl_nomix_crt', 'nbn', 'cbn', 'fsa',
                  'ce_balanced'],
    'cbn_ablation': ['balanced_softmax', 'bs_aa', 'bs_aa_cbn', 'bs_aa_cbn_sbn', 'cbn', 'cbn_m1', 'cbn_m4',
                     'cbn_t_channels', 'cbn_dpl_once'],
    'gcl_diagnosis': ['ce', 'ce_mixup', 'gcl', 'gcl_nomix', 'gcl_crt', 'gcl_nomix_crt'],
}


def configure(epochs=None) -> None:
    """Set the budget: the protocol's own (None, or its config's epochs) or another one, such as the papers'
    200 epochs on a GPU.  Another budget adds ``--epochs N`` to every stage-1 run (a stage 2 keeps its own
    few epochs) and moves LDAM-DRW's re-weighting to epoch 0.8 N; it keeps its records in
    ``benchmarks/results/fmnist_lt_e<N>_runs/`` and writes its tables as ``<table>_e<N>``.  The plateau rows
    train 80% of whichever budget is set."""
    global PROTOCOL_EPOCHS, SHORT_EPOCHS, BUDGET, SUFFIX, RECORDS, PLATEAU_PAIRS, RUNS, TABLES, SUMMARY_ORDER
    own = _protocol_epochs()
    BUDGET = None if epochs in (None, own) else int(epochs)
    PROTOCOL_EPOCHS = BUDGET or own
    SHORT_EPOCHS = round(0.8 * PROTOCOL_EPOCHS)  # 40 of 50: the plateau compares the budget with its first 80%
    SUFFIX = f'_e{BUDGET}' if BUDGET else ''
    RECORDS = RESULTS / f'fmnist_lt{SUFFIX}_runs'
    # row -> the same row at SHORT_EPOCHS (the schedule shrinks with the budget): the gain the plateau target
    # judges (docs/benchmark.md#the-plateau-criterion-under-a-cosine-schedule)
    PLATEAU_PAIRS = {'ce': f'ce_e{SHORT_EPOCHS}', 'balanced_softmax': f'bs_e{SHORT_EPOCHS}'}
    RUNS = dict(_RUNS, **{f'{short}_e{SHORT_EPOCHS}': (f'{label}, {SHORT_EPOCHS} epochs', config,
                                                        {'epochs': SHORT_EPOCHS}, None)
                          for short, label, config in (('ce', 'CE', 'ce.yaml'),
                                                       ('bs', 'Balanced Softmax', 'balanced_softmax.yaml'))})
    if BUDGET:  # LDAM-DRW re-weights from 80% of the budget on; its config names the protocol's epoch (40)
        import yaml
        label, config, overrides, stage1 = RUNS['ldam_drw']
        kw = yaml.safe_load((ROOT / CONFIGS / config).read_text())['loss_kwargs']
        RUNS['ldam_drw'] = (label, config, dict(overrides, loss_kwargs=dict(kw, drw_epoch=SHORT_EPOCHS)), stage1)
    TABLES = dict(_TABLES, plateau=[f'ce_e{SHORT_EPOCHS}', 'ce', f'bs_e{SHORT_EPOCHS}', 'balanced_softmax'])
    SUMMARY_ORDER = ['ce', f'ce_e{SHORT_EPOCHS}', 'balanced_softmax', f'bs_e{SHORT_EPOCHS}'] + _SUMMARY_ORDER


# Table ids of the CBN ablation rows, as the issue and the paper name them.
ABLATION_IDS = {'balanced_softmax': 'bs', 'cbn': 'bs_aa_cbn_sbn_dpl'}
RUNS_BY_ID = {v: k for k, v in ABLATION_IDS.items()}
# Keys that do not change what a run computes (where it writes, how it reports).
_NOT_PROTOCOL = {'output_dir', 'overwrite', 'resume', 'progress', 'stop_after_epoch', 'log_with', 'stage1_dir',
                 'save_checkpoints', 'keep_checkpoints', 'num_workers', 'command',
                 'cbn_kernel'}  # how CBN is computed (equal to rounding), added after records were made


def run_dir(args, run, seed) -> Path:
    return Path(args.runs) / run / f'seed{seed}'


def record_dir(run, seed) -> Path:
    return RECORDS / run / f'seed{seed}'


def overrides_argv(overrides) -> list:
    return [x for k, v in overrides.items() for x in (f'--{k}', json.dumps(v) if not isinstance(v, str) else v)]


def resolved_config(run, seed, args) -> dict:
    """The run's config as train/train.py resolves it (defaults, YAML bases, overrides)."""
    from lt_zoo.training.config import load_config  # light import: argparse + yaml
    cfg = load_config(command_argv(run, seed, args, for_fingerprint=True))
    return cfg if isinstance(cfg, dict) else cfg.to_dict()


# Bumped when a change outside the config changes what a run computes.  3: CIFAR ResNets no longer
# zero-initialise the last norm of each block (with option-A shortcuts that left the padded channels
# dead, docs/models.md#decision-cifar-initialisation).  4: the CBN layer's default M is 2 (it was 4); with it
# the budget went from 25 to 50 epochs (a config change, which the fingerprint sees on its own).  Records of
# an earlier version are void; v3's tables are kept in benchmarks/results/v3_25_epochs/.
PROTOCOL_VERSION = 4


def fingerprint(cfg: dict) -> str:
    kept = {k: v for k, v in sorted(cfg.items()) if k not in _NOT_PROTOCOL}
    kept['protocol_version'] = PROTOCOL_VERSION
    if BUDGET:  # a stage 2 resolves to the same config at any budget; its stage 1 does not
        kept['budget_epochs'] = BUDGET
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def command_argv(run, seed, args, for_fingerprint=False) -> list:
    label, config, overrides, stage1 = RUNS[run]
    argv = ['--config', str(CONFIGS / config), '--seed', str(seed), '--progress', 'false',
            '--output_dir', str(run_dir(args, run, seed))]
    if stage1 is not None:
        argv += ['--stage1_dir', str(run_dir(args, stage1, seed))]
    if args.eval_every:
        argv += ['--eval_every', str(args.eval_every)]
    if args.compile:
        argv += ['--compile', 'true']
    if BUDGET and 'epochs' not in overrides and stage1 is None:
        argv += ['--epochs', str(BUDGET)]
    return argv + overrides_argv(overrides)


def is_recorded(run, seed, fp) -> bool:
    path = ROOT / record_dir(run, seed) / 'eval.json'
    return path.exists() and json.loads(path.read_text()).get('protocol_fingerprint') == fp


def protocol_diff(have: dict, want: dict) -> list:
    """The keys, sorted, on which two resolved configs differ in what a run computes (not in _NOT_PROTOCOL)."""
    return sorted(k for k in set(have) | set(want) if k not in _NOT_PROTOCOL and have.get(k) != want.get(k))


# Written into a run directory when its pair is recorded: the fingerprint it was recorded under.
STAMP = 'benchmark_protocol.json'


def run_dir_mismatch(args, run, seed, fp):
    """Why the run directory of (run, seed) cannot serve this protocol, or None (absent, or of this protocol).

    A recorded directory carries its fingerprint (STAMP); any directory's config.yaml is compared key by key
    with the config this protocol resolves.  So a directory of an earlier protocol (another budget, another
    version) is never resumed, recorded under the new fingerprint or used as a stage 1."""
    out = ROOT / run_dir(args, run, seed)
    if (out / STAMP).exists():
        got = json.loads((out / STAMP).read_text()).get('protocol_fingerprint')
        if got != fp:
            return f'{run_dir(args, run, seed)} was recorded under protocol fingerprint {got}, this protocol is {fp}'
    if (out / 'config.yaml').exists():
        import yaml
        have = yaml.safe_load((out / 'config.yaml').read_text()) or {}
        want = resolved_config(run, seed, args)
        diff = protocol_diff(have, want)
        if diff:
            shown = ', '.join(f'{k}: {have.get(k)!r} (protocol: {want.get(k)!r})' for k in diff[:3])
            return f'{run_dir(args, run, seed)} holds a run of another config ({shown})'
    return None


def keep_record(args, run, seed, fp) -> None:
    """Copy a finished run's small files into the committed records, stamped with the protocol fingerprint."""
    src, dst = ROOT / run_dir(args, run, seed), ROOT / record_dir(run, seed)
    dst.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    ev = json.loads((dst / 'eval.json').read_text())
    ev['protocol_fingerprint'] = fp
    (dst / 'eval.json').write_text(json.dumps(ev, indent=1))
    (src / STAMP).write_text(json.dumps({'protocol_fingerprint': fp, 'protocol_version': PROTOCOL_VERSION}))


def train_one(args, run, seed, fp, log_dir) -> None:
    out = ROOT / run_dir(args, run, seed)
    argv = command_argv(run, seed, args)
    if (out / 'eval.json').exists():
        keep_record(args, run, seed, fp)
        return
    from lt_zoo.training.run_dir import checkpoint_dirs
    if checkpoint_dirs(out):
        argv += ['--resume', 'latest']
    elif out.exists():
        argv += ['--overwrite', 'true']  # started but never checkpointed: nothing to keep
    cmd = [sys.executable, 'train/train.py'] + argv
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.time()
    log = log_dir / f'{run}_seed{seed}.log'
    with open(log, 'a') as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    took = time.time() - start
    if rc != 0:
        raise RuntimeError(f'{run} seed {seed} failed (exit {rc}) after {took:.0f} s; see {log}')
    keep_record(args, run, seed, fp)
    print(f'{run} seed {seed}: done in {took:.0f} s', flush=True)


def training_order(pairs) -> list:
    """The order schedule() starts pairs in: seed by seed, so a table fills up evenly; within a seed the
    longest first (dual path, then other CBN rows), stage-2 pairs last (they wait for their stage 1)."""
    cost = lambda p: (RUNS[p[0]][3] is not None, -('cbn' in p[0]), -('dpl' in p[0] or p[0] == 'cbn'), p[1])
    return sorted(pairs, key=lambda p: (p[1], cost(p)))


def schedule(args, pairs, fps):
    """Run the missing (run, seed) pairs in training_order; stage-2 pairs after their stage 1.

    A pair whose run directory another live process trains (a second runner: its lock,
    ``run_dir_holder``) is skipped, and so is a stage-2 pair whose stage 1 is; the next invocation
    records or resumes them.  Returns the failed pairs."""
    from lt_zoo.training.run_dir import run_dir_holder
    log_dir = ROOT / args.runs / 'logs'
    log_dir.mkdir(parents=True, exist_ok=True)
    done = {p: threading.Event() for p in pairs}
    failed, skipped = [], []

    def work(pair):
        run, seed = pair
        stage1 = RUNS[run][3]
        if stage1 is not None and (stage1, seed) in done:
            done[(stage1, seed)].wait()
            if (stage1, seed) in failed + skipped:
                (failed if (stage1, seed) in failed else skipped).append(pair)
                done[pair].set()
                return
        holder = run_dir_holder(ROOT / run_dir(args, run, seed))
        if holder is not None:
            print(f'{run} seed {seed}: skipped, process {holder} is training it; run again when it ends',
                  flush=True)
            skipped.append(pair)
            done[pair].set()
            return
        try:
            train_one(args, run, seed, fps[pair], log_dir)
        except Exception as err:  # keep the other runs going; report at the end
            print(err, flush=True)
            failed.append(pair)
        done[pair].set()

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work, training_order(pairs)))
    if skipped:
        print(f'skipped (trained by another process): {skipped}', flush=True)
    return failed


def minutes_per_epoch(run):
    """(median wall-clock minutes per epoch over the recorded seeds of ``run``, number of seeds, where from).

    From the committed records of this budget (eval.json ``wall_time_s`` over config.yaml ``epochs``), else
    of the protocol's own budget, else of the newest archived protocol that has the row
    (benchmarks/results/v*/fmnist_lt_runs): an epoch costs the same at another budget.  (None, 0, None)
    for a row never recorded."""
    archives = sorted(ROOT.glob(f'{RESULTS}/v*/fmnist_lt_runs'), reverse=True)
    for records in dict.fromkeys([ROOT / RECORDS, ROOT / RESULTS / 'fmnist_lt_runs'] + archives):
        per_epoch = []
        for ev in sorted((records / run).glob('seed*/eval.json')):
            took = record_seconds(ev.parent)
            cfg = ev.parent / 'config.yaml'
            epochs = _yaml_epochs(cfg) if cfg.exists() else None
            if took is not None and epochs:
                per_epoch.append(took / 60 / epochs)
        if per_epoch:
            return statistics.median(per_epoch), len(per_epoch), records.relative_to(ROOT).as_posix()
    return None, 0, None


def record_seconds(record: Path):
    """Wall-clock seconds a recorded run took, over all its processes (None if unknown).

    eval.json ``wall_time_s`` counts every process of a resumed run when the record carries
    ``resumed_at_epoch``.  An older record counted only the last process, so it is raised to at least the
    sum of its epochs' training times in metrics.jsonl (a resumed run's earlier epochs are only there)."""
    ev = json.loads((record / 'eval.json').read_text())
    took = ev.get('wall_time_s')
    if 'resumed_at_epoch' in ev or not (record / 'metrics.jsonl').exists():
        return took
    from lt_zoo.training.run_dir import read_metrics
    epochs = sum(r.get('time_s', 0.0) for r in read_metrics(record / 'metrics.jsonl'))
    return max(took or 0.0, epochs) or None


def _yaml_epochs(path: Path):
    import yaml
    return (yaml.safe_load(path.read_text()) or {}).get('epochs')


def epochs_done(args, run, seed) -> int:
    """Epochs of the latest complete checkpoint in the run directory (0 if none): where a resume starts."""
    from lt_zoo.training.run_dir import checkpoint_dirs, checkpoint_epoch
    done = checkpoint_dirs(ROOT / run_dir(args, run, seed))
    return checkpoint_epoch(done[-1]) if done else 0


def plan(args, todo, foreign) -> str:
    """What the runner would train, in its order, with what each pair costs by the committed records.

    A pair's estimate is its row's minutes per epoch (minutes_per_epoch: this protocol's records, else an
    archived protocol's, marked) times the epochs a resume still has to train.  The records' wall times
    are what they were: 1 thread each with ``--threads 1``, slower when the machine was shared.  A pair
    that a live process trains now (another runner) says so; this runner would skip it."""
    from lt_zoo.training.run_dir import run_dir_holder
    lines = [f'{len(todo)} (run, seed) pairs to train, in this order ({args.jobs} at a time, {args.threads} '
             f'thread(s) each):', '',
             '| row | seed | minutes per epoch (recorded seeds) | resumes at epoch | estimate, minutes |',
             '|---|---|---|---|---|']
    known, unknown, archived = 0.0, [], {}
    for run, seed in training_order(todo):
        per_epoch, n, source = minutes_per_epoch(run)
        epochs = int(resolved_config(run, seed, args).get('epochs') or 0)
        done = min(epochs_done(args, run, seed), epochs)
        if per_epoch is None:
            unknown.append(run)
            cells = ['? (0)', '?']
        else:
            left = per_epoch * (epochs - done)
            known += left
            mark = ''
            if source != RECORDS.as_posix():
                archived[run] = source
                mark = ' *'
            cells = [f'{per_epoch:.2f} ({n}){mark}', f'{left:.0f}']
        holder = run_dir_holder(ROOT / run_dir(args, run, seed))
        now = f' (training now: process {holder})' if holder is not None else ''
        lines.append(f'| `{run}` | {seed} | {cells[0]} | {done} of {epochs}{now} | {cells[1]} |')
    lines += ['', f'Estimated: {known / 60:.1f} core-hours'
              + (f'; no estimate for {len(unknown)} pair(s) of rows never recorded: '
                 f'{", ".join(dict.fromkeys(unknown))}' if unknown else '') + '.']
    if archived:
        lines += ['', '* from the records of another budget or an archived protocol: ' + ', '.join(f'`{r}` ({src})' for r, src in archived.items())]
    if foreign:
        lines += ['', 'The runner would refuse to start: run directories of another protocol:']
        lines += [f'- {m}' for m in foreign]
    return '\n'.join(lines)


def with_missing_stage1(args, todo, fps) -> list:
    """``todo`` plus the stage-1 pair of every stage-2 pair whose stage-1 run directory holds no finished model.

    A record keeps a run's small files only, so a stage 2 trained after its stage-1 run directory is gone (a
    fresh clone, another machine) re-trains that stage 1 first. Its new record then replaces the old one:
    the table's stage-1 row is the run its stage 2 started from."""
    out = list(todo)
    for run, seed in todo:
        stage1 = RUNS[run][3]
        if stage1 is None or (stage1, seed) in out:
            continue
        if not (ROOT / run_dir(args, stage1, seed) / 'model.safetensors').exists():
            fps[(stage1, seed)] = fingerprint(resolved_config(stage1, seed, args))
            out.insert(out.index((run, seed)), (stage1, seed))
    return out


def recorded_seeds(run, args) -> list:
    """Every seed of ``run`` with a committed record made under the current protocol (its fingerprint)."""
    base = ROOT / RECORDS / run
    seeds = sorted(int(d.name[4:]) for d in base.glob('seed*') if d.name[4:].isdigit()) if base.is_dir() else []
    return [s for s in seeds if is_recorded(run, s, fingerprint(resolved_config(run, s, args)))]


def summarise(run, args) -> dict:
    """One table row: every recorded seed of ``run`` (not only those of this invocation), mean ± sample std."""
    evs = [(s, json.loads((ROOT / record_dir(run, s) / 'eval.json').read_text())) for s in recorded_seeds(run, args)]
    mean = lambda xs: statistics.fmean(xs) if xs else None
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else None
    groups = {g: [e[g] for _, e in evs if e.get(g) is not None] for g in ('many', 'medium', 'few', 'top1', 'ece')}
    bal = [e['balanced_acc'] for _, e in evs]
    gains = [g for g in (last_fifth_gain(run, s) for s, _ in evs) if g is not None]
    return dict(method=run, label=RUNS[run][0], seeds=[s for s, _ in evs], balanced_acc_per_seed=bal,
                carried_over={s: e['carried_over_from'] for s, e in evs if e.get('carried_over_from')},
                mean=mean(bal), std=sd(bal), **{g: mean(v) for g, v in groups.items()},
                last_fifth_gain=mean(gains),
                wall_time_s=mean([t for t in (record_seconds(ROOT / record_dir(run, s)) for s, _ in evs)
                                  if t is not None]),
                command=shlex.join(['python', 'train/train.py'] + command_argv_for_report(run)))


def last_fifth_gain(run, seed):
    """Balanced accuracy gained over the last 20% of epochs (final minus the evaluation at 80%), or None."""
    evals = eval_curve(run, seed)
    if not evals:
        return None
    last = max(evals)
    at = round(0.8 * last)
    return evals[last] - evals[at] if at in evals and at < last else None


def eval_curve(run, seed):
    """{epoch: balanced accuracy} of a recorded (run, seed) pair's evaluations."""
    from lt_zoo.training.run_dir import read_metrics
    rows = read_metrics(ROOT / record_dir(run, seed) / 'metrics.jsonl')
    return {r['epoch']: r['test_balanced_acc'] for r in rows if r.get('test_balanced_acc') is not None}


def plot_curves(table, rows):
    """<table>_curves.png: balanced accuracy against epoch, seed mean (band: min-max over seeds), per row."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        curves = [c for c in (eval_curve(RUNS_BY_ID.get(r['method'], r['method']), s) for s in r['seeds']) if c]
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not epochs:
            continue
        vals = [[100 * c[e] for e in epochs] for c in curves]
        mean = [statistics.fmean(v) for v in zip(*vals)]
        line, = ax.plot(epochs, mean, marker='o', ms=3, label=f"{r['method']} ({len(curves)} seed(s))")
        if len(curves) > 1:
            ax.fill_between(epochs, [min(v) for v in zip(*vals)], [max(v) for v in zip(*vals)],
                            color=line.get_color(), alpha=0.15)
    ax.set(xlabel='epoch', ylabel='balanced accuracy (%)', title=f'{table}: test curves (band: min-max over seeds)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(ROOT / RESULTS / f'{table}{SUFFIX}_curves.png', dpi=110)
    plt.close(fig)


def command_argv_for_report(run):
    label, config, overrides, stage1 = RUNS[run]
    argv = ['--config', str(CONFIGS / config), '--seed', 'K']
    if stage1 is not None:
        argv += ['--stage1_dir', f'<{stage1} run, seed K>']
    if BUDGET and 'epochs' not in overrides and stage1 is None:
        argv += ['--epochs', str(BUDGET)]
    return argv + overrides_argv(overrides)


def write_table(table, args, rows_by_run):
    rows = [dict(rows_by_run[r]) for r in TABLES[table]]
    if table == 'cbn_ablation':
        for r in rows:
            r['method'] = ABLATION_IDS.get(r['method'], r['method'])
    by = {r['method']: r for r in rows}
    if table == 'fmnist_lt' and by.get('ce', {}).get('mean') is not None and by.get('ce_balanced', {}).get('mean'):
        lo, hi = by['ce']['mean'], by['ce_balanced']['mean']
        for r in rows:
            r['gap_closed'] = None if r['mean'] is None or hi <= lo else (r['mean'] - lo) / (hi - lo)
    # The table is a function of the committed records alone, so its command is the one that rebuilds it;
    # the per-row training commands follow the table.
    meta = dict(protocol='train/configs/fmnist_lt/_base.yaml' + (f' at {BUDGET} epochs' if BUDGET else ''),
                python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                command=report_command(), trained_by='python benchmarks/fmnist_lt.py (every missing pair)'
                + (f' --epochs {BUDGET}' if BUDGET else ''))
    (ROOT / RESULTS / f'{table}{SUFFIX}.json').write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    pm = lambda r: '-' if r['mean'] is None else (f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
                                                 if r['std'] is not None else f"{100 * r['mean']:.2f}")
    title = {'fmnist_lt': 'Fashion-MNIST-LT (IF 100): every method',
             'cbn_ablation': 'Fashion-MNIST-LT (IF 100): CBN ablation (shaped like Cheng et al. Table 2)',
             'gcl_diagnosis': 'Fashion-MNIST-LT (IF 100): GCL with and without mixup',
             'plateau': f'Fashion-MNIST-LT (IF 100): CE and Balanced Softmax at {SHORT_EPOCHS} and '
                        f'{PROTOCOL_EPOCHS} epochs (the plateau check)'}[table]
    lines = [f'# {title}' + (f', {BUDGET}-epoch budget' if BUDGET and table != 'plateau' else ''), '',
             f"Protocol: `{meta['protocol']}`; balanced accuracy (%) on the balanced 10,000-image test set, mean ± "
             f"sample std over seeds; many/medium/few are seed means. Produced by `{meta['command']}` from the "
             f"committed records in `{RECORDS.as_posix()}/` (each record's eval.json has its command and wall "
             f"time; a {meta['cpu_count']}-core CPU).",
             'Gain (last 20%): balanced accuracy added over the last fifth of the epochs (seed mean; the '
             'protocol asks < 0.5 points for CE and Balanced Softmax).',
             '', '| id | row | seeds | balanced acc | per seed | many | medium | few | ECE | gain (last 20%) |'
             + (' gap closed |' if table == 'fmnist_lt' else ''),
             '|---|---|---|---|---|---|---|---|---|---|' + ('---|' if table == 'fmnist_lt' else '')]
    for r in rows:
        line = (f"| `{r['method']}` | {r['label']} | {len(r['seeds'])} | {pm(r)} | "
                f"{', '.join(_pct(v) for v in r['balanced_acc_per_seed']) or '-'} | {_pct(r['many'])} | "
                f"{_pct(r['medium'])} | {_pct(r['few'])} | {_pct(r['ece'])} | {_pct(r['last_fifth_gain'])} |")
        if table == 'fmnist_lt':
            gc = r.get('gap_closed')
            line += f" {'-' if gc is None else f'{100 * gc:.0f}%'} |"
        lines.append(line)
    if table == 'cbn_ablation':
        lines += ['', 'Not rows: options the trainer refuses from scratch, because they do not train:', '']
        lines += [f'- {option}: {why}.' for option, why in NOT_ROWS.items()]
    carried = {}  # (row, source run) -> seeds
    for r in rows:
        for seed, src in r.get('carried_over', {}).items():
            carried.setdefault((r['method'], str(Path(src).parent)), []).append(str(seed))
    if carried:
        lines += ['', 'Seeds carried over from an earlier protocol (same resolved config, on a model the change '
                      'did not touch; benchmarks/carry_over.py):', '']
        lines += [f"- `{m}` seed(s) {', '.join(seeds)}: from `{src}/`" for (m, src), seeds in carried.items()]
    lines += ['', 'Rows (each seed K = 0, 1, 2 replaces `K`):', '']
    lines += [f"- `{r['method']}`: `{r['command']}`" for r in rows]
    lines += ['', f'Curves (seed mean against epoch, band = min-max over seeds): `{table}{SUFFIX}_curves.png`.']
    (ROOT / RESULTS / f'{table}{SUFFIX}.md').write_text('\n'.join(lines) + '\n')
    plot_curves(table, rows)
    print('\n'.join(lines))


def _pct(v) -> str:
    return '-' if v is None else f'{100 * v:.2f}'


# The targets of the benchmark (docs/benchmark.md): a verdict needs every row involved at >= MIN_SEEDS seeds.
MIN_SEEDS = 3


def report_command() -> str:
    return 'python benchmarks/fmnist_lt.py --report_only' + (f' --epochs {BUDGET}' if BUDGET else '')


CBN_ROWS = ('bs_aa_cbn', 'bs_aa_cbn_sbn', 'cbn', 'cbn_m4', 'cbn_t_channels', 'cbn_dpl_once')


def write_targets(rows):
    """targets.json/.md: each target of the protocol, with the rows it compares and met / missed / pending.
    A "best row" target is judged on the best row with MIN_SEEDS seeds; a better row with fewer is named."""
    ok = lambda *ids: all(len(rows[i]['seeds']) >= MIN_SEEDS for i in ids)

    def verdict(ids, met):
        if any(rows[i]['mean'] is None for i in ids):
            return 'no data'
        return ('met' if met else 'missed') if ok(*ids) else 'pending (fewer than 3 seeds)'

    def best_of(candidates):
        """(the best row with MIN_SEEDS seeds, else the best row; a note on a better row with fewer seeds)."""
        full = [r for r in candidates if ok(r)]
        best = max(full or candidates, key=lambda r: rows[r]['mean'])
        top = max(candidates, key=lambda r: rows[r]['mean'])
        note = (f'; best with fewer seeds: {top} {_pct(rows[top]["mean"])} ({len(rows[top]["seeds"])} seed(s))'
                if top != best else '')
        return best, note

    targets = []
    cbn = [r for r in CBN_ROWS if rows[r]['mean'] is not None]
    if cbn and rows['bs_aa']['mean'] is not None:
        best, note = best_of(cbn)
        d = rows[best]['mean'] - rows['bs_aa']['mean']
        targets.append(dict(target='best CBN row >= bs_aa + 2.0 points', rows=[best, 'bs_aa'], value=d,
                            text=f'{best} {_pct(rows[best]["mean"])} - bs_aa {_pct(rows["bs_aa"]["mean"])} = '
                                 f'{100 * d:+.2f}{note}',
                            verdict=verdict([best, 'bs_aa'], d >= 0.02)))
    if rows['gcl_crt']['mean'] is not None and rows['ce']['mean'] is not None:
        d = rows['gcl_crt']['mean'] - rows['ce']['mean']
        targets.append(dict(target='GCL + cRT above CE', rows=['gcl_crt', 'ce'], value=d,
                            text=f'gcl_crt {_pct(rows["gcl_crt"]["mean"])} - ce {_pct(rows["ce"]["mean"])} = {100 * d:+.2f}',
                            verdict=verdict(['gcl_crt', 'ce'], d > 0)))
    lo, hi = rows['ce']['mean'], rows['ce_balanced']['mean']
    methods = [r for r in TABLES['fmnist_lt'] + TABLES['gcl_diagnosis'] + TABLES['cbn_ablation']
               if r not in ('ce', 'ce_balanced') and rows[r]['mean'] is not None]
    if lo is not None and hi is not None and hi > lo and methods:
        best, note = best_of(methods)
        g = (rows[best]['mean'] - lo) / (hi - lo)
        targets.append(dict(target='best method closes >= 70% of the gap CE -> CE on a balanced subset',
                            rows=[best, 'ce', 'ce_balanced'], value=g,
                            text=f'({_pct(rows[best]["mean"])} - {_pct(lo)}) / ({_pct(hi)} - {_pct(lo)}) = '
                                 f'{100 * g:.0f}% ({best}){note}',
                            verdict=verdict([best, 'ce', 'ce_balanced'], g >= 0.7)))
    for r, shorter in PLATEAU_PAIRS.items():
        # Under cosine decay the last fifth of one run is also the end of its annealing, so the plateau is judged
        # on the budget: the protocol's run against the same schedule over its first 80% (docs/benchmark.md).
        if rows[r]['mean'] is not None and rows[shorter]['mean'] is not None:
            gain = rows[r]['mean'] - rows[shorter]['mean']
            targets.append(dict(target=f'{r} plateaus: {PROTOCOL_EPOCHS} epochs add < 0.5 points over '
                                       f'{SHORT_EPOCHS}', rows=[r, shorter], value=gain,
                                text=f'{r} {_pct(rows[r]["mean"])} - {shorter} {_pct(rows[shorter]["mean"])} = '
                                     f'{100 * gain:+.2f}', verdict=verdict([r, shorter], gain < 0.005)))
        within = rows[r]['last_fifth_gain']
        if within is not None:
            targets.append(dict(target=f'{r}, within one run: its last 20% of epochs add < 0.5 points '
                                       '(includes the end of the annealing)', rows=[r], value=within,
                                text=f'{r}: {100 * within:+.2f} (seed mean)', verdict=verdict([r], within < 0.005)))
    (ROOT / RESULTS / f'targets{SUFFIX}.json').write_text(json.dumps(dict(command=report_command(), min_seeds=MIN_SEEDS, targets=targets),
                                                            indent=2))
    lines = ['# Fashion-MNIST-LT benchmark: targets', '',
             f'From the committed records (`{report_command()}`); seed means over every recorded seed of a row; '
             f'a verdict needs {MIN_SEEDS} seeds of every row it compares.', '',
             '| target | measured | verdict |', '|---|---|---|']
    lines += [f"| {t['target']} | {t['text']} | {t['verdict']} |" for t in targets]
    (ROOT / RESULTS / f'targets{SUFFIX}.md').write_text('\n'.join(lines) + '\n')
    return targets


# The README's benchmark table: every row with a record, in this order (ablation and diagnosis rows beside
# their method), then the targets.  Spliced between the markers below by --update_readme.
_SUMMARY_ORDER = ['bs_aa', 'bs_aa_cbn', 'bs_aa_cbn_sbn', 'cbn', 'cbn_m1', 'cbn_m4', 'cbn_t_channels', 'cbn_dpl_once',
                 'ce_mixup', 'gcl', 'gcl_crt', 'gcl_nomix', 'gcl_nomix_crt', 'ldam_drw', 'logit_adjust', 'nbn', 'fsa',
                 'ce_balanced']
README_MARKERS = ('<!-- benchmark-summary:start (python benchmarks/fmnist_lt.py --report_only --update_readme) -->',
                  '<!-- benchmark-summary:end -->')
configure()


def write_summary(rows, targets) -> str:
    """summary.md: one line per recorded row of every table (mean ± std, per seed, many/medium) and the targets."""
    lines = ['| row | method | seeds | balanced acc (mean ± std) | per seed | many | medium |',
             '|---|---|---|---|---|---|---|']
    for run in SUMMARY_ORDER + [r for r in RUNS if r not in SUMMARY_ORDER]:
        r = rows[run]
        if r['mean'] is None:
            continue
        pm = _pct(r['mean']) + ('' if r['std'] is None else f" ± {_pct(r['std'])}")
        lines.append(f"| `{run}` | {r['label']} | {len(r['seeds'])} | "
                     f"{pm} | {', '.join(_pct(v) for v in r['balanced_acc_per_seed'])} | {_pct(r['many'])} | "
                     f"{_pct(r['medium'])} |")
    lines += ['', f'Targets (`benchmarks/results/targets{SUFFIX}.md`; a verdict needs {MIN_SEEDS} seeds of every row it '
                  'compares):', '', '| target | measured | verdict |', '|---|---|---|']
    lines += [f"| {t['target']} | {t['text']} | {t['verdict']} |" for t in targets]
    text = '\n'.join(lines) + '\n'
    (ROOT / RESULTS / f'summary{SUFFIX}.md').write_text(
        f'# Fashion-MNIST-LT benchmark: summary\n\nMade by `{report_command()}`.\n\n' + text)
    return text


def update_readme(text: str) -> None:
    """Replace the README's text between README_MARKERS by ``text``; refuse if the markers are missing."""
    path = ROOT / 'README.md'
    readme = path.read_text()
    start, end = README_MARKERS
    if readme.count(start) != 1 or readme.count(end) != 1 or readme.index(start) > readme.index(end):
        raise SystemExit(f'README.md must hold each marker once, start before end: {start!r} ... {end!r}')
    head, rest = readme.split(start)
    tail = rest.split(end)[1]
    path.write_text(f'{head}{start}\n{text}{end}{tail}')


def main(argv=None):
    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument('--epochs', type=int, default=None,
                        help="another budget than the protocol's (e.g. 200, the papers', on a GPU): every run "
                             'trains that many epochs (the plateau rows 80%%); records, tables and run directories '
                             'are kept apart, suffixed _e<N>')
    known, _ = budget.parse_known_args(argv)
    if known.epochs is not None and known.epochs < 5:
        budget.error(f'--epochs must be >= 5 (the plateau rows train 80% of it), got {known.epochs}')
    configure(known.epochs)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=[budget])
    ap.add_argument('--tables', nargs='+', default=sorted(TABLES), choices=sorted(TABLES))
    ap.add_argument('--runs_only', nargs='+', default=None, choices=sorted(RUNS), help='only these run ids')
    ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2],
                    help='seeds to train; the tables always summarise every recorded seed')
    ap.add_argument('--jobs', type=int, default=2, help='trainings at the same time')
    ap.add_argument('--threads', type=int, default=1, help='torch threads per training')
    ap.add_argument('--eval_every', type=int, default=None, help='override eval_every of the protocol')
    ap.add_argument('--compile', action='store_true', help='train with compile: true')
    ap.add_argument('--runs', default=f'runs/bench{SUFFIX}', help='parent of the run directories (not committed)')
    ap.add_argument('--report_only', action='store_true', help='only rebuild the tables from the records')
    ap.add_argument('--plan', action='store_true',
                    help='print the pairs still to train, in order, with their cost by the records; train nothing')
    ap.add_argument('--update_readme', action='store_true',
                    help="also write benchmarks/results/summary.md into README.md's benchmark table")
    args = ap.parse_args(argv)
    if args.update_readme and BUDGET:
        ap.error(f"--update_readme: the README's table is the protocol's own budget, not --epochs {BUDGET}")
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    runs = [r for t in args.tables for r in TABLES[t]]
    runs = list(dict.fromkeys(r for r in runs if args.runs_only is None or r in args.runs_only))
    for r in list(runs):  # a stage-2 run needs its stage 1
        if RUNS[r][3] is not None and RUNS[r][3] not in runs:
            runs.insert(0, RUNS[r][3])
    pairs = [(r, s) for s in args.seeds for r in runs]
    fps = {p: fingerprint(resolved_config(*p, args)) for p in pairs}
    if not args.report_only:
        todo = [p for p in pairs if not is_recorded(*p, fps[p])]
        todo = with_missing_stage1(args, todo, fps)
        stage1s = {(RUNS[r][3], s) for r, s in todo if RUNS[r][3] is not None}
        for p in stage1s - set(fps):
            fps[p] = fingerprint(resolved_config(*p, args))
        foreign = [m for p in dict.fromkeys(todo + sorted(stage1s)) if (m := run_dir_mismatch(args, *p, fps[p]))]
        if args.plan:
            print(plan(args, todo, foreign))
            return
        if foreign:  # before any training: nothing of an earlier protocol is resumed, recorded or overwritten
            raise SystemExit('run directories of another protocol; move them away (or pass another --runs) and '
                             'run again:\n  ' + '\n  '.join(foreign))
        print(f'{len(pairs) - len(todo)} of {len(pairs)} (run, seed) pairs already recorded; {len(todo)} to train',
              flush=True)
        failed = schedule(args, todo, fps)
        if failed:
            print(f'failed: {failed}', flush=True)
    rows = {r: summarise(r, args) for r in RUNS}
    for t in args.tables:
        write_table(t, args, rows)
    summary = write_summary(rows, write_targets(rows))
    if args.update_readme:
        update_readme(summary)


if __name__ == '__main__':
    main()
