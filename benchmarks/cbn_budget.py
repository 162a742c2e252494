#!/usr/bin/env python
"""The CBN layer against BN at two budgets: does a longer schedule close the gap, and for which M?

Reads the committed benchmark records of the layer rows (BS + AutoAugment, BN or the CBN layer, no split or
dual path) at 25 epochs (protocol v3, ``benchmarks/results/v3_25_epochs/``) and at 50 epochs (protocol v4,
and v3's 50-epoch budget rows), and writes ``benchmarks/results/cbn_budget.{json,md,png}``: every seed's
balanced accuracy per (row, budget), mean ± sample std, and the gap to BN at the same budget.

    python benchmarks/cbn_budget.py

Each record's ``config.yaml`` is checked against what the row claims (epochs, model, M), so a moved or
mislabelled record is refused rather than plotted.  The two protocols differ only in the budget and the
CBN default M (docs/benchmark.md#decision-protocol-v4); each source below names M explicitly.
"""
import json
import statistics
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
OUT = RESULTS / 'cbn_budget'
V3, V4 = 'v3_25_epochs/fmnist_lt_runs', 'fmnist_lt_runs'

# row -> (model, M or None for BN, {epochs: records directory under benchmarks/results})
ROWS = {
    'BN (bs_aa)': ('resnet32', None, {25: f'{V3}/bs_aa', 50: f'{V4}/bs_aa'}),
    'CBN layer, M = 1': ('resnet32_cbn', 1, {25: f'{V3}/cbn_m1', 50: f'{V4}/cbn_m1'}),
    'CBN layer, M = 2': ('resnet32_cbn', 2, {25: f'{V3}/cbn_m2', 50: f'{V4}/bs_aa_cbn'}),
    'CBN layer, M = 4': ('resnet32_cbn', 4, {25: f'{V3}/bs_aa_cbn', 50: f'{V3}/bs_aa_cbn_e50'}),
}
# the CBN default M of the protocol a record was made under (its config names M only when it differs)
DEFAULT_M = {V3: 4, V4: 2}


def read_row(model: str, m, sources: dict) -> dict:
    """{epochs: {'source', 'seeds', 'balanced_acc_per_seed'}} of one row, each record checked."""
    out = {}
    for epochs, rel in sources.items():
        seeds, accs = [], []
        for d in sorted((RESULTS / rel).glob('seed*')):
            cfg = yaml.safe_load((d / 'config.yaml').read_text())
            got_m = (cfg.get('model_kwargs') or {}).get('num_components', DEFAULT_M[str(Path(rel).parent)])
            if cfg['epochs'] != epochs or cfg['model'] != model or cfg.get('train_aug') != 'strong' or (
                    m is not None and got_m != m) or cfg.get('dual_path'):
                raise SystemExit(f'{d}: epochs {cfg["epochs"]}, model {cfg["model"]}, M {got_m}, train_aug '
                                 f'{cfg.get("train_aug")!r}, dual_path {cfg.get("dual_path")} is not the row '
                                 f'({epochs} epochs, {model}, M {m}, train_aug strong, single path)')
            seeds.append(int(cfg['seed']))
            accs.append(json.loads((d / 'eval.json').read_text())['balanced_acc'])
        out[epochs] = dict(source=f'benchmarks/results/{rel}', seeds=seeds, balanced_acc_per_seed=accs)
    return out


def _mean_std(xs):
    return (statistics.fmean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None)


def _cell(xs) -> str:
    mean, std = _mean_std(xs)
    if mean is None:
        return '-'
    return f'{100 * mean:.2f}' + ('' if std is None else f' ± {100 * std:.2f}') + f' ({len(xs)})'


def main():
    rows = {label: dict(model=model, num_components=m, budgets=read_row(model, m, sources))
            for label, (model, m, sources) in ROWS.items()}
    budgets = sorted({e for r in rows.values() for e in r['budgets']})
    bn = rows['BN (bs_aa)']['budgets']
    for r in rows.values():
        for e, b in r['budgets'].items():
            mine, base = _mean_std(b['balanced_acc_per_seed'])[0], _mean_std(bn[e]['balanced_acc_per_seed'])[0]
            b['mean'], b['std'] = _mean_std(b['balanced_acc_per_seed'])
            b['gap_to_bn'] = None if mine is None or base is None else mine - base
    command = 'python benchmarks/cbn_budget.py'
    OUT.with_suffix('.json').write_text(json.dumps(dict(command=command, rows=rows), indent=2))
    lines = ['# The CBN layer against BN at 25 and 50 epochs', '',
             f'Made by `{command}` from the committed records (balanced accuracy %, mean ± sample std (seeds); '
             'BS + AutoAugment, single path; 25 epochs: protocol v3, 50 epochs: protocol v4, and v3\'s 50-epoch '
             'rows for M = 4). Gap: the row\'s mean minus BN\'s at the same budget.', '',
             '| row | ' + ' | '.join(f'{e} epochs | gap to BN at {e}' for e in budgets) + ' |',
             '|---|' + '---|---|' * len(budgets)]
    for label, r in rows.items():
        cells = []
        for e in budgets:
            b = r['budgets'].get(e)
            cells += ['-', '-'] if b is None else [
                _cell(b['balanced_acc_per_seed']),
                '-' if b['gap_to_bn'] is None or label.startswith('BN') else f"{100 * b['gap_to_bn']:+.2f}"]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Per seed:', '']
    for label, r in rows.items():
        for e, b in r['budgets'].items():
            vals = ', '.join(f'seed {s}: {100 * a:.2f}' for s, a in zip(b['seeds'], b['balanced_acc_per_seed']))
            lines.append(f"- {label}, {e} epochs (`{b['source']}`): {vals or 'no record yet'}")
    lines += ['', 'Plot: `cbn_budget.png` (every seed as a dot, the mean as a line).']
    OUT.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plot(rows, budgets)


def plot(rows, budgets):
    try:  # a Figure of its own: no pyplot state, PNG through matplotlib's Agg canvas
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for i, (label, r) in enumerate(rows.items()):
        dx = (i - (len(rows) - 1) / 2) * 0.6  # spread the rows apart at each budget
        xs, ms = [], []
        for e in budgets:
            b = r['budgets'].get(e)
            if not b or not b['balanced_acc_per_seed']:
                continue
            accs = [100 * a for a in b['balanced_acc_per_seed']]
            ax.scatter([e + dx] * len(accs), accs, s=14, alpha=0.6, color=f'C{i}')
            xs.append(e + dx)
            ms.append(statistics.fmean(accs))
        ax.plot(xs, ms, marker='o', color=f'C{i}', label=label)
    ax.set(xlabel='epochs (cosine schedule over the whole budget)', ylabel='balanced accuracy (%)',
           title='CBN layer vs BN by budget (Fashion-MNIST-LT, BS + AutoAugment)', xticks=budgets)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix('.png'), dpi=110)


if __name__ == '__main__':
    main()
