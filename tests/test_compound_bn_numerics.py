"""CompoundBatchNorm2d numerics and robustness: bounded variance correction, precision far from the
running mean, non-finite batches, starving components, eval-constant caching, export paths.

Float64 references are explicit NumPy loops (independent of the layer's matrix algebra)."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lt_zoo.layers import compound_bn_functional as cbf
from lt_zoo.layers.compound_bn import CompoundBatchNorm2d, cbn_statistics, format_cbn_statistics


def loop_posteriors(x, prior, mean, var):
    """float64 r_pk for (P, C) vectors, one vector and component at a time."""
    out = np.zeros((len(x), len(prior)))
    for p, v in enumerate(x):
        logl = np.array([math.log(prior[k]) - 0.5 * sum(math.log(var[k, c]) + (v[c] - mean[k, c]) ** 2 / var[k, c]
                                                         for c in range(len(v))) for k in range(len(prior))])
        e = np.exp(logl - logl.max())
        out[p] = e / e.sum()
    return out


# ------------------------------------------------------------------------ 8: bounded correction
def test_running_variance_correction_is_bounded_when_soft_count_is_just_above_one():
    """N_1 = 1.001: N/(N-1) = 1001 blew running_var up (1.0 -> 72.4); n_eff/(n_eff-1) stays bounded."""
    torch.manual_seed(0)
    x = torch.randn(256, 4, 1, 1, dtype=torch.float64)
    layer = CompoundBatchNorm2d(4, 2, perturbation=0.0).double()
    with torch.no_grad():
        layer.running_mean[1].fill_(2.0)

    def soft_count(logit_prior):
        with torch.no_grad():
            p1 = torch.sigmoid(torch.tensor(logit_prior, dtype=torch.float64))
            layer.running_prior.copy_(torch.stack([1 - p1, p1]))
        return float(layer.responsibilities(x)[:, 1].sum())
    lo, hi = -30.0, 10.0  # bisection on the prior of component 1 for N_1 = 1.001
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if soft_count(mid) < 1.001 else (lo, mid)
    assert abs(soft_count(hi) - 1.001) < 1e-9
    st = {k: v.detach().numpy().copy() for k, v in layer.state_dict().items()}
    xv = x.view(256, 4).numpy()
    r = loop_posteriors(xv, st['running_prior'], st['running_mean'], st['running_var'])[:, 1]
    nk = r.sum()
    mu = (r[:, None] * xv).sum(0) / nk
    var_b = (r[:, None] * (xv - mu) ** 2).sum(0) / nk
    n_eff = nk ** 2 / (r ** 2).sum()
    expected = 0.9 * st['running_var'][1] + 0.1 * var_b * n_eff / (n_eff - 1)
    layer(x)
    np.testing.assert_allclose(layer.running_var[1].detach().numpy(), expected, rtol=1e-7)
    assert n_eff > nk and layer.running_var[1].max() < 2.0  # was 72.4 with N/(N-1)


def test_effective_sample_size_reduces_to_counts_for_hard_assignments():
    stats = cbf.compound_batch_norm(torch.randn(3, 2, 4, 5), torch.ones(1), torch.zeros(1, 2), torch.ones(1, 2),
                                    torch.ones(1, 2), torch.zeros(1, 2), True)[1]
    torch.testing.assert_close(stats.n_eff, torch.tensor([60.0]))  # M = 1: n = P
    groups = torch.tensor([0, 1, 1])
    stats = cbf.compound_batch_norm(torch.randn(3, 2, 4, 5), torch.ones(2) / 2, torch.zeros(2, 2),
                                    torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, 2), True, groups=groups)[1]
    torch.testing.assert_close(stats.n_eff, torch.tensor([20.0, 40.0]))  # split path: n = group size


# ------------------------------------------------------------------------ 9: precision far from the state
@pytest.mark.parametrize('m', [1, 4])
def test_fresh_fp32_layer_is_accurate_on_data_far_from_its_running_mean(m):
    """mean 50, std 0.1 on a fresh layer: within 10x of torch BN's fp32 error vs a float64 loop reference."""
    g = torch.Generator().manual_seed(1)
    x = 50.0 + 0.1 * torch.randn(8, 3, 4, 4, generator=g)
    layer = CompoundBatchNorm2d(3, m)
    st = {k: v.double().numpy().copy() for k, v in layer.state_dict().items()}
    y = layer(x).detach().double().numpy()
    xv = x.double().permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    r = loop_posteriors(xv, st['running_prior'], st['running_mean'], st['running_var'])
    ref = np.zeros_like(xv)
    for k in range(m):
        nk = r[:, k].sum()
        if nk <= 1:
            continue
        mu = (r[:, k:k + 1] * xv).sum(0) / nk
        var = (r[:, k:k + 1] * (xv - mu) ** 2).sum(0) / nk
        ref += r[:, k:k + 1] * ((xv - mu) / np.sqrt(var + 1e-5) * st['weight'][k] + st['bias'][k])
    ref = ref.reshape(8, 4, 4, 3).transpose(0, 3, 1, 2)
    bn_err = (F.batch_norm(x, None, None, training=True) - F.batch_norm(x.double(), None, None, training=True)
              ).abs().max().item()
    cbn_err = np.abs(y - ref).max()
    assert cbn_err <= 10 * bn_err, (cbn_err, bn_err)  # the old code: 8.5e-2 vs 6.3e-5


