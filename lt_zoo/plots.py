"""Headless PNG plots of evaluation results (matplotlib Agg; never touches pyplot's global state)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .metrics import ece_from_bins, calibration_bins, shot_groups

__all__ = ["plot_per_class_accuracy", "plot_reliability"]

_GROUP_COLORS = {"many": "#d8e6f3", "medium": "#fbe5c8", "few": "#f6d0d0"}


def _save(fig: Figure, path) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_per_class_accuracy(per_class_acc: Sequence[Optional[float]], class_counts, path,
                            class_names: Optional[Sequence[str]] = None, title: Optional[str] = None,
                            many_threshold: float = 100, few_threshold: float = 20) -> str:
    """Bar chart of per-class accuracy in class order, training counts on a log right axis.

    Background spans mark the many/medium/few shot groups (thresholds as in
    :func:`lt_zoo.metrics.shot_groups`); classes without test samples (``None``) get no bar.
    Writes a PNG to ``path`` and returns the path.
    """
    groups = shot_groups(class_counts, many_threshold, few_threshold)
    c = len(groups)
    if len(per_class_acc) != c:
        raise ValueError(f"per_class_acc has {len(per_class_acc)} entries but class_counts has {c}")
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} entries but class_counts has {c}")
    acc = np.array([np.nan if a is None else float(a) for a in per_class_acc])
    counts = np.asarray(class_counts, dtype=np.float64)
    xs = np.arange(c)

    fig = Figure(figsize=(min(max(6.0, 0.25 * c), 16.0), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    start = 0
    for j in range(1, c + 1):  # one span per run of equal groups
        if j == c or groups[j] != groups[start]:
            ax.axvspan(start - 0.5, j - 0.5, color=_GROUP_COLORS[groups[start]], lw=0, zorder=0)
            start = j
    ax.bar(xs, np.nan_to_num(acc, nan=0.0) * 100, width=0.8 if c <= 200 else 1.0, color="#3b6ea5",
           linewidth=0, zorder=2)
    ax.set_xlim(-0.5, c - 0.5)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("class")
    if class_names is not None and c <= 50:
        ax.set_xticks(xs)
        ax.set_xticklabels(class_names, rotation=90, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(xs, counts, color="black", marker="." if c <= 200 else None, lw=1, zorder=3)
    ax2.set_yscale("log")
    ax2.set_ylabel("training samples (log)")
    handles = [Patch(color=_GROUP_COLORS[g], label=f"{g} ({groups.count(g)})")
               for g in ("many", "medium", "few") if g in groups]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(logits, targets, path, n_bins: int = 15, title: Optional[str] = None) -> str:
    """Reliability diagram: per-bin accuracy vs. mean confidence, with the diagonal and the ECE.

    Same binning as :func:`lt_zoo.metrics.expected_calibration_error`. Writes a PNG, returns the path.
    """
    bins = calibration_bins(logits, targets, n_bins)
    edges = np.asarray(bins["edges"])
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in bins["confidence"]])
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    width = np.diff(edges)
    ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", color="#3b6ea5",
           edgecolor="white", label="accuracy")
    ax.bar(edges[:-1], np.nan_to_num(np.abs(conf - acc)), bottom=np.nan_to_num(np.fmin(acc, conf)),
           width=width, align="edge", color="#e07b7b", alpha=0.35, edgecolor="#c03030", hatch="//",
           linewidth=0.5, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"ECE = {100 * ece_from_bins(bins):.2f}%")
    fig.tight_layout()
    return _save(fig, path)
