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
from collections import Counter
from typing import Any

import numpy as np

from camoe.features import FORMATS, Encoded, FeatureLayout, is_float32
from camoe.settings import Settings
from consumers.metrics import ScoringMetrics
from services.triton import InferenceServerException, TritonClient
from streaming.app import BatchResult, Output, Record
from streaming.exceptions import RetryLater

log = logging.getLogger(__name__)


FALLBACK_VERSION = "fallback"  # the model_version of scores from the prior CTRs


# gRPC statuses that mean "Triton is down or busy", worth a retry; any other error is
# about the inputs themselves.
TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED")


class ModelRejected(Exception):
    """Triton answered, and refused the inputs."""


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
        self._priors = np.asarray([settings.scoring.prior_ctr[f] for f in FORMATS], np.float32)
        self.counts: Counter[str] = Counter()
        self.metrics = ScoringMetrics()

    def _infer(
        self, categorical: np.ndarray, numeric: np.ndarray, fmt: np.ndarray
    ) -> tuple[np.ndarray, str]:
        """pCTR from Triton with retries and backoff; when it stays down, the policy decides:
        ``fallback`` answers with per-format prior CTRs, ``hold`` raises RetryLater so the
        app pauses and re-reads the batch. Either way no request is dropped."""
        s = self.settings.scoring
        error: Exception | None = None
        for attempt in range(s.triton_retries):
            try:
                return self.triton.infer(categorical, numeric, fmt)
            except InferenceServerException as failure:
                if not any(code in str(failure.status()) for code in TRANSIENT):
                    raise ModelRejected(str(failure)) from None  # retrying cannot help
                error = failure
                time.sleep(s.triton_backoff_s * 2**attempt)
        if s.triton_policy == "fallback":
            self.counts["fallback_batches"] += 1
            return self._priors[fmt], FALLBACK_VERSION
        raise RetryLater(
            f"Triton unavailable after {s.triton_retries} tries: {error}", s.hold_retry_s
        )

    def _isolate(self, requests: list[Record], reason: str, result: BatchResult) -> BatchResult:
        """Triton rejected the batch's inputs: score each request alone, so only the
        request that cannot be scored goes to the dead-letter topic (no poison pill)."""
        if len(requests) == 1:
            result.dead_letters.append((requests[0], f"model rejected the request: {reason}"))
            return result
        for record in requests:
            alone = self([record])
            result.outputs += alone.outputs
            result.dead_letters += alone.dead_letters
        return result

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
            if not is_float32(candidate["bid"]) or candidate["bid"] < 0:
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
        if not requests:
            return result
        values = [r.value for r in requests]
        users, ads = self.features.read(
            (v["user_id"] for v in values), (c["ad_id"] for v in values for c in v["candidates"])
        )
        encoded = self.layout.encode(values, users, ads)
        features_done = time.perf_counter()
        categorical, numeric, fmt = encoded.categorical, encoded.numeric, encoded.fmt
        try:
            pctr, version = self._infer(categorical, numeric, fmt)
        except ModelRejected as error:
            return self._isolate(requests, str(error), result)
        done = time.perf_counter()
        timings = {
            "features": (features_done - started) * 1000,
            "inference": (done - features_done) * 1000,
            "total": (done - started) * 1000,
        }
        flags = self._flags(encoded, len(requests))
        starts = np.searchsorted(encoded.request, np.arange(len(requests)))
        for k, record in enumerate(requests):
            result.outputs += self._outputs(
                record.value, int(starts[k]), pctr, categorical, numeric, flags[k], version, timings
            )
        self._observe(requests, len(fmt), timings, version, len(result.dead_letters))
        return result

    @staticmethod
    def _flags(encoded: Encoded, requests: int) -> list[list[str]]:
        """Each request's flags, sorted: ``degraded`` when a default stood in for a stored
        value of any of its candidates, ``unknown_user`` / ``unknown_ad`` when the store has
        no profile for them."""
        per_request: list[set[str]] = [set() for _ in range(requests)]
        for name, rows in (
            ("degraded", ~encoded.complete),
            ("unknown_user", encoded.unknown_user),
            ("unknown_ad", encoded.unknown_ad),
        ):
            for k in np.unique(encoded.request[rows]):
                per_request[k].add(name)
        return [sorted(flags) for flags in per_request]

    def _observe(
        self,
        requests: list[Record],
        candidates: int,
        timings: dict[str, float],
        version: str,
        rejected: int,
    ) -> None:
        m = self.metrics
        m.requests.inc(len(requests))
        m.candidates.inc(candidates)
        m.dead_letters.inc(rejected)
        m.batch_size.observe(len(requests))
        for stage, ms in timings.items():
            m.stage_ms.labels(stage).observe(ms)
        now_ms = time.time() * 1000
        for record in requests:
            m.end_to_end_ms.observe(now_ms - record.value["event_time"])
        if version == FALLBACK_VERSION:
            m.fallbacks.inc(len(requests))
            m.model_version.set(0)
        else:
            m.model_version.set(int(version))

    def _outputs(
        self,
        request: dict[str, Any],
        first: int,
        pctr: np.ndarray,
        categorical: np.ndarray,
        numeric: np.ndarray,
        flags: list[str],
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
        if version == FALLBACK_VERSION:
            flags = [*flags, "fallback"]
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
