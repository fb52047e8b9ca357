"""Prometheus metrics of the incremental trainer (its stream app's own are in
camoe/streaming/metrics.py): what it trained, its live quality per format, the quality
gate's verdicts, each publish step's time, the served version, and freshness."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from camoe.settings import TrainerSettings


class Trainer(Protocol):
    """What the metrics read of the trainer (trainer/online.py: IncrementalTrainer)."""

    t: TrainerSettings
    examples: int
    events: int
    rejected: int
    version: int
    pinned: int
    waiting: list[dict[str, Any]]
    ready: list[dict[str, Any]]


FRESHNESS_BUCKETS_S = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 900)
STEP_BUCKETS_S = (0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class TrainerMetrics:
    """The trainer's metrics, in ``registry`` (its stream app's, or one of its own).

    Counts and sizes are read from ``trainer`` at each scrape; verdicts, publish steps,
    freshness and live quality are recorded when a candidate is judged or published.
    """

    def __init__(self, trainer: Trainer, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.gate = Counter(
            "camoe_trainer_gate_decisions",
            "Quality-gate verdicts on candidates, by outcome and by the check that decided "
            "(finite_weights, finite_scores, logloss; no_held_out: finiteness alone)",
            ["outcome", "check"],
            registry=r,
        )
        self.publish_failures = Counter(
            "camoe_trainer_publish_failures",
            "Candidates that passed the gate and failed to publish (staging, trial, load)",
            registry=r,
        )
        self.publish_step = Histogram(
            "camoe_trainer_publish_step_seconds",
            "Seconds of each publish step: write (export and onnxruntime check), trial, "
            "rename, load (load and check in Triton)",
            ["step"],
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.freshness = Histogram(
            "camoe_trainer_freshness_seconds",
            "From a click's event time to the publish of the first version that learned it",
            buckets=FRESHNESS_BUCKETS_S,
            registry=r,
        )
        self.quality = Gauge(
            "camoe_trainer_prequential",
            "Test-then-train AUC-PR, logloss and ECE per format over the most recent "
            "events, as of the last version published",
            ["format", "metric"],
            registry=r,
        )
        r.register(_TrainerCollector(trainer))

    def published(self, published_at_ms: int, learned_click_ms: list[int]) -> None:
        for click_ms in learned_click_ms:
            self.freshness.observe(max(published_at_ms - click_ms, 0) / 1000)

    def prequential(self, figures: dict[str, float]) -> None:
        """``figures`` as the trainer names them: ``<format>_<metric>``."""
        for key, value in figures.items():
            fmt, metric = key.split("_", 1)
            self.quality.labels(fmt, metric).set(value)

    def steps(self, seconds: dict[str, float]) -> None:
        for step, value in seconds.items():
            self.publish_step.labels(step).observe(value)


class _TrainerCollector(Collector):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def collect(self) -> Iterator[Metric]:
        t = self.trainer
        for name, text, value in (
            ("examples", "Labelled events trained on", t.examples),
            ("events", "Labelled events read (trained, held out or buffered)", t.events),
            ("rejected_candidates", "Candidates not published (gate or publish)", t.rejected),
        ):
            family = CounterMetricFamily(f"camoe_trainer_{name}", text)
            family.add_metric([], value)
            yield family
        for name, text, value in (
            ("served_version", "The version the trainer last published (0: none yet)", t.version),
            (
                "pinned_version",
                "The version an operator pinned (camoe models pin/rollback; 0: none): while "
                "it is pinned the trainer publishes nothing",
                t.pinned,
            ),
            ("minibatch_size", "Rows per optimiser step", t.t.online_batch_size),
            (
                "buffered_events",
                "Events read but not yet trained: waiting for the negatives of their time, "
                "or short of a mini-batch",
                len(t.waiting) + len(t.ready),
            ),
        ):
            yield GaugeMetricFamily(f"camoe_trainer_{name}", text, value=value)
