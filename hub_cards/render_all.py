#!/usr/bin/env python
"""Render the model card of every published checkpoint (lt_zoo.models.pretrained_tags.SOURCE_RUNS).

    python hub_cards/render_all.py              # after the Fashion-MNIST-LT benchmark (benchmarks/fmnist_lt.py)
    python hub_cards/render_all.py --available  # the tags whose run exists; the others: benchmark section only

Writes hub_cards/<tag>.md from the seed-0 run directories the benchmark wrote (runs/bench/<row>/seed0);
every number in a card comes from that run's eval.json, and its "Benchmark across seeds" section from the
tag's row (SOURCE_ROWS) of the benchmark's seed table benchmarks/results/fmnist_lt.json, left out while
that row has no finished seed.  With --available, a tag whose run directory is not on this machine keeps its
card, and only that card's "Benchmark across seeds" section is rewritten from the current table; its seed is
checked against the benchmark's committed record of that run (benchmarks/results/fmnist_lt_runs/<row>/seed0).
The same card is what
``python -m lt_zoo.hub push RUN --repo-id lt-zoo/<tag> --benchmark benchmarks/results/fmnist_lt.json``
uploads as README.md.
"""
import json
import os
import sys

import yaml

from lt_zoo.hub import benchmark_row, write_card
from lt_zoo.hub.card import refresh_benchmark_section
from lt_zoo.models.pretrained_tags import BENCHMARK_TABLE, HF_ORG, SOURCE_ROWS, SOURCE_RUNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_rows(table: str = os.path.join(ROOT, BENCHMARK_TABLE)) -> dict:
    """{tag: its benchmark row for the card, or None while the row has no finished seed}."""
    return {tag: benchmark_row(table, SOURCE_ROWS[tag]) for tag in SOURCE_RUNS}


def main(argv=None):
    available = '--available' in (sys.argv[1:] if argv is None else argv)
    missing = [run for run in SOURCE_RUNS.values() if not os.path.isfile(os.path.join(ROOT, run, 'eval.json'))]
    if missing and not available:
        sys.exit(f'missing benchmark runs {missing}: run python benchmarks/fmnist_lt.py first '
                 f'(or pass --available to render only the others)')
    rows = benchmark_rows()
    for tag, run in SOURCE_RUNS.items():
        if run in missing:
            print(refresh_from_record(tag, run, rows[tag]), file=sys.stderr)
    for tag, run in SOURCE_RUNS.items():
        if run in missing:
            continue
        if rows[tag] is None:
            print(f'{tag}: {BENCHMARK_TABLE} has no finished seed of row {SOURCE_ROWS[tag]!r}; card without '
                  f'the benchmark section', file=sys.stderr)
        write_card(os.path.join(ROOT, run), f'{HF_ORG}/{tag}', os.path.join(ROOT, 'hub_cards', f'{tag}.md'),
                   benchmark=rows[tag])


def refresh_from_record(tag: str, run: str, row) -> str:
    """Rewrite the benchmark section of hub_cards/<tag>.md from ``row``, its seed checked against the
    benchmark's committed record of ``run``; returns what was done, for the log."""
    card = os.path.join(ROOT, 'hub_cards', f'{tag}.md')
    row_id, seed_dir = run.split('/')[-2:]
    record = os.path.join(ROOT, 'benchmarks', 'results', 'fmnist_lt_runs', row_id, seed_dir)
    if row is None or not os.path.isfile(card) or not os.path.isfile(os.path.join(record, 'eval.json')):
        return f'skipped: {run} has no eval.json (its card is not rendered)'
    with open(os.path.join(record, 'eval.json')) as f:
        balanced_acc = json.load(f)['balanced_acc']
    with open(os.path.join(record, 'config.yaml')) as f:
        seed = yaml.safe_load(f)['seed']
    changed = refresh_benchmark_section(card, row, seed, balanced_acc, os.path.relpath(record, ROOT))
    return (f'{tag}: {run} is not here; ' + ('refreshed' if changed else 'kept') + ' the benchmark section of '
            f'hub_cards/{tag}.md (the rest of the card is from that run)')


if __name__ == '__main__':
    main()
