"""Command line of lt_zoo.hub: ``push`` (or ``push --dry-run``) a run directory, or render its ``card``.

``--benchmark benchmarks/results/fmnist_lt.json`` adds the run's row of that seed table to the card
(``--benchmark-row``, default: the row of the repo's tag in lt_zoo.models.pretrained_tags.SOURCE_ROWS).
"""
import argparse
import sys
from typing import Any, Dict, List, Optional

from ..models.pretrained_tags import HF_ORG, SOURCE_ROWS
from .card import benchmark_row
from .publish import push_run, write_card


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m lt_zoo.hub',
                                     description='Publish an lt_zoo run directory to the Hugging Face Hub.')
    sub = parser.add_subparsers(dest='command', required=True)
    push = sub.add_parser('push', help='build the Hub folder of a run and upload it in one commit')
    card = sub.add_parser('card', help='render only the model card of a run')
    for p in (push, card):
        p.add_argument('run_dir', help='run directory written by train/train.py')
        p.add_argument('--repo-id', required=True, help="Hub model repo 'ORG/NAME', e.g. lt-zoo/resnet32_cbn.fmnist_lt")
        p.add_argument('--fold-nbn', action='store_true',
                       help='fold Normalized BN into plain BN (ImageNet depths then load in vanilla timm)')
        p.add_argument('--template', default=None, help='model card Jinja template (default hub_cards/model_card_template.md)')
        p.add_argument('--benchmark', default=None, metavar='TABLE_JSON',
                       help='benchmark seed table (e.g. benchmarks/results/fmnist_lt.json): the card shows the '
                            "run's row across seeds")
        p.add_argument('--benchmark-row', default=None, metavar='ID',
                       help="row id in --benchmark (its 'method', e.g. cbn); default: the row of the repo's tag "
                            'in lt_zoo.models.pretrained_tags.SOURCE_ROWS')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--dry-run', action='store_true', help='write the folder and list it; upload nothing')
    push.add_argument('--out', default=None, help='folder to build (dry run default: RUN_DIR/hub_export)')
    push.add_argument('--commit-message', default=None)
    card.add_argument('--out', required=True, help='card file to write, e.g. hub_cards/NAME.md')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; any failure is printed as one ``error:`` line on stderr (exit 2), never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark_row is not None and args.benchmark is None:
        parser.error('--benchmark-row needs --benchmark TABLE_JSON')
    try:
        benchmark = _benchmark(args.benchmark, args.benchmark_row, args.repo_id)
        if args.command == 'push':
            push_run(args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run, out=args.out,
                     fold_nbn=args.fold_nbn, commit_message=args.commit_message, template_path=args.template,
                     benchmark=benchmark)
        else:
            write_card(args.run_dir, args.repo_id, args.out, fold_nbn=args.fold_nbn, template_path=args.template,
                       benchmark=benchmark)
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a CLI user needs the message, not the stack
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2
    return 0


def _benchmark(table: Optional[str], row_id: Optional[str], repo_id: str) -> Optional[Dict[str, Any]]:
    """The card's benchmark row (None without --benchmark); ValueError when it cannot be shown."""
    if table is None:
        return None
    if row_id is None:
        tag = repo_id.split('/', 1)[-1] if repo_id.startswith(f'{HF_ORG}/') else None
        row_id = SOURCE_ROWS.get(tag)
        if row_id is None:
            raise ValueError(f"--benchmark needs --benchmark-row ID: {repo_id!r} is not a tag of "
                             f"lt_zoo.models.pretrained_tags.SOURCE_ROWS")
    row = benchmark_row(table, row_id)
    if row is None:
        raise ValueError(f"benchmark table {table!r} has no finished seed of row {row_id!r}")
    return row


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; the exception type is added unless it is an expected input error."""
    text = ' '.join(str(e).split()) or repr(e)
    expected = isinstance(e, (ValueError, FileNotFoundError, FileExistsError, RuntimeError))
    return text if expected else f'{type(e).__name__}: {text}'


if __name__ == '__main__':
    sys.exit(main())
