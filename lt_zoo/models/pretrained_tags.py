"""Which lt_zoo names have weights, where they come from, and what a load says when they are missing.

Two kinds of ``'arch.tag'`` (usage and the full table: docs/pretrained.md):

- **Converted timm ImageNet weights** (every ImageNet-depth architecture, ``resnet50_cbn.a1_in1k`` ...):
  the repo is timm's own checkpoint of the same depth (``hf_hub_id`` of timm's default tag, e.g.
  ``timm/resnet50.a1_in1k``); the model's ``pretrained_filter_fn`` (``lt_zoo.models.timm_weights``)
  turns its BN layers and linear head into the architecture's NBN / CBN / cosine head while loading.
  They are the default tag of their architecture, so ``timm.create_model('resnet50_cbn', pretrained=True)``
  loads them.  Not trained on long-tailed data.
- **lt_zoo-trained checkpoints** (``PRETRAINED_TAGS``, the ResNet-32 Fashion-MNIST-LT benchmark):
  repos ``lt-zoo/<arch>.<tag>``, each the seed-0 run of its benchmark row (``SOURCE_RUNS``,
  ``SOURCE_ROWS``).  Each entry records ``published``; an unpublished tag is registered without a weight
  source (``timm.list_pretrained`` does not list it) and ``pretrained=True`` names the commands that train
  it locally.  ``python -m lt_zoo.hub push RUN --repo-id lt-zoo/NAME`` uploads a run and
  prints its entry; paste it here with ``published=True``.

Every tag loads ``model.safetensors`` only (``hf_hub_filename``): timm would otherwise retry the pickled
``pytorch_model.bin`` when the safetensors file is missing.

Tag loading builds the model from the entrypoint's default options plus the cfg's num_classes and
in_chans (``input_size[0]``); a checkpoint trained with other model options (e.g. ``num_components``)
must be loaded with ``hf-hub:`` instead, which reads them from config.json ``model_args``.

Why ``with_pretrained_tags`` reorders lt_zoo-trained tags: ``timm.models.generate_default_cfgs`` makes the
first tag *with weights* the architecture's default, and the default cfg's num_classes/in_chans become
constructor defaults, so ``timm.create_model('resnet32_cbn')`` would silently turn into a 1-channel,
10-class model.  The untrained cfg is therefore re-keyed ``'arch.*'`` (timm: "a tag ending in '*' marks
the default") and placed after those tags (a ``*`` key placed first would lose its place to the first tag
with weights; timm/models/_registry.py ``generate_default_cfgs``).  Converted ImageNet tags keep the
architecture's 1000 classes and 3 channels, so they become the default instead.
"""
import contextlib
from typing import Any, Dict, Iterator, Optional

import timm
from timm.models import get_pretrained_cfg
from timm.models._builder import resolve_pretrained_cfg

__all__ = ['BENCHMARK_TABLE', 'HF_ORG', 'PRETRAINED_TAGS', 'SOURCE_ROWS', 'SOURCE_RUNS', 'TIMM_SOURCE_TAGS',
           'WEIGHTS_FILE', 'converted_tag', 'with_pretrained_tags', 'check_pretrained', 'hub_errors']

HF_ORG = 'lt-zoo'
# The only file a tag loads; timm's default would fall back to the pickled pytorch_model.bin.
WEIGHTS_FILE = 'model.safetensors'

# Label order 0..9 of Zalando's Fashion-MNIST README (= lt_zoo.data.FASHION_MNIST_CLASSES, checked by a test).
_FASHION_MNIST_LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')

# Fashion-MNIST-LT benchmark, protocol v4 (train/configs/fmnist_lt/_base.yaml, benchmarks/fmnist_lt.py
# PROTOCOL_VERSION): IF 100, exp profile, cao2019 selection, lt_seed 0 -> 14,886 training images (indices hash
# 52323999b1542c91), resized to 16x16x1, so ResNet-32 (two stride-2 stages) ends on a 4x4 map.  mean/std: the
# training split's (lt_zoo.data.dataset_mean_std, normalize: dataset), computed on the images at their stored
# 28x28 size, so the input size does not change them; every benchmark run records them in its config.json
# pretrained_cfg; stage-2 runs inherit them from stage 1.  Replace with the printed entry if they differ.
_FMNIST_LT = dict(
    num_classes=10, input_size=(1, 16, 16), pool_size=(4, 4), crop_pct=1.0, interpolation='bilinear',
    mean=(0.2979101838236302,), std=(0.3550707124808394,), label_names=_FASHION_MNIST_LABELS,
    license='apache-2.0', origin_url='https://github.com/zalandoresearch/fashion-mnist',
)
_RESNET = dict(paper_name='Deep Residual Learning for Image Recognition', paper_ids='arXiv:1512.03385')
_BS = dict(paper_name='Balanced Meta-Softmax for Long-Tailed Visual Recognition', paper_ids='arXiv:2007.10740')
_LDAM = dict(paper_name='Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss',
             paper_ids='arXiv:1906.07413')
