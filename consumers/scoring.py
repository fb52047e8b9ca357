"""The scoring consumer: ad-requests -> features (Feast) -> pCTR (Triton) -> ad-scores and
the feature log.

Per batch of requests (what has arrived, up to ``scoring.batch_size``): validate each
request; read the features of its distinct users and ads from the online store
(camoe/clients/feature_store.py) and build every candidate's model inputs with numpy
(camoe/features.py) and send them to Triton, in waves of
``scoring.triton_chunk_requests`` requests: while Triton scores one wave, the next one's
features and inputs are prepared and the previous one's outputs built; rank each
request's candidates by bid x pCTR; produce its ad-scores record (by default each
batch's to one partition, in turn: ``scoring.scores_partitioning``) and the feature-log
row of the winner (the features the model saw, for training).

Delivery guarantee: the StreamApp's (at-least-once by default: a request re-read after a
crash is scored again, and both records carry its request id as key; its second
ad-scores record may be on another partition, so readers recognise duplicates by key).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, NamedTuple, Protocol

import numpy as np
from prometheus_client import CollectorRegistry

from camoe.clients.triton import InferenceServerException, TritonClient
from camoe.features import FORMATS, Encoded, FeatureLayout, is_float32
from camoe.settings import Settings
from camoe.streaming.app import BatchResult, Output, Record
from camoe.streaming.exceptions import RetryLater
from consumers.metrics import ScoringMetrics

log = logging.getLogger(__name__)


FALLBACK_VERSION = "fallback"  # the model_version of scores from the prior CTRs


# gRPC statuses that describe the server's state, not the request: down or restarting
# (UNAVAILABLE), no loaded version of the model, or a model that failed to load
# (NOT_FOUND), overloaded or slow (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), or a call cut
# short (CANCELLED, ABORTED). They get retries, then ``scoring.triton_policy``; any other
# answer is about the inputs themselves and dead-letters only the request that caused it.
SERVER_STATE = (
    "UNAVAILABLE",
    "NOT_FOUND",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "CANCELLED",
    "ABORTED",
)


def _server_state(failure: InferenceServerException) -> bool:
    """True when ``failure`` is about Triton's state (worth a retry, then the policy)."""
    status = str(failure.status())
    return any(status.endswith(code) for code in SERVER_STATE)


class Wave(NamedTuple):
    """Part of a batch sent to Triton: its requests, their model inputs (request k's
    candidates are rows ``bounds[k]:bounds[k + 1]``), flags, the pending call, and when
    its preparation started and ended."""

    requests: list[Record]
    encoded: Encoded
    bounds: np.ndarray
    flags: list[list[str]]
    call: Future[tuple[np.ndarray, str]]
    started: float
    features_done: float


