"""Normalized BN: the layer against a float64 NumPy reference, its scope in the models (one shared alpha
in the official scope, one per layer in 'all'), zero_init_last, and folding into plain BN."""
import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import lt_zoo
from lt_zoo.layers import NormalizedBatchNorm2d

BN_EPS, NORM_EPS = 1e-5, 1e-6


def _np(t):
    return t.detach().double().numpy()


def _nbn_reference(x, gamma, beta, alpha, mean, var):
    """y = w * (x - mean) / sqrt(var + eps) + b, w = alpha gamma / (|gamma| + 1e-6), b likewise; float64."""
    w = alpha * gamma / (np.sqrt(np.sum(gamma * gamma)) + NORM_EPS)
    b = alpha * beta / (np.sqrt(np.sum(beta * beta)) + NORM_EPS)
    c = (slice(None), None, None)
    return (x - mean[c]) / np.sqrt(var[c] + BN_EPS) * w[c] + b[c]


def _effective_affine(layer):
    """(w, b) that ``layer`` applies, read off its eval forward with mean 0 and variance 1 - eps."""
    probe = copy.deepcopy(layer).float().eval()
    with torch.no_grad():
        probe.running_mean.zero_()
        probe.running_var.fill_(1 - BN_EPS)
        y0 = probe(torch.zeros(1, probe.num_features, 1, 1)).flatten()
        y1 = probe(torch.ones(1, probe.num_features, 1, 1)).flatten()
    return _np(y1 - y0), _np(y0)


def _nbn_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NormalizedBatchNorm2d)}


def _alpha_params(model):
    return {n: p for n, p in model.named_parameters() if n.endswith('alpha')}