_GCL = dict(paper_name='Long-tailed Visual Recognition via Gaussian Clouded Logit Adjustment',
            paper_ids='arXiv:2305.11733')
_NBN = dict(paper_name='Normalizing Batch Normalization for Long-Tailed Recognition', paper_ids='arXiv:2501.03122')
_CBN = dict(paper_name='Compound Batch Normalization for Long-tailed Image Classification',
            paper_ids='arXiv:2212.01007')
_FSA = dict(paper_name='Feature Space Augmentation for Long-Tailed Data', paper_ids='arXiv:2008.03673')


def _tag(name: str, description: str, paper: Dict[str, str], published: bool = False, **overrides) -> Dict[str, Any]:
    return dict(_FMNIST_LT, hf_hub_id=f'{HF_ORG}/{name}', description=description, published=published, **paper,
                **overrides)


# No lt-zoo/... repo exists yet: every entry is published=False until `python -m lt_zoo.hub push` has run.
PRETRAINED_TAGS: Dict[str, Dict[str, Any]] = {
    'resnet32.fmnist_lt': _tag(
        'resnet32.fmnist_lt', 'ResNet-32, cross-entropy, Fashion-MNIST-LT (IF 100)', _RESNET),
    'resnet32.fmnist_lt_bs': _tag(
        'resnet32.fmnist_lt_bs', 'ResNet-32, Balanced Softmax, Fashion-MNIST-LT (IF 100)', _BS),
    'resnet32_gcl.fmnist_lt_ldam': _tag(
        'resnet32_gcl.fmnist_lt_ldam', 'ResNet-32 cosine head, LDAM-DRW, Fashion-MNIST-LT (IF 100)', _LDAM),
    'resnet32_gcl.fmnist_lt': _tag(
        'resnet32_gcl.fmnist_lt', 'ResNet-32 cosine head, GCL stage 1 + cRT, Fashion-MNIST-LT (IF 100)', _GCL),
    'resnet32_gcl.fmnist_lt_nomix': _tag(
        'resnet32_gcl.fmnist_lt_nomix', 'ResNet-32 cosine head, GCL stage 1 without mixup + cRT, Fashion-MNIST-LT '
                                        '(IF 100)', _GCL),
    'resnet32_nbn.fmnist_lt': _tag(
        'resnet32_nbn.fmnist_lt', 'ResNet-32 with Normalized BN, cross-entropy, Fashion-MNIST-LT (IF 100)', _NBN),
    'resnet32_cbn.fmnist_lt': _tag(
        'resnet32_cbn.fmnist_lt', 'ResNet-32 with Compound BN, dual path + Balanced Softmax, Fashion-MNIST-LT '
                                  '(IF 100)', _CBN),
    'resnet32.fmnist_lt_fsa': _tag(
        'resnet32.fmnist_lt_fsa', 'ResNet-32, cross-entropy + FSA phase II, Fashion-MNIST-LT (IF 100)', _FSA),
}