class FeatureReader(Protocol):
    """The online store as the scorer reads it (camoe/clients/feature_store.py: OnlineFeatures)."""

    def read(
        self, user_ids: Iterable[str], ad_ids: Iterable[str]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(users, ads): the features of each known id; an unknown one is absent."""
        ...


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
        scores_partitions: the ad-scores topic's partitions on the broker (None: as many
            as the settings give it).
        registry: where its metrics go (its stream app's; None: a registry of its own).
    """

    def __init__(
        self,
        settings: Settings,
        features: FeatureReader,
        triton: TritonClient,
        scores_partitions: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.features = features
        self.triton = triton
        self.layout = FeatureLayout(settings.features.n_campaigns)
        topics = settings.kafka.topics
        self.scores_topic = topics.ad_scores.name
        self.feature_log_topic = topics.feature_log.name
        self._scores_partitions = scores_partitions or topics.ad_scores.partitions
        self._batches = 0
        self._priors = np.asarray([settings.scoring.prior_ctr[f] for f in FORMATS], np.float32)
        self.counts: Counter[str] = Counter()
        self.metrics = ScoringMetrics(registry)

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
                if not _server_state(failure):
                    raise ModelRejected(str(failure)) from None  # retrying cannot help
                error = failure
                time.sleep(s.triton_backoff_s * 2**attempt)
        if s.triton_policy == "fallback":
            self.counts["fallback_batches"] += 1
            return self._priors[fmt], FALLBACK_VERSION
        raise RetryLater(
            f"Triton unavailable after {s.triton_retries} tries: {error}", s.hold_retry_s
        )

    def _isolate(self, requests: list[Record], reason: str, result: BatchResult) -> None:
        """Triton rejected a wave's inputs: score each of its requests alone, so only the
        request that cannot be scored goes to the dead-letter topic (no poison pill); adds
        their outputs and dead letters to ``result``."""
        if len(requests) == 1:
            result.dead_letters.append((requests[0], f"model rejected the request: {reason}"))
            self.metrics.dead_letters.inc()
            return
        for record in requests:
            alone = self([record])
            result.outputs += alone.outputs
            result.dead_letters += alone.dead_letters

    def check(self, request: dict[str, Any]) -> None:
        ahead_s = request["event_time"] / 1000 - time.time()
        if ahead_s > self.settings.scoring.max_clock_skew_s:
            raise RequestError(
                f"event time is {ahead_s:.0f} s ahead of the clock, more than "
                f"scoring.max_clock_skew_s={self.settings.scoring.max_clock_skew_s:g}"
            )
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
        self.metrics.dead_letters.inc(len(result.dead_letters))
        if not requests:
            return result
        scores_partition = self._scores_partition()
        # The batch goes to Triton in waves of triton_chunk_requests requests: the next
        # wave's features and model inputs are prepared while Triton scores this one, and
        # this one's outputs are built while Triton scores the next. (Sent all at once, the
        # chunks were merged by Triton's batcher, and the loop waited a quarter of its time
        # at saturation.)
        size = self.settings.scoring.triton_chunk_requests
        waves = [requests[k : k + size] for k in range(0, len(requests), size)]
        sent = self._send(waves[0])
        observed = []
        for k in range(len(waves)):
            wave = sent
            if k + 1 < len(waves):
                sent = self._send(waves[k + 1])
            try:
                pctr, version = self._result(wave)
            except ModelRejected as error:
                self._isolate(wave.requests, str(error), result)
                continue
            done = time.perf_counter()
            timings = {
                "features": (wave.features_done - wave.started) * 1000,
                "inference": (done - wave.features_done) * 1000,
                "total": (done - started) * 1000,
            }
            result.outputs += self._outputs(wave, pctr, version, timings, scores_partition)
            observed.append((wave.requests, len(pctr), timings, version))
        self.metrics.batch_size.observe(len(requests))
        for scored in observed:
            self._observe(*scored)
        return result

    def _scores_partition(self) -> int | None:
        """The ad-scores partition of the next batch: each in turn (``batch``), or None
        (``key``: the request id's)."""
        if self.settings.scoring.scores_partitioning == "key":
            return None
        self._batches += 1
        return self._batches % self._scores_partitions

    def _send(self, requests: list[Record]) -> Wave:
        """Reads the features of ``requests``, builds their model inputs and sends them to
        Triton without waiting."""
        started = time.perf_counter()
        values = [r.value for r in requests]
        users, ads = self.features.read(
            (v["user_id"] for v in values), (c["ad_id"] for v in values for c in v["candidates"])
        )
        encoded = self.layout.encode(values, users, ads)
        features_done = time.perf_counter()
        call = self.triton.infer_async(encoded.categorical, encoded.numeric, encoded.fmt)
        bounds = np.searchsorted(encoded.request, np.arange(len(requests) + 1))
        flags = self._flags(encoded, len(requests))
        if self.features.unavailable:  # scored from cached rows and defaults
            self.metrics.feature_store_down.inc(len(requests))
            flags = [sorted([*f, "features_unavailable"]) for f in flags]
        return Wave(requests, encoded, bounds, flags, call, started, features_done)

    def _result(self, wave: Wave) -> tuple[np.ndarray, str]:
        """A wave's pCTR and version; on a transient failure, ``_infer`` (retries, then the
        policy) for the same rows."""
        try:
            return wave.call.result(self.triton.timeout_s + 5)
        except InferenceServerException as failure:
            if not _server_state(failure):
                raise ModelRejected(str(failure)) from None
        except TimeoutError:  # no answer, not even the client's own deadline
            pass
        x = wave.encoded
        return self._infer(x.categorical, x.numeric, x.fmt)

    @staticmethod
    def _flags(encoded: Encoded, requests: int) -> list[list[str]]:
        """Each request's flags, sorted: ``degraded`` when a default stood in for a stored
        value of any of its candidates, ``unknown_user`` / ``unknown_ad`` when the store has
        no profile for them (``_send`` adds ``features_unavailable`` when the store could
        not be read)."""
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
        self, requests: list[Record], candidates: int, timings: dict[str, float], version: str
    ) -> None:
        m = self.metrics
        m.requests.inc(len(requests))
        m.candidates.inc(candidates)
        for stage, ms in timings.items():
            m.stage_seconds.labels(stage).observe(ms / 1000)
        now_ms = time.time() * 1000
        for record in requests:
            m.end_to_end_seconds.observe((now_ms - record.value["event_time"]) / 1000)
        if version == FALLBACK_VERSION:
            m.fallbacks.inc(len(requests))
            m.model_version.set(0)
        else:
            m.model_version.set(int(version))

    def _outputs(
        self,
        wave: Wave,
        pctr: np.ndarray,
        version: str,
        timings: dict[str, float],
        scores_partition: int | None,
    ) -> list[Output]:
        """Each request's ad-scores record (to ``scores_partition``) and its winner's
        feature-log row (by request id: the labeler joins it with the clicks by partition);
        ``pctr`` (B,) has a row per candidate of the wave."""
        x, flags = wave.encoded, wave.flags
        chosen = winners(x.bid, pctr, wave.bounds)
        p = pctr.tolist()
        first = wave.bounds.tolist()
        # The winners' feature rows, converted in one call rather than one per request.
        logged = zip(
            chosen.tolist(), x.categorical[chosen].tolist(), x.numeric[chosen].tolist(), strict=True
        )
        service = self.settings.feast.feature_service
        fallback = version == FALLBACK_VERSION
        outputs = []
        for k, (record, (row, cat, num)) in enumerate(zip(wave.requests, logged, strict=True)):
            request = record.value
            candidates = request["candidates"]
            winner = candidates[row - first[k]]
            key = request["request_id"]
            outputs += [
                Output(
                    self.scores_topic,
                    key,
                    {
                        "request_id": key,
                        "user_id": request["user_id"],
                        "event_time": request["event_time"],
                        "model_version": version,
                        "scores": [
                            {
                                "ad_id": c["ad_id"],
                                "format": c["format"],
                                "bid": c["bid"],
                                "pctr": q,
                            }
                            for c, q in zip(candidates, p[first[k] : first[k + 1]], strict=True)
                        ],
                        "winner_ad_id": winner["ad_id"],
                        "flags": [*flags[k], "fallback"] if fallback else flags[k],
                        "timings_ms": timings,
                    },
                    scores_partition,
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
                        "pctr": p[row],
                        "feature_service": service,
                        "categorical": cat,
                        "numeric": num,
                    },
                ),
            ]
        return outputs


def winners(bid: np.ndarray, pctr: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Each request's winning row: its highest bid x pCTR, the first of equals.

    Args:
        bid: (B,) each candidate's bid.
        pctr: (B,) each candidate's pCTR.
        bounds: (R + 1,) request k's candidates are rows ``bounds[k]:bounds[k + 1]``, none
            empty.

    Returns:
        (R,) row index of each request's winner.
    """
    request = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    # Sorted by request, then by value, highest first; the sort is stable, so equals keep
    # their order, and NaN sorts last. Each request's first row is then its winner.
    order = np.lexsort((-(bid * pctr), request))
    return order[bounds[:-1]]
