"""Prometheus metrics of the scoring consumer, served on 127.0.0.1 when a port is set."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Milliseconds, from sub-millisecond stages up to a held batch.
LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


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
        self.batch_size = Histogram(
            "camoe_scoring_batch_requests",
            "Requests per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.stage_ms = Histogram(
            "camoe_scoring_stage_ms",
            "Per-wave stage latency (features: reading and encoding a wave; inference: "
            "sending it to having its scores; total: its batch's start to its scores)",
            ["stage"],
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.end_to_end_ms = Histogram(
            "camoe_scoring_end_to_end_ms",
            "Request event time to scores produced",
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.model_version = Gauge(
            "camoe_scoring_model_version",
            "Model version of the last batch (0: fallback)",
            registry=r,
        )

    def serve(self, port: int) -> int:
        """Serves /metrics on 127.0.0.1:``port`` (0: any free port); returns the port."""
        server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        bound = server.server_address[1]
        log.info("metrics on http://127.0.0.1:%d/metrics", bound)
        return bound
