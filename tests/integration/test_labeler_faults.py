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
    return make_world(services, tmp_path_factory.mktemp("labeler"), request.param)


def make_world(services, root: Path, feedback: str) -> tuple[Settings, str, Path, str]:
    settings, endpoints = services
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
                    "feedback": feedback,
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


def _start_labeler(config: Path, log_path: Path, worker: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CAMOE_CONFIG": str(config), "CAMOE_WORKER_ID": str(worker)}
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
    s, _, config, suffix = world
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
        labels = _finish(s, traffic)
        assert process.poll() is None, f"the labeler died; see {log_path}"
    finally:
        traffic.stop.set()
        process.terminate()
        process.wait(60)
    seconds = time.monotonic() - started
    late = _assert_exactly_once(s, traffic, labels)

    # The restarts did restore state: pending impressions survived the kills.
    restored_pending = [
        int(n) for n in re.findall(r"restored: (\d+) pending", log_path.read_text())
    ]
    assert sum(restored_pending) > 0
    _assert_counters(s, traffic)
    print(
        f"\n{s.labeler.feedback} mode: {KILLS} kills, {len(traffic.impressions)} impressions, "
        f"{traffic.clicks_sent} clicks ({len(traffic.clicked)} clicked impressions, {late} "
        f"late positives, {len(traffic.unknown)} unknown), {len(labels)} labels, {seconds:.0f}s"
    )


def test_two_labelers_one_sigkilled_count_every_entity_exactly(services, tmp_path):
    """Two workers share the four partitions; one is killed (SIGKILL) and restarted three
    times. Labels stay exactly-once, and every user's and ad's counters in Feast equal
    what was produced, although each entity's impressions reach both workers."""
    s, _, config, suffix = make_world(services, tmp_path, "fake-negative")
    traffic = Traffic(s, suffix, rate=40.0, least=2_000)
    logs = [tmp_path / f"label-{w}.log" for w in (0, 1)]
    rng = np.random.default_rng(29)
    traffic.start()
    processes = [_start_labeler(config, logs[w], worker=w) for w in (0, 1)]
    try:
        for w in (0, 1):
            _wait_restored(processes[w], logs[w], 1)
        for _ in range(3):
            time.sleep(float(rng.uniform(2.0, 5.0)))  # a random moment while labelling
            processes[1].send_signal(signal.SIGKILL)
            processes[1].wait()
            before = logs[1].read_text().count("restored:")
            processes[1] = _start_labeler(config, logs[1], worker=1)
            _wait_restored(processes[1], logs[1], before + 1)
        labels = _finish(s, traffic)
        for w in (0, 1):
            assert processes[w].poll() is None, f"labeler {w} died; see {logs[w]}"
    finally:
        traffic.stop.set()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
    _assert_exactly_once(s, traffic, labels)
    for w in (0, 1):  # both took part
        assert "restored:" in logs[w].read_text() and "assigned" in logs[w].read_text()
    counted = _assert_counters(s, traffic, every_entity=True)
    print(
        f"\ntwo labelers, 3 kills of one: {len(traffic.impressions)} impressions, "
        f"{len(labels)} labels, {counted} users and ads counted exactly"
    )


def _finish(s: Settings, traffic: Traffic) -> list[dict[str, Any]]:
    """Stops the traffic and reads back every label once all of them are committed."""
    traffic.stop.set()
    traffic.join(300)
    assert not traffic.is_alive() and traffic.error is None, traffic.error
    impressions, clicked = traffic.impressions, traffic.clicked

    def complete(values: list[dict[str, Any]]) -> bool:
        seen = {v["impression"]["request_id"] for v in values if not v["late_positive"]}
        positives = sum(v["label"] for v in values)
        return seen >= impressions.keys() and positives >= len(clicked)

    bootstrap = s.kafka.bootstrap_servers or ""
    labels = _read_all(bootstrap, s.kafka.topics.labelled_events.name, LABELLED, complete, 300)
    letters = _read_all(
        bootstrap,
        s.kafka.topics.dead_letters.name,
        DEAD_LETTERS,
        lambda values: {v["key"].decode() for v in values} >= traffic.unknown,
        120,
    )
    unknown_letters = Counter(
        v["key"].decode() for v in letters if "unknown impression" in v["reason"]
    )
    assert unknown_letters.keys() == traffic.unknown and set(unknown_letters.values()) == {1}
    return labels


def _assert_exactly_once(s: Settings, traffic: Traffic, labels: list[dict[str, Any]]) -> int:
    """Every label once: one per impression (window mode) or one negative each
    (fake-negative), one positive per clicked impression. Returns the late positives."""
    impressions, clicked = traffic.impressions, traffic.clicked
    by_request = Counter(
        (v["impression"]["request_id"], v["label"], v["late_positive"]) for v in labels
    )
    repeated = {key: n for key, n in by_request.items() if n > 1}
    assert not repeated, f"{len(repeated)} labels emitted twice, e.g. {list(repeated)[:3]}"
    fake_negative = s.labeler.feedback == "fake-negative"
    assert {v["fake_negative"] for v in labels} == {fake_negative}
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
    return late


def _assert_counters(s: Settings, traffic: Traffic, every_entity: bool = False) -> int:
    """Feast's counters equal the produced impressions and clicks, for five users (or
    every user and ad); returns how many entities were checked. The last increments
    reach the store a moment after the last label: waited for."""
    rows = list(traffic.impressions.values())
    users = sorted({r["user_id"] for r in rows})
    ads = sorted({r["ad_id"] for r in rows}) if every_entity else []
    users = users if every_entity else users[:5]
    expected = {
        (kind, entity): [
            sum(r[f"{kind}_id"] == entity for r in rows),
            sum(r[f"{kind}_id"] == entity and r["request_id"] in traffic.clicked for r in rows),
        ]
        for kind, entities in (("user", users), ("ad", ads))
        for entity in entities
    }
    store = open_store(s.feast)
    deadline = time.monotonic() + 30
    while True:
        online = {}
        for kind, entities in (("user", users), ("ad", ads)):
            if not entities:
                continue
            got = store.get_online_features(
                features=[f"{kind}_counters:{kind}_impressions", f"{kind}_counters:{kind}_clicks"],
                entity_rows=[{f"{kind}_id": e} for e in entities],
            ).to_dict()
            for e, shown, clicks in zip(
                entities, got[f"{kind}_impressions"], got[f"{kind}_clicks"], strict=True
            ):
                online[(kind, e)] = [shown, clicks]
        if online == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    wrong = {k: (online[k], v) for k, v in expected.items() if online[k] != v}
    assert not wrong, f"{len(wrong)} counters (online, produced) differ: {list(wrong.items())[:5]}"
    return len(expected)


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
