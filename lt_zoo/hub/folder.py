"""Build the Hub repository folder of a run: weights, timm config, card and the run's records.

Files (``HUB_FILES``): model.safetensors and config.json (copied, or re-exported through
``lt_zoo.export.export_model`` after folding NBN), README.md (model card), eval.json,
training_config.yaml (the run's resolved config.yaml), per_class_accuracy.png and metrics.jsonl when the
run has them.  The folder is written under a temporary name and moved into place only once complete and
verified: it must load with ``timm.create_model('local-dir:...')`` and predict what the run's own
export predicts.  No token is involved here.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from ..export import (CONFIG_NAME, WEIGHTS_NAME, ExportError, export_model, fold_nbn_for_export, load_exported,
                      plain_architecture, read_export_config)
from .card import render_model_card
from .run_record import EVAL_NAME, METRICS_NAME, PLOT_NAME, TRAIN_CONFIG_NAME, RunRecord

__all__ = ['HUB_FILES', 'build_hub_folder', 'plain_architecture', 'fold_nbn_for_export', 'load_checked',
           'verify_export']

CARD_NAME = 'README.md'
HUB_TRAIN_CONFIG_NAME = 'training_config.yaml'  # not config.yaml: config.json next to it is timm's
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, EVAL_NAME, HUB_TRAIN_CONFIG_NAME, PLOT_NAME, METRICS_NAME)
# data config keys carried from the run's config.json into a re-export (timm resolve_input_data_config)
_DATA_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')



def _weights_report(folder: str, cfg: Dict[str, Any]) -> str:
    """Which checkpoint tensors the config's architecture lacks, adds or shapes differently (a few of each)."""
    import timm
    expected = {k: tuple(v.shape) for k, v in
                timm.create_model(cfg['architecture'], **cfg.get('model_args', {})).state_dict().items()}
    with safe_open(os.path.join(folder, WEIGHTS_NAME), framework='pt') as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    reshaped = [f'{k} {stored[k]} vs {expected[k]}' for k in sorted(set(stored) & set(expected))
                if stored[k] != expected[k]]
    return '; '.join(f'{len(keys)} {what} (e.g. {keys[:3]})' for what, keys in
                     (('tensors the architecture needs are missing', missing),
                      ('checkpoint tensors are unknown to it', unexpected),
                      ('tensors have another shape, checkpoint vs model', reshaped)) if keys)


def load_checked(folder: str) -> torch.nn.Module:
    """``lt_zoo.export.load_exported`` with a clear ValueError when config.json does not fit the weights."""
    cfg = read_export_config(folder)
    head = (f"{folder}: config.json architecture {cfg['architecture']!r} (model_args {cfg.get('model_args', {})}) "
            f"does not load its {WEIGHTS_NAME}")
    try:
        return load_exported(folder)
    except ExportError:  # an unreadable file, named in the message: not a config/weights mismatch
        raise
    except ValueError as e:  # the entrypoint refuses an option, or the stem check of the model's filter
        raise ValueError(f"{head}: {e}") from e
    except RuntimeError as e:  # torch load_state_dict: report the key differences, not the full dump
        raise ValueError(f"{head}: {_weights_report(folder, cfg) or e}") from e


def verify_export(folder: str, reference: torch.nn.Module, *, atol: float = 1e-6) -> None:
    """Load ``folder`` as timm does and check its predictions against ``reference`` (both in eval mode).

    Raises ValueError when config.json's architecture does not take the weights (missing/unexpected
    keys, shape mismatch) or when the predictions differ.
    """
    cfg = read_export_config(folder)
    loaded = load_checked(folder)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *cfg['pretrained_cfg']['input_size'], generator=gen)
    with torch.no_grad():
        want, got = reference.eval()(x), loaded.eval()(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=0.0, atol=atol):
        diff = (want - got).abs().max().item() if want.shape == got.shape else f'shapes {want.shape} vs {got.shape}'
        raise ValueError(f"{folder}: the exported model's predictions differ from the run's (max |diff| {diff})")


def _check_out_dir(out: Path, run_dir: Path) -> None:
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {str(out)!r} is the run directory itself; choose another folder")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {str(out)!r} exists and is not a directory")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in HUB_FILES)
        if foreign:
            raise ValueError(f"--out {str(out)!r} holds files that are not a previous Hub export {foreign}; "
                             f"refusing to replace it")


def build_hub_folder(record: RunRecord, out_dir: str, repo_id: str, *, fold: bool = False,
                     template_path: Optional[str] = None,
                     benchmark: Optional[Dict[str, Any]] = None) -> Tuple[Path, List[str]]:
    """Write the Hub repository folder of ``record`` to ``out_dir``; returns (folder, file names).

    ``out_dir`` may be absent, empty, or a previous export (replaced); anything else is refused.
    ``benchmark``: the run's benchmark seed-table row for the card (``lt_zoo.hub.card.benchmark_row``).
    """
    out = Path(out_dir)
    _check_out_dir(out, record.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}-'))
    try:
        reference = load_checked(os.fspath(record.path))
        if fold:
            pcfg = record.export_config['pretrained_cfg']
            folded = fold_nbn_for_export(load_checked(os.fspath(record.path)))
            export_model(folded, os.fspath(tmp), class_names=record.export_config.get('label_names'),
                         data_config={k: pcfg[k] for k in _DATA_KEYS if pcfg.get(k) is not None})
        else:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                shutil.copyfile(record.path / name, tmp / name)
        verify_export(os.fspath(tmp), reference)
        shutil.copyfile(record.path / EVAL_NAME, tmp / EVAL_NAME)
        shutil.copyfile(record.path / TRAIN_CONFIG_NAME, tmp / HUB_TRAIN_CONFIG_NAME)
        for src in (record.plot, record.metrics):
            if src is not None:
                shutil.copyfile(src, tmp / src.name)
        card = render_model_card(record, repo_id, export_config=read_export_config(os.fspath(tmp)),
                                 files=sorted(os.listdir(tmp)), template_path=template_path,
                                 benchmark=benchmark)
        card.save(tmp / CARD_NAME)
        for p in tmp.iterdir():  # mkdtemp and safetensors leave 0700/0600; the folder is meant to be shared
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, sorted(os.listdir(out))
