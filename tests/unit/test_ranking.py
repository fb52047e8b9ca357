"""consumers/scoring.py ``winners``: each request's highest bid x pCTR."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from consumers.scoring import winners

candidates = st.tuples(
    st.sampled_from([0.0, 0.5, 1.0, 2.5]),  # few distinct values: ties are common
    st.sampled_from([0.0, 0.01, 0.02, 0.5]),
)


@given(st.lists(st.lists(candidates, min_size=1, max_size=6), min_size=1, max_size=20))
def test_winners_are_the_first_highest_bid_times_pctr(requests: list) -> None:
    rows = [c for request in requests for c in request]
    bid = np.asarray([b for b, _ in rows], np.float64)
    pctr = np.asarray([p for _, p in rows], np.float32)
    bounds = np.cumsum([0, *map(len, requests)])
    expected = [
        first + max(range(len(request)), key=lambda i: request[i][0] * float(pctr[first + i]))
        for first, request in zip(bounds.tolist(), requests, strict=False)
    ]
    assert winners(bid, pctr, bounds).tolist() == expected


def test_a_nan_pctr_never_wins() -> None:
    bid = np.asarray([1.0, 1.0, 2.0])
    pctr = np.asarray([np.nan, 0.1, 0.0], np.float32)
    assert winners(bid, pctr, np.asarray([0, 3])).tolist() == [1]
