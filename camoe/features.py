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
from typing import Any, Literal

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

Kind = Literal["categorical", "numeric", "counter"]
# Where a feature's value comes from: the request, or a Feast feature view (by name).
Source = Literal[
    "candidate", "context", "user_profile", "ad_profile", "user_counters", "ad_counters"
]
# Each feature view's entity (its join key is ``<entity>_id``).
VIEW_ENTITIES = {
    "user_profile": "user",
    "ad_profile": "ad",
    "user_counters": "user",
    "ad_counters": "ad",
}


@dataclass(frozen=True)
class Feature:
    """One input of the model.

    Args:
        name: the Feast field, simulator column and feature-log name of the raw value.
        kind: ``categorical``: an int64 index, 0 for unknown; ``numeric``: float32;
            ``counter``: an event count, fed to the model as float32 ``log1p(count)``
            under the name ``log1p_<name>``.
        source: ``candidate`` or ``context`` (read from the ad request), or the Feast
            feature view that stores it.
        vocabulary: categorical only: the values in index order from 1 (a request's
            strings), or how many values a stored index takes (1..n); None: sized by
            ``features.n_campaigns``.
    """

    name: str
    kind: Kind
    source: Source
    vocabulary: tuple[str, ...] | int | None = None

    @property
    def input_name(self) -> str:
        """The feature's name in the model's arrays."""
        return f"log1p_{self.name}" if self.kind == "counter" else self.name


def _affinities(prefix: str, source: Source) -> tuple[Feature, ...]:
    return tuple(Feature(f"{prefix}_{i}", "numeric", source) for i in range(AFFINITY_DIM))


# The model's inputs, in array order: the categorical ones make the ``categorical``
# (B, 11) int64 array, the numeric and counter ones the ``numeric`` (B, 15) float32 array.
# Feast's definitions and both Triton configs are tested against this declaration.
FEATURES: tuple[Feature, ...] = (
    Feature("format", "categorical", "candidate", FORMATS),
    Feature("content_type", "categorical", "context", CONTENT_TYPES),
    Feature("foreground", "categorical", "context", ("background", "foreground")),
    Feature("device", "categorical", "context", DEVICES),
    Feature("hour", "categorical", "context", 24),  # hour 0..23 is index 1..24
    Feature("placement", "categorical", "context", PLACEMENTS),
    Feature("age_bucket", "categorical", "user_profile", N_AGE_BUCKETS),
    Feature("country", "categorical", "user_profile", N_COUNTRIES),
    Feature("premium", "categorical", "user_profile", 2),
    Feature("campaign_index", "categorical", "ad_profile"),
    Feature("category", "categorical", "ad_profile", N_CATEGORIES),
    Feature("activity", "numeric", "user_profile"),
    Feature("bid", "numeric", "candidate"),
    *_affinities("affinity", "user_profile"),
    Feature("quality", "numeric", "ad_profile"),
    *_affinities("ad_affinity", "ad_profile"),
    Feature("user_impressions", "counter", "user_counters"),
    Feature("user_clicks", "counter", "user_counters"),
    Feature("ad_impressions", "counter", "ad_counters"),
    Feature("ad_clicks", "counter", "ad_counters"),
)


def stored(view: str, kind: Kind | None = None) -> list[str]:
    """The fields of Feast feature view ``view`` (of one ``kind``), in array order."""
    return [f.name for f in FEATURES if f.source == view and kind in (None, f.kind)]


USER_PROFILE = stored("user_profile")
AD_PROFILE = stored("ad_profile")
USER_COUNTERS = stored("user_counters")
AD_COUNTERS = stored("ad_counters")
NUMERIC_FEATURES = [f.input_name for f in FEATURES if f.kind != "categorical"]
USER_CATEGORICAL = tuple(stored("user_profile", "categorical"))
AD_CATEGORICAL = tuple(stored("ad_profile", "categorical"))
CONTEXT_CATEGORICAL = tuple(f.name for f in FEATURES if f.source == "context")
USER_NUMERIC = stored("user_profile", "numeric")
AD_NUMERIC = stored("ad_profile", "numeric")


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    cardinality: int  # including index 0, "unknown"