# The benchmark run each tag is published from: the seed-0 run directory benchmarks/fmnist_lt.py writes
# (runs/bench/<row id>/seed<k>, trained with the config of RUNS[<row id>] there, no overrides, and --seed k).
#   python -m lt_zoo.hub push runs/bench/cbn/seed0 --repo-id lt-zoo/resnet32_cbn.fmnist_lt \
#       --benchmark benchmarks/results/fmnist_lt.json
SOURCE_RUNS: Dict[str, str] = {
    'resnet32.fmnist_lt': 'runs/bench/ce/seed0',
    'resnet32.fmnist_lt_bs': 'runs/bench/balanced_softmax/seed0',
    'resnet32_gcl.fmnist_lt_ldam': 'runs/bench/ldam_drw/seed0',
    'resnet32_gcl.fmnist_lt': 'runs/bench/gcl_crt/seed0',
    'resnet32_gcl.fmnist_lt_nomix': 'runs/bench/gcl_nomix_crt/seed0',
    'resnet32_nbn.fmnist_lt': 'runs/bench/nbn/seed0',
    'resnet32_cbn.fmnist_lt': 'runs/bench/cbn/seed0',
    'resnet32.fmnist_lt_fsa': 'runs/bench/fsa/seed0',
}
# Each tag's row of the benchmark seed table (benchmarks/results/fmnist_lt.json "results"[i]["method"], a run
# id of benchmarks/fmnist_lt.py RUNS); its card shows that row's mean, std and per-seed values.
SOURCE_ROWS: Dict[str, str] = {
    'resnet32.fmnist_lt': 'ce',
    'resnet32.fmnist_lt_bs': 'balanced_softmax',
    'resnet32_gcl.fmnist_lt_ldam': 'ldam_drw',
    'resnet32_gcl.fmnist_lt': 'gcl_crt',
    'resnet32_gcl.fmnist_lt_nomix': 'gcl_nomix_crt',
    'resnet32_nbn.fmnist_lt': 'nbn',
    'resnet32_cbn.fmnist_lt': 'cbn',
    'resnet32.fmnist_lt_fsa': 'fsa',
}
# The benchmark's seed table and the stage-1 row id of each stage-2 row above (benchmarks/fmnist_lt.py RUNS).
BENCHMARK_TABLE = 'benchmarks/results/fmnist_lt.json'
_STAGE1_ROWS = {'gcl_crt': 'gcl', 'gcl_nomix_crt': 'gcl_nomix', 'fsa': 'ce'}
# Rows trained with a variant of a method's recipe (train/configs/fmnist_lt/variants/); any other row's
# config is train/configs/fmnist_lt/<row>.yaml (benchmarks/fmnist_lt.py RUNS, checked by a test).
_ROW_CONFIGS = {'gcl_nomix': 'variants/gcl_nomix.yaml', 'gcl_nomix_crt': 'variants/gcl_nomix_crt.yaml'}


def _row_config(row: str) -> str:
    return 'train/configs/fmnist_lt/' + _ROW_CONFIGS.get(row, f'{row}.yaml')


# Depth -> timm's default ImageNet tag of that depth (timm 1.0 timm/models/resnet.py default_cfgs: the first
# tag of each depth; a test checks them against the installed timm).  The converted lt_zoo tag has its name.
TIMM_SOURCE_TAGS: Dict[str, str] = {
    'resnet18': 'a1_in1k',
    'resnet34': 'a1_in1k',
    'resnet50': 'a1_in1k',
    'resnet101': 'a1h_in1k',
    'resnet152': 'a1h_in1k',
}
# Data fields of timm's cfg that describe its weights (the model's own cfg keeps first_conv, classifier, papers).
_TIMM_DATA_FIELDS = ('num_classes', 'input_size', 'test_input_size', 'pool_size', 'crop_pct', 'test_crop_pct',
                     'crop_mode', 'interpolation', 'mean', 'std', 'license')


def converted_tag(arch: str) -> Optional[str]:
    """``'resnet50_cbn'`` -> ``'resnet50_cbn.a1_in1k'``: the tag holding timm's weights of that depth, or None."""
    depth = arch.split('_', 1)[0]
    tag = TIMM_SOURCE_TAGS.get(depth)
    return None if tag is None or depth == arch else f'{arch}.{tag}'


