"""Records shaped like the system's topics, built from the simulator, for tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from camoe.features import FORMATS


def labelled_events(history: dict[str, np.ndarray], start: int, n: int) -> list[dict[str, Any]]:
    """labelled-events values for rows ``start .. start + n`` of a simulated history."""
    return [
        {
            "impression": {
                "request_id": f"r{i}",
                "user_id": "u1",
                "ad_id": "a1",
                "format": FORMATS[int(history["format"][i])],
                "event_time": 1_000_000 + i,
                "model_version": "1",
                "pctr": 0.01,
                "feature_service": "camoe_v1",
                "categorical": history["categorical"][i].tolist(),
                "numeric": history["numeric"][i].tolist(),
            },
            "label": int(history["label"][i]),
            "click_delay_ms": 1500 if history["label"][i] else None,
            "late_positive": False,
            "labelled_at": 1_000_000 + i,
        }
        for i in range(start, start + n)
    ]
