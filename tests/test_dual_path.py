"""CBN dual path (lt_zoo.training.dual_path): the loss terms by hand, the stop-gradient, the switches,
and that the model runs exactly the (path, view) forwards the loss declares."""
import numpy as np
import pytest
import torch

import timm
import lt_zoo  # noqa: F401  (registers resnet32_cbn with timm)
from lt_zoo.training.dual_path import DualPathLoss, DualPathModel, dual_path_keys


KEYS = ['compound_weak', 'compound_strong', 'split_weak', 'split_strong']


def _logits(b=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(b, k, generator=g, dtype=torch.float64, requires_grad=True) for key in KEYS}


def _stub_cls(z, y):
    """A stand-in classification loss whose value identifies which logits it saw."""
    return (z * torch.arange(1, z.shape[1] + 1, dtype=z.dtype)).sum() / z.shape[0] + 0.01 * y.sum()


def _neg_mean_cos(a, b):
    a, b = a.detach().numpy(), b.detach().numpy()
    return -np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def test_dual_path_loss_default_terms():
    logits, y = _logits(), torch.tensor([0, 1, 2, 3, 4, 0])
    terms = DualPathLoss(_stub_cls)(logits, y)  # defaults: strong view, both paths; consistency 0.1 on both views
    assert set(terms) == {'cls_compound_strong', 'cls_split_strong', 'consistency_weak', 'consistency_strong', 'loss'}
    cls = sum(float(_stub_cls(logits[k], y).detach()) for k in ('compound_strong', 'split_strong'))
    cons = {v: _neg_mean_cos(logits[f'compound_{v}'], logits[f'split_{v}']) for v in ('weak', 'strong')}
    for v in cons:
        assert float(terms[f'consistency_{v}'].detach()) == pytest.approx(cons[v], abs=1e-12)
    assert float(terms['loss'].detach()) == pytest.approx(cls + 0.1 * (cons['weak'] + cons['strong']), abs=1e-12)


def test_dual_path_consistency_gradient_is_stop_gradient():
    """Each half D(c, sg(s)) moves only its prediction: d loss / d c = w/2 * d(-mean cos(c, s))/dc, s fixed."""
    logits, y = _logits(seed=1), torch.zeros(6, dtype=torch.long)
    w = 0.3
    loss = DualPathLoss(_stub_cls, cls_views=(), cls_paths=(), consistency_views=('weak',), consistency_weight=w)
    loss(logits, y)['loss'].backward()
    for pred, target in (('compound_weak', 'split_weak'), ('split_weak', 'compound_weak')):
        c, s = logits[pred].detach().numpy(), logits[target].detach().numpy()
        nc, ns = np.linalg.norm(c, axis=1, keepdims=True), np.linalg.norm(s, axis=1, keepdims=True)
        cos = (c * s).sum(1, keepdims=True) / (nc * ns)
        dcos = s / (nc * ns) - cos * c / nc ** 2  # closed-form d cos(c, s) / d c
        np.testing.assert_allclose(logits[pred].grad.numpy(), -0.5 * w * dcos / len(c), rtol=1e-10, atol=1e-14)
    assert logits['compound_strong'].grad is None and logits['split_strong'].grad is None


@pytest.mark.parametrize('views,paths', [(['weak'], ['split']), (['weak', 'strong'], ['compound']),
                                         (['strong'], ['compound', 'split'])])
def test_dual_path_loss_switches(views, paths):
    logits, y = _logits(seed=2), torch.tensor([1, 1, 2, 0, 4, 3])
    chosen = [f'{p}_{v}' for p in paths for v in views]
    only = {k: logits[k] for k in chosen}  # without consistency no other logits are needed
    terms = DualPathLoss(_stub_cls, cls_views=views, cls_paths=paths, consistency_weight=0.0)(only, y)
    assert set(terms) == {f'cls_{k}' for k in chosen} | {'loss'}
    want = sum(float(_stub_cls(logits[k], y).detach()) for k in chosen)
    assert float(terms['loss'].detach()) == pytest.approx(want, abs=1e-12)
    assert dual_path_keys(views, paths, ['weak', 'strong'], 0.0) == sorted(chosen)
    assert dual_path_keys(views, paths, ['weak'], 0.1) == sorted(set(chosen) | {'compound_weak', 'split_weak'})


def test_dual_path_model_runs_the_requested_passes():
    torch.manual_seed(0)
    net = timm.create_model('resnet32_cbn', num_classes=10, in_chans=1)
    keys = dual_path_keys(['strong'], ['compound', 'split'], ['weak'], 0.1)
    wrapped = DualPathModel(net, 10, keys)
    x_weak, x_strong, y = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    out = wrapped.train()(x_weak, x_strong, y)
    assert sorted(out) == keys and all(v.shape == (8, 10) for v in out.values())
    assert not torch.allclose(out['compound_strong'], out['split_strong'])  # the paths normalise differently
    wrapped.eval()
    with torch.no_grad():  # evaluation: one tensor, the compound path = the plain model
        assert torch.equal(wrapped(x_weak), net(x_weak))




def _cbn_batches_tracked(model):
    from lt_zoo.layers import CompoundBatchNorm2d
    return [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, CompoundBatchNorm2d)]


@pytest.mark.parametrize('stat_updates,expected', [('all', 4), ('once', 2)])
def test_dual_stat_updates_counts_the_running_updates_of_a_step(stat_updates, expected):
    torch.manual_seed(0)
    net = timm.create_model('resnet20_cbn', num_classes=10, in_chans=1).train()
    wrapped = DualPathModel(net, 10, KEYS, stat_updates)
    x = torch.randn(8, 1, 8, 8)
    wrapped(x, x.flip(-1), torch.arange(8))
    # 'all': each of the 4 (path, view) forwards updates every layer; 'once': one forward per path
    assert set(_cbn_batches_tracked(net)) == {expected}


def test_dual_stat_updates_once_keeps_the_outputs_of_all():
    torch.manual_seed(0)
    net = timm.create_model('resnet20_cbn', num_classes=10, in_chans=1).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    out_all = DualPathModel(net, 10, KEYS, 'all')(x, x.flip(-1), y)
    net.load_state_dict(state)
    out_once = DualPathModel(net, 10, KEYS, 'once')(x, x.flip(-1), y)
    # the first forward sees the same running state either way; only later forwards may differ
    first = sorted(KEYS)[0]
    assert torch.equal(out_all[first], out_once[first])
    with pytest.raises(ValueError, match=r"stat_updates='twice'; expected one of \('all', 'once'\)"):
        DualPathModel(net, 10, KEYS, 'twice')
