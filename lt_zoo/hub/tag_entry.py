"""The ``lt_zoo.models.pretrained_tags.PRETRAINED_TAGS`` entry of a published checkpoint, ready to paste."""
import pprint
from typing import Any, Dict, List, Tuple

from ..models.pretrained_tags import PRETRAINED_TAGS
from .citations import PAPERS, papers_for

__all__ = ['pretrained_tag_entry', 'format_tag_entry']

# model_args that a tag's cfg expresses itself (num_classes, input_size[0]) or that timm fills in
_CFG_ARGS = ('num_classes', 'in_chans', 'global_pool')


def pretrained_tag_entry(record, export_config: Dict[str, Any], repo_id: str) -> Tuple[str, Dict[str, Any], List[str]]:
    """(``arch.tag`` name, cfg overrides, warnings) for the checkpoint published at ``repo_id``.

    The name is the repo name when it reads ``<architecture>.<tag>`` (the lt-zoo convention), else
    ``<architecture>.<repo name with dots replaced>``.  Warnings name model args that a tag cannot carry
    (tag loading uses the entrypoint defaults; ``hf-hub:`` loading reads them from config.json).
    """
    arch = export_config['architecture']
    repo_name = repo_id.split('/')[-1]
    name = repo_name if repo_name.startswith(arch + '.') else f"{arch}.{repo_name.replace('.', '_')}"
    pcfg = export_config.get('pretrained_cfg', {})
    entry: Dict[str, Any] = {'hf_hub_id': repo_id, 'num_classes': export_config['num_classes']}
    for key in ('input_size', 'pool_size', 'crop_pct', 'interpolation', 'mean', 'std'):
        if pcfg.get(key) is not None:
            entry[key] = tuple(pcfg[key]) if isinstance(pcfg[key], list) else pcfg[key]
    if export_config.get('label_names'):
        entry['label_names'] = tuple(export_config['label_names'])
    entry['license'] = pcfg.get('license', 'apache-2.0')
    ev = record.eval
    paper = PAPERS[papers_for(ev['method'], ev['stage'], record.train_config.get('loss'), record.architecture)[0]]
    entry.update(paper_name=paper['title'], paper_ids=f"arXiv:{paper['arxiv']}",
                 description=f"{arch}, method {ev['method']} ({ev['stage']}), {ev['dataset']}")
    extra = {k: v for k, v in export_config.get('model_args', {}).items() if k not in _CFG_ARGS}
    warnings = [f"config.json model_args {extra} cannot be carried by a pretrained tag: "
                f"timm.create_model('{name}', pretrained=True) builds the entrypoint's default options, so the tag "
                f"only loads if these are the defaults; otherwise document 'hf-hub:{repo_id}'"] if extra else []
    listed = PRETRAINED_TAGS.get(name)
    if listed is not None:
        stale = [k for k in _CHECKED if _norm(listed.get(k)) != _norm(entry.get(k))]
        if stale:
            warnings.append(f"PRETRAINED_TAGS['{name}'] differs from this checkpoint in {stale}: paste the entry "
                            f"above into lt_zoo/models/pretrained_tags.py")
    return name, entry, warnings


# fields of a listed tag that must describe the published weights
_CHECKED = ('hf_hub_id', 'num_classes', 'input_size', 'mean', 'std', 'label_names')


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def format_tag_entry(name: str, entry: Dict[str, Any]) -> str:
    """``'name': dict(...)`` lines to paste into PRETRAINED_TAGS."""
    body = pprint.pformat(entry, indent=4, width=110, sort_dicts=False)
    return f"{name!r}: {body},"
