"""A Spotify-like ad traffic simulator with a documented generative model.

World (fixed by ``seed``):
  * users: age bucket, country, premium flag, activity ~ LogNormal(0, 0.5), and a taste
    vector ``u ~ N(0, I_d)``;
  * campaigns: an advertiser category each; ads: a campaign, a format drawn from
    ``format_shares`` (audio dominates), a quality ``q ~ N(0, 0.5)`` and a vector
    ``a ~ N(0, I_d)``.
Requests: a user (Zipf-like popularity), a context (content type, foreground with
probability ``foreground_share``, device, hour, placement) and
``candidates_per_request`` ads.

Click probability of ad ``a`` shown to user ``u`` in context ``c``:

    logit p = logit(base_ctr[format]) + log(foreground_lift) * (fg - foreground_share)
              + affinity_strength * <u, a> / sqrt(d) + q
              + cross_strength * cos(effect_drift_per_hour * t) * cross(format, u, c)

with the taste ``u`` turned by ``format_taste_turn`` (radians, x1 for video, x0.5 for
display, 0 for audio) before the dot product: 0 (the default) means one taste across
formats; larger values make the formats want different ads, a conflict between tasks.

where ``cross`` is a format-specific interaction (audio: podcast listeners in older age
buckets; video: premium users on a visible screen; display: desktop listeners) that a
model must learn per format, and drift changes the world with time ``t`` (hours):
``drift_per_hour`` rotates the taste vectors, ``effect_drift_per_hour`` (default 0) fades
the format-specific effects and turns them around, so a model that stops learning falls
behind.
Clicks come after a log-normal delay (median ``click_delay_median_s``, long tail).

The true probability is available for analysis (``true_ctr``), never used for training.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from camoe.features import (
    AD_COUNTERS,
    AFFINITY_DIM,
    CONTENT_TYPES,
    DEVICES,
    FORMATS,
    N_AGE_BUCKETS,
    N_CATEGORIES,
    N_COUNTRIES,
    USER_COUNTERS,
    FeatureLayout,
)
from camoe.settings import SimulatorSettings

PLACEMENTS_BY_FORMAT = {
    "audio": ["audio_midroll", "audio_preroll", "podcast_host_read"],
    "video": ["video_takeover", "video_midroll"],
    "display": ["display_leavebehind", "display_homepage", "display_nowplaying"],
}


# How far each format's taste turns away from audio's, in units of format_taste_turn.
TASTE_TURN = {"audio": 0.0, "video": 1.0, "display": 0.5}
CONTENT_CDF = np.cumsum([0.6, 0.3, 0.1]).tolist()  # music, podcast, audiobook
DEVICE_CDF = np.cumsum([0.6, 0.2, 0.1, 0.1]).tolist()  # mobile, desktop, tv, speaker


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _pick(cdf: list[float], u: float) -> int:
    """Index drawn from a cumulative distribution by one uniform (``bisect`` on a list:
    the result of ``np.searchsorted(side="right")``, at a tenth of its cost per call)."""
    return min(bisect.bisect_right(cdf, u), len(cdf) - 1)


_STANDARD_NORMAL = statistics.NormalDist()


def _normal(u: float) -> float:
    """Standard normal quantile of a uniform (inverse CDF)."""
    return _STANDARD_NORMAL.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))


@dataclass
class Impression:
    """What the simulator remembers of a served ad, to answer with a click or not."""

    request_id: str
    user_id: str
    ad_id: str
    probability: float


class World:
    """Users, campaigns and ads, plus the click model. Deterministic for a seed."""

    def __init__(self, settings: SimulatorSettings) -> None:
        if AFFINITY_DIM != settings.affinity_dim:
            raise ValueError(f"simulator.affinity_dim must be {AFFINITY_DIM} (the feature layout)")
        self.settings = settings
        rng = np.random.default_rng(settings.seed)
        n_u, n_a, d = settings.n_users, settings.n_ads, settings.affinity_dim
        self.user_ids = [f"u{i}" for i in range(n_u)]
        self.users = pd.DataFrame(
            {
                "user_id": self.user_ids,
                "age_bucket": rng.integers(1, N_AGE_BUCKETS + 1, n_u),
                "country": rng.integers(1, N_COUNTRIES + 1, n_u),
                "premium": rng.choice([1, 2], n_u, p=[0.6, 0.4]),
                "activity": rng.lognormal(0.0, 0.5, n_u).astype(np.float32),
            }
        )
        self.user_vectors = rng.normal(size=(n_u, d)).astype(np.float32)
        for i in range(d):
            self.users[f"affinity_{i}"] = self.user_vectors[:, i]
        self.user_popularity = 1.0 / np.arange(1, n_u + 1) ** 0.6
        self.user_popularity /= self.user_popularity.sum()

        campaign_category = rng.integers(1, N_CATEGORIES + 1, settings.n_campaigns)
        shares = np.array([settings.format_shares[f] for f in FORMATS])
        self.ad_ids = [f"a{i}" for i in range(n_a)]
        self.ad_format = rng.choice(len(FORMATS), n_a, p=shares / shares.sum())
        campaign_index = rng.integers(1, settings.n_campaigns + 1, n_a)
        self.ads = pd.DataFrame(
            {
                "ad_id": self.ad_ids,
                "campaign_index": campaign_index,
                "category": campaign_category[campaign_index - 1],
                "quality": rng.normal(0, 0.5, n_a).astype(np.float32),
            }
        )
        self.ad_vectors = rng.normal(size=(n_a, d)).astype(np.float32)
        for i in range(d):
            self.ads[f"ad_affinity_{i}"] = self.ad_vectors[:, i]
        self.ads_by_format = {f: np.flatnonzero(self.ad_format == k) for k, f in enumerate(FORMATS)}
        self.layout = FeatureLayout(settings.n_campaigns)
        self._user_row = {u: i for i, u in enumerate(self.user_ids)}
        self._ad_row = {a: i for i, a in enumerate(self.ad_ids)}
        self._user_dicts = self.users.set_index("user_id").to_dict("index")
        # Plain arrays for the per-request hot path (pandas indexing costs ~100 us).
        self._user_cdf = np.cumsum(self.user_popularity).tolist()
        self._format_cdf = np.cumsum(shares / shares.sum()).tolist()
        self._campaign = self.ads.campaign_index.to_numpy()
        self._quality = self.ads.quality.to_numpy()
        self._age = self.users.age_bucket.to_numpy()
        self._premium = self.users.premium.to_numpy()
        self._ad_dicts = self.ads.set_index("ad_id").to_dict("index")

    # --- requests ------------------------------------------------------------------

    def request(self, rng: np.random.Generator, event_time_ms: int) -> dict[str, Any]:
        s = self.settings
        # One draw of uniforms per request, mapped through cumulative shares: this is the
        # hot loop of history generation, and rng.choice(p=...) costs ~20 us a call.
        draws = rng.random(4 + 3 * s.candidates_per_request).tolist()
        user = self.user_ids[_pick(self._user_cdf, draws[0])]
        formats = [_pick(self._format_cdf, d) for d in draws[4 : 4 + s.candidates_per_request]]
        slot_format = FORMATS[formats[0]]
        candidates = []
        for i, k in enumerate(formats):
            pool = self.ads_by_format[FORMATS[k]]
            ad = int(pool[int(draws[4 + s.candidates_per_request + i] * len(pool))])
            bid = math.exp(0.3 * _normal(draws[4 + 2 * s.candidates_per_request + i]))
            candidates.append(
                {
                    "ad_id": self.ad_ids[ad],
                    "format": FORMATS[k],
                    "campaign_id": f"c{self._campaign[ad]}",
                    "bid": round(bid, 4),
                }
            )
        placements = PLACEMENTS_BY_FORMAT[slot_format]
        return {
            "request_id": uuid.uuid4().hex,
            "user_id": user,
            "event_time": event_time_ms,
            "context": {
                "content_type": CONTENT_TYPES[_pick(CONTENT_CDF, draws[1])],
                "foreground": bool(draws[2] < s.foreground_share),
                "device": DEVICES[_pick(DEVICE_CDF, draws[3])],
                "hour": int(rng.integers(0, 24)),
                "placement": placements[int(rng.integers(len(placements)))],
            },
            "candidates": candidates,
        }

    def true_ctr(self, request: dict[str, Any], ad_id: str, hours: float = 0.0) -> float:
        """The click probability the simulator draws from (for analysis only)."""
        s = self.settings
        ctx = request["context"]
        a = self._ad_row[ad_id]
        fmt = FORMATS[self.ad_format[a]]
        u_row = self._user_row.get(request["user_id"])
        logit = _logit(min(s.base_ctr[fmt] * s.click_boost, 0.5))
        logit += math.log(s.foreground_lift) * (float(ctx["foreground"]) - s.foreground_share)
        logit += float(self._quality[a])
        if u_row is not None:
            u = self.user_vectors[u_row]
            # Drift, and each format's own view of the taste: rotations in the first two axes.
            angle = s.drift_per_hour * hours + s.format_taste_turn * TASTE_TURN[fmt]
            if angle:
                c, sn = math.cos(angle), math.sin(angle)
                u = u.copy()
                u[0], u[1] = c * u[0] - sn * u[1], sn * u[0] + c * u[1]
            logit += s.affinity_strength * float(u @ self.ad_vectors[a]) / math.sqrt(len(u))
            if fmt == "audio":
                cross = (ctx["content_type"] == "podcast") * (self._age[u_row] - 3.5) / 2.5
            elif fmt == "video":
                cross = 1.5 * ((self._premium[u_row] == 2) and ctx["foreground"]) - 0.5
            else:
                cross = 1.0 * (ctx["device"] == "desktop") - 0.2
            # Effect drift: the format-specific effects fade and turn around with time.
            logit += s.cross_strength * math.cos(s.effect_drift_per_hour * hours) * float(cross)
        return 1.0 / (1.0 + math.exp(-logit))

    def click_delay_s(self, rng: np.random.Generator) -> float:
        s = self.settings
        return float(rng.lognormal(math.log(s.click_delay_median_s), s.click_delay_sigma))

    def features(self, user_id: str, ad_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The profile values Feast serves for this user and ad (empty when unknown)."""
        return self._user_dicts.get(user_id, {}), self._ad_dicts.get(ad_id, {})

    # --- history for offline training and Feast ------------------------------------------

    def history(
        self, n_requests: int, seed: int = 0, hours: float = 24.0, start_hours: float = 0.0
    ) -> dict[str, np.ndarray]:
        """Simulated served impressions in time order over ``hours`` from ``start_hours``
        (drift applies): one per request, a random candidate shown (so formats follow their
        shares)."""
        rng = np.random.default_rng(self.settings.seed * 1000 + seed)
        shown, users, ads, label, true_p, encoded = [], {}, {}, [], [], []
        start = int(time.time() * 1000)
        for i in range(n_requests):
            request = self.request(rng, start + i)
            candidate = request["candidates"][int(rng.integers(len(request["candidates"])))]
            shown.append({**request, "candidates": [candidate]})
            users[request["user_id"]], ads[candidate["ad_id"]] = self.features(
                request["user_id"], candidate["ad_id"]
            )
            hour = start_hours + hours * i / max(n_requests, 1)
            p = self.true_ctr(request, candidate["ad_id"], hour)
            label.append(float(rng.random() < p))
            true_p.append(p)
            if len(shown) == 10_000 or i == n_requests - 1:  # encoded in chunks
                encoded.append(self.layout.encode(shown, users, ads))
                shown = []
        encoded = encoded or [self.layout.encode([], {}, {})]
        return {
            "categorical": np.concatenate([e.categorical for e in encoded]),
            "numeric": np.concatenate([e.numeric for e in encoded]),
            "format": np.concatenate([e.fmt for e in encoded]),
            "label": np.asarray(label, dtype=np.float32),
            "true_ctr": np.asarray(true_p, dtype=np.float32),
        }

    def write_offline_data(self, data_dir: Path) -> None:
        """Writes the Feast offline sources (parquet) the feature views read."""
        data_dir.mkdir(parents=True, exist_ok=True)
        stamp = pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(minutes=5)
        users = self.users.assign(event_timestamp=stamp)
        ads = self.ads.assign(event_timestamp=stamp)
        users.to_parquet(data_dir / "user_profiles.parquet", index=False)
        ads.to_parquet(data_dir / "ad_profiles.parquet", index=False)
        for entity, ids, fields in (
            ("user", self.user_ids, USER_COUNTERS),
            ("ad", self.ad_ids, AD_COUNTERS),
        ):
            counters = {name: np.zeros(len(ids), np.int64) for name in fields}
            pd.DataFrame({f"{entity}_id": ids, "event_timestamp": stamp, **counters}).to_parquet(
                data_dir / f"{entity}_counters.parquet", index=False
            )
