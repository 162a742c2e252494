"""CompoundBatchNorm2d: EM statistics, outputs and gradients against independent references.

References are written differently from the layer: a float64 NumPy loop over vectors and components
(no matmul algebra), torch BatchNorm2d for M = 1 and for every group of the split path, and a
per-component autograd loop for the gradient of the default (constant-responsibility) path.
"""
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lt_zoo.layers.compound_bn import (CBN_OPTIONS, CompoundBatchNorm2d, convert_bn_to_cbn, split_norm,
                                       symmetry_directions)


def make_layer(c=5, m=3, seed=0, **kw):
    """A layer with non-trivial running state and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    layer = CompoundBatchNorm2d(c, m, **kw)
    with torch.no_grad():
        layer.running_prior.copy_(torch.rand(m, generator=g) + 0.5)
        layer.running_prior.div_(layer.running_prior.sum())
        layer.running_mean.copy_(torch.randn(m, c, generator=g))
        layer.running_var.copy_(torch.rand(m, c, generator=g) + 0.5)
        layer.weight.copy_(torch.randn(m, c, generator=g))
        layer.bias.copy_(torch.randn(m, c, generator=g))
    return layer


def state(layer):
    return {k: v.detach().double().numpy().copy() for k, v in layer.state_dict().items()}


def numpy_reference(x, st, momentum, eps, temperature=1.0, combine='posterior'):
    """One training forward in float64 with explicit loops (paper Eq. 8-16, docs/compound_bn.md)."""
    x = x.detach().double().numpy()
    n, c, h, w = x.shape
    prior, mean, var = st['running_prior'], st['running_mean'], st['running_var']
    gamma, beta = st['weight'], st['bias']
    m = prior.shape[0]
    vecs = [x[i, :, a, b] for i in range(n) for a in range(h) for b in range(w)]  # BN order: (n, h, w)
    p_count = len(vecs)
    r = np.zeros((p_count, m))
    for p, v in enumerate(vecs):
        logl = np.array([math.log(prior[k]) - 0.5 * sum(math.log(var[k, j]) + (v[j] - mean[k, j]) ** 2 / var[k, j]
                                                         for j in range(c)) for k in range(m)]) / temperature
        top = logl.max()
        r[p] = np.exp(logl - top) / np.exp(logl - top).sum()
    nk = r.sum(0)
    mu_t = np.zeros((m, c))
    var_t = np.zeros((m, c))
    for k in range(m):
        mu_t[k] = sum(r[p, k] * vecs[p] for p in range(p_count)) / nk[k]
        var_t[k] = sum(r[p, k] * (vecs[p] - mu_t[k]) ** 2 for p in range(p_count)) / nk[k]
    new_prior = (1 - momentum) * prior + momentum * nk / p_count
    new_prior = new_prior / new_prior.sum()
    new_mean = (1 - momentum) * mean + momentum * mu_t
    # unbiasing with the effective sample size n_k = N_k^2 / sum_p r_pk^2 (Kish; reliability weights)
    n_eff = np.array([nk[k] ** 2 / sum(r[p, k] ** 2 for p in range(p_count)) for k in range(m)])
    unbias = n_eff / (n_eff - 1)
    new_var = (1 - momentum) * var + momentum * var_t * unbias[:, None]
    weights = r if combine == 'posterior' else r / np.sqrt(nk / p_count)[None, :]
    y = np.zeros((n, c, h, w))
    for p, v in enumerate(vecs):
        i, rest = divmod(p, h * w)
        a, b = divmod(rest, w)
        y[i, :, a, b] = sum(weights[p, k] * (gamma[k] * (v - mu_t[k]) / np.sqrt(var_t[k] + eps) + beta[k])
                            for k in range(m))
    resp = r.reshape(n, h, w, m).transpose(0, 3, 1, 2)
    return dict(y=y, r=resp, mu_t=mu_t, var_t=var_t, prior=new_prior, mean=new_mean, var=new_var, nk=nk,
                unbias=unbias)


def close(a, b, tol=1e-5):
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else a
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------- reference
@pytest.mark.parametrize('graph', [True, False])  # autograd.Function path / no-graph path
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('combine,temperature', [('posterior', 1.0), ('mn', 1.0), ('posterior', 3.0)])
def test_training_forward_matches_numpy_reference(graph, channels_last, combine, temperature):
    layer = make_layer(combine=combine, temperature=temperature)
    x = torch.randn(4, 5, 3, 2, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = numpy_reference(x, state(layer), layer.momentum, layer.eps, temperature, combine)
    close(layer.responsibilities(x), ref['r'])
    with torch.set_grad_enabled(graph):
        y = layer(x.requires_grad_(graph))
    assert y.requires_grad == graph
    close(y, ref['y'])
    close(layer.running_prior, ref['prior'])
    close(layer.running_mean, ref['mean'])
    close(layer.running_var, ref['var'])
    assert int(layer.num_batches_tracked) == 1
    # momentum 1: the running state is the batch ("temporary") statistics themselves
    layer1 = make_layer(momentum=1.0, combine=combine, temperature=temperature)
    layer1(x)
    close(layer1.running_mean, ref['mu_t'])
    close(layer1.running_var, ref['var_t'] * ref['unbias'][:, None])
    close(layer1.running_prior, ref['nk'] / ref['nk'].sum())


@pytest.mark.parametrize('graph', [True, False])
def test_eval_forward_matches_numpy_reference(graph):
    layer = make_layer(c=4, m=3).eval()
    st = state(layer)
    x = torch.randn(3, 4, 2, 3) * 2
    with torch.set_grad_enabled(graph):
        y = layer(x.requires_grad_(graph))
    xn = x.detach().double().numpy()
    r = layer.responsibilities(x).detach().double().numpy()  # checked against the loop reference above
    expected = np.zeros_like(xn)
    for k in range(3):
        xhat = (xn - st['running_mean'][k][None, :, None, None]) / np.sqrt(
            st['running_var'][k][None, :, None, None] + layer.eps)
        expected += r[:, k:k + 1] * (st['weight'][k][None, :, None, None] * xhat + st['bias'][k][None, :, None, None])
    close(y, expected)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('graph', [True, False])
def test_large_mean_offset_is_numerically_stable(train, graph):
    """|mean| = 1000 std: fp32 results match fp64 (squares are taken relative to the mixture mean)."""
    layers = []
    for dtype in (torch.float32, torch.float64):
        layer = make_layer(c=6, m=3).to(dtype)
        with torch.no_grad():
            layer.running_mean.add_(1000.0)
        layers.append(layer.train(train))
    x = 1000.0 + torch.randn(4, 6, 3, 3, dtype=torch.float64) * 1.3
    outs = []
    for layer in layers:
        with torch.set_grad_enabled(graph):
            xi = x.to(layer.weight.dtype).requires_grad_(graph)
            y = layer(xi)
        if graph:
            y.backward(torch.ones_like(y))
        outs.append((y.double(), layer.running_mean.double(), layer.running_var.double()))
        if graph:
            outs[-1] += (xi.grad.double(), layer.weight.grad.double())
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_single_component_is_batchnorm():
    torch.manual_seed(0)
    bn, cbn = nn.BatchNorm2d(6), CompoundBatchNorm2d(6, 1)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        cbn.weight.copy_(bn.weight[None])
        cbn.bias.copy_(bn.bias[None])
    for _ in range(3):
        x = (torch.randn(8, 6, 4, 4) * 2 + 3).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(8, 6, 4, 4)
        bn(x).backward(g)
        y = cbn(x2)
        y.backward(g)
        torch.testing.assert_close(y, F.batch_norm(x.detach(), None, None, bn.weight, bn.bias, True, 0.0, 1e-5),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cbn.weight.grad[0], bn.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cbn.bias.grad[0], bn.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cbn.running_mean[0], bn.running_mean)
        torch.testing.assert_close(cbn.running_var[0], bn.running_var)
    bn.eval()
    cbn.eval()
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(cbn(x), bn(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- EM behaviour
def mixture_batches(steps, batch, c, seed=0):
    """Batches of (batch, c, 1, 1) vectors from 0.7 N(mu_0, 1) + 0.3 N(mu_1, 0.49)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.stack([torch.full((c,), 2.0), torch.full((c,), -2.0)])
    mu[1, : c // 2] = 1.0
    sd = torch.tensor([1.0, 0.7])
    pi = torch.tensor([0.7, 0.3])
    for _ in range(steps):
        z = (torch.rand(batch, generator=g) >= pi[0]).long()
        yield (mu[z] + sd[z, None] * torch.randn(batch, c, generator=g)).view(batch, c, 1, 1)


def test_running_statistics_converge_to_true_mixture():
    c = 8
    layer = CompoundBatchNorm2d(c, 2)  # default init: symmetry broken only by the seeded offsets
    for x in mixture_batches(150, 512, c):
        layer(x)
    mu = torch.stack([torch.full((c,), 2.0), torch.full((c,), -2.0)])
    mu[1, : c // 2] = 1.0
    true_var = torch.tensor([1.0, 0.49])[:, None].expand(2, c)
    true_pi = torch.tensor([0.7, 0.3])
    order = [0, 1] if (layer.running_mean[0] - mu[0]).abs().mean() < 1 else [1, 0]
    torch.testing.assert_close(layer.running_mean[order], mu, atol=0.1, rtol=0)
    torch.testing.assert_close(layer.running_var[order], true_var, atol=0.1, rtol=0)
    torch.testing.assert_close(layer.running_prior[order], true_pi, atol=0.03, rtol=0)
    assert torch.isclose(layer.running_prior.sum(), torch.tensor(1.0))


def test_symmetry_breaking_is_deterministic_and_separates_components():
    torch.manual_seed(123)
    a = CompoundBatchNorm2d(16, 4)
    torch.manual_seed(456)
    b = CompoundBatchNorm2d(16, 4)
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)  # global RNG irrelevant
    d = symmetry_directions(4, 16)
    torch.testing.assert_close(d.sum(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.pow(2).mean(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.running_mean, 0.1 * d)
    assert torch.cdist(a.running_mean, a.running_mean).add(torch.eye(4)).min() > 0.1
    # identical components never separate (all r = 1/M); the default offsets make them separate
    sym = CompoundBatchNorm2d(8, 2, perturbation=0.0)
    brk = CompoundBatchNorm2d(8, 2)
    for x in mixture_batches(60, 256, 8, seed=3):
        sym(x)
        brk(x)
    assert (sym.running_mean[0] - sym.running_mean[1]).abs().max() < 1e-5
    assert (brk.running_mean[0] - brk.running_mean[1]).norm() > 5.0


def test_eval_output_of_a_sample_does_not_depend_on_the_batch():
    layer = make_layer(c=6, m=4).eval()
    x = torch.randn(5, 6, 3, 3)
    full = layer(x)
    for i in range(5):
        torch.testing.assert_close(layer(x[i:i + 1]), full[i:i + 1], rtol=1e-5, atol=1e-6)
    other = torch.cat([x[:1], 10 * torch.randn(7, 6, 3, 3)])
    torch.testing.assert_close(layer(other)[:1], full[:1], rtol=1e-5, atol=1e-6)
    state_before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state_before[k]), k


def test_train_stats_running_uses_running_statistics_and_still_updates():
    layer = make_layer(train_stats='running')
    ref = make_layer().eval()  # same seed: same state
    x = torch.randn(4, 5, 3, 3)
    expected = ref(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.running_mean, ref.running_mean)  # EM still ran
    batch_layer = make_layer()
    assert not torch.allclose(batch_layer(x), expected, atol=1e-3)


def test_temperature_channels_is_per_dimension_average():
    a = make_layer(temperature='channels')
    b = make_layer(temperature=5.0)
    x = torch.randn(3, 5, 2, 2)
    torch.testing.assert_close(a.responsibilities(x), b.responsibilities(x))
    torch.testing.assert_close(a(x), b(x))


# ----------------------------------------------------------------------------------- gradients
def functional(layer, x, w, b, targets=None, num_classes=10):
    """The layer as a pure function of (x, weight, bias): fresh copies of the buffers every call."""
    params = {k: v.detach().clone() for k, v in layer.named_buffers()}
    params.update(weight=w, bias=b)
    if targets is None:
        return torch.func.functional_call(layer, params, (x,))
    with split_norm(layer, targets, num_classes):
        return torch.func.functional_call(layer, params, (x,))


def gradcheck_layer(layer, x, targets=None):
    layer = layer.double()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x = x.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: functional(layer, *a, targets=targets), (x, w, b),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('channels_last', [False, True])
def test_gradcheck_split_path(channels_last):
    x = torch.randn(5, 3, 2, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # groups of 10 classes with M = 3: floor(y * 3 / 10) -> 0, 1, 2, 2, 0
    gradcheck_layer(make_layer(c=3, m=3), x, targets=torch.tensor([0, 4, 7, 9, 2]))


@pytest.mark.parametrize('combine', ['posterior', 'mn'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_gradcheck_compound_with_responsibility_grad(combine, channels_last):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gradcheck_layer(make_layer(c=3, m=2, responsibility_grad=True, combine=combine), x)


def test_gradcheck_compound_default_when_responsibilities_are_constant():
    # far-apart components: r is one-hot to machine precision, so the full derivative equals the
    # constant-responsibility derivative the default path implements
    sign = torch.tensor([1.0, -1, -1, 1, 1, -1], dtype=torch.float64).view(6, 1, 1, 1)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64) + 10 * sign
    for combine in ('posterior', 'mn'):
        layer = make_layer(c=3, m=2, combine=combine)
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor([[10.0] * 3, [-10.0] * 3]))
        assert layer.responsibilities(x).max(1).values.min() == 1.0
        gradcheck_layer(layer, x)


@pytest.mark.parametrize('combine', ['posterior', 'mn'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_default_gradient_matches_constant_responsibility_reference(combine, channels_last):
    """Default path vs autograd of a per-component loop with r held fixed (soft r, overlapping comps)."""
    layer = make_layer(c=4, m=3, combine=combine).double()
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    r = layer.responsibilities(x).detach()  # (N, M, H, W)
    assert r.min() > 1e-3  # genuinely soft
    xr = x.clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    y_ref = torch.zeros_like(x)
    for k in range(3):
        rk = r[:, k:k + 1]
        nk = rk.sum() * 1.0
        mu = (rk * xr).sum((0, 2, 3)) / nk
        var = (rk * (xr - mu.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) / nk
        weight = rk if combine == 'posterior' else rk / torch.sqrt(nk / rk.numel())
        xhat = (xr - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps)
        y_ref = y_ref + weight * (w[k].view(1, -1, 1, 1) * xhat + b[k].view(1, -1, 1, 1))
    y_ref.backward(g)
    xl = x.clone().requires_grad_()
    y = layer(xl)
    y.backward(g)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_responsibility_grad_changes_the_input_gradient():
    x = torch.randn(4, 5, 3, 3)
    grads = []
    for flag in (False, True):
        layer = make_layer(responsibility_grad=flag)
        xr = x.clone().requires_grad_()
        layer(xr).pow(2).sum().backward()
        grads.append(xr.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------- split path
def test_split_path_is_per_group_batchnorm():
    m, num_classes = 4, 10
    layer = make_layer(c=5, m=m)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    targets = torch.tensor([0, 1, 2, 9, 8, 3, 3, 0])  # groups floor(y*4/10): 0,0,0,3,3,1,1,0; group 2 absent
    groups = targets * m // num_classes
    x = torch.randn(8, 5, 3, 3) + 1.0
    xr = x.clone().requires_grad_()
    with split_norm(layer, targets, num_classes):
        y = layer(xr)
    g = torch.randn_like(y)
    y.backward(g)
    for k in range(m):
        idx = (groups == k).nonzero().flatten()
        if len(idx) == 0:
            for name in ('running_mean', 'running_var'):
                torch.testing.assert_close(getattr(layer, name)[k], before[name][k], rtol=0, atol=0)
            continue
        rm, rv = before['running_mean'][k].clone(), before['running_var'][k].clone()
        xk = x[idx].clone().requires_grad_()
        wk = layer.weight.detach()[k].clone().requires_grad_()
        bk = layer.bias.detach()[k].clone().requires_grad_()
        yk = F.batch_norm(xk, rm, rv, wk, bk, True, layer.momentum, layer.eps)
        yk.backward(g[idx])
        torch.testing.assert_close(y[idx], yk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xr.grad[idx], xk.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.weight.grad[k], wk.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.bias.grad[k], bk.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_mean[k], rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var[k], rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad[2], torch.zeros(5))  # absent group: no gradient
    torch.testing.assert_close(layer.running_prior, before['running_prior'], rtol=0, atol=0)
    assert layer._split is None  # restored on exit


@pytest.mark.parametrize('channels_last', [False, True])
def test_paths_agree_with_and_without_graph(channels_last):
    """No-graph (raw coordinates) vs autograd.Function vs plain-autograd paths: same outputs and state."""
    x = torch.randn(6, 5, 3, 4) + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([0, 3, 5, 9, 9, 1])
    for train in (True, False):
        for split in (False, True):
            results = []
            for graph, rgrad in ((True, False), (False, False), (True, True)):
                layer = make_layer(responsibility_grad=rgrad).train(train)
                with torch.set_grad_enabled(graph), split_norm(layer, targets, 10) if split else nullcontext():
                    y = layer(x.clone().requires_grad_(graph))
                results.append((y.detach(),) + tuple(b.clone() for b in layer.buffers()))
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_split_group_with_one_vector_uses_running_statistics():
    layer = make_layer(c=4, m=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 4, 1, 1)
    with split_norm(layer, torch.tensor([0, 0, 1]), 2):  # group 1 has a single vector
        y = layer(x)
    assert torch.isfinite(y).all()
    eval_out = F.batch_norm(x[2:], before['running_mean'][1], before['running_var'][1], layer.weight[1],
                            layer.bias[1], False, 0.0, layer.eps)
    torch.testing.assert_close(y[2:], eval_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_mean[1], before['running_mean'][1], rtol=0, atol=0)
    assert not torch.allclose(layer.running_mean[0], before['running_mean'][0])


def test_split_norm_context_rules():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), make_layer(c=4, m=2), nn.ReLU(), make_layer(c=4, m=4))
    x = torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError):
        with split_norm(model, t.int(), 4):
            pass
    with pytest.raises(ValueError, match='targets must lie'):
        with split_norm(model, torch.tensor([0, 4]), 4):
            pass
    with split_norm(model, t[:3], 4), pytest.raises(ValueError, match='3 entries'):
        model(x)
    # eval ignores the split path: compound is the only inference path
    model.eval()
    expected = model(x)
    with split_norm(model, t, 4):
        torch.testing.assert_close(model(x), expected)
    # nesting restores the outer targets
    with split_norm(model, t, 4):
        with split_norm(model, t.flip(0), 4):
            assert model[1]._split[0] is not t
        assert model[1]._split[0] is t
    assert model[1]._split is None and model[3]._split is None


# ----------------------------------------------------------------------------------- robustness
def test_empty_component_keeps_its_statistics_and_stays_finite():
    layer = make_layer(c=4, m=3)
    with torch.no_grad():
        layer.running_mean[2].fill_(1e3)  # nothing in the batch comes near component 2
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, 4, 2, 2).requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(layer.running_mean[2], before['running_mean'][2], rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var[2], before['running_var'][2], rtol=0, atol=0)
    assert layer.running_prior[2] < before['running_prior'][2]  # prior decays towards N_2 / P = 0
    torch.testing.assert_close(layer.running_prior.sum(), torch.tensor(1.0))


def test_constant_input_tiny_batches_and_single_vector():
    layer = make_layer(c=4, m=3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    const = torch.full((4, 4, 2, 2), 3.0, requires_grad=True)
    r = layer.responsibilities(const).detach()
    y = layer(const)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(const.grad).all()
    # zero batch variance: a component with N_k > 1 gives exactly beta_k; one with N_k <= 1 (here the
    # unlikely one) is normalised with its running statistics
    nk = r.sum((0, 2, 3))
    assert (nk > 1).any() and (nk <= 1).any()
    branch = torch.where((nk > 1)[:, None], before['bias'],
                         before['weight'] * (3.0 - before['running_mean'])
                         / torch.sqrt(before['running_var'] + layer.eps) + before['bias'])
    expected = torch.einsum('nkhw,kc->nchw', r, branch)
    # fp32 rounding leaves x - mu ~ 1e-7, amplified by 1 / sqrt(eps) ~ 316 (torch BN behaves the same)
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)
    for name in ('running_prior', 'running_mean', 'running_var'):
        assert torch.isfinite(getattr(layer, name)).all()
    assert torch.isfinite(layer(torch.randn(2, 4, 1, 1))).all()  # two vectors
    assert torch.isfinite(layer(torch.randn(1, 4, 2, 1))).all()  # one image, two positions
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        layer(torch.randn(1, 4, 1, 1))
    layer.eval()
    assert torch.isfinite(layer(torch.randn(1, 4, 1, 1))).all()  # fine in eval, as BN
    with pytest.raises(ValueError, match=r'\(N, 4, H, W\)'):
        layer(torch.randn(2, 5, 2, 2))


def test_high_dimensional_responsibilities_are_finite():
    layer = CompoundBatchNorm2d(512, 4)
    with torch.no_grad():
        layer.running_var.uniform_(0.01, 0.1)  # log-likelihoods of order -1e5: exp would underflow
    x = torch.randn(4, 512, 2, 2) * 3
    r = layer.responsibilities(x)
    assert torch.isfinite(r).all()
    torch.testing.assert_close(r.sum(1), torch.ones(4, 2, 2))
    y = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_mean).all()


def test_bf16_autocast_keeps_fp32_state():
    layer = make_layer(c=6, m=4)
    ref = make_layer(c=6, m=4)
    x = torch.randn(4, 6, 3, 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    for name in ('running_prior', 'running_mean', 'running_var'):
        assert getattr(layer, name).dtype == torch.float32
    y_ref = ref(x.bfloat16().float())
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    # bf16 parameters (module built with dtype=bf16): statistics still fp32
    half = CompoundBatchNorm2d(6, 2, dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half.running_var.dtype == torch.float32
    out = half(x.bfloat16())
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and half.weight.grad.dtype == torch.bfloat16
    # Module.to(bf16) / .half() lower the parameters, not the EM state (values kept exactly)
    src = make_layer(c=6, m=4)
    means = src.running_mean.clone()
    for low in (src.to(torch.bfloat16), make_layer(c=6, m=4).half()):
        assert low.weight.dtype in (torch.bfloat16, torch.float16)
        assert low.running_mean.dtype == low.running_var.dtype == low.running_prior.dtype == torch.float32
    torch.testing.assert_close(src.running_mean, means, rtol=0, atol=0)
    assert torch.isfinite(src(x.bfloat16())).all()


@pytest.mark.parametrize('mode', ['compound', 'split', 'eval'])
def test_channels_last_matches_contiguous(mode):
    x = torch.randn(4, 6, 3, 5)
    g = torch.randn(4, 6, 3, 5)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer = make_layer(c=6, m=3)
        if mode == 'eval':
            layer.eval()
        xr = x.clone(memory_format=fmt).requires_grad_()
        if mode == 'split':
            with split_norm(layer, torch.tensor([0, 5, 2, 9]), 10):
                y = layer(xr)
        else:
            y = layer(xr)
        assert y.is_contiguous(memory_format=fmt)
        y.backward(g)
        outs.append((y, xr.grad, layer.weight.grad, layer.running_mean, layer.running_var, layer.running_prior))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_options_raise():
    with pytest.raises(ValueError, match='train_stats'):
        CompoundBatchNorm2d(4, train_stats='global')
    with pytest.raises(ValueError, match='combine'):
        CompoundBatchNorm2d(4, combine='mean')
    with pytest.raises(ValueError, match='temperature'):
        CompoundBatchNorm2d(4, temperature=0.0)
    with pytest.raises(ValueError, match='momentum'):
        CompoundBatchNorm2d(4, momentum=1.5)
    with pytest.raises(ValueError, match='num_components'):
        CompoundBatchNorm2d(4, 0)
    with pytest.raises(TypeError, match='responsibility_grad'):
        CompoundBatchNorm2d(4, responsibility_grad='yes')
    assert {'num_components', 'momentum', 'train_stats', 'combine', 'responsibility_grad',
            'temperature'} <= set(CBN_OPTIONS)


# ----------------------------------------------------------------------------------- integration
def test_timm_norm_layer_contract_and_state_dict_round_trip():
    layer = CompoundBatchNorm2d(8, device='cpu', dtype=torch.float64)  # timm's call signature
    assert layer.weight.shape == (2, 8) and layer.weight.dtype == torch.float64  # default M = 2
    nn.init.zeros_(layer.weight)  # timm zero_init_last
    model = nn.Sequential(nn.Conv2d(3, 8, 3), CompoundBatchNorm2d(8, 3))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model[1], CompoundBatchNorm2d)  # not swallowed by SyncBN conversion
    x = torch.randn(4, 3, 6, 6)
    model(x)
    sd = model.state_dict()
    assert {'1.running_prior', '1.running_mean', '1.running_var', '1.num_batches_tracked'} <= set(sd)
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), CompoundBatchNorm2d(8, 3))
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def populated_resnet18():
    import timm
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(8, 3, 64, 64))
    return model.eval()


