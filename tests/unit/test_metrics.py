"""trainer/metrics.py: AUC-PR against known click probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from trainer.metrics import ece, expected_auc_pr, format_metrics


def test_expected_auc_pr_with_certain_outcomes_is_plain_auc_pr():
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.2).astype(float)
    scores = rng.random(500) + y * 0.5
    assert expected_auc_pr(scores, y) == average_precision_score(y, scores)


def test_expected_auc_pr_is_the_mean_over_sampled_labels():
    rng = np.random.default_rng(1)
    p = rng.beta(1, 8, 2000)
    scores = p + rng.normal(0, 0.05, 2000)
    sampled = [average_precision_score(rng.random(2000) < p, scores) for _ in range(300)]
    assert abs(expected_auc_pr(scores, p) - float(np.mean(sampled))) < 0.01


def test_the_true_probabilities_rank_best_and_order_is_all_that_counts():
    rng = np.random.default_rng(2)
    p = rng.beta(1, 8, 3000)
    noisy = p + rng.normal(0, 0.1, 3000)
    assert expected_auc_pr(p, p) > expected_auc_pr(noisy, p)
    assert expected_auc_pr(np.log(p), p) == expected_auc_pr(p, p)
    assert np.isnan(expected_auc_pr(np.array([]), np.array([])))


def test_weighted_metrics_equal_the_metrics_of_the_repeated_rows():
    rng = np.random.default_rng(4)
    y = (rng.random(600) < 0.2).astype(float)
    p = np.clip(rng.random(600) * 0.4 + y * 0.2, 0.01, 0.99)
    w = rng.integers(1, 4, 600).astype(float)
    repeated = np.repeat(np.arange(600), w.astype(int))
    weighted = format_metrics(p, y, w)
    plain = format_metrics(p[repeated], y[repeated])
    for name in ("auc_pr", "roc_auc", "logloss"):
        assert weighted[name] == pytest.approx(plain[name], rel=1e-9), name
    # ECE's bins are equal in rows, not in weight: close to, not equal to, the repeated.
    assert weighted["ece"] == pytest.approx(plain["ece"], abs=0.01)
    assert ece(p, y, weights=np.ones(600)) == ece(p, y)
