"""Drives live traffic through the system: produces ad requests at a steady rate, reads
their scores, and answers each served ad with a click (drawn from the simulator's true
click probability) after a realistic delay. Counts what it sees along the way.
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from threading import Event
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer

from camoe.clients.kafka import Kafka, consumer_config, producer_config
from camoe.settings import Settings
from camoe.sim.traffic import World
from camoe.streaming.app import consume_batch
from camoe.streaming.avro import AvroCodec

log = logging.getLogger(__name__)


@dataclass
class TrafficStats:
    """What the driver saw; ``latencies_ms`` are request-produced to scores-received."""

    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    scored: int = 0
    clicks: int = 0
    labels: int = 0
    positives: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    answered_s: list[float] = field(default_factory=list)  # when each score came, from start

    def latency_windows(self, window_s: float = 10.0) -> list[dict[str, float]]:
        """Latency p50 and p99 of the scores received in each ``window_s`` of the run."""
        at, lat = np.asarray(self.answered_s), np.asarray(self.latencies_ms)
        windows = []
        for start in np.arange(0.0, at.max(initial=0.0) + 1e-9, window_s):
            rows = lat[(at >= start) & (at < start + window_s)]
            if len(rows):
                p50, p99 = np.percentile(rows, [50, 99])
                windows.append(
                    {"start_s": float(start), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
                )
        return windows

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "seconds": round(elapsed, 1),
            "requests": self.requests,
            "scored": self.scored,
            "clicks": self.clicks,
            "labels": self.labels,
            "positive_labels": self.positives,
            "model_versions": dict(
                sorted(self.versions.items(), key=lambda kv: (len(kv[0]), kv[0]))
            ),
            "scored_per_s": round(self.scored / max(elapsed, 1e-9), 1),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2),
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2),
        }


class TrafficDriver:
    """Produces requests, consumes scores and labels, produces clicks.

    Args:
        settings: the system's settings (topics, simulator parameters, rate).
        kafka: the cluster and how to reach it.
        world: the simulated users and ads.
    """

    def __init__(self, settings: Settings, kafka: Kafka, world: World) -> None:
        self.settings = settings
        self.world = world
        self.topics = settings.kafka.topics
        self.rng = np.random.default_rng(settings.simulator.seed + 1)
        self.stats = TrafficStats()
        self._requests = AvroCodec("ad_request")
        self._clicks = AvroCodec("ad_click")
        self._codecs = {
            self.topics.ad_scores.name: AvroCodec("ad_scores"),
            self.topics.labelled_events.name: AvroCodec("labelled_event"),
        }
        self._producer = Producer(producer_config(kafka, linger_ms=5))
        self._consumer = Consumer(consumer_config(kafka, f"simulator-{uuid.uuid4().hex[:8]}"))
        self._consumer.subscribe(list(self._codecs))
        self._sent: dict[str, tuple[float, dict[str, Any]]] = {}
        self._due_clicks: list[tuple[float, str, bytes]] = []

    def run(
        self,
        duration_s: float,
        stop: Event | None = None,
        progress: Callable[[TrafficStats], None] | None = None,
        progress_every_s: float = 5.0,
        drain_s: float = 0.0,
    ) -> TrafficStats:
        """Sends traffic for ``duration_s``, then keeps reading for ``drain_s``."""
        stop = stop or Event()
        rate = self.settings.simulator.requests_per_second
        start = time.monotonic()
        sending_until = start + duration_s
        end = sending_until + drain_s
        next_progress = start + progress_every_s
        while not stop.is_set() and (now := time.monotonic()) < end:
            if now < sending_until:
                due = int((now - start) * rate) - self.stats.requests
                for _ in range(max(due, 0)):
                    self._send_request()
            self._send_due_clicks(now)
            self._read(0.01)
            self._producer.poll(0)
            if progress is not None and now >= next_progress:
                progress(self.stats)
                next_progress += progress_every_s
        self._producer.flush(10)
        return self.stats

    def _send_request(self) -> None:
        request = self.world.request(self.rng, int(time.time() * 1000))
        self._sent[request["request_id"]] = (time.monotonic(), request)
        self._producer.produce(
            self.topics.ad_requests.name,
            key=request["request_id"],
            value=self._requests.encode(request),
        )
        self.stats.requests += 1

    def _read(self, timeout_s: float) -> None:
        for message in consume_batch(self._consumer, 500, timeout_s):
            if message.error() is not None:
                continue
            topic = message.topic()
            value = self._codecs[topic].decode(message.value())
            if topic == self.topics.ad_scores.name:
                self._on_scores(value)
            else:
                self.stats.labels += 1
                self.stats.positives += value["label"]

    def _on_scores(self, scores: dict[str, Any]) -> None:
        sent = self._sent.pop(scores["request_id"], None)
        if sent is None:  # a duplicate, or another run's request
            return
        sent_at, request = sent
        self.stats.scored += 1
        now = time.monotonic()
        self.stats.latencies_ms.append((now - sent_at) * 1000)
        self.stats.answered_s.append(now - self.stats.started)
        self.stats.versions[scores["model_version"]] += 1
        winner = scores["winner_ad_id"]
        hours = (time.monotonic() - self.stats.started) / 3600
        if self.rng.random() < self.world.true_ctr(request, winner, hours):
            delay = self.world.click_delay_s(self.rng)
            click = {
                "request_id": request["request_id"],
                "ad_id": winner,
                "user_id": request["user_id"],
                "event_time": request["event_time"] + int(delay * 1000),
            }
            heapq.heappush(
                self._due_clicks,
                (sent_at + delay, request["request_id"], self._clicks.encode(click)),
            )

    def _send_due_clicks(self, now: float) -> None:
        while self._due_clicks and self._due_clicks[0][0] <= now:
            _, key, value = heapq.heappop(self._due_clicks)
            self._producer.produce(self.topics.ad_clicks.name, key=key, value=value)
            self.stats.clicks += 1

    def close(self) -> None:
        self._producer.flush(10)
        self._producer.close()
        self._consumer.close()
