"""Model card of a run: Hub metadata with a ``model-index`` plus a Jinja body (hub_cards/ template).

Every number in the card is read from the run: results, per-class accuracies, class counts and the
long-tail record from eval.json, the recipe from the resolved config.yaml, input size and normalisation
from the exported config.json.  Nothing is typed in by hand.  Optionally the card also shows the run's row
of a benchmark seed table (``benchmark``: one row of e.g. benchmarks/results/fmnist_lt.json, read with
``benchmark_row``): its mean, std and per-seed balanced accuracy, numbers taken from that row only.
"""
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..metrics import shot_groups
from ..models.pretrained_tags import PRETRAINED_TAGS
from .citations import PAPERS, papers_for

__all__ = ['DEFAULT_TEMPLATE', 'benchmark_row', 'card_data_for', 'render_model_card', 'dataset_ids',
           'needs_lt_zoo_import']

_CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = _CHECKOUT / 'hub_cards' / 'model_card_template.md'

# Hub dataset ids of lt_zoo's built-in datasets (lt_zoo.data.builtin); 'digits' (scikit-learn) has none.
_BUILTIN_HUB_IDS = {'fashion_mnist': 'zalando-datasets/fashion_mnist'}
_BUILTIN_TITLES = {'fashion_mnist': 'Fashion-MNIST', 'digits': 'Digits'}

METHOD_TITLES = {
    'ce': 'cross-entropy', 'ce_balanced': 'cross-entropy on a class-balanced subset (upper reference)',
    'focal': 'focal loss', 'class_balanced': 'class-balanced loss (effective number of samples)',
    'ldam_drw': 'LDAM with deferred re-weighting (LDAM-DRW)', 'logit_adjust': 'logit-adjusted cross-entropy',
    'balanced_softmax': 'Balanced Softmax', 'gcl': 'Gaussian Clouded Logit adjustment (GCL)',
    'nbn': 'Normalized Batch Normalization (NBN)', 'cbn': 'Compound Batch Normalization (CBN), dual-path learning',
    'crt': 'classifier re-training (cRT)', 'lws': 'learnable weight scaling (LWS)',
    'tau_norm': 'tau-normalisation', 'fsa': 'Feature Space Augmentation (FSA)',
}
STAGE_TITLES = {'stage1': 'stage 1 (representation and classifier)', 'crt': 'classifier re-training (cRT)',
                'lws': 'learnable weight scaling (LWS)', 'tau_norm': 'tau-normalisation',
                'fsa': 'FSA phase II (feature space augmentation)'}

# config keys not shown in the recipe: run bookkeeping, data location, and the long-tail keys (own section)
_RECIPE_SKIP = {'output_dir', 'overwrite', 'resume', 'stop_after_epoch', 'cpu', 'num_workers', 'log_with',
                'save_checkpoints', 'keep_checkpoints', 'progress', 'eval_every', 'data_dir', 'data_files',
                'image_column', 'label_column', 'train_split', 'test_split', 'method', 'dataset',
                'imbalance_factor', 'lt_profile', 'lt_selection', 'lt_seed', 'balanced_subset',
                'many_threshold', 'few_threshold'}
_DUAL_PATH_KEYS = {'dual_cls_views', 'dual_cls_paths', 'consistency_weight', 'consistency_views', 'strong_aug'}


def _relevant(key: str, cfg: Dict[str, Any]) -> bool:
    """Whether a config key took part in the run (e.g. fsa_* only in an FSA stage)."""
    stage = cfg.get('stage', 'stage1')
    if key in _RECIPE_SKIP:
        return False
    if key in _DUAL_PATH_KEYS:
        return bool(cfg.get('dual_path'))
    if key.startswith('fsa_'):
        return stage == 'fsa'
    rules = {'tau': stage == 'tau_norm', 'reinit_classifier': stage == 'crt', 'stage1_dir': stage != 'stage1',
             'lr_steps': cfg.get('scheduler') == 'step', 'model': stage == 'stage1', 'model_kwargs': stage == 'stage1'}
    return rules.get(key, True)


def _fmt(v: Any) -> str:
    if v is None:
        return '-'
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


