"""The model's input layout: which features, in which order, and how raw values become
the ``categorical`` (int64) and ``numeric`` (float32) arrays the model and Triton take.

One layout serves the simulator (history), the scoring consumer (live), the feature log
and the trainer, so training sees exactly what serving saw.

Defaults, documented because a scorer must never guess silently:

* a categorical value outside its vocabulary maps to index 0 ("unknown");
* a missing numeric feature (unknown user or ad, or NaN from the store) becomes 0.0
  after normalisation is applied by the model, and the row carries a flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMATS = ("audio", "video", "display")
CONTENT_TYPES = ("music", "podcast", "audiobook")
DEVICES = ("mobile", "desktop", "tv", "speaker")
PLACEMENTS = (
    "audio_midroll",
    "audio_preroll",
    "podcast_host_read",
    "video_takeover",
    "video_midroll",
    "display_leavebehind",
    "display_homepage",
    "display_nowplaying",
)
N_AGE_BUCKETS = 6
N_COUNTRIES = 10
N_CATEGORIES = 10
AFFINITY_DIM = 4

FEATURE_SERVICE = "camoe_v1"
# Feast feature references in the order the layout reads them.
USER_PROFILE = ["age_bucket", "country", "premium", "activity"] + [
    f"affinity_{i}" for i in range(AFFINITY_DIM)
]
AD_PROFILE = ["campaign_index", "category", "quality"] + [
    f"ad_affinity_{i}" for i in range(AFFINITY_DIM)
]
USER_COUNTERS = ["user_impressions", "user_clicks"]
STORED_CATEGORICAL = ("age_bucket", "country", "premium", "campaign_index", "category")
AD_COUNTERS = ["ad_impressions", "ad_clicks"]


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    cardinality: int  # including index 0, "unknown"


def categorical_features(n_campaigns: int) -> list[CategoricalFeature]:
    return [
        CategoricalFeature("format", len(FORMATS) + 1),
        CategoricalFeature("content_type", len(CONTENT_TYPES) + 1),
        CategoricalFeature("foreground", 3),
        CategoricalFeature("device", len(DEVICES) + 1),
        CategoricalFeature("hour", 25),
        CategoricalFeature("placement", len(PLACEMENTS) + 1),
        CategoricalFeature("age_bucket", N_AGE_BUCKETS + 1),
        CategoricalFeature("country", N_COUNTRIES + 1),
        CategoricalFeature("premium", 3),
        CategoricalFeature("campaign_index", n_campaigns + 1),
        CategoricalFeature("category", N_CATEGORIES + 1),
    ]


NUMERIC_FEATURES = (
    ["activity", "bid"]
    + [f"affinity_{i}" for i in range(AFFINITY_DIM)]
    + ["quality"]
    + [f"ad_affinity_{i}" for i in range(AFFINITY_DIM)]
    + [f"log1p_{name}" for name in USER_COUNTERS + AD_COUNTERS]
)


def _index(vocabulary: tuple[str, ...], value: str) -> int:
    try:
        return vocabulary.index(value) + 1
    except ValueError:
        return 0


FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_float32(value: Any) -> bool:
    """A number the model's float32 input can hold (not None, NaN, inf or overflowing)."""
    return value is not None and math.isfinite(float(value)) and abs(float(value)) <= FLOAT32_MAX


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _bounded(value: Any, cardinality: int) -> int:
    """Stores give ints 1..cardinality-1; anything else (None, NaN, out of range) is 0."""
    if not _present(value):
        return 0
    value = int(value)
    return value if 0 < value < cardinality else 0


def format_index(name: str) -> int:
    """0-based format index used to pick the tower; raises on an unknown format."""
    try:
        return FORMATS.index(name)
    except ValueError:
        raise ValueError(f"unknown ad format {name!r}; expected one of {FORMATS}") from None


class FeatureLayout:
    """Turns request context + user and ad feature dicts into model arrays.

    Args:
        n_campaigns: campaign vocabulary size (campaign_index is 1..n_campaigns).
    """

    def __init__(self, n_campaigns: int) -> None:
        self.categorical = categorical_features(n_campaigns)
        self.numeric = NUMERIC_FEATURES
        self._cards = {f.name: f.cardinality for f in self.categorical}

    @property
    def n_categorical(self) -> int:
        return len(self.categorical)

    @property
    def n_numeric(self) -> int:
        return len(self.numeric)

    def row(
        self,
        context: dict[str, Any],
        candidate: dict[str, Any],
        user: dict[str, Any],
        ad: dict[str, Any],
    ) -> tuple[list[int], list[float], bool]:
        """One candidate's (categorical, numeric, complete) where ``complete`` is False when
        a store value was missing or NaN and a default stood in for it."""
        cards = self._cards
        stored = [user.get(n) for n in STORED_CATEGORICAL[:3]] + [
            ad.get(n) for n in STORED_CATEGORICAL[3:]
        ]
        categorical = [
            _index(FORMATS, candidate["format"]),
            _index(CONTENT_TYPES, context["content_type"]),
            2 if context["foreground"] else 1,
            _index(DEVICES, context["device"]),
            _bounded(int(context["hour"]) + 1, cards["hour"]),
            _index(PLACEMENTS, context["placement"]),
            *(
                _bounded(value, cards[name])
                for value, name in zip(stored, STORED_CATEGORICAL, strict=True)
            ),
        ]
        raw = (
            [user.get("activity"), candidate["bid"]]
            + [user.get(f"affinity_{i}") for i in range(AFFINITY_DIM)]
            + [ad.get("quality")]
            + [ad.get(f"ad_affinity_{i}") for i in range(AFFINITY_DIM)]
        )
        counters = [user.get(n) for n in USER_COUNTERS] + [ad.get(n) for n in AD_COUNTERS]
        complete = all(_present(v) for v in stored)
        numeric: list[float] = []
        for value in raw:
            if not is_float32(value):
                complete = False
                numeric.append(0.0)
            else:
                numeric.append(float(value))
        # Missing counters mean "no events yet": 0 is the true value, not a default.
        numeric += [math.log1p(max(float(c), 0.0)) if is_float32(c) else 0.0 for c in counters]
        return categorical, numeric, complete

    def arrays(
        self, rows: list[tuple[list[int], list[float], bool]]
    ) -> tuple[np.ndarray, np.ndarray]:
        categorical = np.asarray([r[0] for r in rows], dtype=np.int64).reshape(
            -1, self.n_categorical
        )
        numeric = np.asarray([r[1] for r in rows], dtype=np.float32).reshape(-1, self.n_numeric)
        return categorical, numeric
