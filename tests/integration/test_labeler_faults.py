"""The labeler under SIGKILL, in both modes: each restart restores its state from the
changelog, and the committed labelled events hold every label exactly once (window mode:
one label per impression, a late positive more; fake-negative mode: one negative per
impression and one positive per clicked impression)."""

from __future__ import annotations

import heapq
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer

from camoe.clients.feature_store import apply_and_materialize, open_store
from camoe.clients.kafka import create_topics
from camoe.settings import Settings
from camoe.sim.loop import run_topics
from camoe.sim.traffic import World
from camoe.streaming.avro import AvroCodec
from camoe.streaming.changelog import read_changelog
from camoe.supervisor import write_settings
from tests.conftest import copy_repos

IMPRESSIONS = AvroCodec("feature_log")
CLICKS = AvroCodec("ad_click")
LABELLED = AvroCodec("labelled_event")
DEAD_LETTERS = AvroCodec("dead_letter")
WINDOW_S = 2.0
KILLS = 5


@pytest.fixture(scope="module", params=["window", "fake-negative"])
def world(services, tmp_path_factory, request):
    """Settings with their own topics, consumer group and feature repository, per mode."""
    settings, endpoints = services
    root = tmp_path_factory.mktemp("labeler")
    feature_repo, _ = copy_repos(root)
    suffix = uuid.uuid4().hex[:6]
    renamed = run_topics(settings, "labeler").kafka.topics
    s = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"topics": renamed, "bootstrap_servers": endpoints.kafka}
            ),
            "feast": settings.feast.model_copy(
                update={"repo_path": feature_repo, "online_store": "sqlite"}
            ),
            "labeler": settings.labeler.model_copy(
                update={
                    "group_id": f"labeler-{suffix}",
                    "attribution_window_s": WINDOW_S,
                    "feedback": request.param,
                    # Every negative emitted, so each impression's label is checked.
                    "negative_sampling_rate": 1.0,
                }
            ),
            "stack": settings.stack.model_copy(update={"state_dir": root / "stack"}),
        }
    )
    World(s.simulator).write_offline_data(feature_repo / "data")
    apply_and_materialize(open_store(s.feast))
    create_topics(endpoints.kafka, s.kafka.topics.all())
    return s, endpoints.kafka, write_settings(s, root / "settings.yaml"), suffix


class Traffic(threading.Thread):
    """Impressions at a steady rate until stopped, and clicks at their own event times:
    most inside the window, some after it (late positives), some duplicated, and some for
    impressions that never existed. Keeps the ground truth of what it produced."""

    def __init__(self, settings: Settings, suffix: str, rate: float, least: int) -> None:
        super().__init__(daemon=True)
        self.topics = settings.kafka.topics
        self.suffix = suffix
        self.rate = rate
        self.least = least
        self.stop = threading.Event()
        self.rng = np.random.default_rng(17)
        self.bootstrap = settings.kafka.bootstrap_servers
        self.impressions: dict[str, dict[str, Any]] = {}
        self.clicked: set[str] = set()  # known impressions with at least one click
        self.unknown: set[str] = set()
        self.clicks_sent = 0
        self._due: list[tuple[float, str, bytes]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        # Created and dropped here: no client outlives the thread (or the broker).
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        try:
            self._run(producer)
        except BaseException as error:  # surfaced by the test, not lost in the thread
            self.error = error
        finally:
            del producer

    def _run(self, producer: Producer) -> None:
        start = time.monotonic()
        i = 0
        while len(self.impressions) < self.least or not self.stop.is_set():
            wall = time.time()
            now_ms = int(wall * 1000)
            request_id = f"lf-{self.suffix}-{i}"
            row = self._impression(request_id, i, now_ms)
            self._produce(
                producer, self.topics.feature_log.name, request_id, IMPRESSIONS.encode(row)
            )
            self.impressions[request_id] = row
            if self.rng.random() < 0.3:
                late = self.rng.random() < 0.3
                delay = (
                    self.rng.uniform(1.2 * WINDOW_S, 3 * WINDOW_S)
                    if late
                    else self.rng.uniform(0.05, 0.8 * WINDOW_S)
                )
                click = {
                    "request_id": request_id,
                    "ad_id": row["ad_id"],
                    "user_id": row["user_id"],
                    "event_time": now_ms + int(delay * 1000),
                }
                copies = 2 if self.rng.random() < 0.15 else 1  # a duplicated click
                for c in range(copies):
                    heapq.heappush(
                        self._due, (wall + delay + c * 0.3, request_id, CLICKS.encode(click))
                    )
                self.clicked.add(request_id)
            if i % 40 == 7:  # a click whose impression never existed
                ghost = f"ghost-{self.suffix}-{i}"
                click = {
                    "request_id": ghost,
                    "ad_id": "ad-x",
                    "user_id": "u-x",
                    "event_time": now_ms,
                }
                self._produce(producer, self.topics.ad_clicks.name, ghost, CLICKS.encode(click))
                self.unknown.add(ghost)
            i += 1
            self._send_due(producer, time.time())
            time.sleep(max(0.0, start + i / self.rate - time.monotonic()))
        while self._due:
            time.sleep(0.05)
            self._send_due(producer, time.time())
        assert producer.flush(30) == 0

    def _impression(self, request_id: str, i: int, now_ms: int) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "user_id": f"lf-{self.suffix}-u{i % 37}",
            "ad_id": f"lf-{self.suffix}-a{i % 11}",
            "format": "audio",
            "event_time": now_ms,
            "model_version": "1",
            "pctr": 0.01,
            "feature_service": "camoe_v1",
            "categorical": [1, 2, 2, 1, 22, 3, 4, 7, 2, 12, 5],
            "numeric": [0.5] * 15,
        }

    def _send_due(self, producer: Producer, wall: float) -> None:
        while self._due and self._due[0][0] <= wall:
            _, key, value = heapq.heappop(self._due)
            self._produce(producer, self.topics.ad_clicks.name, key, value)
            self.clicks_sent += 1

    @staticmethod
    def _produce(producer: Producer, topic: str, key: str, value: bytes) -> None:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)