def categorical_features(n_campaigns: int) -> list[CategoricalFeature]:
    """The categorical inputs in array order, each with its cardinality."""

    def values(vocabulary: tuple[str, ...] | int | None) -> int:
        if vocabulary is None:
            return n_campaigns
        return vocabulary if isinstance(vocabulary, int) else len(vocabulary)

    return [
        CategoricalFeature(f.name, values(f.vocabulary) + 1)
        for f in FEATURES
        if f.kind == "categorical"
    ]


def _index(vocabulary: tuple[str, ...], value: str) -> int:
    try:
        return vocabulary.index(value) + 1
    except ValueError:
        return 0


FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_float32(value: Any) -> bool:
    """A number the model's float32 input can hold (not None, NaN, inf or overflowing)."""
    return value is not None and math.isfinite(float(value)) and abs(float(value)) <= FLOAT32_MAX


def _bounded(value: int, cardinality: int) -> int:
    """Indices run 1..cardinality-1; anything else is 0 ("unknown")."""
    return value if 0 < value < cardinality else 0


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def format_index(name: str) -> int:
    """0-based format index used to pick the tower; raises on an unknown format."""
    try:
        return FORMATS.index(name)
    except ValueError:
        raise ValueError(f"unknown ad format {name!r}; expected one of {FORMATS}") from None


@dataclass(frozen=True)
class Encoded:
    """A batch of requests' candidates as model inputs, one row per candidate in request
    order: categorical (B, C) int64, numeric (B, N) float32, format (B,) 0-based,
    request (B,) index of its request, bid (B,) float64 (NaN where not a float32),
    complete / unknown_user / unknown_ad (B,) bool."""

    categorical: np.ndarray
    numeric: np.ndarray
    fmt: np.ndarray
    request: np.ndarray
    bid: np.ndarray
    complete: np.ndarray
    unknown_user: np.ndarray
    unknown_ad: np.ndarray


