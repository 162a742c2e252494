"""tau-normalisation and learnable weight scaling (lt_zoo.decoupling), Kang et al. ICLR'20."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from lt_zoo.decoupling import LearnableWeightScaling, tau_normalize, tau_normalize_
from lt_zoo.layers.cosine_classifier import CosineClassifier


def rows(seed=0, c=5, k=7):
    return torch.randn(c, k, generator=torch.Generator().manual_seed(seed)) * torch.arange(1, c + 1).unsqueeze(1)


@pytest.mark.parametrize('tau', [1.0, 0.5, 2.0, 0.0])
def test_tau_normalize_row_norms_closed_form(tau):
    w = rows()
    out = tau_normalize(w, tau)
    w64 = w.double().numpy()
    norms = np.sqrt((w64 ** 2).sum(1))
    # ||W_c / ||W_c||^tau|| = ||W_c||^(1 - tau), direction unchanged
    np.testing.assert_allclose(np.linalg.norm(out.double().numpy(), axis=1), norms ** (1 - tau), rtol=1e-5)
    np.testing.assert_allclose(out.double().numpy() * norms[:, None] ** tau, w64, rtol=1e-5, atol=1e-6)


def test_tau_normalize_edge_cases():
    w = rows()
    assert torch.equal(tau_normalize(w, 0.0), w)
    torch.testing.assert_close(tau_normalize(w, 1.0).norm(dim=1), torch.ones(5))
    w[2] = 0.0
    out = tau_normalize(w, 1.0)
    assert torch.isfinite(out).all() and (out[2] == 0).all()
    half = tau_normalize(w.half(), 1.0)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match='tau'):
        tau_normalize(w, float('nan'))
    with pytest.raises(ValueError, match='weight'):
        tau_normalize(w[0], 1.0)


def test_tau_normalize_linear_in_place():
    fc = nn.Linear(7, 5)
    with torch.no_grad():
        fc.weight.copy_(rows())
    param, expected = fc.weight, tau_normalize(rows(), 1.0)
    assert tau_normalize_(fc, 1.0) is fc
    assert fc.weight is param and torch.equal(fc.weight, expected) and (fc.bias == 0).all()
    x = torch.randn(3, 7)
    torch.testing.assert_close(fc(x), x @ expected.T)   # Kang et al. score without bias
    keep = nn.Linear(7, 5)
    bias = keep.bias.detach().clone()
    tau_normalize_(keep, 0.5, zero_bias=False)
    assert torch.equal(keep.bias, bias)
    with pytest.raises(TypeError, match='Identity'):
        tau_normalize_(nn.Identity())


def test_lws_forward_is_scaled_logits_and_only_scales_train():
    inner = nn.Linear(7, 5)
    lws = LearnableWeightScaling(inner)
    x = torch.randn(4, 7)
    torch.testing.assert_close(lws(x), inner(x))              # f = 1 at init
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0, -1.0]))
    expected = (x @ inner.weight.T + inner.bias) * torch.tensor([0.5, 2.0, 1.0, 3.0, -1.0])
    torch.testing.assert_close(lws(x), expected)
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ['scales']
    lws(x).sum().backward()
    assert lws.scales.grad is not None and inner.weight.grad is None and inner.bias.grad is None
    assert set(lws.state_dict()) == {'scales', 'classifier.weight', 'classifier.bias'}
    assert lws.weight is inner.weight and lws.bias is inner.bias
    assert (lws.in_features, lws.out_features) == (7, 5)


def test_lws_fold_into_linear():
    lws = LearnableWeightScaling(nn.Linear(7, 5))
    with torch.no_grad():
        lws.scales.uniform_(0.5, 2.0)
    folded = lws.to_linear()
    x = torch.randn(4, 7)
    assert type(folded) is nn.Linear
    torch.testing.assert_close(folded(x), lws(x))
    with pytest.raises(TypeError, match='CosineClassifier'):
        LearnableWeightScaling(CosineClassifier(7, 5)).to_linear()
    with pytest.raises(TypeError, match='Identity'):
        LearnableWeightScaling(nn.Identity())


def test_lws_on_cosine_head():
    head = CosineClassifier(7, 5, scale=30.0)
    lws = LearnableWeightScaling(head)
    with torch.no_grad():
        lws.scales.copy_(torch.arange(1.0, 6.0))
    x = torch.randn(3, 7)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    torch.testing.assert_close(lws(x), 30.0 * cos * torch.arange(1.0, 6.0))
    assert lws.bias is None


def test_lws_replaces_timm_fc():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    model.fc = LearnableWeightScaling(model.fc)
    assert model.get_classifier() is model.fc and model.get_classifier().weight.shape == (4, 512)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
        model.fc.scales.mul_(2.0)
        torch.testing.assert_close(model(x), 2.0 * before)
    keys = [k for k in model.state_dict() if k.startswith('fc.')]
    assert sorted(keys) == ['fc.classifier.bias', 'fc.classifier.weight', 'fc.scales']