# ------------------------------------------------------------------------ 10: non-finite batches
@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
@pytest.mark.parametrize('graph', [True, False])
def test_non_finite_batch_leaves_running_state_intact(bad, graph):
    torch.manual_seed(0)
    layer, clean = CompoundBatchNorm2d(4, 3), CompoundBatchNorm2d(4, 3)
    good = torch.randn(6, 4, 3, 3)
    layer(good), clean(good)
    poisoned = torch.randn(6, 4, 3, 3)
    poisoned[2, 1, 0, 0] = bad
    with torch.set_grad_enabled(graph):
        layer(poisoned.requires_grad_(graph))
    for name in ('running_prior', 'running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(layer, name), getattr(clean, name), rtol=0, atol=0)
    assert int(layer.num_batches_skipped) == 1
    nxt = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(layer(nxt), clean(nxt))  # later batches train as if it never happened
    torch.testing.assert_close(layer.running_var, clean.running_var)
    with pytest.warns(UserWarning, match='1 training batch'):
        stats = cbn_statistics(nn.Sequential(layer))
    assert stats['0']['skipped_batches'] == 1


# ------------------------------------------------------------------------ 11: starving components
@pytest.mark.parametrize('combine', ['posterior', 'mn'])
def test_starving_component_stays_finite_and_is_reported(combine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CompoundBatchNorm2d(4, 3, momentum=1.0, combine=combine))
    with torch.no_grad():
        model[1].running_mean[2].fill_(1e3)  # never responsible for anything: N_2 = 0, prior -> 0
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4, requires_grad=True)
        y = model(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model[1].running_prior[2] == 0  # momentum 1: the prior is exactly N_2 / P = 0
    assert torch.isfinite(model.eval()(torch.randn(2, 3, 4, 4))).all()
    stats = cbn_statistics(model)
    assert stats['1']['min_prior'] == 0 and stats['1']['starving'] == 1 and stats['1']['active'] == 2
    assert stats['1']['components'] == 3 and len(stats['1']['prior']) == 3
    line = format_cbn_statistics(stats)
    assert 'min prior 0 (1)' in line and 'active 2/3' in line and 'starving 1' in line and '\n' not in line
    fresh = cbn_statistics(nn.Sequential(CompoundBatchNorm2d(4, 2)))
    assert fresh['0']['active'] is None and 'n/a' in format_cbn_statistics(fresh)


# ------------------------------------------------------------------------ eval constants
def uncached_eval(layer, x):
    return cbf.compound_batch_norm(x, layer.running_prior, layer.running_mean, layer.running_var,
                                   layer.weight, layer.bias, False, layer.eps, combine=layer.combine)[0]


def test_eval_constants_are_recomputed_after_every_state_change():
    torch.manual_seed(0)
    layer = CompoundBatchNorm2d(4, 3, combine='mn')
    for _ in range(2):
        layer(torch.randn(8, 4, 3, 3) + 1)
    layer.eval()
    x = torch.randn(5, 4, 3, 3)
    with torch.no_grad():
        first = layer(x)
        folded = layer._eval_cache[3]
        layer(x)
        assert layer._eval_cache[3] is folded  # reused while nothing changed
    changes = [
        lambda: torch.optim.SGD(layer.parameters(), lr=0.5).step(),
        lambda: layer.load_state_dict({k: v * 1.1 if v.is_floating_point() else v
                                       for k, v in layer.state_dict().items()}),
        lambda: layer.running_mean.add_(0.3),
        lambda: (layer.train()(torch.randn(8, 4, 3, 3)), layer.eval()),
        lambda: layer.double(),
    ]
    layer.weight.grad = torch.randn_like(layer.weight)
    layer.bias.grad = torch.randn_like(layer.bias)
    previous = first
    for change in changes:
        change()
        xi = x.to(layer.weight.dtype)
        with torch.no_grad():
            y = layer(xi)
            torch.testing.assert_close(y, uncached_eval(layer, xi), rtol=1e-6, atol=1e-6)
        assert y.dtype == layer.weight.dtype
        if change is not changes[-1]:  # .double() keeps the values; the others change them
            assert not torch.allclose(y, previous)
        previous = y


# ------------------------------------------------------------------------ export
def test_torchscript_is_refused_with_alternatives_and_eval_trace_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CompoundBatchNorm2d(4, 2), nn.ReLU())
    model(torch.randn(4, 3, 6, 6))
    model.eval()
    with pytest.raises(RuntimeError, match=r'torch\.jit\.trace.*eval mode.*torch\.compile.*torch\.export'):
        torch.jit.script(model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(2, 3, 6, 6))
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x))


def test_fx_treats_the_layer_as_a_leaf():
    from timm.models._features_fx import create_feature_extractor
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CompoundBatchNorm2d(4, 2), nn.ReLU()).eval()
    fx = create_feature_extractor(model, return_nodes={'1': 'norm', '2': 'out'})
    assert any(n.op == 'call_module' and n.target == '1' for n in fx.graph.nodes)
    x = torch.randn(2, 3, 6, 6)
    out = fx(x)
    torch.testing.assert_close(out['out'], model(x))
    torch.testing.assert_close(out['norm'], model[1](model[0](x)))


def test_train_stats_running_warns_that_it_cannot_train_from_scratch():
    with pytest.warns(UserWarning, match="diverges.*train_stats='batch'"):
        CompoundBatchNorm2d(4, 2, train_stats='running')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        CompoundBatchNorm2d(4, 2)  # the default is silent
