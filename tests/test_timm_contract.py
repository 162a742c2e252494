"""timm's generic model contract, checked on every registered lt_zoo architecture.

Per architecture: forward/backward, default_cfg fields and their consistency, heads (reset_classifier,
forward_features, forward_head), forward_intermediates and prune_intermediate_layers, features_only with
the hook / getter / fx feature classes, TorchScript (or, for CBN, its documented refusal), torch.jit.trace
in eval mode, and FX tracing with timm's leaf modules.  The ImageNet depths 50/101/152 are marked slow.
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers._fx import create_feature_extractor, get_graph_node_names

import lt_zoo  # noqa: F401  (registers the models)

CIFAR = ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110')
HEAVY = ('resnet50', 'resnet101', 'resnet152')
REGISTERED = sorted(timm.list_models(module='cifar_resnet') + timm.list_models(module='imagenet_resnet'))


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n.split('_')[0] in HEAVY else n for n in names]


ALL = _params(REGISTERED)


def _size(name):
    """Small input sides: 16 for CIFAR (4x4 final map), 64 for ImageNet depths (2x2 final map)."""
    return 16 if name.split('_')[0] in CIFAR else 64


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _input(name, n=2):
    s = _size(name)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))


def _expected_feature_shapes(model, x):
    h, w = x.shape[-2:]
    return [(x.shape[0], info['num_chs'], h // info['reduction'], w // info['reduction'])
            for info in model.feature_info]


def test_every_architecture_is_checked():
    assert len(REGISTERED) == 55


@pytest.mark.parametrize('name', ALL)
def test_forward_backward(name):
    model = _create(name, num_classes=4).train()
    out = model(_input(name))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', ALL)
def test_default_cfg_is_consistent_with_the_model(name):
    model = _create(name)
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg or cfg == model.default_cfg
    assert cfg['architecture'] == name
    first = model.get_submodule(cfg['first_conv'])
    assert isinstance(first, nn.Conv2d) and first.in_channels == cfg['input_size'][0] == 3
    classifier = model.get_submodule(cfg['classifier'])
    assert classifier is model.get_classifier()
    assert classifier.in_features == model.num_features and classifier.out_features == cfg['num_classes']
    assert model.num_classes == cfg['num_classes']
    last = model.feature_info[-1]
    assert model.num_features == last['num_chs']
    assert tuple(cfg['pool_size']) == tuple(s // last['reduction'] for s in cfg['input_size'][1:])
    assert 0 < cfg['crop_pct'] <= 1 and len(cfg['mean']) == len(cfg['std']) == 3


@pytest.mark.parametrize('name', ALL)
def test_features_head_and_reset_classifier(name):
    model = _create(name, num_classes=5).eval()
    x = _input(name)
    r = model.feature_info[-1]['reduction']
    feat_shape = (2, model.num_features, x.shape[-2] // r, x.shape[-1] // r)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == feat_shape
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pre, feats.mean((2, 3)))
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(0, '')  # no head, no pooling: the feature map itself
        assert torch.equal(model(x), feats)
        model.reset_classifier(7, 'avg')
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
    unpooled = _create(name, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert unpooled(x).shape == feat_shape


@pytest.mark.parametrize('name', ALL)
def test_forward_intermediates_and_prune(name):
    model = _create(name, num_classes=3).eval()
    x = _input(name)
    n = len(model.feature_info)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inter] == _expected_feature_shapes(model, x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last_two) == 2 and all(torch.equal(a, b) for a, b in zip(last_two, inter[-2:]))
        picked = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        assert torch.equal(picked[0], inter[0]) and torch.equal(picked[1], inter[n - 2])
        early, (only,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(only, inter[1]) and torch.equal(early, inter[1])  # stopped right after tap 1
        kept = model.prune_intermediate_layers(indices=[1])
        assert kept == [1]
        assert model.num_features == model.feature_info[1]['num_chs']
        (pruned,) = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert torch.equal(pruned, inter[1])
        assert model(x).shape == inter[1].shape  # head removed, stages after 1 removed


@pytest.mark.parametrize('feature_cls', ['hook', 'getter', 'fx'])
@pytest.mark.parametrize('name', ALL)
def test_features_only(name, feature_cls):
    reference = _create(name).eval()
    x = _input(name)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
    model = _create(name, features_only=True, feature_cls=feature_cls).eval()
    assert model.feature_info.channels() == [i['num_chs'] for i in reference.feature_info]
    assert model.feature_info.reduction() == [i['reduction'] for i in reference.feature_info]
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):  # same seed, same weights: the same tensors
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize('name', ALL)
def test_torchscript_or_documented_refusal(name):
    model = _create(name, num_classes=3).eval()
    x = _input(name)
    if '_cbn' in name:
        with pytest.raises(Exception) as info:
            torch.jit.script(model)
        assert 'torch.jit.trace' in str(info.value)
    else:
        scripted = torch.jit.script(model)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', ALL)
def test_jit_trace_in_eval(name):
    model = _create(name, num_classes=3).eval()
    x = _input(name)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)  # checked below, on another input
        other = _input(name, n=3) * 2
        expected = model(other)
        # deep CIFAR ResNets start with every residual branch on (no zero init), so their logits reach
        # ~1e3 at init: compare at float32 precision relative to the output's magnitude.  A CBN trace runs
        # the GEMM kernel (no trace records the native C++ passes that eager CPU uses); their float32
        # summation orders differ, by up to ~1e-5 of the logits after 56 layers
        torch.testing.assert_close(traced(other), expected, rtol=5e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize('name', ALL)
def test_fx_graph(name):
    model = _create(name, num_classes=3).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes and eval_nodes
    extractor = create_feature_extractor(model, return_nodes={eval_nodes[-1]: 'out'})
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['out'], model(x))
