"""timm.create_model('resnet50_cbn', pretrained=True): timm's ImageNet BN checkpoints, converted while loading.

The test writes a timm ResNet (random convs, non-trivial BN statistics and affine) as model.safetensors into
a temporary Hugging Face cache in the snapshot layout huggingface_hub reads:
    models--timm--resnet50.a1_in1k/refs/main                        40-hex commit, no trailing newline
    models--timm--resnet50.a1_in1k/snapshots/<commit>/model.safetensors
and timm's real loading code reads it offline.  Expectations come from the BN model itself or from
closed forms written here (docs/pretrained.md states them).
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from hf_cache import install_snapshot
import lt_zoo  # noqa: F401  (registers the lt_zoo architectures)
from lt_zoo.layers import CompoundBatchNorm2d, CosineClassifier, NormalizedBatchNorm2d, convert_bn_to_cbn
from lt_zoo.layers.compound_bn import symmetry_directions
from lt_zoo.models.pretrained_tags import TIMM_SOURCE_TAGS, converted_tag
from lt_zoo.models.timm_weights import DEFAULT_PERTURBATION

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = ('resnet18', 'resnet50')
IMAGENET_ARCHS = timm.list_models(module='imagenet_resnet')


def _timm_bn_model(depth: str) -> nn.Module:
    """timm's own ``depth`` with BN statistics and affine far from their init (as trained weights are)."""
    gen = torch.Generator().manual_seed(len(depth))
    model = timm.create_model(depth)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.2 + 0.8 * torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.3 + 1.7 * torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(12345)
        model.fc.bias.copy_(0.1 * torch.randn(model.fc.bias.shape, generator=gen))
    return model.eval()


_install = install_snapshot


@pytest.fixture(scope='module')
def bn_models(tmp_path_factory):
    """{depth: timm BN model}, each saved as timm/<depth>.<default tag>/model.safetensors; the cache path."""
    cache = tmp_path_factory.mktemp('hf') / 'hub'
    models = {}
    for depth in DEPTHS:
        model = _timm_bn_model(depth)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        _install(cache, f'timm/{depth}.{TIMM_SOURCE_TAGS[depth]}',
                 {'model.safetensors': lambda p, sd=sd: safetensors.torch.save_file(sd, str(p))})
        models[depth] = model
    return models, cache


def _use_cache(monkeypatch, cache) -> None:
    """huggingface_hub reads its env vars at import, so patch the constants it consults per call."""
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


@pytest.fixture
def offline(bn_models, monkeypatch):
    models, cache = bn_models
    _use_cache(monkeypatch, cache)
    return models


