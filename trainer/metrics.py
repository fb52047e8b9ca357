"""Quality metrics per ad format, shared by the offline benchmark, the incremental
trainer's live (prequential) evaluation and the freshness benchmark."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from camoe.features import FORMATS

METRICS = ("auc_pr", "roc_auc", "logloss", "ece")


def ece(p: np.ndarray, y: np.ndarray, bins: int = 15, weights: np.ndarray | None = None) -> float:
    """Expected calibration error over equal-count bins of predicted probability; with
    ``weights`` (importance weights of sampled events) each bin's means and share are
    weighted."""
    w = np.ones(len(p)) if weights is None else np.asarray(weights, np.float64)
    order = np.argsort(p)
    total = 0.0
    for chunk in np.array_split(order, bins):
        mass = w[chunk].sum()
        if len(chunk) and mass > 0:
            gap = np.average(p[chunk], weights=w[chunk]) - np.average(y[chunk], weights=w[chunk])
            total += abs(gap) * mass
    return float(total / max(w.sum(), 1e-12)) if len(p) else 0.0


def format_metrics(
    p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """AUC-PR, ROC-AUC, logloss and ECE, each weighted by ``weights`` when given."""
    if len(y) == 0 or y.min() == y.max():  # a format absent, or with one class
        return {m: float("nan") for m in METRICS}
    return {
        "auc_pr": float(average_precision_score(y, p, sample_weight=weights)),
        "roc_auc": float(roc_auc_score(y, p, sample_weight=weights)),
        "logloss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), sample_weight=weights)),
        "ece": ece(p, y, weights=weights),
    }


def expected_auc_pr(p: np.ndarray, click_probability: np.ndarray) -> float:
    """AUC-PR of scores ``p`` when row i is a click with probability ``click_probability[i]``
    (known in simulation): each row counts as a click with that weight and as a non-click
    with the rest, so no sampling noise of labels remains."""
    if len(p) == 0:
        return float("nan")
    y = np.r_[np.ones(len(p)), np.zeros(len(p))]
    weights = np.r_[click_probability, 1 - click_probability]
    return float(average_precision_score(y, np.r_[p, p], sample_weight=weights))


def per_format(
    p: np.ndarray, y: np.ndarray, fmt: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """``format_metrics`` for each format index in ``fmt`` (NaN where a format has one class)."""
    return {
        f: format_metrics(p[fmt == k], y[fmt == k], None if weights is None else weights[fmt == k])
        for k, f in enumerate(FORMATS)
    }
