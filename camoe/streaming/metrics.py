"""Prometheus metrics of the stream apps, served on 127.0.0.1.

Counters and state sizes are read when Prometheus scrapes (custom collectors over what
the app and its handler count anyway), so the record loop pays nothing for them; only
timings are observed as they happen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# name -> help of StreamApp.counters
STREAM_COUNTERS = {
    "consumed": "Records read from the input topics",
    "produced": "Records produced to the output topics (dead letters apart)",
    "dead_letters": "Records sent to the dead-letter topic",
    "batches": "Batches processed",
    "retried_batches": "Batches read again because the handler asked to wait (RetryLater)",
}


def serve(registry: CollectorRegistry, port: int, address: str = "127.0.0.1") -> int:
    """Serves /metrics of ``registry`` on ``address``:``port`` (0: any free port); returns
    the port."""
    server, _ = start_http_server(port, addr=address, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", address, bound)
    return bound


class Counted(Protocol):
    """What the collector reads of a stream app (camoe/streaming/app.py: StreamApp)."""

    name: str
    counters: dict[str, int]
    lag: dict[tuple[str, int], int]


class StreamCollector(Collector):
    """The app's counters and its consumer lag per assigned partition, labelled ``app``."""

    def __init__(self, app: Counted) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        name = self.app.name
        counters = dict.copy(self.app.counters)  # one C call: safe against the app's thread
        for key, text in STREAM_COUNTERS.items():
            family = CounterMetricFamily(f"camoe_stream_{key}", text, labels=["app"])
            family.add_metric([name], counters[key])
            yield family
        lag = GaugeMetricFamily(
            "camoe_stream_consumer_lag",
            "Records of each assigned input partition not yet read (its end offset minus "
            "the consumer's position), as of the app's last look",
            labels=["app", "topic", "partition"],
        )
        for (topic, partition), records in dict.copy(self.app.lag).items():
            lag.add_metric([name, topic, str(partition)], records)
        yield lag
