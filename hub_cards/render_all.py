#!/usr/bin/env python
"""Render the model card of every published checkpoint (lt_zoo.models.pretrained_tags.SOURCE_RUNS).

    python hub_cards/render_all.py              # after the Fashion-MNIST-LT benchmark (benchmarks/fmnist_lt.py)
    python hub_cards/render_all.py --available  # only the tags whose run exists; names the others

Writes hub_cards/<tag>.md from the seed-0 run directories the benchmark wrote (runs/bench/<row>/seed0);
every number in a card comes from that run's eval.json, and its "Benchmark across seeds" section from the
tag's row (SOURCE_ROWS) of the benchmark's seed table benchmarks/results/fmnist_lt.json, left out while
that row has no finished seed.  The same card is what
``python -m lt_zoo.hub push RUN --repo-id lt-zoo/<tag> --benchmark benchmarks/results/fmnist_lt.json``
uploads as README.md.
"""
import os
import sys

from lt_zoo.hub import benchmark_row, write_card
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
    for run in missing:
        print(f'skipped: {run} has no eval.json (its card is not rendered)', file=sys.stderr)
    rows = benchmark_rows()
    for tag, run in SOURCE_RUNS.items():
        if run in missing:
            continue
        if rows[tag] is None:
            print(f'{tag}: {BENCHMARK_TABLE} has no finished seed of row {SOURCE_ROWS[tag]!r}; card without '
                  f'the benchmark section', file=sys.stderr)
        write_card(os.path.join(ROOT, run), f'{HF_ORG}/{tag}', os.path.join(ROOT, 'hub_cards', f'{tag}.md'),
                   benchmark=rows[tag])


if __name__ == '__main__':
    main()