def recipe_rows(cfg: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(key, value) rows of the config keys that shaped the run, in config order (checkout paths relative)."""
    return [(k, _repo_relative_text(_fmt(v))) for k, v in cfg.items() if _relevant(k, cfg)]


def dataset_ids(record) -> Tuple[Optional[str], str, str]:
    """(Hub dataset id or None, dataset type for model-index, human title such as 'Fashion-MNIST-LT (IF 100)')."""
    name = record.eval['dataset']
    hub_id = _BUILTIN_HUB_IDS.get(name, name if '/' in name else None)
    title = _BUILTIN_TITLES.get(name, name)
    lt = record.eval['long_tail']
    if record.train_config.get('balanced_subset'):
        title += f" balanced subset ({sum(lt['counts'])} images)"
    elif lt.get('imbalance_factor', 1) > 1:
        title += f"-LT (IF {lt['imbalance_factor']:g})"
    return hub_id, hub_id or name, title


def needs_lt_zoo_import(architecture: str) -> bool:
    """True when ``architecture`` is registered by lt_zoo, i.e. timm cannot build it without ``import lt_zoo``."""
    return timm.models.is_model(architecture) and \
        timm.models.model_entrypoint(architecture).__module__.split('.')[0] == 'lt_zoo'


def _metrics(record) -> List[Tuple[str, str, str, float]]:
    """(eval key, model-index type, name, value) of the measured results; absent shot groups skipped."""
    ev, cfg = record.eval, record.train_config
    many, few = cfg.get('many_threshold', 100), cfg.get('few_threshold', 20)
    rows = [('top1', 'accuracy', 'Top-1 accuracy'),
            ('balanced_acc', 'balanced_accuracy', 'Balanced accuracy (mean per-class)'),
            ('many', 'accuracy', f'Many-shot accuracy (classes with > {many} training images)'),
            ('medium', 'accuracy', f'Medium-shot accuracy ({few}-{many} training images)'),
            ('few', 'accuracy', f'Few-shot accuracy (< {few} training images)'),
            ('ece', 'ece', 'Expected calibration error (max-softmax confidence, equal-width bins)')]
    return [(k, t, n, ev[k]) for k, t, n in rows if ev.get(k) is not None]


def card_data_for(record, repo_id: str, architecture: Optional[str] = None) -> ModelCardData:
    """Hub metadata: library timm, apache-2.0, tags, dataset and the model-index of the measured results."""
    hub_id, dataset_type, title = dataset_ids(record)
    ev, lt = record.eval, record.eval['long_tail']
    split = record.train_config.get('test_split', 'test')
    lt_args = {k: v for k, v in lt.items() if k != 'counts'} or None
    results = [EvalResult(task_type='image-classification', task_name='Image Classification',
                          dataset_type=dataset_type, dataset_name=title, dataset_split=split, dataset_args=lt_args,
                          metric_type=mtype, metric_name=name, metric_value=value)
               for _, mtype, name, value in _metrics(record)]
    arch = architecture or record.architecture
    tags = ['image-classification', 'timm', 'lt_zoo', 'long-tailed', ev['method']]
    tags += [t for t, suffix in (('compound-batch-norm', '_cbn'), ('normalized-batch-norm', '_nbn'))
             if suffix in record.architecture and t not in tags]
    if ev['stage'] != 'stage1' and ev['stage'] not in tags:
        tags.append(ev['stage'])
    # base_model stays unset (None keys are dropped): every checkpoint is trained from scratch.
    return ModelCardData(library_name='timm', license='apache-2.0', pipeline_tag='image-classification',
                         tags=tags, datasets=[hub_id] if hub_id else None, metrics=['accuracy'],
                         model_name=repo_id.split('/')[-1], eval_results=results)


def _stage1_recipe(cfg: Dict[str, Any], run_path: Path) -> Optional[List[Tuple[str, str]]]:
    """Recipe rows of the stage-1 run a stage-2 run started from, when its config.yaml can be found."""
    if cfg.get('stage', 'stage1') == 'stage1' or not cfg.get('stage1_dir'):
        return None
    for base in (Path.cwd(), run_path.parent, run_path):
        path = base / cfg['stage1_dir'] / 'config.yaml'
        if path.is_file():
            with open(path) as f:
                return recipe_rows(yaml.safe_load(f))
    return None


def _repo_relative_text(text: Optional[str]) -> Optional[str]:
    """``text`` with each absolute path inside this checkout made relative to it (the checkout itself: ``.``).

    ``--config /home/me/lt_zoo/train/configs/x.yaml`` -> ``--config train/configs/x.yaml``.  A card is public
    and its command should run in any checkout; records written before train/train.py made its paths
    repo-relative still hold absolute ones.  Paths outside the checkout are left as they are.
    """
    if not text:
        return text
    sep = re.escape(os.sep)
    for root in sorted({str(_CHECKOUT), str(Path(__file__).absolute().parents[2])}, key=len, reverse=True):
        # a path starts a token (or follows '=' or a quote) and the root ends at a separator or the token's end
        pattern = rf"(?<![^\s='\"]){re.escape(root)}(?:{sep}|(?=[\s'\"]|$))"
        text = re.sub(pattern, lambda m: '.' if m.group(0) == root else '', text)
    return text


# `--resume latest` (or a checkpoint folder) continues a run that was stopped; on a fresh checkout the run
# directory has no checkpoint and train/train.py refuses it, so the card shows the command that starts the
# run, and says that it was resumed.
_RESUME = re.compile(r"\s--resume(?:=|\s+)(?:'[^']*'|\"[^\"]*\"|\S+)")


def starting_command(command: Optional[str]) -> Tuple[Optional[str], bool]:
    """(``command`` without its ``--resume`` option, whether it had one): what reproduces the run from scratch."""
    if not command:
        return command, False
    started = _RESUME.sub('', command)
    return started, started != command


def benchmark_row(table_path: str, row_id: str) -> Optional[Dict[str, Any]]:
    """Row ``row_id`` of a benchmark seed table (benchmarks/fmnist_lt.py's ``<table>.json``) for a card.

    Returns the row plus ``table`` (the table's Markdown file next to the JSON when there is one, else the
    JSON; relative to this checkout when inside it), ``command`` (the table's ``meta.command``, which
    replaces the row's per-seed training command) and ``table_rows`` (every row of the table with a
    finished seed: method, label, seeds, mean, std; what the card compares the row with), or None when the
    table has no such row or the row has no finished seed yet.
    """
    path = Path(table_path)
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark table {str(table_path)!r} not found (benchmarks/fmnist_lt.py writes "
                                f"benchmarks/results/fmnist_lt.json)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"benchmark table {str(table_path)!r} is unreadable: {' '.join(str(e).split())}") from None
    if not isinstance(table, dict) or not isinstance(table.get('results'), list) or \
            not isinstance(table.get('meta'), dict) or not table['meta'].get('command'):
        raise ValueError(f"benchmark table {str(table_path)!r} is not a seed table: expected "
                         f"{{'meta': {{..., 'command': ...}}, 'results': [...]}}")
    row = next((r for r in table['results'] if isinstance(r, dict) and r.get('method') == row_id), None)
    if row is None or not row.get('seeds'):
        return None
    shown = path.with_suffix('.md') if path.with_suffix('.md').is_file() else path
    others = [{k: r.get(k) for k in ('method', 'label', 'seeds', 'mean', 'std')} for r in table['results']
              if isinstance(r, dict) and r.get('seeds') and r.get('mean') is not None]
    return dict(row, table=_repo_relative_text(os.path.abspath(shown)), command=table['meta']['command'],
                table_rows=others)


def _pct(v: float) -> str:
    return f'{100 * v:.2f}'


def _benchmark_context(benchmark: Optional[Dict[str, Any]], record) -> Optional[Dict[str, Any]]:
    """What the card's "Benchmark across seeds" section shows, every number from ``benchmark``.

    Refuses a row this run is not part of: the run's seed (config.yaml ``seed``) must be one of the row's
    seeds, with the row's balanced accuracy for that seed equal to the run's eval.json ``balanced_acc``.
    """
    if benchmark is None:
        return None
    return _across_seeds(benchmark, record.train_config.get('seed'), record.eval['balanced_acc'], str(record.path))


def _across_seeds(benchmark: Dict[str, Any], seed, run_value: float, where: str) -> Dict[str, Any]:
    absent = [k for k in ('method', 'seeds', 'balanced_acc_per_seed', 'mean', 'table', 'command')
              if benchmark.get(k) is None]
    if absent:
        raise ValueError(f"benchmark row lacks {absent}; expected a row of the seed table plus 'table' and "
                         f"'command' (lt_zoo.hub.card.benchmark_row)")
    row_id, seeds, values = benchmark['method'], list(benchmark['seeds']), list(benchmark['balanced_acc_per_seed'])
    if not seeds or len(seeds) != len(values):
        raise ValueError(f"benchmark row {row_id!r}: seeds {seeds} and balanced_acc_per_seed {values} do not match "
                         f"one to one")
    if seed not in seeds:
        raise ValueError(f"run {where!r} has seed {seed!r}, which is not one of benchmark row {row_id!r}'s "
                         f"seeds {seeds}; the card would show another run's table")
    row_value = values[seeds.index(seed)]
    if not math.isclose(run_value, row_value, rel_tol=0.0, abs_tol=1e-9):
        raise ValueError(f"run {where!r} has balanced accuracy {run_value}, but benchmark row {row_id!r} "
                         f"records {row_value} for seed {seed}: the table was made from another run")
    std = benchmark.get('std')
    rows = [('seeds', f"{len(seeds)} ({', '.join(str(s) for s in seeds)})"),
            ('balanced accuracy %, mean ± std over seeds' if std is not None else 'balanced accuracy %',
             _pct(benchmark['mean']) + (f' ± {_pct(std)}' if std is not None else '')),
            ('balanced accuracy % per seed', ', '.join(_pct(v) for v in values))]
    rows += [(f'{group}-shot accuracy %, mean over seeds', _pct(benchmark[group]))
             for group in ('many', 'medium', 'few') if benchmark.get(group) is not None]
    compared = [(f"**`{r['method']}`**" if r['method'] == row_id else f"`{r['method']}`",
                 _escape(r.get('label') or ''), str(len(r['seeds'])),
                 _pct(r['mean']) + (f" ± {_pct(r['std'])}" if r.get('std') is not None else ''))
                for r in benchmark.get('table_rows') or []]
    return dict(row=row_id, label=benchmark.get('label'), seed=seed, rows=rows, compared=compared,
                table=_repo_relative_text(str(benchmark['table'])),
                command=_repo_relative_text(str(benchmark['command'])))


_SECTION_HEADING = '## Benchmark across seeds\n'


def benchmark_section(context: Optional[Dict[str, Any]]) -> str:
    """The card's "Benchmark across seeds" section (markdown ending in a blank line), '' without a row.
    One function renders it, for a whole card and for :func:`refresh_benchmark_section`."""
    if context is None:
        return ''
    label = f' ("{context["label"]}")' if context.get('label') else ''
    rows = ''.join(f'| {name} | {value} |\n' for name, value in context['rows'])
    compared = ''
    if context.get('compared'):
        compared = ("Every row of the same table with a finished seed, this one in bold (same data, protocol and "
                    "test split; differences within about the rows' std are seed noise):\n\n"
                    "| row | method | seeds | balanced accuracy % |\n|---|---|---|---|\n"
                    + ''.join(f'| {" | ".join(r)} |\n' for r in context['compared']) + '\n')
    return (f"{_SECTION_HEADING}\nThis checkpoint is seed {context['seed']} of the benchmark row `{context['row']}`"
            f"{label}, which trains the same recipe once per seed (balanced test split):\n\n"
            f"| across seeds | value |\n|---|---|\n{rows}\n{compared}"
            f"From `{context['table']}`, produced by `{context['command']}`.\n\n")


def refresh_benchmark_section(card_path: str, benchmark: Dict[str, Any], seed: int, balanced_acc: float,
                              where: str) -> bool:
    """Rewrite only the "Benchmark across seeds" section of a rendered card, in place, from ``benchmark``
    (a row of the seed table); the card's run is seed ``seed`` with ``balanced_acc`` (its eval.json, or the
    benchmark's committed record of it, named by ``where``).  For a card whose run directory, and so its
    checkpoint, is not on this machine: every other number of the card comes from that run and stays.
    Returns whether the file changed."""
    path = Path(card_path)
    text = path.read_text()
    section = benchmark_section(_across_seeds(benchmark, seed, balanced_acc, where))
    if text.count(_SECTION_HEADING) == 1:
        start = text.index(_SECTION_HEADING)
        end = text.find('\n## ', start + len(_SECTION_HEADING))
        if end < 0:
            raise ValueError(f"card {card_path!r}: no heading after its benchmark section")
        new = text[:start] + section + text[end + 1:]
    elif text.count('\n## Usage\n') == 1:  # a card rendered before its row had a finished seed
        start = text.index('\n## Usage\n') + 1
        new = text[:start] + section + text[start:]
    else:
        raise ValueError(f"card {card_path!r} has neither one {_SECTION_HEADING.strip()!r} nor one '## Usage' "
                         f"heading; render it whole (hub_cards/render_all.py)")
    if new == text:
        return False
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(new)
    os.replace(tmp, path)
    return True


def _escape(s: Any) -> str:
    return str(s).replace('|', '\\|')


def render_model_card(record, repo_id: str, *, export_config: Optional[Dict[str, Any]] = None,
                      files: Sequence[str] = (), template_path: Optional[str] = None,
                      benchmark: Optional[Dict[str, Any]] = None) -> ModelCard:
    """The model card of ``record`` published as ``repo_id`` (``export_config``: the published config.json).

    ``benchmark``: the run's row of a benchmark seed table (``benchmark_row``); adds the section
    "Benchmark across seeds" after the results.  Without it the card shows this run only.
    """
    template = Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {str(template)!r} not found; pass template_path "
                                f"(CLI: --template)")
    ev, cfg = record.eval, record.train_config
    across_seeds = _benchmark_context(benchmark, record)
    export_config = export_config or record.export_config
    arch = export_config['architecture']
    pcfg = export_config.get('pretrained_cfg', {})
    hub_id, _, dataset_title = dataset_ids(record)
    groups = shot_groups(ev['class_counts'], cfg.get('many_threshold', 100), cfg.get('few_threshold', 20))
    classes = [dict(index=i, name=_escape(n), count=c, group=g, acc='-' if a is None else f'{100 * a:.2f}')
               for i, (n, c, g, a) in enumerate(zip(ev['class_names'], ev['class_counts'], groups,
                                                     ev['per_class_acc']))]
    results = [dict(name=name, key=k, value=f'{100 * v:.2f}') for k, _, name, v in _metrics(record)]
    papers = [dict(key=k, **PAPERS[k]) for k in papers_for(ev['method'], ev['stage'], cfg.get('loss'),
                                                              record.architecture)]
    tag = next((name for name, entry in PRETRAINED_TAGS.items() if entry.get('hf_hub_id') == repo_id), None)
    lt = ev['long_tail']
    command, resumed = starting_command(ev['command'])
    data = card_data_for(record, repo_id, arch)
    return ModelCard.from_template(
        data, template_path=str(template),
        repo_id=repo_id, architecture=arch, trained_architecture=record.architecture,
        folded=arch != record.architecture, needs_lt_zoo=needs_lt_zoo_import(arch),
        method=ev['method'], method_title=METHOD_TITLES.get(ev['method'], ev['method']),
        stage=ev['stage'], stage_title=STAGE_TITLES.get(ev['stage'], ev['stage']),
        dataset=ev['dataset'], dataset_title=dataset_title, dataset_hub_id=hub_id,
        train_images=ev['train_images'], test_images=ev['test_images'], world_size=ev.get('world_size'),
        input_size=list(pcfg.get('input_size', [])), mean=list(pcfg.get('mean', [])),
        std=list(pcfg.get('std', [])), num_classes=export_config['num_classes'],
        model_args=json.dumps(export_config.get('model_args', {})),
        results=results, recipe=recipe_rows(cfg), stage1_recipe=_stage1_recipe(cfg, record.path),
        stage1_dir=_repo_relative_text(cfg.get('stage1_dir')), command=_repo_relative_text(command),
        resumed=resumed,
        classes=classes, many_threshold=cfg.get('many_threshold', 100), few_threshold=cfg.get('few_threshold', 20),
        long_tail={k: _fmt(v) for k, v in lt.items() if k not in ('counts', 'indices_hash')},
        indices_hash=lt.get('indices_hash'), papers=papers, pretrained_tag=tag,
        has_plot='per_class_accuracy.png' in files, has_metrics='metrics.jsonl' in files,
        has_training_config='training_config.yaml' in files, benchmark_section=benchmark_section(across_seeds),
    )
