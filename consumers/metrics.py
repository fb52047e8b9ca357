"""Prometheus metrics of the scoring consumer and the labeler (their stream apps' own are
in camoe/streaming/metrics.py), served on 127.0.0.1 when a port is set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from consumers.labeler import Labeler

# Seconds (Prometheus's base unit), from sub-millisecond stages up to a held batch.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5)


class ScoringMetrics:
    """Throughput, latencies, batch sizes, dead letters, fallbacks and the served version.

    Args:
        registry: where the metrics live (a fresh one per scorer, so tests can read them).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("camoe_scoring_requests", "Requests scored", registry=r)
        self.candidates = Counter("camoe_scoring_candidates", "Candidates scored", registry=r)
        self.dead_letters = Counter(
            "camoe_scoring_dead_letters", "Requests sent to the dead-letter topic", registry=r
        )
        self.fallbacks = Counter(
            "camoe_scoring_fallback_requests", "Requests answered by prior CTRs", registry=r
        )
        self.feature_store_down = Counter(
            "camoe_scoring_feature_store_down_requests",
            "Requests scored while the feature store could not be read (cached rows and "
            "defaults, flagged features_unavailable)",
            registry=r,
        )
        self.batch_size = Histogram(
            "camoe_scoring_batch_requests",
            "Requests per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "camoe_scoring_stage_seconds",
            "Per-wave stage latency (features: reading and encoding a wave; inference: "
            "sending it to having its scores; total: its batch's start to its scores)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "camoe_scoring_end_to_end_seconds",
            "Request event time to scores produced",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.model_version = Gauge(
            "camoe_scoring_model_version",
            "Model version of the last batch (0: fallback)",
            registry=r,
        )


# labeler.counts key -> (metric, its ``kind`` label)
LABELER_COUNTS = {
    "negatives": ("labels", "negative"),
    "positives": ("labels", "positive"),
    "late_positives": ("labels", "late_positive"),
    "negatives_sampled_out": ("labels", "negative_sampled_out"),
    "duplicate_clicks": ("clicks", "duplicate"),
    "unknown_clicks": ("clicks", "unknown"),
    "duplicate_impressions": ("impressions", "duplicate"),
    "future_events": ("future_events", None),
    "counter_pushes": ("feature_pushes", None),
    "counters_pushed": ("feature_rows_pushed", None),
    "counter_push_failures": ("feature_push_failures", None),
}
LABELER_HELP = {
    "labels": "Impressions labelled, by kind (a negative sampled out is counted, not emitted)",
    "clicks": "Clicks that labelled nothing: a duplicate, or one whose impression never came",
    "impressions": "Feature-log rows already known (a request scored again after a crash)",
    "future_events": "Inputs dead-lettered for an event time beyond the clock's skew",
    "feature_pushes": "Pushes of fresh user and ad counters to the online store",
    "feature_rows_pushed": "User and ad rows written by those pushes",
    "feature_push_failures": "Pushes the online store could not take (the counters wait)",
}


class LabelerCollector(Collector):
    """The labeler's counts and the size of its state, read at each scrape."""

    def __init__(self, labeler: Labeler) -> None:
        self.labeler = labeler

    def collect(self) -> Iterator[Metric]:
        counts = dict.copy(self.labeler.counts)  # one C call: safe against the app's thread
        families: dict[str, CounterMetricFamily] = {}
        for key, (name, kind) in LABELER_COUNTS.items():
            if name not in families:
                labels = ["kind"] if kind is not None else []
                families[name] = CounterMetricFamily(
                    f"camoe_labeler_{name}", LABELER_HELP[name], labels=labels
                )
            families[name].add_metric([kind] if kind is not None else [], counts.get(key, 0))
        yield from families.values()
        state = GaugeMetricFamily(
            "camoe_labeler_state",
            "What the labeler holds over its partitions: impressions waiting for their "
            "window, clicks waiting for their impression, labelled impressions remembered "
            "for late clicks, user and ad counters",
            labels=["part"],
        )
        partitions = list(dict.copy(self.labeler.partitions).values())
        for part, attribute in (
            ("pending_impressions", "pending"),
            ("waiting_clicks", "orphans"),
            ("labelled_impressions", "decided"),
            ("counters", "counters"),
        ):
            state.add_metric([part], sum(len(getattr(p, attribute)) for p in partitions))
        yield state
