#!/usr/bin/env python
"""Carry records of an earlier benchmark protocol over to the current one, where the change did not touch them.

A ``PROTOCOL_VERSION`` bump voids every record (benchmarks/fmnist_lt.py), yet some runs of the old protocol
computed exactly what the new one asks: same resolved config, on a model whose code the bump did not change.
This copies such a record into the current records, stamped with the current fingerprint and with
``carried_over_from`` naming its source, and moves its run directory (when there is one) to the current run
directory, so that stage-2 rows and model cards can start from it.  The tables name every carried seed.

Protocol v3 -> v4 (50 epochs, CBN default M = 2): the v3 rows ``ce_e50``, ``bs_e50``, ``bs_aa_e50``,
``ce_e40`` and ``bs_e40`` are the v4 rows ``ce``, ``balanced_softmax``, ``bs_aa``, ``ce_e40``, ``bs_e40``;
only CBN models changed, so:

    python benchmarks/carry_over.py --records benchmarks/results/v3_25_epochs/fmnist_lt_runs \\
        --old_runs runs/bench_v3 --unchanged_models resnet32 resnet32_gcl resnet32_nbn

A pair is carried only if its config.yaml equals the current protocol's resolved config on every key that
changes what a run computes; nothing already recorded under the current protocol is replaced.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
import fmnist_lt as bench  # noqa: E402


def candidates(records: Path, seed: int) -> list:
    """(old run id, its record directory) of every old record of ``seed``, sorted by run id."""
    return sorted((d.name, d / f'seed{seed}') for d in records.iterdir() if (d / f'seed{seed}' / 'config.yaml').exists())


def carry_over(args) -> list:
    records = Path(args.records)
    if not records.is_dir():
        raise SystemExit(f'--records {records}: not a directory of records (<run>/seed<k>/config.yaml)')
    runs_args = argparse.Namespace(runs=args.runs, eval_every=None, compile=False)
    carried = []
    for run, (label, config, overrides, stage1) in bench.RUNS.items():
        if stage1 is not None:  # a stage 2 is only as carried as the stage 1 it started from: re-train both
            continue
        for seed in args.seeds:
            want = bench.resolved_config(run, seed, runs_args)
            fp = bench.fingerprint(want)
            if want['model'] not in args.unchanged_models or bench.is_recorded(run, seed, fp):
                continue
            match = [(old, d) for old, d in candidates(records, seed)
                     if not bench.protocol_diff(yaml.safe_load((d / 'config.yaml').read_text()) or {}, want)]
            if not match:
                continue
            old, src = match[0]
            dst = ROOT / bench.record_dir(run, seed)
            dst.mkdir(parents=True, exist_ok=True)
            for name in bench.RECORD_FILES:
                if (src / name).exists():
                    shutil.copyfile(src / name, dst / name)
            ev = json.loads((dst / 'eval.json').read_text())
            ev['protocol_fingerprint'] = fp
            ev['carried_over_from'] = str(src.relative_to(ROOT) if src.is_absolute() else src)
            (dst / 'eval.json').write_text(json.dumps(ev, indent=1))
            old_dir, new_dir = Path(args.old_runs) / old / f'seed{seed}', ROOT / bench.run_dir(runs_args, run, seed)
            moved = False
            if old_dir.is_dir() and not new_dir.exists():
                new_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(old_dir), str(new_dir))
                (new_dir / bench.STAMP).write_text(json.dumps({'protocol_fingerprint': fp,
                                                               'protocol_version': bench.PROTOCOL_VERSION}))
                moved = True
            carried.append((run, seed, old))
            print(f'{run} seed {seed} <- {old} seed {seed}' + (f' (run directory moved from {old_dir})' if moved else ''))
    return carried


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--records', required=True, help='the old protocol\'s records (<run>/seed<k>/...)')
    ap.add_argument('--old_runs', required=True, help='the old protocol\'s run directories (<run>/seed<k>)')
    ap.add_argument('--unchanged_models', nargs='+', required=True,
                    help='models whose code the protocol change did not touch; only their runs are carried')
    ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    ap.add_argument('--runs', default='runs/bench', help='the current run directories (as fmnist_lt.py --runs)')
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(ROOT)  # the protocol's configs resolve relative to the repository
    carried = carry_over(args)
    print(f'{len(carried)} pair(s) carried over')


if __name__ == '__main__':
    main()
