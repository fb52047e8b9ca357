"""Produce and consume through the real broker, with the StreamApp's guarantees."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from threading import Event

import pytest
from confluent_kafka import Consumer, Producer

from camoe.clients.kafka import create_topics
from camoe.settings import StreamSettings, TopicSpec
from camoe.streaming.app import BatchResult, Output, StreamApp
from camoe.streaming.avro import AvroCodec
from camoe.streaming.exceptions import MissingTopicError

CLICKS = AvroCodec("ad_click")
LETTERS = AvroCodec("dead_letter")


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < expected and time.monotonic() < deadline:
        values += [m.value() for m in consumer.consume(500, 0.5) if m.error() is None]
    consumer.close()
    return values


def fresh_topics(bootstrap: str) -> tuple[str, str, str, str]:
    """(suffix, input, output, dead-letter topic), the topics created for one test."""
    suffix = uuid.uuid4().hex[:8]
    topics = (f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}")
    create_topics(bootstrap, [TopicSpec(name=t) for t in topics])
    return (suffix, *topics)


# 3600 s: no commit is due by time, so offsets are committed only when the uncommitted
# records exceed in_flight_batches full batches, and when the app stops.
@pytest.mark.parametrize("commit_interval_s", [0.0, 3600.0])
def test_passthrough_app_delivers_everything_and_dead_letters_garbage(services, commit_interval_s):
    _, endpoints = services
    suffix = uuid.uuid4().hex[:8]
    source, sink, dlq = f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}"
    create_topics(
        endpoints.kafka,
        [TopicSpec(name=source, partitions=3), TopicSpec(name=sink), TopicSpec(name=dlq)],
    )
    producer = Producer({"bootstrap.servers": endpoints.kafka})
    n = 2_000
    for i in range(n):
        click = {"request_id": f"r{i}", "ad_id": "a1", "user_id": "u1", "event_time": i}
        producer.produce(source, key=f"r{i}", value=CLICKS.encode(click))
    for garbage in (b"", b"not avro", b"\xc3\x01" + b"\x00" * 8 + b"x"):
        producer.produce(source, key=b"bad", value=garbage)
    assert producer.flush(10) == 0

    def member():
        return StreamApp(
            "passthrough",
            endpoints.kafka,
            {source: CLICKS},
            {sink: CLICKS},
            dlq,
            StreamSettings(
                group_id=f"g-{suffix}",
                batch_size=100,
                poll_timeout_s=0.2,
                in_flight_batches=2,
                commit_interval_s=commit_interval_s,
            ),
        )

    app = member()

    def handler(records):
        return BatchResult(outputs=[Output(sink, r.value["request_id"], r.value) for r in records])

    app.run(handler, Event(), max_idle_s=3.0)

    out = {CLICKS.decode(v)["request_id"] for v in read_all(endpoints.kafka, sink, n)}
    assert out == {f"r{i}" for i in range(n)}
    letters = [LETTERS.decode(v) for v in read_all(endpoints.kafka, dlq, 3)]
    assert len(letters) == 3
    assert all(letter["source_topic"] == source and letter["reason"] for letter in letters)
    assert sorted(letter["value"] for letter in letters) == sorted(
        [b"", b"not avro", b"\xc3\x01" + b"\x00" * 8 + b"x"]
    )

    # Everything consumed was committed: a new member of the group reads nothing.
    again = member()
    seen = []
    again.run(lambda records: seen.extend(records) or BatchResult(), Event(), max_idle_s=3.0)
    assert seen == []
    assert app.counters["consumed"] == n + 3


def test_batch_interval_gathers_in_the_broker_and_never_holds_a_backlog(services):
    _, endpoints = services
    suffix, source, sink, dlq = fresh_topics(endpoints.kafka)
    producer = Producer({"bootstrap.servers": endpoints.kafka, "linger.ms": 0})

    def send(ids: range) -> None:
        for i in ids:
            click = {"request_id": f"r{i}", "ad_id": "a1", "user_id": "u1", "event_time": i}
            producer.produce(source, key=f"r{i}", value=CLICKS.encode(click))
        assert producer.flush(10) == 0

    batches: list[tuple[float, int]] = []  # (when the handler got it, its size)

    def handler(records):
        if records:
            batches.append((time.monotonic(), len(records)))
        return BatchResult(outputs=[Output(sink, r.value["request_id"], r.value) for r in records])

    def run(interval_s: float, batch_size: int, stop: Event, max_idle_s: float) -> StreamApp:
        app = StreamApp(
            "gather",
            endpoints.kafka,
            {source: CLICKS},
            {sink: CLICKS},
            dlq,
            StreamSettings(
                group_id=f"g-{suffix}",
                batch_size=batch_size,
                poll_timeout_s=0.05,
                batch_interval_ms=interval_s * 1000,
            ),
        )
        app.run(handler, stop, max_idle_s=max_idle_s)
        return app

    # A backlog: while more than FETCH_MIN_BYTES of it (about 60 bytes a record) waits,
    # the broker answers at once, whatever the interval, and the app takes full batches
    # back to back (a fetch's last records make a short one); only the last part of the
    # backlog waits, for an interval at most.
    backlog = 30_000
    send(range(backlog))
    run(5.0, 500, Event(), max_idle_s=8.0)
    assert sum(size for _, size in batches) == backlog
    first = batches[0][0]
    at_once = [size for when, size in batches if when - first < 1.0]
    assert sum(at_once) >= 10_000 and at_once.count(500) >= len(at_once) - 1, at_once
    assert batches[-1][0] - first < 6.5

    # A steady stream (a record every 10 ms), once the app has its partition (a record
    # primes it): the broker answers the fetch an interval after it came, so batches come
    # about an interval apart, each holding what arrived meanwhile; nothing is lost. After
    # a pause, a record waits at most an interval.
    batches.clear()
    stop = Event()
    app = threading.Thread(target=run, args=(0.5, 500, stop, 2.0))
    app.start()
    send(range(backlog, backlog + 1))
    deadline = time.monotonic() + 30
    while not batches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batches, "the app did not take the priming record"
    for k in range(15):
        send(range(backlog + 1 + 10 * k, backlog + 11 + 10 * k))
        time.sleep(0.1)
    time.sleep(1.0)
    sent = time.monotonic()
    send(range(backlog + 151, backlog + 152))
    time.sleep(1.0)
    stop.set()
    app.join(30)
    assert not app.is_alive()
    assert sum(size for _, size in batches) == 152
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(batches[:-1])]
    assert min(gaps) > 0.45, gaps
    assert len(batches) <= 8, batches  # without the interval, one per burst of ten: 17
    assert batches[-1][1] == 1 and batches[-1][0] - sent < 0.8  # an interval, and some
    out = {CLICKS.decode(v)["request_id"] for v in read_all(endpoints.kafka, sink, backlog + 152)}
    assert out == {f"r{i}" for i in range(backlog + 152)}


def test_partitions_counts_a_topics_partitions_and_names_a_missing_one(services):
    _, endpoints = services
    topic = f"counted-{uuid.uuid4().hex[:8]}"
    create_topics(endpoints.kafka, [TopicSpec(name=topic, partitions=3)])
    app = StreamApp("counter", endpoints.kafka, {}, {}, "dlq", StreamSettings(group_id="g-counter"))
    try:
        assert app.partitions(topic) == 3
        with pytest.raises(MissingTopicError, match=r"not on the broker.*camoe stack up"):
            app.partitions(f"{topic}-missing")
    finally:
        app.close()


def test_outputs_refused_by_a_full_local_queue_are_queued_again_in_order(services):
    _, endpoints = services
    suffix = uuid.uuid4().hex[:8]
    sink = f"out-{suffix}"
    create_topics(endpoints.kafka, [TopicSpec(name=sink)])
    app = StreamApp(
        "full", endpoints.kafka, {}, {sink: CLICKS}, "dlq", StreamSettings(group_id=f"g-{suffix}")
    )
    # A local queue of 50 records: a batch of 1,000 outputs overflows it many times over.
    app._producer = Producer(
        {"bootstrap.servers": endpoints.kafka, "queue.buffering.max.messages": 50}
    )
    n = 1_000
    clicks = [
        {"request_id": f"r{i}", "ad_id": "a1", "user_id": "u1", "event_time": i} for i in range(n)
    ]
    app.checkpoint(BatchResult(outputs=[Output(sink, c["request_id"], c) for c in clicks]), [], 0)
    app.flush()
    out = [CLICKS.decode(v)["request_id"] for v in read_all(endpoints.kafka, sink, n)]
    assert out == [f"r{i}" for i in range(n)]
    app.close()


def test_metrics_count_the_records_and_show_the_lag_of_a_backlog(services):
    _, endpoints = services
    suffix, source, sink, dlq = fresh_topics(endpoints.kafka)
    producer = Producer({"bootstrap.servers": endpoints.kafka, "linger.ms": 5})
    backlog = 3000
    for i in range(backlog):
        click = {"request_id": f"r{i}", "ad_id": "a1", "user_id": "u1", "event_time": i}
        producer.produce(source, key=f"r{i}", value=CLICKS.encode(click))
    producer.produce(source, key="bad", value=b"not avro")
    assert producer.flush(10) == 0
    app = StreamApp(
        "slow",
        endpoints.kafka,
        {source: CLICKS},
        {sink: CLICKS},
        dlq,
        StreamSettings(group_id=f"g-{suffix}", batch_size=100, poll_timeout_s=0.05),
    )
    value = app.registry.get_sample_value
    lags: list[float] = []

    def handler(records):
        time.sleep(0.1)  # a slow handler: the backlog drains at about 1,000 records/s
        lags.append(value("camoe_stream_consumer_lag", _lag_labels(source)) or -1.0)
        return BatchResult(outputs=[Output(sink, r.value["request_id"], r.value) for r in records])

    app.run(handler, Event(), max_idle_s=3.0)
    seen = [lag for lag in lags if lag >= 0]
    assert seen and max(seen) > 500, lags  # the backlog showed while it drained
    assert max(seen) <= backlog + 1
    assert value("camoe_stream_consumed_total", {"app": "slow"}) == backlog + 1
    assert value("camoe_stream_produced_total", {"app": "slow"}) == backlog
    assert value("camoe_stream_dead_letters_total", {"app": "slow"}) == 1
    assert len(read_all(endpoints.kafka, sink, backlog)) == backlog


def _lag_labels(topic: str) -> dict[str, str]:
    return {"app": "slow", "topic": topic, "partition": "0"}
