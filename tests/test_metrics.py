"""Metrics on hand-computed small cases; plots write readable PNGs."""
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from lt_zoo.metrics import (balanced_accuracy, calibration_bins, confusion_matrix, evaluate,
                            expected_calibration_error, per_class_accuracy, shot_accuracy, shot_groups,
                            top1_accuracy)
from lt_zoo.plots import plot_per_class_accuracy, plot_reliability


def one_hot_logits(preds, num_classes):
    """Logits whose argmax is ``preds``."""
    x = np.zeros((len(preds), num_classes))
    x[np.arange(len(preds)), preds] = 5.0
    return x


# targets / predictions for 3 classes, 10 samples:
#   class 0: 4 samples, 3 right   class 1: 4 samples, 1 right   class 2: 2 samples, 2 right
TARGETS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
PREDS = [0, 0, 0, 1, 1, 0, 2, 2, 2, 2]
LOGITS = one_hot_logits(PREDS, 3)


def test_accuracies_hand_case():
    assert top1_accuracy(LOGITS, TARGETS) == pytest.approx(6 / 10)
    assert per_class_accuracy(LOGITS, TARGETS) == pytest.approx([3 / 4, 1 / 4, 1.0])
    assert balanced_accuracy(LOGITS, TARGETS) == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    np.testing.assert_array_equal(confusion_matrix(torch.tensor(LOGITS), torch.tensor(TARGETS)),
                                  [[3, 1, 0], [1, 1, 2], [0, 0, 2]])


def test_class_without_test_samples_is_none_and_excluded():
    logits = one_hot_logits([0, 1, 1], 3)
    targets = [0, 1, 0]  # class 2 never appears
    assert per_class_accuracy(logits, targets) == [0.5, 1.0, None]
    assert balanced_accuracy(logits, targets) == pytest.approx(0.75)


def test_shot_groups_boundaries_and_thresholds():
    assert shot_groups([101, 100, 20, 19]) == ["many", "medium", "medium", "few"]
    assert shot_groups([101, 100, 20, 19], many_threshold=99, few_threshold=21) == ["many", "many", "few", "few"]
    assert shot_groups([60, 40, 5], many_threshold=50, few_threshold=10) == ["many", "medium", "few"]
    with pytest.raises(ValueError, match="overlap"):
        shot_groups([60, 40], many_threshold=10, few_threshold=50)


def test_shot_accuracy_with_empty_group():
    per_class = [0.9, 0.7, 0.5, 0.3]
    assert shot_accuracy(per_class, [500, 200, 50, 10]) == pytest.approx(
        {"many": 0.8, "medium": 0.5, "few": 0.3})
    # no class has < 20 training samples: 'few' is None, not 0
    result = shot_accuracy(per_class, [500, 200, 50, 30])
    assert result["few"] is None
    assert result["many"] == pytest.approx(0.8) and result["medium"] == pytest.approx(0.4)


def logits_with_confidence(p, num_classes=2):
    """Rows whose softmax is (p, (1-p)/(C-1), ...): max-softmax confidence p on class 0."""
    rest = (1 - p) / (num_classes - 1)
    return np.log(np.array([p] + [rest] * (num_classes - 1)))


def test_ece_perfectly_calibrated_is_zero():
    # 10 samples at confidence 0.8, 8 of them right: the only bin has accuracy == confidence
    logits = np.stack([logits_with_confidence(0.8)] * 10)
    targets = [0] * 8 + [1] * 2
    assert expected_calibration_error(logits, targets) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_hand_value():
    # 4 samples at confidence 0.95 with 2 right, 6 at confidence 0.6 with 6 right:
    # ECE = 4/10 * |0.5 - 0.95| + 6/10 * |1.0 - 0.6| = 0.18 + 0.24 = 0.42
    logits = np.stack([logits_with_confidence(0.95)] * 4 + [logits_with_confidence(0.6)] * 6)
    targets = [0, 0, 1, 1] + [0] * 6
    assert expected_calibration_error(logits, targets) == pytest.approx(0.42, abs=1e-12)
    bins = calibration_bins(logits, targets)
    assert len(bins["count"]) == 15 and sum(bins["count"]) == 10
    # 0.95 lies in (14/15, 1], 0.6 in (8/15, 9/15]
    assert bins["count"][14] == 4 and bins["count"][8] == 6
    assert bins["accuracy"][14] == pytest.approx(0.5) and bins["confidence"][8] == pytest.approx(0.6)
    assert bins["accuracy"][0] is None


def test_evaluate_returns_plain_json():
    counts = [500, 50, 5]  # one class per shot group
    result = evaluate(torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(TARGETS), counts)
    assert json.loads(json.dumps(result)) == result
    assert result["top1"] == pytest.approx(0.6)
    assert result["balanced_acc"] == pytest.approx(2 / 3)
    assert (result["many"], result["medium"], result["few"]) == pytest.approx((0.75, 0.25, 1.0))
    assert result["per_class_acc"] == pytest.approx([0.75, 0.25, 1.0])
    assert result["num_samples"] == 10
    # softmax of (5, 0, 0): confidence e^5 / (e^5 + 2) for every sample, accuracy 0.6
    conf = math.exp(5) / (math.exp(5) + 2)
    assert result["ece"] == pytest.approx(abs(conf - 0.6), abs=1e-6)
    assert "confusion_matrix" not in result
    assert evaluate(LOGITS, TARGETS, counts, include_confusion=True)["confusion_matrix"][1] == [1, 1, 2]
    none_few = evaluate(LOGITS, TARGETS, [500, 300, 50])
    assert none_few["few"] is None and json.dumps(none_few)


def test_metric_errors():
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[1\].*\[3\]"):
        top1_accuracy(LOGITS[:2], [0, 3])
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        top1_accuracy(LOGITS, TARGETS[:5])
    with pytest.raises(ValueError, match="3 classes but class_counts has 2"):
        evaluate(LOGITS, TARGETS, [10, 5])
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        evaluate(LOGITS, TARGETS, [10, 0, 5])
    with pytest.raises(TypeError, match="integer"):
        top1_accuracy(LOGITS, np.array(TARGETS, dtype=float))
    bad = LOGITS.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(bad, TARGETS, [500, 50, 5])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_per_class_accuracy_writes_png(tmp_path):
    counts = [500, 300, 120, 80, 40, 19, 7, 3]
    acc = [0.9, 0.85, 0.8, 0.6, 0.5, 0.3, None, 0.1]
    path = plot_per_class_accuracy(acc, counts, tmp_path / "sub" / "per_class.png",
                                   class_names=[f"c{i}" for i in range(8)], title="toy")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError, match="7 entries"):
        plot_per_class_accuracy(acc[:7], counts, tmp_path / "x.png")


def test_plot_reliability_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 5)) * 3
    targets = rng.integers(0, 5, size=200)
    path = plot_reliability(logits, targets, tmp_path / "rel.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3
