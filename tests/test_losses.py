"""Losses against float64 NumPy references written independently of lt_zoo's code path."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lt_zoo.losses import (BalancedSoftmaxLoss, ClassBalancedLoss, ConsistencyLoss, CrossEntropyLoss,
                           FocalLoss, GCLLoss, LDAMLoss, LogitAdjustedLoss, class_balanced_weights,
                           consistency_loss, create_loss, ldam_margins, list_losses, loss_options,
                           posthoc_adjust)

COUNTS = [500, 120, 40, 9, 2]  # long-tailed, C = 5


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def np_ce(z, y):
    """Per-sample -log softmax(z)_y, float64."""
    return -np_log_softmax(z)[np.arange(len(y)), y]


def batch(seed=0, b=16, c=5, cosine=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, generator=g, dtype=dtype) * 2 - 1 if cosine else torch.randn(b, c, generator=g, dtype=dtype) * 3
    y = torch.randint(0, c, (b,), generator=g)
    return x, y


# ---------------------------------------------------------------- logit adjustment / balanced softmax

def test_balanced_softmax_equals_ce_on_logits_plus_log_counts():
    z, y = batch(1)
    expected = np_ce(z.numpy() + np.log(np.array(COUNTS, dtype=np.float64)), y.numpy()).mean()
    got = BalancedSoftmaxLoss(COUNTS)(z, y)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # differs from plain CE on this long-tailed prior
    assert abs(expected - np_ce(z.numpy(), y.numpy()).mean()) > 1e-2


def test_logit_adjusted_loss_with_tau():
    z, y = batch(2)
    pi = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    for tau in (0.5, 1.0, 2.0):
        expected = np_ce(z.numpy() + tau * np.log(pi), y.numpy()).mean()
        assert LogitAdjustedLoss(COUNTS, tau=tau)(z, y).item() == pytest.approx(expected, rel=1e-12)
    assert LogitAdjustedLoss(COUNTS)(z, y).item() == pytest.approx(BalancedSoftmaxLoss(COUNTS)(z, y).item(), rel=1e-12)


def test_posthoc_adjust_argmax():
    z, _ = batch(3, b=64)
    pi = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    for tau in (1.0, 0.7):
        adjusted = posthoc_adjust(z, COUNTS, tau=tau)
        assert adjusted.shape == z.shape
        np.testing.assert_allclose(adjusted.numpy(), z.numpy() - tau * np.log(pi), rtol=0, atol=1e-12)
        expected_pred = np.argmax(z.numpy() - tau * np.log(pi), axis=1)
        np.testing.assert_array_equal(adjusted.argmax(1).numpy(), expected_pred)
    # the adjustment moves predictions towards rare classes on this batch
    assert (posthoc_adjust(z, COUNTS).argmax(1) != z.argmax(1)).any()
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        posthoc_adjust(z[:, :4], COUNTS)


# ---------------------------------------------------------------- CE / focal

def test_cross_entropy_label_smoothing():
    z, y = batch(4)
    logp = np_log_softmax(z.numpy())
    nll = -logp[np.arange(len(y)), y.numpy()]
    assert CrossEntropyLoss(COUNTS)(z, y).item() == pytest.approx(nll.mean(), rel=1e-12)
    eps = 0.1
    smoothed = (1 - eps) * nll + eps * (-logp.mean(axis=1))
    assert CrossEntropyLoss(COUNTS, label_smoothing=eps)(z, y).item() == pytest.approx(smoothed.mean(), rel=1e-12)


def test_focal_loss_value_and_gradient():
    z, y = batch(5)
    p = np.exp(np_log_softmax(z.numpy()))[np.arange(len(y)), y.numpy()]
    for gamma in (0.0, 1.0, 2.0):
        expected = ((1 - p) ** gamma * -np.log(p)).mean()
        assert FocalLoss(COUNTS, gamma=gamma)(z, y).item() == pytest.approx(expected, rel=1e-10)
    # the modulating factor is differentiated (numeric vs analytic gradient)
    zz = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: FocalLoss(COUNTS, gamma=2.0)(t, y), (zz,))


# ---------------------------------------------------------------- class-balanced

def test_class_balanced_weights_hand_numbers():
    # beta = 0.5, n = (3, 1): raw (1-b)/(1-b^n) = (4/7, 1); sum = 11/7; scaled to sum 2 -> (8/11, 14/11)
    np.testing.assert_allclose(class_balanced_weights([3, 1], beta=0.5), [8 / 11, 14 / 11], rtol=1e-14)
    # beta = 0 gives equal weights; beta near 1 tends to inverse frequency
    np.testing.assert_allclose(class_balanced_weights([3, 1], beta=0.0), [1.0, 1.0])
    w = class_balanced_weights([1000, 10], beta=1 - 1e-9)
    assert w[1] / w[0] == pytest.approx(100.0, rel=1e-4)


def test_class_balanced_reductions_hand_numbers():
    # zero logits: every per-sample CE is log 2; targets (0, 0, 1) -> weights (8/11, 8/11, 14/11)
    z = torch.zeros(3, 2, dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    mean = ClassBalancedLoss([3, 1], beta=0.5, reduction="mean")(z, y)
    wmean = ClassBalancedLoss([3, 1], beta=0.5, reduction="weighted_mean")(z, y)
    assert mean.item() == pytest.approx(math.log(2) * (30 / 11) / 3, rel=1e-14)
    assert wmean.item() == pytest.approx(math.log(2), rel=1e-14)
    assert ClassBalancedLoss([3, 1]).reduction == "mean"


def test_class_balanced_reductions_random_batch():
    z, y = batch(6)
    w = class_balanced_weights(COUNTS, 0.999)
    l = np_ce(z.numpy(), y.numpy())
    wy = w[y.numpy()]
    got_mean = ClassBalancedLoss(COUNTS, beta=0.999, reduction="mean")(z, y).item()
    got_wmean = ClassBalancedLoss(COUNTS, beta=0.999, reduction="weighted_mean")(z, y).item()
    assert got_mean == pytest.approx((wy * l).sum() / len(l), rel=1e-12)
    assert got_wmean == pytest.approx((wy * l).sum() / wy.sum(), rel=1e-12)
    # 'weighted_mean' is the F.cross_entropy(weight=) convention
    ref = F.cross_entropy(z, y, weight=torch.from_numpy(w)).item()
    assert got_wmean == pytest.approx(ref, rel=1e-12)
    # focal base: (1-p)^gamma CE, weighted
    p = np.exp(-l)
    got_focal = ClassBalancedLoss(COUNTS, beta=0.999, base="focal", gamma=2.0)(z, y).item()
    assert got_focal == pytest.approx((wy * (1 - p) ** 2 * l).sum() / len(l), rel=1e-10)


def test_class_balanced_option_errors():
    with pytest.raises(ValueError, match="gamma"):
        ClassBalancedLoss(COUNTS, base="ce", gamma=2.0)
    with pytest.raises(ValueError, match="reduction"):
        ClassBalancedLoss(COUNTS, reduction="sum")
    with pytest.raises(ValueError, match="base"):
        ClassBalancedLoss(COUNTS, base="bce")
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\)"):
        ClassBalancedLoss(COUNTS, beta=1.0)


# ---------------------------------------------------------------- LDAM

def test_ldam_margins_hand_numbers():
    # n^(-1/4) = 0.1, 0.2, 0.5, 1 -> scaled so the largest margin is max_m
    np.testing.assert_allclose(ldam_margins([10000, 625, 16, 1], max_m=0.5), [0.05, 0.1, 0.25, 0.5], rtol=1e-12)
    m = LDAMLoss(COUNTS).margins.numpy()
    n = np.array(COUNTS, dtype=np.float64)
    np.testing.assert_allclose(m / n ** -0.25, np.full(5, (m / n ** -0.25)[0]), rtol=1e-12)
    assert m.max() == pytest.approx(0.5) and m.argmax() == 4


def np_ldam(cos, y, counts, max_m=0.5, s=30.0, weights=None):
    n = np.asarray(counts, dtype=np.float64)
    margins = n ** -0.25
    margins = margins / margins.max() * max_m
    z = np.array(cos, dtype=np.float64)
    rows = np.arange(len(y))
    z[rows, y] -= margins[y]
    l = np_ce(s * z, y)
    if weights is None:
        return l.mean()
    return (weights[y] * l).sum() / weights[y].sum()


def test_ldam_loss_and_deferred_reweighting():
    cos, y = batch(7, cosine=True)
    loss = LDAMLoss(COUNTS, drw_epoch=3)
    assert LDAMLoss.expects_cosine
    unweighted = np_ldam(cos.numpy(), y.numpy(), COUNTS)
    assert loss(cos, y).item() == pytest.approx(unweighted, rel=1e-12)
    loss.set_epoch(2)
    assert not loss.reweighting and loss(cos, y).item() == pytest.approx(unweighted, rel=1e-12)
    loss.set_epoch(3)
    # Cui et al. weights for beta = 0.9999, written out: (1-b)/(1-b^n), normalised to sum C
    n = np.array(COUNTS, dtype=np.float64)
    raw = (1 - 0.9999) / (1 - 0.9999 ** n)
    w = raw / raw.sum() * len(n)
    weighted = np_ldam(cos.numpy(), y.numpy(), COUNTS, weights=w)
    assert loss.reweighting and loss(cos, y).item() == pytest.approx(weighted, rel=1e-12)
    assert abs(weighted - unweighted) > 1e-3
    assert LDAMLoss(COUNTS).drw_epoch == 160
    never = LDAMLoss(COUNTS, drw_epoch=None)
    never.set_epoch(10_000)
    assert never(cos, y).item() == pytest.approx(unweighted, rel=1e-12)


# ---------------------------------------------------------------- GCL

def np_gcl(cos, y, counts, abs_eps, s=30.0, m=0.0, noise_mul=0.5, gamma=0.0):
    log_n = np.log(np.asarray(counts, dtype=np.float64))
    delta = log_n.max() - log_n
    z = np.array(cos, dtype=np.float64) - noise_mul * abs_eps * delta / delta.max()
    z[np.arange(len(y)), y] -= m
    ce = np_ce(s * z, y)
    return ((1 - np.exp(-ce)) ** gamma * ce).mean()


def test_gcl_seeded_generator_matches_closed_form():
    cos, y = batch(8, cosine=True)
    loss = GCLLoss(COUNTS, generator=torch.Generator().manual_seed(123))
    first, second = loss(cos, y).item(), loss(cos, y).item()
    # same generator seed -> the same two draws: eps ~ N(0, 1/3), clamped to [-1, 1]
    replay = torch.Generator().manual_seed(123)
    draws = [torch.normal(0.0, 1 / 3, size=(16, 5), generator=replay).clamp(-1, 1).abs().double().numpy()
             for _ in range(2)]
    assert first == pytest.approx(np_gcl(cos.numpy(), y.numpy(), COUNTS, draws[0]), rel=1e-6)
    assert second == pytest.approx(np_gcl(cos.numpy(), y.numpy(), COUNTS, draws[1]), rel=1e-6)
    assert first != second  # noise is resampled on every call


def test_gcl_global_rng_matches_official_sampling():
    cos, y = batch(9, cosine=True)
    torch.manual_seed(0)
    got = GCLLoss(COUNTS)(cos, y).item()
    torch.manual_seed(0)  # the official draw: torch.distributions.Normal(0, 1/3).sample(shape)
    eps = torch.distributions.Normal(0.0, 1 / 3).sample(cos.shape).clamp(-1, 1).abs().double().numpy()
    assert got == pytest.approx(np_gcl(cos.numpy(), y.numpy(), COUNTS, eps), rel=1e-6)


def test_gcl_stage2_focal_form_and_detached_factor():
    cos, y = batch(10, cosine=True)
    opts = dict(s=20.0, m=0.1, noise_mul=0.5, gamma=1.0)
    loss = GCLLoss(COUNTS, generator=torch.Generator().manual_seed(5), **opts)
    x = cos.clone().requires_grad_()
    value = loss(x, y)
    value.backward()
    eps = torch.normal(0.0, 1 / 3, size=(16, 5), generator=torch.Generator().manual_seed(5))
    eps = eps.clamp(-1, 1).abs().double().numpy()
    assert value.item() == pytest.approx(np_gcl(cos.numpy(), y.numpy(), COUNTS, eps, **opts), rel=1e-6)
    # official focal_loss detaches p: d/dcos = s * (1-p)^gamma * (softmax(s z) - onehot) / B
    log_n = np.log(np.array(COUNTS, dtype=np.float64))
    z = cos.numpy() - 0.5 * eps * (log_n.max() - log_n) / (log_n.max() - log_n).max()
    z[np.arange(16), y.numpy()] -= 0.1
    prob = np.exp(np_log_softmax(20 * z))
    p = prob[np.arange(16), y.numpy()]
    onehot = np.eye(5)[y.numpy()]
    expected_grad = 20 * (1 - p)[:, None] * (prob - onehot) / 16
    np.testing.assert_allclose(x.grad.numpy(), expected_grad, rtol=1e-5, atol=1e-10)


def test_gcl_special_cases():
    cos, y = batch(11, cosine=True)
    plain = np_ce(30 * cos.numpy(), y.numpy()).mean()
    assert GCLLoss(COUNTS, noise_mul=0.0)(cos, y).item() == pytest.approx(plain, rel=1e-12)
    # balanced counts: every cloud size is 0 -> finite, noise-free, equals CE(s (cos - m e_y))
    balanced = GCLLoss([50] * 5, m=0.2)
    assert torch.all(balanced.cloud_size == 0)
    z = cos.numpy().copy()
    z[np.arange(16), y.numpy()] -= 0.2
    got = balanced(cos, y)
    assert torch.isfinite(got) and got.item() == pytest.approx(np_ce(30 * z, y.numpy()).mean(), rel=1e-12)
    assert GCLLoss.expects_cosine and not BalancedSoftmaxLoss.expects_cosine


def test_gcl_rejects_scaled_logits():
    cos, y = batch(12, cosine=True)
    with pytest.raises(ValueError, match=r"cosine similarities in \[-1, 1\].*30"):
        GCLLoss(COUNTS)(cos * 30, y)


# ---------------------------------------------------------------- all losses

@pytest.mark.parametrize("name", list_losses())
def test_every_loss_has_finite_gradients(name):
    loss = create_loss(name, COUNTS)
    cos, y = batch(13, cosine=True, dtype=torch.float32)
    # near-saturated inputs: confident predictions, 12 right and 4 wrong
    x = (cos * 0.2).index_put((torch.arange(16), y), torch.full((16,), 0.999))
    if not loss.expects_cosine:
        x = x * 50
    y = torch.cat([y[:12], (y[12:] + 1) % 5])
    x.requires_grad_()
    value = loss(x, y)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    loss.set_epoch(200)  # every loss accepts the trainer's epoch
    assert torch.isfinite(loss(x.detach(), y))


@pytest.mark.parametrize("name", list_losses())
def test_half_precision_input_is_computed_in_float32(name):
    loss = create_loss(name, COUNTS)
    cos, y = batch(14, cosine=True, dtype=torch.float32)
    x = cos if loss.expects_cosine else cos * 4
    torch.manual_seed(1)
    full = loss(x, y)
    torch.manual_seed(1)
    half = loss(x.bfloat16(), y)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)


# ---------------------------------------------------------------- factory and validation

def test_factory_builds_each_registered_loss():
    assert list_losses() == sorted(["balanced_softmax", "ce", "class_balanced", "focal", "gcl", "ldam",
                                    "logit_adjusted"])
    assert isinstance(create_loss("ldam", COUNTS, max_m=0.3), LDAMLoss)
    assert create_loss("gcl", COUNTS, s=20.0, m=0.1, gamma=1.0).s == 20.0
    assert loss_options("focal") == {"gamma": 1.0, "check_inputs": True}


def test_factory_errors():
    with pytest.raises(ValueError, match=r"unknown loss 'cross_entropy'.*'balanced_softmax'.*'gcl'"):
        create_loss("cross_entropy", COUNTS)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gama'\] for loss 'focal'.*'gamma'"):
        create_loss("focal", COUNTS, gama=2.0)
    with pytest.raises(ValueError, match=r"\['tau'\].*'balanced_softmax'"):
        create_loss("balanced_softmax", COUNTS, tau=1.0)


@pytest.mark.parametrize("counts, message", [
    ([], "empty"),
    ([10, 0, 3], r"positive.*\(1, 0\)"),
    ([10, -2], r"positive.*\(1, -2\)"),
    ([10, 2.5], r"integers.*\(1, 2.5\)"),
    ([10, float("nan")], r"integers.*nan"),
])
def test_bad_class_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        create_loss("balanced_softmax", counts)


def test_bad_class_count_types():
    with pytest.raises(TypeError, match="str"):
        CrossEntropyLoss("10,5")
    with pytest.raises(TypeError, match="numbers"):
        CrossEntropyLoss([10, "5"])
    # integral floats and tensors are accepted
    assert BalancedSoftmaxLoss(torch.tensor([10, 5])).class_counts == (10, 5)
    assert BalancedSoftmaxLoss([10.0, 5.0]).class_counts == (10, 5)


def test_bad_call_inputs():
    loss = BalancedSoftmaxLoss(COUNTS)
    z, y = batch(15)
    with pytest.raises(ValueError, match=r"\(B, 5\).*len\(class_counts\)=5.*\(16, 4\)"):
        loss(z[:, :4], y)
    with pytest.raises(ValueError, match=r"\[0, 5\).*\(3, 7\)"):
        loss(z, y.index_fill(0, torch.tensor([3]), 7))
    with pytest.raises(ValueError, match=r"\(0, -1\)"):
        loss(z, y.index_fill(0, torch.tensor([0]), -1))
    bad = z.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\(2, 1\), nan"):
        loss(bad, y)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*inf"):
        loss(bad, y)
    with pytest.raises(TypeError, match="int64"):
        loss(z, y.double())
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        loss(z, y[:8])
    with pytest.raises(ValueError, match="empty batch"):
        loss(z[:0], y[:0])
    # int32 targets are accepted and mean the same
    assert loss(z, y.int()).item() == pytest.approx(loss(z, y).item(), rel=1e-12)


# ---------------------------------------------------------------- consistency

def test_consistency_loss_value_and_stop_gradient():
    g = torch.Generator().manual_seed(16)
    p = torch.randn(8, 12, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(8, 12, generator=g, dtype=torch.float64, requires_grad=True)
    pn, zn = p.detach().numpy(), z.detach().numpy()
    cos = (pn * zn).sum(1) / (np.linalg.norm(pn, axis=1) * np.linalg.norm(zn, axis=1))
    value = consistency_loss(p, z)
    assert value.item() == pytest.approx(-cos.mean(), rel=1e-12)
    value.backward()
    assert z.grad is None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert ConsistencyLoss()(p, p).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(p, z[:, :5])
