"""pretrained=True loading of the published lt_zoo tags, fully offline.

The checkpoints are written by lt_zoo's own export (lt_zoo.export.export_model) into a temporary Hugging
Face cache in the exact snapshot layout (docs/hub.md#decision-offline-cache-loading):
    models--lt-zoo--NAME/refs/main                      40-hex commit, no trailing newline
    models--lt-zoo--NAME/snapshots/<commit>/{model.safetensors, config.json}
and timm's real loading code (hf_hub_download through huggingface_hub) reads them with HF_HUB_OFFLINE.
"""
import importlib.util
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml

import timm
from hf_cache import install_snapshot
import lt_zoo  # noqa: F401  (registers the lt_zoo architectures)
from lt_zoo.data import FASHION_MNIST_CLASSES
from lt_zoo.export import export_model
from lt_zoo.layers.cosine_classifier import CosineClassifier
from lt_zoo.models import pretrained_tags
from lt_zoo.models.pretrained_tags import HF_ORG, PRETRAINED_TAGS, SOURCE_ROWS, SOURCE_RUNS
from lt_zoo.training.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHED_TAGS = ('resnet32_cbn.fmnist_lt', 'resnet32_gcl.fmnist_lt')  # a CBN model and a cosine-head model


def _perturbed(name: str) -> torch.nn.Module:
    """A model of tag ``name`` whose weights and norm statistics differ from any fresh init."""
    torch.manual_seed(sum(map(ord, name)))
    model = timm.create_model(name)  # the tag's cfg: 1 channel, 10 classes, no weights loaded
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.train()
        for _ in range(3):
            model(torch.randn(8, *model.pretrained_cfg['input_size']))
    return model.eval()


def _install_snapshot(cache: Path, repo_id: str, export_dir: Path) -> Path:
    copy = lambda name: (lambda path: shutil.copyfile(export_dir / name, path))  # noqa: E731
    return install_snapshot(cache, repo_id, {name: copy(name) for name in ('model.safetensors', 'config.json')})