def _randomize(model, seed=0):
    """Random gamma/beta for every NBN, each owned alpha drawn from +-[0.5, 2]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _nbn_layers(model).values():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 3)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
        for p in _alpha_params(model).values():
            sign = 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0
            p.fill_(sign * float(torch.empty(()).uniform_(0.5, 2.0, generator=gen)))
    return model


def _warm_up(model, in_chans, size, steps=3):
    gen = torch.Generator().manual_seed(7)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, in_chans, size, size, generator=gen) * 2 + 0.5)
    return model


def _norm_count(model):
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, NormalizedBatchNorm2d)) for m in model.modules())


# ------------------------------------------------------------------------------------------ the layer
def test_layer_matches_numpy_reference_in_train_and_eval():
    torch.manual_seed(0)
    layer = NormalizedBatchNorm2d(6)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6) * 3)
        layer.bias.copy_(torch.randn(6))
        layer.alpha.fill_(-1.7)
    g, b, a = _np(layer.weight), _np(layer.bias), -1.7
    x = torch.randn(4, 6, 5, 5) * 2 + 1
    xn = _np(x)

    out = layer(x)  # train: batch statistics, running stats updated with momentum 0.1
    mean, var = xn.mean((0, 2, 3)), xn.var((0, 2, 3))
    np.testing.assert_allclose(_np(out), _nbn_reference(xn, g, b, a, mean, var), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(layer.running_mean), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(layer.running_var), 0.9 + 0.1 * xn.var((0, 2, 3), ddof=1), rtol=1e-5)
    assert int(layer.num_batches_tracked) == 1

    layer.eval()
    x2 = torch.randn(3, 6, 4, 4)
    ref = _nbn_reference(_np(x2), g, b, a, _np(layer.running_mean), _np(layer.running_var))
    np.testing.assert_allclose(_np(layer(x2)), ref, rtol=1e-5, atol=1e-5)

    layer.double()
    out64 = layer(x2.double())
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.detach().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_output_is_invariant_to_the_scale_of_gamma_and_beta():
    torch.manual_seed(0)
    layer = NormalizedBatchNorm2d(5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5))
        layer.bias.copy_(torch.randn(5))
    x = torch.randn(4, 5, 3, 3)
    ref = layer(x)
    with torch.no_grad():
        layer.weight.mul_(7.0)  # scales far above norm_eps = 1e-6, which breaks exact invariance
        layer.bias.mul_(0.3)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_layer_errors():
    owner, borrower, third = NormalizedBatchNorm2d(4), NormalizedBatchNorm2d(4), NormalizedBatchNorm2d(4)
    with pytest.raises(ValueError, match='4-D'):
        owner(torch.randn(2, 4))
    borrower.share_alpha_with(owner)
    with pytest.raises(ValueError, match='owns its alpha'):
        third.share_alpha_with(borrower)


@pytest.mark.parametrize('kwargs, words', [
    ({'num_features': 0}, ['num_features', '0', 'positive int']),
    ({'num_features': 8, 'eps': 0.0}, ['eps', '0.0', 'positive']),
    ({'num_features': 8, 'norm_eps': -1e-6}, ['norm_eps', '-1e-06', 'positive']),
    ({'num_features': 8, 'momentum': 1.5}, ['momentum', '1.5', '[0, 1]']),
    ({'num_features': 8, 'alpha_init': float('inf')}, ['alpha_init', 'inf', 'finite']),
])
def test_layer_option_errors_name_the_value(kwargs, words):
    with pytest.raises(ValueError) as info:
        NormalizedBatchNorm2d(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def _shared_pair():
    owner, borrower = NormalizedBatchNorm2d(4), NormalizedBatchNorm2d(4)
    borrower.share_alpha_with(owner)
    return nn.Sequential(owner, borrower)


def test_torchscript_keeps_outputs_and_the_shared_alpha():
    model = _randomize(_shared_pair())
    with torch.no_grad():
        model[0].alpha.fill_(-1.7)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    for train in (True, False):
        eager = copy.deepcopy(model).train(train)
        scripted = torch.jit.script(copy.deepcopy(model).train(train))
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), eager(x))
        torch.testing.assert_close(scripted[1].running_mean, eager[1].running_mean)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        model[0].alpha.fill_(0.5)  # still one parameter after scripting
    torch.testing.assert_close(scripted.eval()(x), model.eval()(x))
    with pytest.raises(Exception, match='4-D'):
        scripted(torch.randn(2, 4))


def test_shared_alpha_is_stored_once_and_retied_on_load():
    model = _shared_pair()
    assert [k for k in model.state_dict() if k.endswith('alpha')] == ['0.alpha']
    assert [n for n, _ in model.named_parameters() if n.endswith('alpha')] == ['0.alpha']
    with torch.no_grad():
        model[0].alpha.fill_(2.5)
    fresh = _shared_pair().to('meta')
    fresh.to_empty(device='cpu')  # re-materialising unties shared parameters
    fresh.load_state_dict(model.state_dict())
    assert fresh[1].alpha is fresh[0].alpha and float(fresh[1].get_alpha()) == 2.5
    x = torch.randn(2, 4, 3, 3)
    fresh(x).sum().backward()
    assert fresh[0].alpha.grad is not None and [n for n, _ in fresh.named_parameters()].count('0.alpha') == 1


# ------------------------------------------------------------------------------------------ norms of w, b
@pytest.mark.parametrize('name, kwargs', [
    ('resnet20_nbn', {'nbn_scope': 'all'}),
    ('resnet32_nbn_gcl', {}),
    ('resnet18_nbn', {'nbn_scope': 'all'}),
])
def test_effective_affine_norms_equal_abs_alpha(name, kwargs):
    model = _randomize(timm.create_model(name, num_classes=3, **kwargs))
    layers = _nbn_layers(model)
    assert layers
    for n, m in layers.items():
        w, b = _effective_affine(m)
        a = abs(float(m.get_alpha().detach()))
        g_norm, b_norm = np.linalg.norm(_np(m.weight)), np.linalg.norm(_np(m.bias))
        # exactly |alpha| |gamma| / (|gamma| + 1e-6): |alpha| up to the 1e-6 eps (float32 forward: 1e-5 rel)
        np.testing.assert_allclose(np.linalg.norm(w), a * g_norm / (g_norm + NORM_EPS), rtol=1e-5, err_msg=n)
        np.testing.assert_allclose(np.linalg.norm(b), a * b_norm / (b_norm + NORM_EPS), rtol=1e-5, err_msg=n)
        np.testing.assert_allclose([np.linalg.norm(w), np.linalg.norm(b)], a, rtol=1e-5, err_msg=n)


# ------------------------------------------------------------------------------------------ scope
@pytest.mark.parametrize('name, kwargs, expected, total', [
    ('resnet32_nbn', {}, {f'layer3.{i}.bn2' for i in range(5)}, 31),
    ('resnet32_nbn', {'shortcut': 'B'}, {f'layer3.{i}.bn2' for i in range(5)} | {'layer3.0.downsample.1'}, 33),
    ('resnet50_nbn', {}, {'layer4.0.bn3', 'layer4.1.bn3', 'layer4.2.bn3', 'layer4.0.downsample.1'}, 53),
    ('resnet18_nbn_gcl', {}, {'layer4.0.bn2', 'layer4.1.bn2', 'layer4.0.downsample.1'}, 20),
], ids=['resnet32', 'resnet32-B', 'resnet50', 'resnet18_gcl'])
def test_official_scope_shares_one_alpha(name, kwargs, expected, total):
    model = _randomize(timm.create_model(name, num_classes=3, **kwargs))
    layers = _nbn_layers(model)
    assert set(layers) == expected
    assert _norm_count(model) == total
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == total - len(expected)

    alpha_keys = [k for k in model.state_dict() if k.endswith('alpha')]
    assert len(alpha_keys) == 1
    (alpha,) = _alpha_params(model).values()
    assert all(m.get_alpha() is alpha for m in layers.values())

    for value in (2.5, -0.4):  # one change moves every layer
        with torch.no_grad():
            alpha.fill_(value)
        for n, m in layers.items():
            w, b = _effective_affine(m)
            np.testing.assert_allclose([np.linalg.norm(w), np.linalg.norm(b)], abs(value), rtol=1e-5, err_msg=n)


@pytest.mark.parametrize('name, kwargs, total', [
    ('resnet32_nbn', {'nbn_scope': 'all'}, 31),
    ('resnet32_nbn_gcl', {'nbn_scope': 'all', 'shortcut': 'B'}, 33),
    ('resnet50_nbn', {'nbn_scope': 'all'}, 53),
])
def test_scope_all_gives_every_norm_its_own_alpha(name, kwargs, total):
    model = _randomize(timm.create_model(name, num_classes=3, **kwargs))
    layers = _nbn_layers(model)
    assert len(layers) == total and _norm_count(model) == total
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len([k for k in model.state_dict() if k.endswith('alpha')]) == total
    assert len({id(m.get_alpha()) for m in layers.values()}) == total

    first, second = list(layers.values())[:2]
    w_before, _ = _effective_affine(second)
    with torch.no_grad():
        first.alpha.fill_(5.0)
    np.testing.assert_allclose(np.linalg.norm(_effective_affine(first)[0]), 5.0, rtol=1e-5)
    np.testing.assert_array_equal(_effective_affine(second)[0], w_before)


# ------------------------------------------------------------------------------------------ zero_init_last
@pytest.mark.parametrize('name, kwargs, zeroed_bn', [
    ('resnet32_nbn', {'zero_init_last': True, 'shortcut': 'B'}, 'layer2.0.bn2'),
    ('resnet32_nbn', {'nbn_scope': 'all', 'zero_init_last': True, 'shortcut': 'B'}, None),
    ('resnet50_nbn', {}, 'layer3.0.bn3'),
    ('resnet18_nbn', {'nbn_scope': 'all'}, None),
])
def test_zero_init_last_keeps_nbn_weights_usable(name, kwargs, zeroed_bn):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    for n, m in _nbn_layers(model).items():
        assert torch.equal(m.weight, torch.ones_like(m.weight)), n  # gamma / |gamma| is undefined at 0
    if zeroed_bn is not None:  # timm's zero init still applies to the plain BN layers
        assert not model.get_submodule(zeroed_bn).weight.any()

    x = torch.randn(4, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n
    # measured ~2e-3 (official scope) and ~2e-2 ('all'); a zero gamma gives ~5e3 here (its gradient is
    # scaled by 1/norm_eps).  NBN biases are not bounded: beta = 0 at init scales their gradient the same way,
    # as in the official code (docs/normalized_bn.md#decision-initialisation-and-zero-init-last).
    worst = max(m.weight.grad.abs().max().item() for m in _nbn_layers(model).values())
    assert worst < 1.0


def test_zero_init_last_is_a_no_op_when_every_norm_is_nbn():
    models = []
    for zero_init_last in (True, False):
        torch.manual_seed(0)
        models.append(timm.create_model('resnet20_nbn', nbn_scope='all', shortcut='B',
                                        zero_init_last=zero_init_last))
    sd_true, sd_false = (m.state_dict() for m in models)
    assert list(sd_true) == list(sd_false)
    assert all(torch.equal(sd_true[k], sd_false[k]) for k in sd_true)


# ------------------------------------------------------------------------------------------ folding
@pytest.mark.parametrize('name, kwargs, size', [
    ('resnet20_nbn', {'nbn_scope': 'all', 'in_chans': 1}, 16),
    ('resnet32_nbn_gcl', {'shortcut': 'B'}, 32),
    ('resnet50_nbn', {}, 32),
])
def test_fold_nbn_keeps_outputs(name, kwargs, size):
    in_chans = kwargs.get('in_chans', 3)
    torch.manual_seed(0)
    model = _warm_up(_randomize(timm.create_model(name, num_classes=4, **kwargs)), in_chans, size)
    total = _norm_count(model)
    folded = copy.deepcopy(model)
    assert lt_zoo.fold_nbn(folded) is folded
    assert not _nbn_layers(folded)
    assert sum(type(m) is nn.BatchNorm2d for m in folded.modules()) == total
    assert not [k for k in folded.state_dict() if k.endswith('alpha')]

    x = torch.randn(3, in_chans, size, size)
    model.eval(), folded.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    model.train(), folded.train()  # batch statistics too
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_folded_resnet18_nbn_loads_into_timm_resnet18():
    torch.manual_seed(0)
    model = _warm_up(_randomize(timm.create_model('resnet18_nbn', num_classes=5)), 3, 32).eval()
    folded = lt_zoo.fold_nbn(copy.deepcopy(model)).eval()
    vanilla = timm.create_model('resnet18', num_classes=5)
    vanilla.load_state_dict(folded.state_dict(), strict=True)
    vanilla.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vanilla(x), model(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(vanilla(x), folded(x))


def test_fold_a_single_layer():
    layer = _randomize(NormalizedBatchNorm2d(4))
    layer.train()
    layer(torch.randn(8, 4, 2, 2))
    layer.eval()
    bn = lt_zoo.fold_nbn(layer)
    assert type(bn) is nn.BatchNorm2d and not bn.training
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn(x), layer(x))
