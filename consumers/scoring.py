"""The scoring consumer: ad-requests -> features (Feast) -> pCTR (Triton) -> ad-scores and
the feature log.

Per batch of requests: validate each request, read user and ad features for every
(user, candidate) pair in one online-store call, score all candidates in one Triton
request, rank each request's candidates by bid x pCTR, and produce its ad-scores record
and the feature-log row of the winner (the features the model saw, for training).

Delivery guarantee: the StreamApp's (at-least-once by default: a request re-read after a
crash is scored again, and both records carry its request id as key).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from camoe.features import FORMATS, FeatureLayout
from camoe.settings import Settings
from services.triton import TritonClient
from streaming.app import BatchResult, Output, Record

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot be scored; it goes to the dead-letter topic."""


class Scorer:
    """StreamApp handler that scores batches of ad requests.

    Args:
        settings: the system's settings.
        features: reads (user features, ad features) for (user_id, ad_id) pairs.
        triton: client of the served CAMoE model.
    """

    def __init__(self, settings: Settings, features: Any, triton: TritonClient) -> None:
        self.settings = settings
        self.features = features
        self.triton = triton
        self.layout = FeatureLayout(settings.simulator.n_campaigns)
        topics = settings.kafka.topics
        self.scores_topic = topics.ad_scores.name
        self.feature_log_topic = topics.feature_log.name

    def check(self, request: dict[str, Any]) -> None:
        candidates = request["candidates"]
        if not candidates:
            raise RequestError("request has no candidates")
        if len(candidates) > self.settings.scoring.max_candidates:
            raise RequestError(
                f"request has {len(candidates)} candidates, more than "
                f"scoring.max_candidates={self.settings.scoring.max_candidates}"
            )
        for candidate in candidates:
            if candidate["format"] not in FORMATS:
                raise RequestError(
                    f"candidate {candidate['ad_id']} has unknown format {candidate['format']!r}"
                )
            if not np.isfinite(candidate["bid"]) or candidate["bid"] < 0:
                raise RequestError(f"candidate {candidate['ad_id']} has invalid bid")

    def __call__(self, records: list[Record]) -> BatchResult:
        result = BatchResult()
        if not records:
            return result
        started = time.perf_counter()
        requests: list[Record] = []
        for record in records:
            try:
                self.check(record.value)
            except RequestError as error:
                result.dead_letters.append((record, str(error)))
                continue
            requests.append(record)
        pairs = [(r.value["user_id"], c["ad_id"]) for r in requests for c in r.value["candidates"]]
        looked_up = self.features.read(pairs)
        features_done = time.perf_counter()

        rows, flags_per_row = [], []
        k = 0
        for record in requests:
            request = record.value
            for candidate in request["candidates"]:
                user, ad = looked_up[k]
                k += 1
                categorical, numeric, complete = self.layout.row(
                    request["context"], candidate, user, ad
                )
                rows.append((categorical, numeric, complete))
                flags = [] if complete else ["degraded"]
                if not user:
                    flags.append("unknown_user")
                if not ad:
                    flags.append("unknown_ad")
                flags_per_row.append(flags)
        if not rows:
            return result
        categorical, numeric = self.layout.arrays(rows)
        fmt = np.asarray(
            [FORMATS.index(c["format"]) for r in requests for c in r.value["candidates"]],
            dtype=np.int64,
        )
        pctr, version = self.triton.infer(categorical, numeric, fmt)
        done = time.perf_counter()
        timings = {
            "features": (features_done - started) * 1000,
            "inference": (done - features_done) * 1000,
            "total": (done - started) * 1000,
        }
        k = 0
        for record in requests:
            result.outputs += self._outputs(
                record.value, k, pctr, categorical, numeric, flags_per_row, version, timings
            )
            k += len(record.value["candidates"])
        return result

    def _outputs(
        self,
        request: dict[str, Any],
        first: int,
        pctr: np.ndarray,
        categorical: np.ndarray,
        numeric: np.ndarray,
        flags_per_row: list[list[str]],
        version: str,
        timings: dict[str, float],
    ) -> list[Output]:
        candidates = request["candidates"]
        scores = [
            {
                "ad_id": c["ad_id"],
                "format": c["format"],
                "bid": c["bid"],
                "pctr": float(pctr[first + i]),
            }
            for i, c in enumerate(candidates)
        ]
        best = max(range(len(scores)), key=lambda i: scores[i]["bid"] * scores[i]["pctr"])
        flags = sorted({f for i in range(len(candidates)) for f in flags_per_row[first + i]})
        winner = candidates[best]
        key = request["request_id"]
        return [
            Output(
                self.scores_topic,
                key,
                {
                    "request_id": key,
                    "user_id": request["user_id"],
                    "event_time": request["event_time"],
                    "model_version": version,
                    "scores": scores,
                    "winner_ad_id": winner["ad_id"],
                    "flags": flags,
                    "timings_ms": timings,
                },
            ),
            Output(
                self.feature_log_topic,
                key,
                {
                    "request_id": key,
                    "user_id": request["user_id"],
                    "ad_id": winner["ad_id"],
                    "format": winner["format"],
                    "event_time": request["event_time"],
                    "model_version": version,
                    "pctr": scores[best]["pctr"],
                    "feature_service": self.settings.feast.feature_service,
                    "categorical": categorical[first + best].tolist(),
                    "numeric": numeric[first + best].tolist(),
                },
            ),
        ]