def _converted_cfg(arch: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    depth = arch.split('_', 1)[0]
    tag = TIMM_SOURCE_TAGS[depth]
    source = get_pretrained_cfg(f'{depth}.{tag}').to_dict()
    return {
        **cfg, **{k: source[k] for k in _TIMM_DATA_FIELDS if source.get(k) is not None},
        'url': '', 'hf_hub_id': source['hf_hub_id'], 'hf_hub_filename': WEIGHTS_FILE,
        'origin_url': source.get('origin_url'),
        'description': f"timm's ImageNet-1k weights {depth}.{tag}, converted to {arch} while loading "
                       f"(ImageNet-initialised, not trained on long-tailed data)",
    }


def _registered_cfg(cfg: Dict[str, Any], entry: Dict[str, Any]) -> Dict[str, Any]:
    """The timm cfg of an lt_zoo-trained tag: no weight source until its repo is published."""
    out = {**cfg, **{k: v for k, v in entry.items() if k != 'published'}, 'hf_hub_filename': WEIGHTS_FILE}
    if not entry.get('published', False):
        out.pop('hf_hub_id')
    return out


def with_pretrained_tags(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{arch: cfg}`` -> the same cfgs plus every tag of these architectures, ordered for timm's default.

    An ImageNet-depth architecture gets its converted timm tag first (the default, with weights).  An
    architecture with lt_zoo-trained tags gets them (published ones with their Hub repo), then ``arch.*``
    (the untouched cfg, so it stays the default of the bare name).  Others keep their single untagged
    entry.  Feed the result to ``timm.models.generate_default_cfgs``.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for arch, cfg in cfgs.items():
        if '.' in arch:
            raise ValueError(f"with_pretrained_tags expects bare architecture names, got {arch!r}")
        converted = converted_tag(arch)
        if converted:
            out[converted] = _converted_cfg(arch, cfg)
        tags = {name: entry for name, entry in PRETRAINED_TAGS.items() if name.split('.', 1)[0] == arch}
        for name, entry in tags.items():
            out[name] = _registered_cfg(cfg, entry)
        if not converted:
            out[f'{arch}.*' if tags else arch] = cfg
    return out


# ------------------------------------------------------------------------------------- load-time checks
def _lt_zoo_pretrained() -> list:
    return timm.list_models(module=['cifar_resnet', 'imagenet_resnet'], pretrained=True, include_tags=True)


def _train_locally(name: str) -> str:
    """How to train tag ``name`` as the benchmark does (its seed-0 run), or '' for a name without a source run."""
    run, row = SOURCE_RUNS.get(name), SOURCE_ROWS.get(name)
    if run is None or row is None:
        return ''
    seed = run.rsplit('seed', 1)[-1]
    argv = f"--config {_row_config(row)} --seed {seed} --output_dir {run}"
    stage1 = _STAGE1_ROWS.get(row)
    first = ''
    if stage1:
        stage1_dir = run.replace(f'/{row}/', f'/{stage1}/')
        argv += f" --stage1_dir {stage1_dir}"
        first = (f"python train/train.py --config {_row_config(stage1)} --seed {seed} "
                 f"--output_dir {stage1_dir}`, then `")
    return (f" Train it locally as the benchmark does (seed {seed}): `{first}python train/train.py {argv}`, then "
            f"load it with timm.create_model('local-dir:{run}', pretrained=True).")


def check_pretrained(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> None:
    """Before building: refuse ``pretrained=True`` when the resolved cfg has no weights, saying what exists.

    ``kwargs`` are the entrypoint's (``pretrained_cfg`` = the tag timm split off the name, an overlay, ...).
    """
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.has_weights or cfg.state_dict is not None:
        return
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    entry = PRETRAINED_TAGS.get(name)
    if entry is not None and not entry.get('published', False):
        raise RuntimeError(
            f"{name} is an lt_zoo checkpoint whose Hub repo {entry['hf_hub_id']} is not published yet, so "
            f"pretrained=True has nothing to download.{_train_locally(name)} Publishing it: "
            f"`python -m lt_zoo.hub push {SOURCE_RUNS.get(name, 'RUN_DIR')} --repo-id {entry['hf_hub_id']}`.")
    unpublished = [n for n in PRETRAINED_TAGS if n.split('.', 1)[0] == variant]
    raise RuntimeError(
        f"No pretrained weights exist for {name}. lt_zoo names with weights: {', '.join(_lt_zoo_pretrained())}"
        + (f"; lt_zoo-trained tags of {variant} not published yet: {', '.join(unpublished)}" if unpublished else '')
        + ". Use pretrained=False for random init.")


@contextlib.contextmanager
def hub_errors(variant: str, kwargs: Dict[str, Any]) -> Iterator[None]:
    """Re-raise a missing Hub file (offline miss, missing safetensors) naming the repo, the file and the fix."""
    from huggingface_hub import constants, errors
    try:
        yield
    except (errors.LocalEntryNotFoundError, errors.EntryNotFoundError, errors.RepositoryNotFoundError) as e:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        repo, file = cfg.hf_hub_id, cfg.hf_hub_filename or WEIGHTS_FILE
        if isinstance(e, errors.RepositoryNotFoundError):
            why = f"the Hub has no repo {repo}"
        elif isinstance(e, errors.LocalEntryNotFoundError):
            why = (f"{file} of {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
                   f"cannot be reached (offline)")
        else:
            why = f"the Hub repo {repo} has no {file}"
        raise RuntimeError(
            f"cannot load pretrained weights of {variant}: {why}. lt_zoo loads {WEIGHTS_FILE} only (never a pickled "
            f"pytorch_model.bin). Provide them: on a machine with Hub access run `hf download {repo} {file}` and copy "
            f"its models--{repo.replace('/', '--')} folder into HF_HUB_CACHE, or pass "
            f"pretrained_cfg_overlay=dict(file='/path/to/{file}').") from e
