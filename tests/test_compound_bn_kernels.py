"""The two formulations of the CBN kernel agree to float64 rounding: the batched-GEMM one with its analytic
backward (eager default) and the broadcast-and-sum one differentiated by autograd (what torch.compile
traces).  Every option of the layer, both memory formats, training and eval."""
import itertools

import pytest
import torch

from lt_zoo.layers import compound_bn_functional as cbf

OPTIONS = [dict(temperature=t, combine=c, train_stats=s, responsibility_grad=g)
           for t, c, s, g in itertools.product((1.0, 5.0), ('posterior', 'mn'), ('batch', 'running'), (False, True))]


def _case(seed, m=4, c=6, dtype=torch.float64, channels_last=False, hw=(5, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, c, *hw, generator=g, dtype=dtype) * 3 + 50  # |mean| >> std: the shift matters
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    prior = torch.softmax(torch.randn(m, generator=g, dtype=dtype), 0)
    mean = 50 + 2 * torch.randn(m, c, generator=g, dtype=dtype)
    var = 4 + 5 * torch.rand(m, c, generator=g, dtype=dtype)
    weight = 1 + 0.3 * torch.randn(m, c, generator=g, dtype=dtype)
    bias = 0.3 * torch.randn(m, c, generator=g, dtype=dtype)
    gy = torch.randn(x.shape, generator=g, dtype=dtype)
    return x, prior, mean, var, weight, bias, gy


def _run(kernel, case, training, groups=None, **opts):
    x, prior, mean, var, weight, bias, gy = case
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    y, stats = cbf.compound_batch_norm(x, prior, mean, var, weight, bias, training, 1e-5, groups=groups,
                                       kernel=kernel, **opts)
    grads = torch.autograd.grad(y, (x, weight, bias), gy)
    return [y, *grads] + ([] if stats is None else list(stats))


@pytest.mark.parametrize('opts', OPTIONS, ids=lambda o: '-'.join(str(v) for v in o.values()))
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_pointwise_kernel_equals_gemm_kernel_in_float64(opts, training):
    for seed, cl in ((0, False), (1, True)):
        case = _case(seed, channels_last=cl)
        gemm, pointwise = _run('gemm', case, training, **opts), _run('pointwise', case, training, **opts)
        assert len(gemm) == len(pointwise) == (9 if training else 4)
        assert pointwise[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for a, b in zip(gemm, pointwise):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('hw', [(5, 4), (1, 1)], ids=['map', '1x1'])
def test_pointwise_kernel_equals_gemm_kernel_on_the_split_path(hw):
    groups = torch.tensor([0, 0, 1, 3, 3, 3])  # component 2 empty: normalised with its running statistics
    for cl in (False, True):
        case = _case(2, hw=hw, channels_last=cl)
        gemm, pointwise = _run('gemm', case, True, groups), _run('pointwise', case, True, groups)
        for a, b in zip(gemm, pointwise):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_pointwise_training_gradient_is_the_gradient_with_constant_responsibilities():
    """Independent of either kernel: autograd through a direct float64 transcription of Eq. 7-16 with r
    detached, and with the batch statistics of each component."""
    x, prior, mean, var, weight, bias, gy = _case(3, m=3, c=5)
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    v = x.permute(0, 2, 3, 1).reshape(-1, 5)  # P x C
    logp = prior.log() - 0.5 * (var.log().sum(1) + (((v[:, None, :] - mean) ** 2) / var).sum(2))
    r = torch.softmax(logp, 1).detach()
    nk = r.sum(0)
    mu = (r.t() @ v) / nk[:, None]
    sig2 = torch.stack([(r[:, k:k + 1] * (v - mu[k]) ** 2).sum(0) / nk[k] for k in range(3)])
    out = sum(r[:, k:k + 1] * (weight[k] * (v - mu[k]) / torch.sqrt(sig2[k] + 1e-5) + bias[k]) for k in range(3))
    y_ref = out.reshape(6, 5, 4, 5).permute(0, 3, 1, 2)
    ref = [y_ref, *torch.autograd.grad(y_ref, (x, weight, bias), gy)]
    got = _run('pointwise', (x.detach(), prior, mean, var, weight.detach(), bias.detach(), gy), True)[:4]
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_unknown_kernel_is_refused_before_any_work():
    x, prior, mean, var, weight, bias, _ = _case(0)
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'gemm', 'pointwise'\), got 'fused'"):
        cbf.compound_batch_norm(x, prior, mean, var, weight, bias, True, kernel='fused')