def _start_labeler(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CAMOE_CONFIG": str(config), "CAMOE_WORKER_ID": "0"}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "camoe.cli", "label"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_restored(process: subprocess.Popen[bytes], log_path: Path, restores: int) -> None:
    """Waits until this process has restored its partitions (the log's restore lines)."""
    deadline = time.monotonic() + 180
    while log_path.read_text().count("restored:") < restores:
        assert process.poll() is None, f"the labeler died; see {log_path}"
        assert time.monotonic() < deadline, f"the labeler did not restore; see {log_path}"
        time.sleep(0.2)


def _read_all(bootstrap: str, topic: str, codec: AvroCodec, done: Any, timeout_s: float) -> list:
    """Every committed record of ``topic`` (read_committed), until ``done(values)`` holds
    and a few more seconds bring nothing new, or ``timeout_s`` passes."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None
    try:
        while time.monotonic() < deadline:
            messages = [m for m in consumer.consume(500, 0.5) if m.error() is None]
            values.extend(codec.decode(m.value()) for m in messages)
            if messages or not done(values):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 5:  # late duplicates would show by now
                break
    finally:
        consumer.close()
    return values


def test_sigkilled_labeler_loses_and_repeats_no_label(world, tmp_path):
    s, bootstrap, config, suffix = world
    topics = s.kafka.topics
    traffic = Traffic(s, suffix, rate=40.0, least=3_000)
    log_path = tmp_path / "label.log"
    log_path.touch()
    rng = np.random.default_rng(23)
    started = time.monotonic()
    traffic.start()
    process = _start_labeler(config, log_path)
    try:
        for kill in range(KILLS):
            _wait_restored(process, log_path, 4 * (kill + 1))
            time.sleep(float(rng.uniform(0.2, 3.0)))  # a random moment while labelling
            process.send_signal(signal.SIGKILL)
            process.wait()
            process = _start_labeler(config, log_path)
        _wait_restored(process, log_path, 4 * (KILLS + 1))
        traffic.stop.set()
        traffic.join(300)
        assert not traffic.is_alive() and traffic.error is None, traffic.error

        impressions, clicked, unknown = traffic.impressions, traffic.clicked, traffic.unknown

        def complete(values: list[dict[str, Any]]) -> bool:
            seen = {v["impression"]["request_id"] for v in values if not v["late_positive"]}
            positives = sum(v["label"] for v in values)
            return seen >= impressions.keys() and positives >= len(clicked)

        labels = _read_all(bootstrap, topics.labelled_events.name, LABELLED, complete, 300)
        letters = _read_all(
            bootstrap,
            topics.dead_letters.name,
            DEAD_LETTERS,
            lambda values: {v["key"].decode() for v in values} >= unknown,
            120,
        )
        assert process.poll() is None, f"the labeler died; see {log_path}"
    finally:
        traffic.stop.set()
        process.terminate()
        process.wait(60)
    seconds = time.monotonic() - started

    by_request = Counter(
        (v["impression"]["request_id"], v["label"], v["late_positive"]) for v in labels
    )
    repeated = {key: n for key, n in by_request.items() if n > 1}
    assert not repeated, f"{len(repeated)} labels emitted twice, e.g. {list(repeated)[:3]}"
    fake_negative = s.labeler.feedback == "fake-negative"
    assert {v["fake_negative"] for v in labels} == {fake_negative}
    # Window mode: one label per impression; fake-negative mode: one negative each.
    first = [v for v in labels if (v["label"] == 0 if fake_negative else not v["late_positive"])]
    once = Counter(v["impression"]["request_id"] for v in first)
    assert once.keys() == impressions.keys(), (
        f"{len(impressions.keys() - once.keys())} impressions never labelled, "
        f"{len(once.keys() - impressions.keys())} labels for unknown requests"
    )
    assert set(once.values()) == {1}
    positives = {v["impression"]["request_id"] for v in labels if v["label"] == 1}
    assert positives == clicked, (len(positives), len(clicked))
    assert sum(v["label"] for v in labels) == len(clicked)  # duplicated clicks count once
    late = sum(v["late_positive"] for v in labels)
    assert late > 0, "no late positive: the test did not exercise them"
    unknown_letters = Counter(
        v["key"].decode() for v in letters if "unknown impression" in v["reason"]
    )
    assert unknown_letters.keys() == traffic.unknown and set(unknown_letters.values()) == {1}

    # The restarts did restore state: pending impressions survived the kills.
    restored_pending = [
        int(n) for n in re.findall(r"restored: (\d+) pending", log_path.read_text())
    ]
    assert sum(restored_pending) > 0

    # Feast holds the final counters (one labeler worker: exact).
    users = sorted({row["user_id"] for row in impressions.values()})[:5]
    online = (
        open_store(s.feast)
        .get_online_features(
            features=["user_counters:user_impressions", "user_counters:user_clicks"],
            entity_rows=[{"user_id": u} for u in users],
        )
        .to_dict()
    )
    for user, shown, clicks in zip(
        users, online["user_impressions"], online["user_clicks"], strict=True
    ):
        rows = [r for r in impressions.values() if r["user_id"] == user]
        assert shown == len(rows), user
        assert clicks == sum(r["request_id"] in clicked for r in rows), user
    print(
        f"\n{s.labeler.feedback} mode: {KILLS} kills, {len(impressions)} impressions, "
        f"{traffic.clicks_sent} clicks "
        f"({len(clicked)} clicked impressions, {late} late positives, {len(unknown)} unknown), "
        f"{len(labels)} labels, {seconds:.0f}s"
    )


@pytest.mark.parametrize("world", ["window"], indirect=True)
def test_restore_reads_committed_state_only(world):
    """read_changelog keeps each key's latest committed value, drops tombstoned keys and
    ignores an aborted transaction's records."""
    s, bootstrap, _, suffix = world
    topic = s.kafka.topics.labeler_state.name
    codec = AvroCodec("labeler_state")
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"restore-{suffix}"})
    producer.init_transactions(30)

    def write(records: list[tuple[str, dict[str, Any] | None]], commit: bool) -> None:
        producer.begin_transaction()
        for key, value in records:
            data = None if value is None else codec.encode(value)
            producer.produce(topic, key=f"{suffix}:{key}", value=data, partition=3)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)

    count = {"counter": {"impressions": 1, "clicks": 0}}
    write([("a", count), ("b", count), ("c", count)], commit=True)
    write([("a", {"counter": {"impressions": 2, "clicks": 1}}), ("b", None)], commit=True)
    write([("c", None), ("d", count)], commit=False)
    state = read_changelog(bootstrap, topic, codec, [3], timeout_s=60)
    mine = {k.split(":", 1)[1]: v["counter"] for k, v in state[3].items() if k.startswith(suffix)}
    assert mine == {"a": {"impressions": 2, "clicks": 1}, "c": {"impressions": 1, "clicks": 0}}
    # The partition ends with an abort marker: the read still ends.
    assert read_changelog(bootstrap, topic, codec, [0, 3], timeout_s=60).keys() == {0, 3}