@pytest.fixture(scope='module')
def hub_cache(tmp_path_factory):
    """{tag: original model} with every tag's export installed in a temporary HF cache; the cache path."""
    root = tmp_path_factory.mktemp('hf')
    cache = root / 'hub'
    models = {}
    for name in CACHED_TAGS:
        model = _perturbed(name)
        cfg = PRETRAINED_TAGS[name]
        export_dir = root / name
        export_model(model, export_dir, class_names=cfg['label_names'],
                     data_config={k: cfg[k] for k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')})
        _install_snapshot(cache, cfg['hf_hub_id'], export_dir)
        models[name] = model
    return models, cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """huggingface_hub reads its env vars at import, so patch the constants it consults per call."""
    models, cache = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    return models


def _x(model, n=4):
    return torch.randn(n, *model.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(1))


def _predict(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------ registry
def test_bare_architecture_keeps_untrained_cifar_default():
    for arch in sorted({name.split('.')[0] for name in PRETRAINED_TAGS}):
        model = timm.create_model(arch)
        assert model.conv1.weight.shape[1] == 3, arch  # not the 1-channel Fashion-MNIST tag
        assert model.pretrained_cfg['input_size'] == (3, 32, 32)
        assert model.pretrained_cfg.get('tag') is None and not model.pretrained_cfg.get('hf_hub_id')
        # the error lists what does have weights, and this architecture's unpublished tags
        with pytest.raises(RuntimeError, match=r'No pretrained weights exist for resnet32.*resnet50_cbn\.a1_in1k'
                                               r'.*not published yet: ' + arch):
            timm.create_model(arch, pretrained=True)


def test_tag_cfg_is_the_fashion_mnist_checkpoint():
    model = timm.create_model('resnet32_cbn.fmnist_lt')
    assert model.conv1.weight.shape[1] == 1 and model.num_classes == 10
    cfg = model.pretrained_cfg
    assert cfg['tag'] == 'fmnist_lt' and cfg['hf_hub_filename'] == 'model.safetensors'
    assert not cfg.get('hf_hub_id')  # not published: no download is promised
    assert cfg['input_size'] == (1, 16, 16) and cfg['architecture'] == 'resnet32_cbn'  # benchmark protocol v3
    assert cfg['pool_size'] == (4, 4) and model.forward_features(torch.zeros(1, 1, 16, 16)).shape[-2:] == (4, 4)


def test_every_tag_is_registered_and_consistent():
    published = {name for name, cfg in PRETRAINED_TAGS.items() if cfg['published']}
    registered = set(timm.list_models('resnet32*', include_tags=True))
    assert set(PRETRAINED_TAGS) <= registered
    assert {n for n in timm.list_pretrained('resnet32*') if n in PRETRAINED_TAGS} == published
    assert set(SOURCE_RUNS) == set(PRETRAINED_TAGS)
    for name, cfg in PRETRAINED_TAGS.items():
        assert isinstance(cfg['published'], bool), name
        assert cfg['hf_hub_id'] == f'{HF_ORG}/{name}' and HF_ORG == 'lt-zoo'
        assert list(cfg['label_names']) == list(FASHION_MNIST_CLASSES)
        assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0] == 1
        assert cfg['num_classes'] == len(cfg['label_names'])


def _benchmark_runs():
    """benchmarks/fmnist_lt.py RUNS (run id -> (label, config, overrides, stage-1 run id)), loaded from its file."""
    spec = importlib.util.spec_from_file_location('fmnist_lt_benchmark', REPO_ROOT / 'benchmarks' / 'fmnist_lt.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RUNS


def test_source_runs_match_the_benchmark_configs():
    """Each tag's run is the seed-0 directory of a benchmark row trained with a fmnist_lt config as it is
    (no overrides), whose (stage-1) model is the tag's arch."""
    runs = _benchmark_runs()
    configs = REPO_ROOT / 'train' / 'configs' / 'fmnist_lt'
    assert set(SOURCE_ROWS) == set(SOURCE_RUNS)
    for name, run in SOURCE_RUNS.items():
        row = SOURCE_ROWS[name]
        _, config, overrides, stage1 = runs[row]
        assert run == f'runs/bench/{row}/seed0' and overrides == {}, (name, run)
        assert pretrained_tags._STAGE1_ROWS.get(row) == stage1, row  # what the train-locally message names
        for r in (row, stage1) if stage1 else (row,):  # and the configs it names are the benchmark's
            assert pretrained_tags._row_config(r) == f'train/configs/fmnist_lt/{runs[r][1]}', r
        trained = runs[stage1][1] if stage1 is not None else config  # a stage-2 tag's network is its stage 1's
        model = load_config(['--config', str(configs / trained)])['model']  # bases resolved
        assert model == name.split('.')[0], (name, run)


# ------------------------------------------------------------------------------------------- loading
def _as_published(name):
    """What the tag's cfg will hold once its repo is published (the table's hf_hub_id)."""
    return dict(pretrained_cfg_overlay=dict(hf_hub_id=PRETRAINED_TAGS[name]['hf_hub_id']))


@pytest.mark.parametrize('name', CACHED_TAGS)
def test_unpublished_tag_says_so_and_how_to_train_it(offline, name):
    run, row = SOURCE_RUNS[name], SOURCE_ROWS[name]
    with pytest.raises(RuntimeError, match='is not published yet') as info:
        timm.create_model(name, pretrained=True)  # even with the repo in the cache: nothing is promised
    text = str(info.value)
    assert f"python train/train.py --config train/configs/fmnist_lt/{row}.yaml --seed 0 --output_dir {run}" in text
    if name == 'resnet32_gcl.fmnist_lt':  # stage 2 (cRT): its GCL stage-1 run first, then the stage-2 run on it
        stage1 = ('python train/train.py --config train/configs/fmnist_lt/gcl.yaml --seed 0 '
                  '--output_dir runs/bench/gcl/seed0`, then `python train/train.py --config '
                  'train/configs/fmnist_lt/gcl_crt.yaml --seed 0 --output_dir runs/bench/gcl_crt/seed0 '
                  '--stage1_dir runs/bench/gcl/seed0`')
        assert stage1 in text
    assert f"timm.create_model('local-dir:{run}', pretrained=True)" in text
    assert f"python -m lt_zoo.hub push {run} --repo-id {PRETRAINED_TAGS[name]['hf_hub_id']}" in text


def test_a_variant_row_names_its_variant_configs():
    text = pretrained_tags._train_locally('resnet32_gcl.fmnist_lt_nomix')
    first = ('python train/train.py --config train/configs/fmnist_lt/variants/gcl_nomix.yaml --seed 0 '
             '--output_dir runs/bench/gcl_nomix/seed0')
    second = ('python train/train.py --config train/configs/fmnist_lt/variants/gcl_nomix_crt.yaml --seed 0 '
              '--output_dir runs/bench/gcl_nomix_crt/seed0 --stage1_dir runs/bench/gcl_nomix/seed0')
    assert f'`{first}`, then `{second}`' in text
    # the configs it names exist and say what the row is: stage 1 without mixup, stage 2 cRT on it
    stage1 = load_config(['--config', str(REPO_ROOT / 'train/configs/fmnist_lt/variants/gcl_nomix.yaml')])
    stage2 = load_config(['--config', str(REPO_ROOT / 'train/configs/fmnist_lt/variants/gcl_nomix_crt.yaml')])
    assert stage1['mixup_alpha'] == 0.0 and stage1['model'] == 'resnet32_gcl' and stage1['stage'] == 'stage1'
    assert stage2['stage'] == 'crt' and stage2['stage1_dir'] == stage1['output_dir']


@pytest.mark.parametrize('name', CACHED_TAGS)
def test_tag_pretrained_loads_exact_weights(offline, name):
    original = offline[name]
    model = timm.create_model(name, pretrained=True, **_as_published(name))
    assert huggingface_hub.try_to_load_from_cache(PRETRAINED_TAGS[name]['hf_hub_id'], 'model.safetensors')
    want = original.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = _x(original)
    assert torch.equal(_predict(model, x), _predict(original, x))


def test_hf_hub_prefix_loads_exact_weights(offline):
    original = offline['resnet32_cbn.fmnist_lt']
    model = timm.create_model('hf-hub:lt-zoo/resnet32_cbn.fmnist_lt', pretrained=True)
    assert model.pretrained_cfg['architecture'] == 'resnet32_cbn'
    assert list(model.pretrained_cfg['label_names']) == list(FASHION_MNIST_CLASSES)
    x = _x(original)
    assert torch.equal(_predict(model, x), _predict(original, x))


@pytest.mark.parametrize('name,head', [('resnet32_cbn.fmnist_lt', torch.nn.Linear),
                                       ('resnet32_gcl.fmnist_lt', CosineClassifier)])
def test_other_num_classes_resets_only_the_head(offline, name, head):
    original = offline[name].state_dict()
    model = timm.create_model(name, pretrained=True, num_classes=4, **_as_published(name))
    assert isinstance(model.fc, head) and model.fc.weight.shape == (4, 64)
    got = model.state_dict()
    body = [k for k in original if not k.startswith('fc.')]
    assert set(got) - {'fc.weight', 'fc.bias'} == set(body)
    assert all(torch.equal(got[k], original[k]) for k in body)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_architecture_mismatch_is_a_clear_error(offline):
    overlay = dict(hf_hub_id='lt-zoo/resnet32_cbn.fmnist_lt', num_classes=10, input_size=(1, 16, 16))
    # CBN weights into an NBN network: keys differ
    with pytest.raises(RuntimeError, match=r'Missing key\(s\)|Unexpected key\(s\)'):
        timm.create_model('resnet32_nbn', pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay)
    # a 1-channel checkpoint into a 3-channel stem: the model's filter names the fix
    with pytest.raises(ValueError, match='in_chans=1'):
        timm.create_model('resnet32_cbn', pretrained=True, in_chans=3,
                          pretrained_cfg_overlay=dict(overlay, input_size=(1, 16, 16)))


def test_loading_is_offline(offline):
    """A tag whose repo is not in the temporary cache fails locally, naming repo and file, without the network."""
    with pytest.raises(RuntimeError, match='model.safetensors of lt-zoo/resnet32_nbn.fmnist_lt is not in the '
                                           'Hugging Face cache') as info:
        timm.create_model('resnet32_nbn.fmnist_lt', pretrained=True, **_as_published('resnet32_nbn.fmnist_lt'))
    assert isinstance(info.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)