class FeatureLayout:
    """Turns request context + user and ad feature dicts into model arrays.

    A row is assembled from parts: the candidate's format and bid, the request's context,
    the user's part and the ad's part. ``encode`` does a whole batch, each distinct user
    and ad encoded once and the parts gathered with numpy (per-candidate Python was the
    scorer's largest cost); ``row`` is ``encode`` of one candidate.

    Args:
        n_campaigns: campaign vocabulary size (campaign_index is 1..n_campaigns).
    """

    def __init__(self, n_campaigns: int) -> None:
        self.categorical = categorical_features(n_campaigns)
        self.numeric = NUMERIC_FEATURES
        self._cards = {f.name: f.cardinality for f in self.categorical}
        cat = [f.name for f in self.categorical]
        num = list(NUMERIC_FEATURES)
        self._format_col = cat.index("format")
        self._context_cols = [cat.index(n) for n in CONTEXT_CATEGORICAL]
        self._user_cat_cols = [cat.index(n) for n in USER_CATEGORICAL]
        self._ad_cat_cols = [cat.index(n) for n in AD_CATEGORICAL]
        self._bid_col = num.index("bid")
        self._user_num_cols = [num.index(n) for n in USER_NUMERIC] + [
            num.index(f"log1p_{n}") for n in USER_COUNTERS
        ]
        self._ad_num_cols = [num.index(n) for n in AD_NUMERIC] + [
            num.index(f"log1p_{n}") for n in AD_COUNTERS
        ]

    @property
    def n_categorical(self) -> int:
        return len(self.categorical)

    @property
    def n_numeric(self) -> int:
        return len(self.numeric)

    def context_part(self, context: dict[str, Any]) -> list[int]:
        """The request context's categorical indices, in CONTEXT_CATEGORICAL order."""
        return [
            _index(CONTENT_TYPES, context["content_type"]),
            2 if context["foreground"] else 1,
            _index(DEVICES, context["device"]),
            _bounded(int(context["hour"]) + 1, self._cards["hour"]),
            _index(PLACEMENTS, context["placement"]),
        ]

    def _parts(
        self,
        rows: list[dict[str, Any]],
        categorical: tuple[str, ...],
        numeric: list[str],
        counters: list[str],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Users' or ads' shares of their rows: categorical indices (E, len(categorical)),
        numeric values then log1p of counters (E, len(numeric) + len(counters)), and
        whether no default stood in (E,)."""
        names = [*categorical, *numeric, *counters]
        raw = [[row.get(n) for n in names] for row in rows]
        try:  # None becomes NaN
            values = np.array(raw, dtype=np.float64).reshape(len(rows), len(names))
        except (TypeError, ValueError):  # a stored value that is no number: missing
            values = np.array([[_number(v) for v in r] for r in raw], dtype=np.float64)
            values = values.reshape(len(rows), len(names))
        usable = np.isfinite(values) & (np.abs(values) <= FLOAT32_MAX)
        k, m = len(categorical), len(categorical) + len(numeric)
        cards = np.asarray([self._cards[n] for n in categorical])
        index = np.where(usable[:, :k], values[:, :k], 0).astype(np.int64)
        index = np.where((index > 0) & (index < cards), index, 0)
        out = np.where(usable[:, k:], values[:, k:], 0.0)
        # Missing counters mean "no events yet": 0 is the true value, not a default.
        out[:, m - k :] = np.log1p(np.maximum(out[:, m - k :], 0.0))
        return index, out.astype(np.float32), usable[:, :m].all(axis=1)

    def row(
        self,
        context: dict[str, Any],
        candidate: dict[str, Any],
        user: dict[str, Any],
        ad: dict[str, Any],
    ) -> tuple[list[int], list[float], bool]:
        """One candidate's (categorical, numeric, complete), ``complete`` False when a
        store value was missing or NaN and a default stood in for it (``encode`` of one)."""
        request = {"user_id": "", "context": context, "candidates": [candidate]}
        encoded = self.encode([request], {"": user}, {candidate["ad_id"]: ad})
        return (
            encoded.categorical[0].tolist(),
            encoded.numeric[0].tolist(),
            bool(encoded.complete[0]),
        )

    def encode(
        self,
        requests: list[dict[str, Any]],
        users: dict[str, dict[str, Any]],
        ads: dict[str, dict[str, Any]],
    ) -> Encoded:
        """Every candidate of ``requests`` (ad-request records) as model inputs; ``users``
        and ``ads`` hold the store's features by id (an id absent or ``{}``: unknown, its
        part all defaults). Equal, row for row, to ``row`` on each candidate."""
        user_ids: dict[str, int] = {}
        ad_ids: dict[str, int] = {}
        u_idx, a_idx, r_idx, fmt, bids = [], [], [], [], []
        for k, request in enumerate(requests):
            user = user_ids.setdefault(request["user_id"], len(user_ids))
            for candidate in request["candidates"]:
                u_idx.append(user)
                a_idx.append(ad_ids.setdefault(candidate["ad_id"], len(ad_ids)))
                r_idx.append(k)
                fmt.append(_index(FORMATS, candidate["format"]))
                bids.append(candidate["bid"])
        rows = (np.asarray(u_idx, np.int64), np.asarray(a_idx, np.int64))
        n = len(r_idx)
        categorical = np.zeros((n, self.n_categorical), np.int64)
        numeric = np.zeros((n, self.n_numeric), np.float32)
        complete = np.ones(n, bool)
        for index, entities, names, cat_cols, num_cols in (
            (
                rows[0],
                [users.get(u) or {} for u in user_ids],
                (USER_CATEGORICAL, USER_NUMERIC, USER_COUNTERS),
                self._user_cat_cols,
                self._user_num_cols,
            ),
            (
                rows[1],
                [ads.get(a) or {} for a in ad_ids],
                (AD_CATEGORICAL, AD_NUMERIC, AD_COUNTERS),
                self._ad_cat_cols,
                self._ad_num_cols,
            ),
        ):
            cats, nums, whole = self._parts(entities, *names)
            categorical[:, cat_cols] = cats[index]
            numeric[:, num_cols] = nums[index]
            complete &= whole[index]
        request = np.asarray(r_idx, np.int64)
        contexts = np.asarray([self.context_part(r["context"]) for r in requests], np.int64)
        categorical[:, self._context_cols] = contexts.reshape(-1, len(self._context_cols))[request]
        codes = np.asarray(fmt, np.int64)
        categorical[:, self._format_col] = codes
        bid = np.asarray([b if is_float32(b) else np.nan for b in bids], np.float64)
        complete &= np.isfinite(bid)
        numeric[:, self._bid_col] = np.nan_to_num(bid, nan=0.0)
        known = (
            np.asarray([bool(users.get(u)) for u in user_ids], bool),
            np.asarray([bool(ads.get(a)) for a in ad_ids], bool),
        )
        return Encoded(
            categorical,
            numeric,
            codes - 1,
            request,
            bid,
            complete,
            ~known[0][rows[0]],
            ~known[1][rows[1]],
        )
