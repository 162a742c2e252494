#!/usr/bin/env python
"""Render the model card of every published checkpoint (lt_zoo.models.pretrained_tags.SOURCE_RUNS).

    python hub_cards/render_all.py        # after the Fashion-MNIST-LT benchmark (benchmarks/fmnist_lt.py)

Writes hub_cards/<tag>.md from the run directories the benchmark wrote; every number in a card comes
from that run's eval.json.  The same card is what ``python -m lt_zoo.hub push RUN --repo-id lt-zoo/<tag>``
uploads as README.md.
"""
import os
import sys

from lt_zoo.hub import write_card
from lt_zoo.models.pretrained_tags import HF_ORG, SOURCE_RUNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    missing = [run for run in SOURCE_RUNS.values() if not os.path.isfile(os.path.join(ROOT, run, 'eval.json'))]
    if missing:
        sys.exit(f'missing benchmark runs {missing}: run python benchmarks/fmnist_lt.py first')
    for tag, run in SOURCE_RUNS.items():
        write_card(os.path.join(ROOT, run), f'{HF_ORG}/{tag}', os.path.join(ROOT, 'hub_cards', f'{tag}.md'))


if __name__ == '__main__':
    main()
