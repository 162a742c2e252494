"""Mixup (lt_zoo.training.mixup): identity at alpha 0, pairs mixed, the mixed loss by hand."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lt_zoo.training.mixup import mixed_loss, mixup_batch


def test_mixup_alpha_zero_is_identity():
    x, y = torch.randn(5, 3), torch.arange(5)
    xm, ya, yb, lam = mixup_batch(x, y, 0.0)
    assert xm is x and ya is y and yb is y and lam == 1.0


@pytest.mark.parametrize('seeded', [True, False])
def test_mixup_mixes_pairs(seeded):
    g = torch.Generator().manual_seed(3) if seeded else None
    x, y = torch.randn(16, 2, 3, dtype=torch.float64), torch.arange(16)  # labels = positions: y_b is the pairing
    xm, ya, yb, lam = mixup_batch(x, y, 1.0, g)
    assert 0.0 < lam < 1.0 and torch.equal(ya, y) and sorted(yb.tolist()) == list(range(16))
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[yb], rtol=0, atol=1e-12)
    lams = [mixup_batch(x, y, 1.0, g)[3] for _ in range(400)]  # Beta(1, 1) = uniform: mean 1/2, sd 0.014
    assert abs(np.mean(lams) - 0.5) < 0.08 and min(lams) >= 0.0 and max(lams) <= 1.0
    if seeded:  # reproducible from the generator's seed
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        a, b = mixup_batch(x, y, 1.0, g1), mixup_batch(x, y, 1.0, g2)
        assert a[3] == b[3] and torch.equal(a[2], b[2])


def test_mixed_loss_by_hand():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    ya, yb = torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([3, 3, 0, 1, 2, 2, 1])
    z = logits.numpy()
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    ce = lambda t: -np.mean(logp[np.arange(7), t.numpy()])  # noqa: E731
    assert float(mixed_loss(F.cross_entropy, logits, ya, yb, 0.3)) == pytest.approx(0.3 * ce(ya) + 0.7 * ce(yb),
                                                                                      abs=1e-12)
    calls = []
    counting = lambda z, t: calls.append(t) or F.cross_entropy(z, t)  # noqa: E731
    assert float(mixed_loss(counting, logits, ya, yb, 1.0)) == pytest.approx(ce(ya), abs=1e-12)
    assert len(calls) == 1  # lam = 1 (mixup off): one loss call, so stochastic losses draw noise once
