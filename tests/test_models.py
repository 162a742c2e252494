"""lt_zoo's timm models: the registry, every entrypoint end to end, the timm model API (heads, features,
hub round trips), the norm layers as timm ``norm_layer``s, and option errors."""
import json
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import save_for_hf
from timm.models.resnet import BasicBlock

import lt_zoo  # noqa: F401  (registers the models)
from lt_zoo.layers import CosineClassifier, NormalizedBatchNorm2d
from lt_zoo.layers.compound_bn import CompoundBatchNorm2d
from lt_zoo.models._builder import create_head
from lt_zoo.models.cifar_resnet import CifarResNet
from lt_zoo.models.imagenet_resnet import LtResNet

# Spelled out here, independently of lt_zoo's own tables.
CIFAR_DEPTHS = ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110')
IMAGENET_DEPTHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')
NORM_SUFFIXES = ('', '_nbn', '_cbn')
HEAD_SUFFIXES = ('', '_gcl')
EXPECTED_CIFAR = {d + n + h for d in CIFAR_DEPTHS for n in NORM_SUFFIXES for h in HEAD_SUFFIXES}
# the plain BN + linear ImageNet ResNets are timm's own resnet18 ... resnet152
EXPECTED_IMAGENET = {d + n + h for d in IMAGENET_DEPTHS for n in NORM_SUFFIXES for h in HEAD_SUFFIXES if n + h}

REGISTERED = timm.list_models(module='cifar_resnet') + timm.list_models(module='imagenet_resnet')
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, NormalizedBatchNorm2d, CompoundBatchNorm2d)


def _is_cifar(name):
    return name.split('_')[0] in CIFAR_DEPTHS


def _norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NORM_TYPES)}


