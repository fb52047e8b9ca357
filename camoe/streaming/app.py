"""A consume-process-produce application with an explicit delivery guarantee.

Shaped like Quix Streams' ``Application``: sources (topics with their codecs) feed a
handler in batches; what it returns goes to sinks (topics with their codecs); records
that cannot be processed go to the dead-letter topic with their reason, and the app
keeps going.

A handler that cannot go on (its downstream is down) raises ``RetryLater``: the app
pauses its partitions and reads the same batch again later (backpressure, not an
unbounded buffer).

Delivery guarantees (``guarantee``):

* ``at-least-once`` (default): a batch's consumed offsets are committed only once the
  broker has acknowledged every output of it and of every batch before it. The app does
  not wait for that: it goes on with the next batches while batches holding up to
  ``in_flight_batches`` x ``batch_size`` input records wait, and commits (asynchronously)
  what has been acknowledged, at most every ``commit_interval_s`` unless more records than
  that are uncommitted. A crash re-delivers the records not yet committed (at most
  (``in_flight_batches`` + 1) x ``batch_size``); outputs are keyed by request id so a
  downstream reader can recognise the duplicates.
* ``exactly-once``: one transactional producer per worker; the outputs and the consumed
  offsets are committed in one Kafka transaction, and a failed batch is aborted and
  re-read. Readers must use ``isolation.level=read_committed``.

The broker going away is waited out: a commit or a flush that times out while it is
unreachable is tried again, and a consumer the group has dropped meanwhile (its session
timed out, or the broker fenced its static identity when it came back) is replaced by a
new one that rejoins the group: the partitions are revoked and assigned again through the
hooks, so uncommitted batches are read again (at-least-once) or their aborted
transactions are (exactly-once), and a stateful handler restores its state. A
transactional call that hangs past its timeout (``_bounded``) gets the producer replaced
and the batch read again the same way.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from threading import Event
from typing import Any, NamedTuple, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Histogram

from camoe.clients.kafka import (
    Kafka,
    check_access,
    consumer_config,
    kafka_error,
    producer_config,
)
from camoe.settings import StreamSettings
from camoe.streaming.avro import AvroCodec
from camoe.streaming.exceptions import (
    DecodeError,
    DeliveryError,
    MissingTopicError,
    ProducerHung,
    Rejoin,
    RetryLater,
)
from camoe.streaming.metrics import StreamCollector

log = logging.getLogger(__name__)

DEAD_LETTERS = AvroCodec("dead_letter")
ANY_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the key's partitioner chooses
# With a batch interval, the fetch's wait decides when the broker answers, not its size: a
# backlog is answered at once while more than this of it waits.
FETCH_MIN_BYTES = 1 << 20
TXN_TIMEOUT_S = 30.0  # each try of a transaction call; retriable timeouts are tried again
HUNG_AFTER_S = TXN_TIMEOUT_S + 10.0  # a transaction call still running then has hung
# The group no longer knows this consumer: replace it (StreamApp._rejoin).
REJOIN = {
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.ILLEGAL_GENERATION,
}
LAG_EVERY_S = 2.0  # how often the consumer lag of the metrics is refreshed


class Record(NamedTuple):
    """One decoded input record and where it came from. (Named tuples: one of each is made
    per record, and a frozen dataclass took three times as long to build.)"""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: dict[str, Any]
    raw: bytes


class Output(NamedTuple):
    """One record for a sink topic; ``value`` is encoded with that sink's codec (None is a
    tombstone). ``partition`` pins it (a changelog follows its input's partition); None
    lets the key choose."""

    topic: str
    key: str | None
    value: dict[str, Any] | None
    partition: int | None = None


@dataclass
class InFlight:
    """A batch's offsets, waiting until the broker has acknowledged all its outputs;
    ``records``: how many input records they cover."""

    offsets: list[TopicPartition]
    records: int
    unacknowledged: int = 0


@dataclass
class BatchResult:
    outputs: list[Output] = field(default_factory=list)
    dead_letters: list[tuple[Record | Message, str]] = field(default_factory=list)


Handler = Callable[[list[Record]], BatchResult]
# Given the batch's messages, returns the offsets it is safe to commit (stateful apps).
CommitPolicy = Callable[[list[Record]], list[TopicPartition]]


class PartitionHooks(Protocol):
    """What a stateful handler does when partitions move (a rebalance or a restart)."""

    def on_assign(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Called before the first record of ``partitions`` is read: restore their state and
        return them, each with the offset to start from (``OFFSET_INVALID``: the committed
        one)."""
        ...

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Called when ``partitions`` go to another worker: forget their state."""
        ...


def consume_batch(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Waits up to ``timeout_s`` for the first message, then takes what is already fetched,
    up to ``max_messages``. ``consume(n, timeout)`` alone waits the whole timeout unless n
    messages arrive: at low rates that wait would be most of every request's latency."""
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    if max_messages == 1:
        return [first]
    return [first, *consumer.consume(max_messages - 1, 0)]


def next_offsets(records: list[Record]) -> list[TopicPartition]:
    """The default commit: every consumed record is done once its outputs are acknowledged."""
    latest: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        latest[key] = max(latest.get(key, -1), record.offset)
    return [TopicPartition(t, p, offset + 1) for (t, p), offset in latest.items()]


class StreamApp:
    """Consumes ``sources`` in batches, calls the handler, produces to ``sinks``, commits.

    Args:
        name: the consumer's name, written into dead letters.
        kafka: the cluster and how to reach it (a bare address: plaintext).
        sources: input topic -> codec.
        sinks: output topic -> codec.
        dead_letter_topic: where undecodable or unprocessable records go.
        options: the group, the delivery guarantee, batching and commit cadence (each
            field is described in ``camoe.settings.StreamSettings``). Records come in
            batches about ``batch_interval_ms`` apart, each what arrived meanwhile; a
            backlog comes at once but for its last ``FETCH_MIN_BYTES``, which waits up to
            that long.
        instance_id: this worker's stable identity within the group. A worker restarted
            with the same id takes its partitions back at once (static membership) and,
            exactly-once, fences its crashed predecessor's open transaction (aborting it)
            instead of waiting for timeouts. None: a fresh identity per process.

    ``registry`` holds the app's Prometheus metrics (camoe/streaming/metrics.py): its
    counters, its consumer lag per partition and, exactly-once, the time each
    transaction took to commit. Components add their own to it.
    """

    def __init__(
        self,
        name: str,
        kafka: Kafka,
        sources: dict[str, Any],
        sinks: dict[str, Any],
        dead_letter_topic: str,
        options: StreamSettings,
        instance_id: str | None = None,
    ) -> None:
        self.name = name
        self.sources = sources
        self.sinks = sinks
        self.dead_letter_topic = dead_letter_topic
        self.guarantee = guarantee = options.guarantee
        self.batch_size = options.batch_size
        self.poll_timeout_s = options.poll_timeout_s
        self.in_flight_batches = options.in_flight_batches
        self.commit_interval_s = options.commit_interval_s
        group_id, interval_ms = options.group_id, options.batch_interval_ms
        self._in_flight: deque[InFlight] = deque()
        self._last_commit = 0.0
        self.counters = {
            "consumed": 0,
            "produced": 0,
            "dead_letters": 0,
            "batches": 0,
            "retried_batches": 0,
        }
        self.lag: dict[tuple[str, int], int] = {}  # (topic, partition) -> records not read
        self._lag_at = 0.0
        self.registry = CollectorRegistry()
        self.registry.register(StreamCollector(self))
        self._commit_seconds = Histogram(
            "camoe_stream_transaction_commit_seconds",
            "Time to commit a batch's transaction (exactly-once)",
            ["app"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5),
            registry=self.registry,
        ).labels(name)
        check_access(kafka, name)
        self._consumer_config = consumer_config(
            kafka,
            group_id,
            **{
                "max.poll.interval.ms": 60_000,
                "session.timeout.ms": 10_000,  # a dead worker's partitions move within 10 s
            },
            **(
                {
                    "fetch.wait.max.ms": max(1, round(interval_ms)),
                    "fetch.min.bytes": FETCH_MIN_BYTES,
                }
                if interval_ms > 0
                else {}
            ),
            **({"group.instance.id": instance_id} if instance_id else {}),
        )
        self._consumer = Consumer(self._consumer_config)
        transactional_id = None
        if guarantee == "exactly-once":
            transactional_id = f"{group_id}-{name}-{instance_id or uuid.uuid4().hex[:12]}"
        self._producer_config = producer_config(
            kafka, options.linger_ms, transactional_id=transactional_id
        )
        self._producer = Producer(self._producer_config)
        # Runs the transactional calls that can hang (see _bounded); replaced when one does.
        self._txn_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-txn")
        self._delivery_errors: list[KafkaError] = []
        if guarantee == "exactly-once":
            self._producer.init_transactions(TXN_TIMEOUT_S)

    def partitions(self, topic: str, timeout_s: float = 10.0) -> int:
        """How many partitions ``topic`` has on the broker."""
        metadata = self._producer.list_topics(topic, timeout_s).topics[topic]
        if metadata.error is not None:
            raise MissingTopicError(
                f"topic {topic!r} is not on the broker ({metadata.error.str()}): create it "
                "(`camoe stack up` creates the topics of the settings)"
            )
        return len(metadata.partitions)

    # --- the loop -----------------------------------------------------------------

    def run(
        self,
        handler: Handler,
        stop: Event,
        commit_policy: CommitPolicy = next_offsets,
        max_idle_s: float | None = None,
        hooks: PartitionHooks | None = None,
    ) -> None:
        """Runs batches until ``stop`` is set (or ``max_idle_s`` passes with no input)."""
        last_input: float | None = None  # idle time counts from the first assignment

        def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            nonlocal last_input
            log.info("%s: assigned %d partitions", self.name, len(partitions))
            if hooks is not None:
                # Assigning here, with offsets, is librdkafka's way to choose where to start.
                consumer.assign(hooks.on_assign(partitions))
            last_input = time.monotonic()

        def on_revoke(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            log.info("%s: revoked %d partitions", self.name, len(partitions))
            if self.guarantee == "at-least-once":
                self.drain()  # their next owner starts after everything acknowledged here
            if hooks is not None:
                hooks.on_revoke(partitions)

        self._consumer.subscribe(list(self.sources), on_assign=on_assign, on_revoke=on_revoke)
        try:
            while not stop.is_set():
                try:
                    had_input = self._batch(handler, stop, commit_policy)
                # Bare: a fatal consumer error comes out of poll() as the KafkaError itself,
                # which is no BaseException.
                except:  # noqa: E722
                    raised = sys.exc_info()[1]
                    error = kafka_error(raised)
                    if isinstance(raised, Rejoin):
                        reason = str(raised)
                    elif error is not None and error.code() in REJOIN:
                        reason = f"its consumer group dropped it: {error.str()}"
                    else:
                        raise
                    self._rejoin(reason, on_assign, on_revoke, hooks)
                    continue
                if had_input:
                    last_input = time.monotonic()
                elif (
                    max_idle_s is not None
                    and last_input is not None
                    and time.monotonic() - last_input > max_idle_s
                ):
                    break
        finally:
            self.close()

    def _batch(self, handler: Handler, stop: Event, commit_policy: CommitPolicy) -> bool:
        """Consumes, handles and checkpoints one batch; whether any record came."""
        messages = consume_batch(self._consumer, self.batch_size, self.poll_timeout_s)
        if time.monotonic() - self._lag_at > LAG_EVERY_S:
            self._refresh_lag()
        records, bad = self._decode(messages)
        try:
            result = handler(records)
        except RetryLater as wait:
            log.warning("%s: %s; retrying the batch in %.1fs", self.name, wait, wait.retry_after_s)
            self._rewind(messages, wait.retry_after_s, stop)
            return bool(messages)
        result.dead_letters.extend(bad)
        if messages or result.outputs or result.dead_letters:
            self.checkpoint(result, commit_policy(records), len(records) + len(bad))
        elif self._in_flight:  # idle: commit what has been acknowledged since
            self._producer.poll(0)
            self._commit_acknowledged()
        return bool(messages)

    def _rejoin(
        self,
        reason: str,
        on_assign: Callable[[Consumer, list[TopicPartition]], None],
        on_revoke: Callable[[Consumer, list[TopicPartition]], None],
        hooks: PartitionHooks | None,
    ) -> None:
        """Replaces the consumer with a new one in the same group (``reason``: its group
        dropped it, or the batch must be read again). What it had not committed is read
        again from the group's offsets: at-least-once, its batches in flight are
        forgotten (their outputs may come twice); exactly-once, their transactions were
        aborted. Its partitions are revoked from the handler first, so a stateful one
        restores their state on reassignment."""
        log.warning("%s: %s; rejoining its group with a new consumer", self.name, reason)
        try:
            assignment = self._consumer.assignment()
        except KafkaException:
            assignment = []
        if hooks is not None and assignment:
            hooks.on_revoke(assignment)
        self._in_flight.clear()
        try:
            self._consumer.close()
        except KafkaException as failure:  # a fenced consumer cannot leave its group
            log.debug("%s: closing the dropped consumer: %s", self.name, failure)
        self._consumer = Consumer(self._consumer_config)
        self._consumer.subscribe(list(self.sources), on_assign=on_assign, on_revoke=on_revoke)

    def _refresh_lag(self) -> None:
        """The records of each assigned partition not yet read: its end offset as of the
        last fetch (librdkafka's cached watermark) minus the consumer's position."""
        self._lag_at = time.monotonic()
        lag = {}
        for tp in self._consumer.position(self._consumer.assignment()):
            _, end = self._consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and end >= 0:  # both known once the partition was fetched
                lag[(tp.topic, tp.partition)] = max(end - tp.offset, 0)
        self.lag = lag

    def _rewind(self, messages: list[Message], retry_after_s: float, stop: Event) -> None:
        """Backpressure for a handler that cannot go on (RetryLater): pause every partition,
        seek the batch's partitions back to its first offsets, wait while still polling (so
        the group keeps this member), then resume: the same batch is read again. Nothing of
        it was produced or committed, so nothing is lost."""
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            if message.error() is None:
                key = (message.topic(), message.partition())
                first[key] = min(first.get(key, message.offset()), message.offset())
        assignment = self._consumer.assignment()
        self._consumer.pause(assignment)
        for (topic, partition), offset in first.items():
            self._consumer.seek(TopicPartition(topic, partition, offset))
        self.counters["retried_batches"] += 1
        deadline = time.monotonic() + retry_after_s
        while time.monotonic() < deadline and not stop.is_set():
            self._consumer.consume(1, 0.1)  # paused: returns nothing, but serves the group
        self._consumer.resume(assignment)

    def _decode(self, messages: list[Message]) -> tuple[list[Record], list[tuple[Message, str]]]:
        records: list[Record] = []
        bad: list[tuple[Message, str]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("%s: consumer error %s", self.name, error)
                continue
            self.counters["consumed"] += 1
            try:
                value = self.sources[message.topic()].decode(message.value())
            except DecodeError as reason:
                bad.append((message, str(reason)))
                continue
            records.append(
                Record(
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    message.key(),
                    value,
                    message.value(),
                )
            )
        return records, bad

    def checkpoint(self, result: BatchResult, offsets: list[TopicPartition], records: int) -> None:
        """Makes one batch durable.

        exactly-once: begin a transaction, produce the outputs and dead letters, send the
        offsets to the transaction and commit it (abort on failure, so the batch is
        re-read).

        at-least-once: produce the outputs and dead letters, then commit the offsets of
        every batch, in order, whose outputs the broker has acknowledged (when the commit
        interval has passed). When the uncommitted batches cover more than
        ``in_flight_batches`` full batches of input records, commit now, waiting for the
        oldest's acknowledgements if need be. The bound is in records, not batches, so
        that it bounds the duplicates a crash can cause, and so that the many small
        batches of a low rate are committed at the interval, not every few batches.
        """
        if self.guarantee == "exactly-once":
            try:
                self._transact(result, offsets)
            except ProducerHung as hung:
                self._replace_producer(hung)
                raise Rejoin(str(hung)) from None
        else:
            batch = InFlight(offsets, records)
            self._produce_all(result, batch)
            self._in_flight.append(batch)
            self._producer.poll(0)
            most = self.in_flight_batches * self.batch_size
            self._commit_acknowledged(force=self._uncommitted() > most)
            while self._uncommitted() > most:
                self._producer.poll(0.005)
                self._commit_acknowledged(force=True)
        self.counters["batches"] += 1

    def _transact(self, result: BatchResult, offsets: list[TopicPartition]) -> None:
        """The batch's outputs and consumed offsets in one transaction, aborted on failure."""
        self._producer.begin_transaction()
        try:
            self._produce_all(result, None)
            if offsets:
                metadata = self._consumer.consumer_group_metadata()
                self._bounded(
                    "sending its offsets",
                    lambda timeout_s: self._producer.send_offsets_to_transaction(
                        offsets, metadata, timeout_s
                    ),
                )
            started = time.perf_counter()
            self._transaction_call("commit", self._producer.commit_transaction)
            self._commit_seconds.observe(time.perf_counter() - started)
        except ProducerHung:
            raise  # the producer cannot abort: it is replaced
        except Exception:
            self._transaction_call("abort", self._producer.abort_transaction)
            raise

    def _bounded(self, what: str, call: Callable[[float], None]) -> None:
        """``call(TXN_TIMEOUT_S)`` on the transaction thread, given ``HUNG_AFTER_S`` to
        return. librdkafka can leave a transactional call waiting forever, whatever its
        timeout, for a coordinator on a broker that restarted (confluentinc/librdkafka
        #5511, ``send_offsets_to_transaction``): that raises ProducerHung."""
        future = self._txn_thread.submit(call, TXN_TIMEOUT_S)
        try:
            future.result(HUNG_AFTER_S)
        except FutureTimeout:
            raise ProducerHung(f"{what} to the transaction hung for {HUNG_AFTER_S:.0f} s") from None

    def _replace_producer(self, hung: ProducerHung) -> None:
        """A new transactional producer in place of a hung one (left to its thread): its
        ``init_transactions`` fences the old one, whose open transaction the broker
        aborts."""
        log.error("%s: %s; replacing its producer and reading the batch again", self.name, hung)
        self._txn_thread.shutdown(wait=False)
        self._txn_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-txn")
        self._producer = Producer(self._producer_config)
        self._producer.init_transactions(TXN_TIMEOUT_S)

    def _transaction_call(self, what: str, call: Callable[[float], None]) -> None:
        """``call`` (commit or abort), tried again while it fails retriably: the broker or
        the transaction coordinator is away, and the outcome is not known yet."""
        waited = 0.0
        while True:
            try:
                self._bounded(f"the {what}", call)
                break
            except KafkaException as error:
                if not error.args[0].retriable():
                    raise
                if not waited:
                    log.warning(
                        "%s: the transaction's %s waits for the broker (%s)",
                        self.name,
                        what,
                        error.args[0].str(),
                    )
                waited += TXN_TIMEOUT_S
        if waited:
            log.info("%s: the transaction's %s went through", self.name, what)

    def _produce_all(self, result: BatchResult, batch: InFlight | None) -> None:
        """Encodes the batch's outputs and dead letters and queues them with one
        ``produce_batch`` call per topic (and pinned partition): a ``produce`` call per
        record, each with a callback of its own, took a tenth of the scorer's time at
        saturation."""
        queued: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for output in result.outputs:
            codec = self.sinks[output.topic]
            value = None if output.value is None else codec.encode(output.value)
            where = (output.topic, ANY_PARTITION if output.partition is None else output.partition)
            queued.setdefault(where, []).append({"key": output.key, "value": value})
        self.counters["produced"] += len(result.outputs)
        for source, reason in result.dead_letters:
            key, value = self._dead_letter(source, reason)
            where = (self.dead_letter_topic, ANY_PARTITION)
            queued.setdefault(where, []).append({"key": key, "value": value})

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            self._on_delivery(error, batch)

        for (topic, partition), messages in queued.items():
            if batch is not None:
                batch.unacknowledged += len(messages)
            self._produce_batch(topic, partition, messages, on_delivery)

    def _produce_batch(
        self,
        topic: str,
        partition: int,
        messages: list[dict[str, Any]],
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        """Queues ``messages`` in order; those refused because the local queue is full are
        queued again once the broker has caught up, any other refusal raises. Nothing
        leaves the queue during the call (records leave it when ``poll`` serves their
        delivery reports), so the refused are the batch's tail and the order holds."""
        while True:
            queued = self._producer.produce_batch(
                topic, messages, partition, on_delivery=on_delivery
            )
            if queued == len(messages):
                return
            refused = [m for m in messages if "_error" in m]
            for message in refused:
                if message["_error"].code() != KafkaError._QUEUE_FULL:
                    raise KafkaException(message["_error"])
            self._producer.poll(0.05)
            messages = [{"key": m["key"], "value": m["value"]} for m in refused]

    def _commit_acknowledged(self, wait: bool = False, force: bool = False) -> None:
        """Commits the offsets of the acknowledged batches at the front of the queue, when
        the commit interval has passed (``force``: now; ``wait``: now, synchronously)."""
        self._check_deliveries()
        now = time.monotonic()
        if not (wait or force) and now - self._last_commit < self.commit_interval_s:
            return
        done: dict[tuple[str, int], int] = {}
        while self._in_flight and self._in_flight[0].unacknowledged == 0:
            for tp in self._in_flight.popleft().offsets:
                done[(tp.topic, tp.partition)] = tp.offset
        if done:
            self._last_commit = now
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()],
                asynchronous=not wait,
            )

    def _uncommitted(self) -> int:
        """Input records of the batches not yet committed."""
        return sum(batch.records for batch in self._in_flight)

    def _check_deliveries(self) -> None:
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise DeliveryError(f"{self.name}: records not acknowledged: {errors[:3]}")

    def drain(self) -> None:
        """Waits for every output's acknowledgement and commits every batch (at-least-once:
        before partitions move, and when stopping)."""
        self.flush()
        if self.guarantee == "at-least-once":
            self._commit_acknowledged(wait=True)

    def _dead_letter(self, source: Record | Message, reason: str) -> tuple[bytes | None, bytes]:
        """The dead-letter topic's (key, value) for ``source``, which failed for ``reason``."""
        if isinstance(source, Record):
            topic, partition, offset = source.topic, source.partition, source.offset
            key, value = source.key, source.raw
        else:
            topic, partition, offset = source.topic(), source.partition(), source.offset()
            key, value = source.key(), source.value()
        letter = {
            "source_topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key,
            "value": value,
            "reason": reason,
            "consumer": self.name,
            "failed_at": int(time.time() * 1000),
        }
        self.counters["dead_letters"] += 1
        log.warning("%s: dead letter %s[%d]@%d: %s", self.name, topic, partition, offset, reason)
        return key, DEAD_LETTERS.encode(letter)

    def _on_delivery(self, error: KafkaError | None, batch: InFlight | None) -> None:
        if error is not None:
            self._delivery_errors.append(error)
        elif batch is not None:
            batch.unacknowledged -= 1

    def flush(self) -> None:
        """Waits for every output's acknowledgement, while the broker is away too: a record
        that cannot be delivered within the producer's ``message.timeout.ms`` fails."""
        remaining = self._producer.flush(30)
        if remaining and not self._delivery_errors:
            log.warning(
                "%s: waiting for the broker to acknowledge %d records", self.name, remaining
            )
            while remaining and not self._delivery_errors:
                remaining = self._producer.flush(30)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise DeliveryError(
                f"{self.name}: {remaining} records unacknowledged, errors: {errors[:3]}"
            )

    def close(self) -> None:
        try:
            self.drain()
        except Exception as error:  # stopping anyway: what is uncommitted is re-read
            log.warning("%s: stopping with unacknowledged outputs: %s", self.name, error)
        finally:
            try:
                self._consumer.close()  # its revoke callback drains: the producer still runs
            finally:
                self._txn_thread.shutdown(wait=False)
                self._producer.close()
