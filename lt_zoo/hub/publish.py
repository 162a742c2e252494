"""Publish a run directory to the Hugging Face Hub in one commit, build the folder only (dry run), or
render its model card only.

Order of work, so that bad input never leaves anything half-published: repo id check -> token lookup
(real push) -> run directory check -> folder build and verification -> ``create_repo(exist_ok=True)`` +
``upload_folder`` (a single commit: all files or none).  The token comes from ``HF_TOKEN`` or the cached
login (``huggingface_hub.get_token``); it is handed to ``HfApi`` only, never printed or written.
"""
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from ..export import read_export_config
from .folder import build_hub_folder
from .run_record import read_run_dir
from .tag_entry import format_tag_entry, pretrained_tag_entry

__all__ = ['validate_repo_id', 'resolve_token', 'push_run', 'write_card', 'PushResult', 'MissingTokenError']

_ORG_NAME = re.compile(r'^[^/]+/[^/]+$')


class MissingTokenError(RuntimeError):
    """A real push was asked for but no Hugging Face token is available."""


@dataclass
class PushResult:
    repo_id: str
    folder: Path
    files: List[str]
    uploaded: bool
    commit_url: Optional[str] = None
    tag_name: str = ''
    tag_entry: dict = field(default_factory=dict)


def validate_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a valid ``ORG/NAME`` Hub model id, else raise ValueError."""
    if not isinstance(repo_id, str) or not _ORG_NAME.match(repo_id):
        raise ValueError(f"invalid repo id {repo_id!r}: expected 'ORG/NAME', e.g. 'lt-zoo/resnet32_cbn.fmnist_lt'")
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"invalid repo id {repo_id!r}: {e}") from None
    return repo_id


def resolve_token() -> str:
    """The Hub token from HF_TOKEN or the cached login; MissingTokenError when there is none."""
    token = get_token()
    if not token:
        raise MissingTokenError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` "
                                "(nothing was built or uploaded); use --dry-run to build the folder only")
    return token


def _describe(folder: Path, files: List[str]) -> str:
    return '\n'.join(f'  {name:<24} {os.path.getsize(folder / name):>12,d} bytes' for name in files)


def push_run(run_dir: str, repo_id: str, *, private: bool = False, dry_run: bool = False,
             out: Optional[str] = None, fold_nbn: bool = False, commit_message: Optional[str] = None,
             template_path: Optional[str] = None, benchmark: Optional[Dict[str, Any]] = None,
             api: Optional[HfApi] = None, log=print) -> PushResult:
    """Build the Hub folder of ``run_dir`` and, unless ``dry_run``, upload it to ``repo_id`` in one commit.

    ``out``: where the folder is written (dry run default ``RUN_DIR/hub_export``; a real push without
    ``out`` builds in a temporary folder that is removed after the upload).  ``benchmark``: the run's
    benchmark seed-table row, shown in the card (``lt_zoo.hub.card.benchmark_row``).  ``api`` is for tests.
    """
    validate_repo_id(repo_id)
    token = None if dry_run else resolve_token()
    record = read_run_dir(run_dir)
    with tempfile.TemporaryDirectory(prefix='lt_zoo_hub_') as scratch:
        if out is None:
            out = os.path.join(run_dir, 'hub_export') if dry_run else os.path.join(scratch, 'export')
        folder, files = build_hub_folder(record, out, repo_id, fold=fold_nbn, template_path=template_path,
                                         benchmark=benchmark)
        name, entry, warnings = pretrained_tag_entry(record, read_export_config(os.fspath(folder)), repo_id)
        result = PushResult(repo_id=repo_id, folder=folder, files=files, uploaded=False, tag_name=name,
                            tag_entry=entry)
        visibility = 'private' if private else 'public'
        if dry_run:
            log(f"dry run: nothing uploaded. Would upload to {visibility} repo {repo_id} in one commit "
                f"from {folder}:\n{_describe(folder, files)}")
        else:
            api = api or HfApi()
            api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type='model')
            info = api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), repo_type='model', token=token,
                                     commit_message=commit_message or f"Add {record.architecture} "
                                                                       f"({record.eval['method']}) from lt_zoo")
            result.uploaded = True
            result.commit_url = getattr(info, 'commit_url', None) or str(info)
            log(f"uploaded {len(files)} files to {visibility} repo {repo_id}: {result.commit_url}\n"
                f"{_describe(folder, files)}")
        log('pretrained tag entry for lt_zoo/models/pretrained_tags.py:\n' + format_tag_entry(name, entry))
        for w in warnings:
            print(f'warning: {w}', file=sys.stderr)
    return result


def write_card(run_dir: str, repo_id: str, out_path: str, *, fold_nbn: bool = False,
               template_path: Optional[str] = None, benchmark: Optional[Dict[str, Any]] = None,
               log=print) -> Path:
    """Render only the model card of ``run_dir`` (as published at ``repo_id``) to ``out_path``.

    ``benchmark``: the run's benchmark seed-table row, shown in the card (``lt_zoo.hub.card.benchmark_row``).

    The card describes exactly what ``push`` would publish, so the folder is built and verified in a
    temporary directory and only its README.md is kept.  Prints the pretrained tag entry to paste.
    """
    validate_repo_id(repo_id)
    record = read_run_dir(run_dir)
    target = Path(out_path)
    if target.is_dir():
        raise ValueError(f"--out {out_path!r} is a directory; give the card's file name, e.g. hub_cards/NAME.md")
    with tempfile.TemporaryDirectory(prefix='lt_zoo_card_') as scratch:
        folder, _ = build_hub_folder(record, os.path.join(scratch, 'export'), repo_id, fold=fold_nbn,
                                     template_path=template_path, benchmark=benchmark)
        name, entry, warnings = pretrained_tag_entry(record, read_export_config(os.fspath(folder)), repo_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f'.{target.name}.tmp')
        shutil.copyfile(folder / 'README.md', tmp)
        os.replace(tmp, target)
    log(f"wrote model card {target}")
    log('pretrained tag entry for lt_zoo/models/pretrained_tags.py:\n' + format_tag_entry(name, entry))
    for w in warnings:
        print(f'warning: {w}', file=sys.stderr)
    return target
