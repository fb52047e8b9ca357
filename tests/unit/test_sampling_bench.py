"""camoe/bench/sampling.py: the labelled stream it trains on is the labeler's."""

from __future__ import annotations

import numpy as np
import pytest

from camoe.bench.sampling import labelled_stream
from consumers.labeler import keeps_negative


def history(labels: list[int]) -> dict[str, np.ndarray]:
    n = len(labels)
    return {
        "categorical": np.arange(n, dtype=np.int64).reshape(n, 1),  # row i holds i
        "numeric": np.zeros((n, 1), np.float32),
        "format": np.zeros(n, np.int64),
        "label": np.asarray(labels, np.float32),
    }


def test_fake_negative_stream_has_every_kept_impression_as_a_negative_and_every_click():
    labels = [1, 0, 0, 1, 0] * 400
    delays = np.full(len(labels), 3.0)
    events, at = labelled_stream(history(labels), 0.25, True, True, 10.0, 100.0, delays)
    kept = [keeps_negative(f"r{i}", 0.25) for i in range(len(labels))]
    negatives = events.label == 0
    assert negatives.sum() == sum(kept)
    assert set(events.categorical[negatives, 0]) == {i for i, k in enumerate(kept) if k}
    assert (events.label == 1).sum() == sum(labels)
    assert events.weight[negatives] == pytest.approx(4.0)
    assert events.weight[~negatives] == pytest.approx(1.0)
    assert events.fake_negative.all()
    assert np.all(np.diff(at) >= 0)
    # A click arrives 3 s after its impression, whose negative came at once.
    first_click = int(np.flatnonzero(events.label == 1)[0])
    assert at[first_click] == pytest.approx(3.0)


def test_window_stream_labels_a_click_in_the_window_once_and_a_late_one_twice():
    labels = [1, 1, 0]
    delays = np.asarray([2.0, 30.0, 0.0])  # row 1 is clicked after its 10 s window
    events, at = labelled_stream(history(labels), 1.0, True, False, 10.0, 1.0, delays)
    got = sorted(
        zip(events.categorical[:, 0].tolist(), events.label.tolist(), at.tolist(), strict=True)
    )
    assert got == [(0, 1.0, 2.0), (1, 0.0, 11.0), (1, 1.0, 31.0), (2, 0.0, 12.0)]
    assert not events.fake_negative.any()


def test_unweighted_sampling_leaves_the_weights_at_one():
    events, _ = labelled_stream(history([0] * 1000), 0.1, False, True, 10.0, 100.0, np.ones(1000))
    assert 50 < len(events) < 150
    assert events.weight == pytest.approx(1.0)