X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _eval(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def _bns(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


# ------------------------------------------------------------------------------------------- registry
def test_default_tags_are_timms_default_weights_of_each_depth():
    for depth, tag in TIMM_SOURCE_TAGS.items():
        timm_default = timm.models.get_pretrained_cfg(depth)
        assert timm_default.tag == tag, depth
        for arch in [a for a in IMAGENET_ARCHS if a.split('_')[0] == depth]:
            assert converted_tag(arch) == f'{arch}.{tag}'
            cfg = timm.create_model(arch, num_classes=0).pretrained_cfg
            assert cfg['tag'] == tag and cfg['hf_hub_id'] == timm_default.hf_hub_id == f'timm/{depth}.{tag}'
            assert cfg['hf_hub_filename'] == 'model.safetensors' and not cfg.get('url')
            for key in ('input_size', 'test_input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'num_classes'):
                assert cfg[key] == getattr(timm_default, key), (arch, key)
    assert len(IMAGENET_ARCHS) == 25
    assert set(timm.list_pretrained('resnet50_cbn*')) == {'resnet50_cbn.a1_in1k', 'resnet50_cbn_gcl.a1_in1k'}
    assert {converted_tag(a) for a in IMAGENET_ARCHS} <= set(timm.list_pretrained())


def test_bare_name_builds_the_same_untrained_model():
    model = timm.create_model('resnet18_cbn')  # default cfg is the converted tag: 1000 classes, 3 channels
    assert model.num_classes == 1000 and model.conv1.in_channels == 3


# ------------------------------------------------------------------------------------------- BN -> CBN
@pytest.mark.parametrize('depth', DEPTHS)
def test_cbn_at_perturbation_zero_equals_the_bn_model(offline, depth):
    bn = offline[depth]
    model = timm.create_model(f'{depth}_cbn', pretrained=True, perturbation=0.0)
    assert all(isinstance(m, CompoundBatchNorm2d) for n, m in model.named_modules() if n in _bns(bn))
    torch.testing.assert_close(_eval(model), _eval(bn), rtol=1e-5, atol=1e-5)
    # float64: the remaining difference is fp32 rounding, not the conversion
    want = _eval(bn.double(), X.double())
    bn.float()
    got = _eval(model.double(), X.double())
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


@pytest.mark.slow
def test_user_line_loads_the_converted_resnet50_cbn(offline):
    """The issue's line, as written: default tag, default perturbation == lt_zoo.convert_bn_to_cbn of the BN model."""
    model = timm.create_model('resnet50_cbn', pretrained=True)
    assert model.pretrained_cfg['hf_hub_id'] == 'timm/resnet50.a1_in1k'
    assert huggingface_hub.try_to_load_from_cache('timm/resnet50.a1_in1k', 'model.safetensors')
    reference = convert_bn_to_cbn(copy.deepcopy(offline['resnet50']))
    want, got = reference.state_dict(), model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize('depth', DEPTHS)
def test_cbn_default_moves_each_layer_within_the_documented_bound(offline, depth):
    """Per channel, |CBN(x) - BN(x)| <= p * |gamma_c| * max_k |d_kc| on each layer's actual eval input."""
    bn = offline[depth]
    model = timm.create_model(f'{depth}_cbn', pretrained=True).eval()
    bn_layers = _bns(bn)
    seen = {}
    # clones: timm's in-place ReLU overwrites a norm's output after the hook has run
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0].clone(), o.clone())))
             for n, m in model.named_modules() if isinstance(m, CompoundBatchNorm2d)]
    _eval(model)
    for h in hooks:
        h.remove()
    assert set(seen) == set(bn_layers)
    worst = 0.0
    for name, (x, y) in seen.items():
        ref = bn_layers[name]
        with torch.no_grad():
            want = ref(x)
        d = symmetry_directions(model.get_submodule(name).num_components, ref.num_features)
        bound = DEFAULT_PERTURBATION * ref.weight.detach().abs() * d.abs().amax(0)
        excess = ((y - want).abs() - bound.view(1, -1, 1, 1)).amax()
        assert excess <= 1e-5, name
        worst = max(worst, float(((y - want).abs() / bound.view(1, -1, 1, 1)).amax()))
    assert 0 < worst <= 1 + 1e-3  # the layers do move, and never past the bound


# ------------------------------------------------------------------------------------------- BN -> NBN
def _nbn_expected(bn_model, nbn_model):
    """The BN model with each NBN layer's affine replaced by the closed form, alpha = mean of the group's norms."""
    expected = timm.create_model(bn_model.pretrained_cfg['architecture'])
    expected.load_state_dict(bn_model.state_dict())
    layers = {n: m for n, m in nbn_model.named_modules() if isinstance(m, NormalizedBatchNorm2d)}
    groups = {}
    for n, m in layers.items():
        groups.setdefault(id(m.alpha), []).append(n)
    src = dict(bn_model.named_modules())
    with torch.no_grad():
        for names in groups.values():
            norms = [src[n].weight.double().norm() for n in names] + [src[n].bias.double().norm() for n in names]
            alpha = sum(norms) / len(norms)
            assert float(layers[names[0]].alpha) == pytest.approx(float(alpha), rel=1e-6)
            for n in names:
                g, b = src[n].weight.double(), src[n].bias.double()
                tgt = expected.get_submodule(n)
                tgt.weight.copy_(alpha * g / g.norm())
                tgt.bias.copy_(alpha * b / b.norm())
    return expected.eval(), groups