def _randomize_and_warm_up(model, in_chans, size, steps=3):
    """Random affine norm parameters (and NBN alphas), then train-mode forwards so running stats move."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in _norms(model).values():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith('alpha'):
                p.fill_(float(torch.empty(()).uniform_(0.5, 2.0, generator=gen)))
        model.train()
        for _ in range(steps):
            model(torch.randn(4, in_chans, size, size, generator=gen) * 2 + 0.5)
    return model.eval()


# ------------------------------------------------------------------------------------------ registry
def test_registered_names_equal_the_spelled_out_sets():
    assert len(EXPECTED_CIFAR) == 30 and len(EXPECTED_IMAGENET) == 25
    assert set(timm.list_models(module='cifar_resnet')) == EXPECTED_CIFAR
    assert set(timm.list_models(module='imagenet_resnet')) == EXPECTED_IMAGENET
    assert len(REGISTERED) == 55
    # the plain ImageNet ResNets stay timm's own
    assert {'resnet18', 'resnet50', 'resnet152'} <= set(timm.list_models(module='resnet'))


@pytest.mark.parametrize('pattern, part', [('*nbn*', '_nbn'), ('*cbn*', '_cbn'), ('*gcl*', '_gcl')])
def test_wildcards_find_the_variants(pattern, part):
    expected = {n for n in EXPECTED_CIFAR | EXPECTED_IMAGENET if part in n}
    assert len(expected) == (20 if part != '_gcl' else 30)
    assert set(timm.list_models(pattern)) == expected


@pytest.mark.parametrize('name', REGISTERED)
def test_every_model_creates_forwards_and_backpropagates(name):
    cifar = _is_cifar(name)
    in_chans = 1 if name.endswith('_gcl') else 3
    size = (16 if in_chans == 1 else 32) if cifar else 32
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, in_chans=in_chans)

    assert isinstance(model, CifarResNet if cifar else LtResNet)
    assert model.conv1.in_channels == in_chans
    assert type(model.fc) is (CosineClassifier if name.endswith('_gcl') else nn.Linear)
    assert model.fc.out_features == 3
    norm_types = {type(m) for m in _norms(model).values()}
    if '_nbn' in name:  # default 'official' scope: NBN in the last stage, BN elsewhere
        assert norm_types == {nn.BatchNorm2d, NormalizedBatchNorm2d}
    elif '_cbn' in name:
        assert norm_types == {CompoundBatchNorm2d}
    else:
        assert norm_types == {nn.BatchNorm2d}

    model.train()
    out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize('name, kwargs, mentioned', [
    ('resnet32', {'num_components': 3}, ['num_components', 'none']),
    ('resnet50_gcl', {'num_components': 3}, ['num_components', 'none']),
    ('resnet32_nbn', {'num_components': 3}, ['num_components', 'nbn_scope']),
    ('resnet32', {'nbn_scope': 'all'}, ['nbn_scope', 'none']),
    ('resnet18_cbn', {'nbn_scope': 'all'}, ['nbn_scope', 'num_components']),
    ('resnet32', {'foo': 1}, ['foo', 'num_classes', 'in_chans', 'shortcut']),
    ('resnet32_cbn_gcl', {'foo': 1}, ['foo', 'num_classes', 'cosine_scale']),
    ('resnet50_nbn', {'foo': 1}, ['foo', 'num_classes', 'in_chans', 'cosine_scale']),
    ('resnet18_gcl', {'foo': 1}, ['foo', 'num_classes']),
    ('resnet32', {'head': 'cosine'}, ['head', 'num_classes']),  # the name picks the head
    ('resnet50_nbn', {'head': 'linear'}, ['head', 'num_classes']),
    ('resnet20_nbn', {'output_stride': 8}, ['output_stride', 'num_classes']),  # no dilated CIFAR stages
])
def test_unknown_option_names_it_and_the_valid_ones(name, kwargs, mentioned):
    with pytest.raises(ValueError) as info:
        timm.create_model(name, **kwargs)
    for word in mentioned:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize('name', ['resnet32_nbn', 'resnet50_nbn_gcl'])
def test_invalid_nbn_scope(name):
    with pytest.raises(ValueError) as info:
        timm.create_model(name, nbn_scope='layer4')
    for word in ("'layer4'", "'official'", "'all'"):
        assert word in str(info.value)


@pytest.mark.parametrize('make', [
    lambda: CifarResNet(layers=(1, 1, 1), head='arc'),
    lambda: LtResNet(block=BasicBlock, layers=(1, 1, 1, 1), head='arc'),
    lambda: create_head('arc', 8, 3, 30.0),
], ids=['cifar', 'imagenet', 'create_head'])
def test_invalid_head(make):
    with pytest.raises(ValueError) as info:
        make()
    for word in ("'arc'", "'linear'", "'cosine'"):
        assert word in str(info.value)


def test_invalid_shortcut():
    with pytest.raises(ValueError) as info:
        timm.create_model('resnet20', shortcut='C')
    for word in ("'C'", "'A'", "'B'"):
        assert word in str(info.value)


# every entrypoint option is checked at create_model time; the message names the value and what was expected
@pytest.mark.parametrize('name, kwargs, words', [
    ('resnet32', {'in_chans': 0}, ['in_chans=0', 'positive int']),
    ('resnet50_nbn', {'in_chans': -3}, ['in_chans=-3', 'positive int']),
    ('resnet32_gcl', {'in_chans': 2.0}, ['in_chans=2.0', 'positive int']),
    ('resnet32', {'num_classes': -1}, ['num_classes=-1', 'int >= 0']),
    ('resnet18_gcl', {'num_classes': -2}, ['num_classes=-2', 'int >= 0']),
    ('resnet32_nbn', {'num_classes': 2.5}, ['num_classes=2.5', 'int >= 0']),
    ('resnet32_gcl', {'cosine_scale': 0.0}, ['cosine_scale=0.0', 'positive']),
    ('resnet50_nbn_gcl', {'cosine_scale': float('nan')}, ['cosine_scale=nan', 'positive finite']),
    ('resnet32', {'drop_rate': 1.0}, ['drop_rate=1.0', '[0, 1)']),
    ('resnet18_cbn', {'drop_path_rate': -0.1}, ['drop_path_rate=-0.1', '[0, 1)']),
    ('resnet20', {'global_pool': 'median'}, ["global_pool='median'", "'avg'"]),
    ('resnet18_nbn', {'global_pool': 'median'}, ["global_pool='median'", "'avg'"]),
    ('resnet20', {'widths': (16, 0, 64)}, ['widths=(16, 0, 64)', 'three positive ints']),
    ('resnet20', {'zero_init_last': 'yes'}, ["zero_init_last='yes'", 'a bool']),
    ('resnet18_nbn', {'output_stride': 7}, ['output_stride=7', '(8, 16, 32)']),
    ('resnet20_cbn', {'momentum': 2.0}, ['momentum', '2.0']),
    ('resnet18_cbn_gcl', {'temperature': -1.0}, ['temperature', '-1.0']),
])
def test_invalid_option_values_are_refused(name, kwargs, words):
    with pytest.raises(ValueError) as info:
        timm.create_model(name, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def _dead_channel_grads(model, in_chans=1):
    """One CE backward on random data; per residual-block last norm: how many channels got no gradient."""
    torch.manual_seed(0)
    x = torch.randn(8, in_chans, 16, 16)
    F.cross_entropy(model.train()(x), torch.arange(8) % 10).backward()
    return {n: int((m.weight.grad == 0).sum()) for n, m in model.named_modules() if n.endswith('bn2')}


def test_option_a_zero_init_last_kills_the_padded_channels():
    """Why CIFAR ResNets do not zero-init: with the option-A shortcut, a widening block's new channels are
    zero padding + zero residual = 0 before the ReLU, whose gradient at 0 is 0, so they never train.
    The old default (zero_init_last=True) is rebuilt here by hand: stage 2 has 16 of 32 channels dead,
    stage 3 48 of 64 (16 carried over + 32 padded)."""
    torch.manual_seed(0)
    model = CifarResNet(num_classes=10, in_chans=1)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    dead = _dead_channel_grads(model)
    assert {n: d for n, d in dead.items() if n.startswith('layer1')} == {f'layer1.{i}.bn2': 0 for i in range(5)}
    assert all(dead[f'layer2.{i}.bn2'] == 16 for i in range(5))
    assert all(dead[f'layer3.{i}.bn2'] == 48 for i in range(5))


@pytest.mark.parametrize('name', ['resnet20', 'resnet20_cbn', 'resnet20_nbn', 'resnet20_gcl'])
def test_cifar_resnets_train_every_channel(name):
    model = timm.create_model(name, num_classes=10, in_chans=1)
    for n, m in model.named_modules():
        if n.endswith('bn2'):
            assert bool((m.weight != 0).all()), n
    assert sum(_dead_channel_grads(model).values()) == 0


def test_option_a_zero_init_last_is_refused_with_the_reason():
    with pytest.raises(ValueError) as info:
        timm.create_model('resnet32', zero_init_last=True)
    for word in ("zero_init_last=True", "shortcut='A'", 'dead', "shortcut='B'"):
        assert word in str(info.value)
    timm.create_model('resnet32', zero_init_last=True, shortcut='B')  # B's 1x1 conv shortcut trains them
    timm.create_model('resnet32', zero_init_last=True, widths=(16, 16, 16))  # no padding, nothing dead


def test_invalid_norm_option_fails_before_the_model_is_built(monkeypatch):
    built, init = [], CifarResNet.__init__
    monkeypatch.setattr(CifarResNet, '__init__', lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    with pytest.raises(ValueError, match='momentum'):
        timm.create_model('resnet20_cbn', momentum=2.0)
    assert built == []


@pytest.mark.parametrize('name', ['resnet20_gcl', 'resnet18_nbn', 'resnet18_cbn_gcl'])
def test_reset_classifier_refuses_a_negative_class_count(name):
    model = timm.create_model(name, num_classes=3)
    with pytest.raises(ValueError, match='num_classes=-1'):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match='num_classes=-1'):
        create_head('cosine', 8, -1, 30.0)


# ------------------------------------------------------------------------------------------ cosine head
@pytest.mark.parametrize('name, in_chans, size', [('resnet32_gcl', 3, 32), ('resnet18_nbn_gcl', 1, 32)])
def test_cosine_head_logits_are_scaled_cosines(name, in_chans, size):
    torch.manual_seed(0)
    assert timm.create_model(name, num_classes=2).fc.scale == 30.0  # GCL's default s
    model = timm.create_model(name, num_classes=6, in_chans=in_chans, cosine_scale=16.0).eval()
    x = torch.randn(3, in_chans, size, size)
    with torch.no_grad():
        logits = model(x).double().numpy()
        feats = model.forward_head(model.forward_features(x), pre_logits=True).double().numpy()
    W = model.fc.weight.detach().double().numpy()
    assert [n for n, _ in model.fc.named_parameters()] == ['weight']  # no bias
    np.testing.assert_allclose(np.sqrt((W ** 2).sum(1)), 1.0, rtol=1e-6)  # unit class vectors at init
    cos = np.einsum('bd,cd->bc', feats, W) / np.outer(np.sqrt((feats ** 2).sum(1)), np.sqrt((W ** 2).sum(1)))
    np.testing.assert_allclose(logits, 16.0 * cos, rtol=1e-5, atol=1e-5)
    assert np.abs(logits).max() <= 16.0 + 1e-5


@pytest.mark.parametrize('name, head_type', [
    ('resnet32_gcl', CosineClassifier), ('resnet32_nbn', nn.Linear),
    ('resnet18_cbn_gcl', CosineClassifier), ('resnet18_nbn', nn.Linear),
])
def test_reset_classifier_keeps_the_head_type(name, head_type):
    kwargs = {'cosine_scale': 16.0} if head_type is CosineClassifier else {}
    model = timm.create_model(name, num_classes=4, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(7)
    assert type(model.fc) is head_type and model.fc.out_features == 7 and model.num_classes == 7
    if head_type is CosineClassifier:
        assert model.fc.scale == 16.0
    assert model.get_classifier() is model.fc
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity)
    assert model(x).shape == (2, model.num_features)


# ------------------------------------------------------------------------------------------ timm API
@pytest.mark.parametrize('name, in_chans, size, feat_shape', [
    ('resnet32_nbn', 3, 32, (64, 8, 8)),
    ('resnet20_cbn_gcl', 1, 16, (64, 4, 4)),
    ('resnet18_nbn', 3, 32, (512, 1, 1)),
    ('resnet50_gcl', 1, 64, (2048, 2, 2)),
])
def test_forward_features_head_and_classifier(name, in_chans, size, feat_shape):
    model = timm.create_model(name, num_classes=5, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, *feat_shape)
        assert model.num_features == feat_shape[0]
        assert pre.shape == (2, feat_shape[0])
        torch.testing.assert_close(pre, feats.mean((2, 3)))
        torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.fc


@pytest.mark.parametrize('name, in_chans, size, channels, reductions', [
    ('resnet20_nbn', 1, 16, [16, 16, 32, 64], [1, 1, 2, 4]),
    ('resnet32_cbn_gcl', 3, 32, [16, 16, 32, 64], [1, 1, 2, 4]),
    ('resnet18_nbn', 3, 32, [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
    ('resnet50_cbn', 1, 64, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
])
def test_features_only(name, in_chans, size, channels, reductions):
    model = timm.create_model(name, features_only=True, in_chans=in_chans).eval()
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == reductions
    with torch.no_grad():
        outs = model(torch.randn(2, in_chans, size, size))
    assert [tuple(o.shape) for o in outs] == [(2, c, size // r, size // r) for c, r in zip(channels, reductions)]


# ------------------------------------------------------------------------------------------ hub round trip
@pytest.mark.parametrize('name, kwargs, size', [
    ('resnet20_nbn', {'num_classes': 4, 'in_chans': 1}, 16),
    ('resnet20_nbn', {'num_classes': 4, 'nbn_scope': 'all', 'shortcut': 'B'}, 32),
    ('resnet32_gcl', {'num_classes': 6, 'cosine_scale': 16.0}, 32),
    ('resnet18_nbn', {'num_classes': 5}, 32),
    ('resnet20_cbn', {'num_classes': 4, 'in_chans': 1, 'num_components': 3}, 16),
], ids=['nbn-official', 'nbn-all', 'gcl', 'imagenet-nbn', 'cbn3'])
def test_save_for_hf_round_trip(tmp_path, name, kwargs, size):
    in_chans = kwargs.get('in_chans', 3)
    torch.manual_seed(0)
    model = _randomize_and_warm_up(timm.create_model(name, **kwargs), in_chans, size)
    save_for_hf(model, tmp_path / 'a', safe_serialization=True)
    config = json.loads((tmp_path / 'a' / 'config.json').read_text())
    assert config['architecture'] == name
    assert config['model_args'] == {**kwargs, 'in_chans': in_chans, 'global_pool': 'avg'}

    torch.manual_seed(1)  # a different random init that the checkpoint must overwrite entirely
    loaded = timm.create_model(f'local-dir:{tmp_path / "a"}', pretrained=True).eval()
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    sd, sd_loaded = model.state_dict(), loaded.state_dict()
    assert list(sd_loaded) == list(sd)
    assert all(torch.equal(sd[k], sd_loaded[k]) for k in sd)
    x = torch.randn(3, in_chans, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    save_for_hf(loaded, tmp_path / 'b', safe_serialization=True)
    config_again = json.loads((tmp_path / 'b' / 'config.json').read_text())
    assert config_again['model_args'] == config['model_args']


@pytest.mark.parametrize('name, size', [('resnet20_nbn', 16), ('resnet18_gcl', 32)])
def test_in_chans_checkpoint_mismatch(tmp_path, name, size):
    save_for_hf(timm.create_model(name, num_classes=3, in_chans=1), tmp_path, safe_serialization=True)
    assert timm.create_model(f'local-dir:{tmp_path}', pretrained=True).conv1.in_channels == 1
    with pytest.raises(ValueError, match='in_chans'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True, in_chans=3)


# ------------------------------------------------------------------------------------------ norm layers
NORM_LAYERS = [NormalizedBatchNorm2d, CompoundBatchNorm2d]


@pytest.mark.parametrize('cls', NORM_LAYERS)
def test_norm_layer_is_not_a_torch_batchnorm(cls):
    assert not issubclass(cls, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize('cls', NORM_LAYERS)
def test_norm_layer_accepts_device_and_dtype(cls):
    meta = cls(8, device='meta', dtype=torch.float64)
    assert all(t.device.type == 'meta' for t in [*meta.parameters(), *meta.buffers()])
    assert all(p.dtype == torch.float64 for p in meta.parameters())
    layer = cls(8, device='cpu', dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    out = layer(torch.randn(2, 8, 3, 3, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (2, 8, 3, 3)


@pytest.mark.parametrize('name, kwargs', [
    ('resnet20_nbn', {'nbn_scope': 'all'}), ('resnet20_cbn_gcl', {}), ('resnet18_nbn_gcl', {}),
])
def test_models_accept_dtype(name, kwargs):
    model = timm.create_model(name, num_classes=3, dtype=torch.float64, **kwargs)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize('name, kwargs', [
    ('resnet18_nbn', {}), ('resnet20_nbn_gcl', {'nbn_scope': 'all'}), ('resnet20_cbn', {}),
])
def test_sync_batchnorm_conversion_leaves_nbn_and_cbn_alone(name, kwargs):
    model = timm.create_model(name, num_classes=3, **kwargs)
    before = _norms(model)
    kept = {n: m for n, m in before.items() if isinstance(m, (NormalizedBatchNorm2d, CompoundBatchNorm2d))}
    assert kept
    alphas = {n: m.get_alpha() for n, m in kept.items() if isinstance(m, NormalizedBatchNorm2d)}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    after = _norms(converted)
    assert set(after) == set(before)
    for n, m in after.items():
        if n in kept:
            assert m is kept[n]
        else:
            assert type(m) is nn.SyncBatchNorm
    for n, a in alphas.items():
        assert after[n].get_alpha() is a


@pytest.mark.parametrize('scale', [0.0, -30.0, float('nan'), float('inf'), True, '30'])
def test_cosine_classifier_refuses_a_scale_that_is_not_positive_and_finite(scale):
    from lt_zoo.layers.cosine_classifier import CosineClassifier
    with pytest.raises(ValueError, match=rf"scale must be a positive finite number, got {re.escape(repr(scale))}"):
        CosineClassifier(8, 3, scale=scale)
    assert CosineClassifier(8, 3, scale=16).scale == 16.0