def test_convert_resnet18_matches_batchnorm_in_eval():
    import copy
    model = populated_resnet18()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    exact = convert_bn_to_cbn(copy.deepcopy(model), num_components=4, perturbation=0.0)
    assert sum(isinstance(m, CompoundBatchNorm2d) for m in exact.modules()) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exact.modules())
    with torch.no_grad():
        torch.testing.assert_close(exact(x), expected, rtol=1e-5, atol=1e-5)
    # Perturbation p (in BN std units) moves the components' means by p * d_k with sum_k d_k = 0, so a
    # layer's eval output changes only at second order: the posteriors deviate from 1/M by O(p) and
    # multiply offsets of size O(p).  Hence error(p) ~ p^2: the default p = 0.01 must stay below
    # 0.5% of the logit scale (measured ~0.15%), and 10x p must give ~100x the error.
    errors = {}
    for p in (0.001, 0.01):
        with torch.no_grad():
            out = convert_bn_to_cbn(copy.deepcopy(model), num_components=4, perturbation=p)(x)
        errors[p] = ((out - expected).abs().max() / expected.abs().max()).item()
    assert 0 < errors[0.01] <= 5e-3
    assert 30 < errors[0.01] / errors[0.001] < 300
    nudged = convert_bn_to_cbn(copy.deepcopy(model), num_components=4)  # default p = 0.01
    first = nudged.bn1
    assert first.running_mean.shape == (4, 64) and not torch.equal(first.running_mean[0], first.running_mean[1])
    torch.testing.assert_close(first.weight, model.bn1.weight.expand(4, -1))


def test_convert_keeps_dtype_training_mode_and_rejects_fused_bn():
    from timm.layers import BatchNormAct2d
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(4)).double()
    model[1].train()
    model[1].momentum = None
    out = convert_bn_to_cbn(model, num_components=2, perturbation=0.0, train_stats='running')
    layer = out[1]
    assert isinstance(layer, CompoundBatchNorm2d) and layer.training
    assert layer.weight.dtype == torch.float64 and layer.running_mean.dtype == torch.float32
    assert layer.momentum == 0.1 and layer.train_stats == 'running'
    assert isinstance(out[2], nn.BatchNorm1d)  # not 2-D: left alone
    assert isinstance(convert_bn_to_cbn(nn.BatchNorm2d(3)), CompoundBatchNorm2d)
    with pytest.raises(TypeError, match='BatchNormAct2d'):
        convert_bn_to_cbn(nn.Sequential(BatchNormAct2d(4)))