@pytest.mark.parametrize('depth', DEPTHS)
def test_nbn_all_scope_is_the_closed_form(offline, depth):
    bn = offline[depth]
    model = timm.create_model(f'{depth}_nbn', pretrained=True, nbn_scope='all')
    expected, groups = _nbn_expected(bn, model)
    assert len(groups) == len(_bns(bn))  # scope 'all': every BN layer, each with its own alpha
    for n, m in model.named_modules():
        if isinstance(m, NormalizedBatchNorm2d):  # raw gamma/beta are the BN's (their directions are NBN's)
            assert torch.equal(m.weight, bn.get_submodule(n).weight) and torch.equal(m.bias, bn.get_submodule(n).bias)
            assert torch.equal(m.running_var, bn.get_submodule(n).running_var)
    torch.testing.assert_close(_eval(model), _eval(expected), rtol=1e-4, atol=1e-4)


def test_nbn_all_scope_is_exact_when_weight_and_bias_norms_agree(bn_models, tmp_path, monkeypatch):
    bn = _timm_bn_model('resnet18')
    with torch.no_grad():
        for m in _bns(bn).values():
            m.bias.mul_(m.weight.norm() / m.bias.norm())
    cache = tmp_path / 'hub'
    sd = {k: v.contiguous() for k, v in bn.state_dict().items()}
    _install(cache, 'timm/resnet18.a1_in1k', {'model.safetensors': lambda p: safetensors.torch.save_file(sd, str(p))})
    _use_cache(monkeypatch, cache)
    model = timm.create_model('resnet18_nbn', pretrained=True, nbn_scope='all')
    torch.testing.assert_close(_eval(model), _eval(bn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('depth', DEPTHS)
def test_nbn_official_scope_shares_one_least_squares_alpha(offline, depth):
    bn = offline[depth]
    model = timm.create_model(f'{depth}_nbn', pretrained=True)
    expected, groups = _nbn_expected(bn, model)
    (names,) = groups.values()  # one alpha for the last BN of every layer4 block and the downsample BN
    last = 'bn3' if depth == 'resnet50' else 'bn2'
    assert sorted(names) == sorted([f'layer4.{i}.{last}' for i in range(3 if depth == 'resnet50' else 2)]
                                   + ['layer4.0.downsample.1'])
    plain = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + '.') for n in names)}
    want = bn.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in plain.items())  # every other tensor loads unchanged
    torch.testing.assert_close(_eval(model), _eval(expected), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------- cosine heads
@pytest.mark.parametrize('arch', ['resnet18_gcl', 'resnet18_cbn_gcl', 'resnet50_nbn_gcl'])
def test_cosine_head_starts_from_the_fc_directions(offline, arch):
    depth = arch.split('_')[0]
    bn = offline[depth]
    kwargs = {'perturbation': 0.0} if '_cbn' in arch else {'nbn_scope': 'all'} if '_nbn' in arch else {}
    model = timm.create_model(arch, pretrained=True, **kwargs)
    assert isinstance(model.fc, CosineClassifier) and 'fc.bias' not in model.state_dict()
    rows = bn.fc.weight.double()
    torch.testing.assert_close(model.fc.weight.double(), rows / rows.norm(dim=1, keepdim=True), rtol=0, atol=1e-6)
    with torch.no_grad():
        feats = model.eval().forward_head(model.forward_features(X), pre_logits=True)
        if arch == 'resnet18_gcl':  # plain BN body: the features are the BN model's, bit for bit
            assert torch.equal(feats, bn.forward_head(bn.forward_features(X), pre_logits=True))
        cos = F.normalize(feats.double(), dim=1) @ (rows / rows.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(_eval(model).double(), model.fc.scale * cos, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ['resnet18_cbn', 'resnet18_gcl', 'resnet18_nbn'])
def test_other_num_classes_resets_the_classifier_as_timm_does(offline, arch):
    bn = offline['resnet18']
    model = timm.create_model(arch, pretrained=True, num_classes=7)
    fresh = timm.create_model(arch, num_classes=7)
    assert model.fc.weight.shape == (7, 512) and type(model.fc) is type(fresh.fc)
    for loaded_rows in (bn.fc.weight[:7], F.normalize(bn.fc.weight[:7], dim=1)):  # a fresh head, not a slice
        assert not torch.allclose(model.fc.weight, loaded_rows)
    assert torch.equal(model.conv1.weight, bn.conv1.weight)  # the body is loaded
    assert _eval(model).shape == (1, 7)
    features = timm.create_model(arch, pretrained=True, num_classes=0)
    assert isinstance(features.fc, nn.Identity) and _eval(features).shape == (1, 512)


# -------------------------------------------------------------------------------------------- errors
def test_offline_miss_names_repo_file_and_the_fix(tmp_path, monkeypatch):
    _use_cache(monkeypatch, tmp_path / 'empty')
    with pytest.raises(RuntimeError, match=r'model\.safetensors of timm/resnet18\.a1_in1k is not in the Hugging '
                                           r'Face cache') as info:
        timm.create_model('resnet18_cbn', pretrained=True)
    assert 'hf download timm/resnet18.a1_in1k model.safetensors' in str(info.value)
    assert "pretrained_cfg_overlay=dict(file=" in str(info.value)


def test_a_cached_pickle_is_never_loaded(tmp_path, monkeypatch):
    """timm alone retries pytorch_model.bin when the safetensors file is missing; a tag never does."""
    sd = _timm_bn_model('resnet18').state_dict()
    cache = tmp_path / 'hub'
    _install(cache, 'timm/resnet18.a1_in1k', {'pytorch_model.bin': lambda p: torch.save(sd, p)})
    _use_cache(monkeypatch, cache)
    assert huggingface_hub.try_to_load_from_cache('timm/resnet18.a1_in1k', 'pytorch_model.bin')
    with pytest.raises(RuntimeError, match='never a pickled pytorch_model.bin'):
        timm.create_model('resnet18_nbn', pretrained=True)
    with pytest.raises(RuntimeError, match='never a pickled pytorch_model.bin'):
        timm.create_model('resnet18_cbn.a1_in1k', pretrained=True)


# ------------------------------------------------------------------------------------ fine-tuning recipe
@pytest.mark.slow
def test_places_lt_recipe_runs_one_step_from_the_converted_checkpoint(bn_models, tmp_path):
    """train/configs/places_lt/cbn_resnet50.yaml through the trainer CLI, on 8 tiny images in a list file.

    The lr is lowered to 1e-6 so that the trained weights still show where they started.
    """
    from PIL import Image
    _, cache = bn_models
    root = tmp_path / 'places'
    lines = {'train': [], 'test': []}
    gen = torch.Generator().manual_seed(0)
    for split, counts in (('train', (5, 2, 1)), ('test', (1, 1, 1))):  # long-tailed train, balanced test
        for label, count in enumerate(counts):
            for i in range(count):
                rel = f'{split}/{label}_{i}.png'
                (root / split).mkdir(parents=True, exist_ok=True)
                pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / rel)
                lines[split].append(f'{rel} {label}')
    for split, text in lines.items():
        (tmp_path / f'{split}.txt').write_text('\n'.join(text) + '\n')
    run = tmp_path / 'run'
    argv = ['--config', 'train/configs/places_lt/cbn_resnet50.yaml', '--data_dir', root,
            '--data_files', f"{{train: {tmp_path / 'train.txt'}, test: {tmp_path / 'test.txt'}}}",
            '--output_dir', run, '--input_size', '64', '--batch_size', '8', '--epochs', '1', '--lr', '1e-6',
            '--mixed_precision', 'no', '--num_workers', '0', '--progress', 'false', '--save_checkpoints', 'false']
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, 'train/train.py', *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = safetensors.torch.load_file(str(run / 'model.safetensors'))
    start = bn_models[0]['resnet50'].state_dict()
    assert trained['fc.weight'].shape == (3, 2048)  # the 1000-class head was reset for the 3 classes
    assert trained['layer4.2.bn3.running_mean'].shape == (2, 2048)  # CBN, the default M = 2
    for key in ('conv1.weight', 'layer3.5.conv2.weight'):  # lr 1e-6: one step, still at timm's weights
        change = (trained[key] - start[key]).norm() / start[key].norm()
        assert 0 < change < 1e-3, (key, float(change))  # a fresh init would differ by ~1.4
