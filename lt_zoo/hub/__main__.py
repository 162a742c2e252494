"""Command line of lt_zoo.hub: ``push`` (or ``push --dry-run``) a run directory, or render its ``card``."""
import argparse
import sys
from typing import List, Optional

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
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--dry-run', action='store_true', help='write the folder and list it; upload nothing')
    push.add_argument('--out', default=None, help='folder to build (dry run default: RUN_DIR/hub_export)')
    push.add_argument('--commit-message', default=None)
    card.add_argument('--out', required=True, help='card file to write, e.g. hub_cards/NAME.md')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; any failure is printed as one ``error:`` line on stderr (exit 2), never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == 'push':
            push_run(args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run, out=args.out,
                     fold_nbn=args.fold_nbn, commit_message=args.commit_message, template_path=args.template)
        else:
            write_card(args.run_dir, args.repo_id, args.out, fold_nbn=args.fold_nbn, template_path=args.template)
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a CLI user needs the message, not the stack
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; the exception type is added unless it is an expected input error."""
    text = ' '.join(str(e).split()) or repr(e)
    expected = isinstance(e, (ValueError, FileNotFoundError, FileExistsError, RuntimeError))
    return text if expected else f'{type(e).__name__}: {text}'


if __name__ == '__main__':
    sys.exit(main())
