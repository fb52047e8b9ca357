"""Kafka client configuration, built in one place, and topic administration.

Every consumer, producer and admin client of the product, the simulator and the
benchmarks is configured here, so a setting that must hold everywhere is set once:

- consumers never auto-commit (offsets are committed after the output is acknowledged)
  and read only committed records (``isolation.level=read_committed``), so the records
  of an aborted transaction are never seen;
- producers are idempotent and wait for every in-sync replica (``acks=all``); with a
  ``transactional_id`` they write exactly-once;
- every client reaches the cluster the same way: its address and security properties
  (``KafkaConnection``: SASL user, TLS CA) come from one place, and a refused user or
  an untrusted certificate stops the client with one line naming the setting to fix
  (``KafkaAccessError``) instead of retrying;
- every client logs through Python logging, one line per change of its connection to
  the cluster ("broker unreachable, retrying", "broker back after N s": ``BrokerWatch``)
  instead of one per connection attempt, and librdkafka's own log (the ``librdkafka``
  logger) at most once a minute per kind of line (``RateLimit``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from camoe.settings import KafkaSecurity, TopicSpec

log = logging.getLogger(__name__)
# librdkafka's log lines (logged when the client is polled), rate-limited per kind.
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
# Errors that say the client cannot reach the cluster; librdkafka retries them itself.
UNREACHABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE,
    KafkaError._TIMED_OUT,
}
# What to check when the cluster refuses this client as configured (retrying cannot help).
CHECK_CREDENTIALS = (
    "check kafka.security.username and kafka.security.password "
    "(CAMOE_KAFKA__SECURITY__PASSWORD or password_file)"
)
CHECK_CERTIFICATE = (
    "check kafka.security.ca_file (the CA that signed the broker's certificate) "
    "and kafka.security.check_hostname"
)


class KafkaAccessError(ValueError):
    """The cluster refused the client's credentials, or its certificate is not trusted."""


@dataclass(frozen=True)
class KafkaConnection:
    """A cluster's bootstrap address and how its clients reach it. A bare address string
    may stand for one wherever a client is built: a plaintext cluster."""

    bootstrap: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def __str__(self) -> str:
        return self.bootstrap

    def properties(self) -> dict[str, Any]:
        """librdkafka's connection properties; the password is read here, when a client
        is built, and never kept in the connection or logged."""
        s = self.security
        properties: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": s.protocol,
        }
        if s.protocol.startswith("SASL_"):
            properties["sasl.mechanism"] = s.sasl_mechanism
            properties["sasl.username"] = s.username
            properties["sasl.password"] = s.secret() or ""
        if s.protocol.endswith("SSL"):
            if s.ca_file is not None:
                properties["ssl.ca.location"] = str(s.ca_file)
            properties["ssl.endpoint.identification.algorithm"] = (
                "https" if s.check_hostname else "none"
            )
        return properties


Kafka = KafkaConnection | str  # where clients connect: a bare address is plaintext


def connection(kafka: Kafka) -> dict[str, Any]:
    """The client properties of ``kafka``: its address and security."""
    return (kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(kafka)).properties()


class RateLimit(logging.Filter):
    """Lets one record of each kind through per ``interval_s``; the next one let through
    says how many were held back. A kind is the logger's first word of the message (the
    librdkafka facility, e.g. FAIL) and the client's name."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, ...], float] = {}
        self._held: dict[tuple[str, ...], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split(" ", 2)
        kind = tuple(words[:2])
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval_s) < self.interval_s:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it held back)"
            record.args = None
        return True


class Refusals(logging.Filter):
    """Drops librdkafka's lines about a refused login or an untrusted certificate: the
    client's ``KafkaAccessError`` says it once, with the setting to fix."""

    MARKS = ("SASL authentication error", "SSL handshake failed")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(mark in record.getMessage() for mark in self.MARKS)


LIBRDKAFKA_LOG.addFilter(Refusals())
LIBRDKAFKA_LOG.addFilter(RateLimit())


class BrokerWatch:
    """A client's connection to the cluster as state changes, logged once each.

    librdkafka reports every failed connection attempt (``error_cb``) and retries on its
    own; this logs the first as "broker unreachable, retrying", and when its statistics
    (``stats_cb``, every ``STATS_INTERVAL_MS``) show a broker up again, "broker back
    after N s". Other errors are logged as warnings (fatal ones as errors); the clients
    raise fatal errors themselves where they are used.
    """

    STATS_INTERVAL_MS = 1000

    def __init__(self, name: str) -> None:
        self.name = name
        self.down_since: float | None = None
        self.outages = 0  # times the cluster became unreachable

    def config(self) -> dict[str, Any]:
        """The client configuration keys that route its reports here."""
        return {
            "logger": LIBRDKAFKA_LOG,
            "error_cb": self.on_error,
            "stats_cb": self.on_stats,
            "statistics.interval.ms": self.STATS_INTERVAL_MS,
        }

    def on_error(self, error: KafkaError) -> None:
        if refused := refusal(self.name, error):
            # Raised out of the client call that served the callback (poll, consume,
            # flush): the process stops with one line instead of retrying forever.
            raise KafkaAccessError(refused)
        if error.code() in UNREACHABLE:
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.outages += 1
                log.warning("%s: broker unreachable (%s), retrying", self.name, error.str())
            return
        log.log(logging.ERROR if error.fatal() else logging.WARNING, "%s: %s", self.name, error)

    def on_stats(self, stats: str) -> None:
        if self.down_since is None:
            return
        brokers = json.loads(stats).get("brokers", {}).values()
        if any(b.get("state") == "UP" and b.get("nodeid", -1) >= 0 for b in brokers):
            down_s = time.monotonic() - self.down_since
            self.down_since = None
            log.info("%s: broker back after %.0f s", self.name, down_s)


def refusal(client: str, error: KafkaError) -> str | None:
    """When ``error`` says the cluster refused ``client``'s login or the client does not
    trust the broker's certificate: one line, with librdkafka's reason and the settings
    to check. Other TLS errors (a connection cut mid-stream) are not refusals."""
    code, reason = error.code(), error.str().split(" (after ")[0]  # without timings
    if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        check = CHECK_CREDENTIALS
    elif code == KafkaError._SSL and "certificate verify failed" in reason:
        check = CHECK_CERTIFICATE
    else:
        return None
    return f"kafka refused the {client}: {reason}; {check}"


def consumer_config(kafka: Kafka, group_id: str, **extra: Any) -> dict[str, Any]:
    """A consumer in ``group_id`` that commits only when told and reads committed records,
    from the earliest offset when its group has none; ``extra`` adds or overrides keys."""
    return {
        **connection(kafka),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        **BrokerWatch(f"consumer {group_id}").config(),
        **extra,
    }


def producer_config(
    kafka: Kafka, linger_ms: float = 5.0, transactional_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An idempotent producer acknowledged by all in-sync replicas, transactional when
    ``transactional_id`` is given; ``extra`` adds or overrides keys."""
    config: dict[str, Any] = {
        **connection(kafka),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        **BrokerWatch(f"producer {transactional_id or ''}".rstrip()).config(),
        **extra,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
    return config


def admin(kafka: Kafka, name: str = "admin client") -> AdminClient:
    """An admin client that logs only errors (it is short-lived and often retried) and
    raises ``KafkaAccessError`` when polled after the cluster refused it (``name`` says
    whose client it is)."""

    def on_error(error: KafkaError) -> None:
        if refused := refusal(name, error):
            raise KafkaAccessError(refused)

    return AdminClient(
        {**connection(kafka), "log_level": 4, "logger": LIBRDKAFKA_LOG, "error_cb": on_error}
    )


def create_topics(kafka: Kafka, topics: list[TopicSpec], timeout_s: float = 30.0) -> None:
    """Creates the topics that do not exist yet (idempotent). A broker that cannot be
    reached is waited for until ``timeout_s``: one that has just started may still drop
    its first connections."""
    client = admin(kafka)
    existing = set(_metadata(client, timeout_s).topics)
    new = [
        NewTopic(
            t.name,
            num_partitions=t.partitions,
            replication_factor=1,
            config={"cleanup.policy": "compact"} if t.compacted else {},
        )
        for t in topics
        if t.name not in existing
    ]
    if not new:
        return
    for name, future in client.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout_s)
        except Exception as error:
            if "TOPIC_ALREADY_EXISTS" not in str(error):
                raise RuntimeError(f"could not create topic {name}: {error}") from None


def kafka_error(raised: object) -> KafkaError | None:
    """The KafkaError an exception carries (or is: the consumer raises fatal errors bare)."""
    if isinstance(raised, KafkaError):
        return raised
    if isinstance(raised, KafkaException) and isinstance(raised.args[0], KafkaError):
        return raised.args[0]
    return None


def _metadata(client: AdminClient, timeout_s: float) -> Any:
    """The cluster's metadata, asked again while the cluster is unreachable; a refusal
    (the client's error callback, served by ``poll``) raises ``KafkaAccessError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.list_topics(timeout=min(max(deadline - time.monotonic(), 1.0), 2.0))
        except KafkaException as raised:
            client.poll(0)
            error = kafka_error(raised)
            if error is None or error.code() not in UNREACHABLE or time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def check_access(kafka: Kafka, name: str, timeout_s: float = 10.0) -> None:
    """Raises ``KafkaAccessError`` when the cluster refuses the client's credentials or
    certificate: before a client starts, because some of its calls (a producer's
    ``init_transactions``) would only time out. A cluster that cannot be reached is left
    to the clients' own retries; plaintext has nothing to refuse."""
    if not isinstance(kafka, KafkaConnection) or kafka.security.protocol == "PLAINTEXT":
        return
    client = admin(kafka, name)
    try:
        _metadata(client, timeout_s)
    except KafkaException:
        return  # not reached in time: not refused
    except KafkaAccessError as error:
        refused = str(error)
    else:
        return
    # The client goes now, not with the traceback at interpreter exit: librdkafka torn
    # down during Python's finalisation can crash the process.
    del client
    raise KafkaAccessError(refused)


def cluster_id(kafka: Kafka, timeout_s: float = 10.0) -> str | None:
    """The cluster's id: a checkpoint's offsets are only valid on the cluster that gave them."""
    client = admin(kafka)
    return _metadata(client, timeout_s).cluster_id


def group_members(kafka: Kafka, group_id: str, timeout_s: float = 5.0) -> int:
    """How many consumers hold partitions in a stable consumer group (0 while rebalancing)."""
    from confluent_kafka import ConsumerGroupState

    client = admin(kafka)
    description = client.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id]
    group = description.result(timeout_s)
    return len(group.members) if group.state == ConsumerGroupState.STABLE else 0


def committed_offsets(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> the offset ``consumer``'s group committed in ``topic`` (negative: none)."""
    partitions = consumer.list_topics(topic, timeout_s).topics[topic].partitions
    committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout_s)
    return {p.partition: p.offset for p in committed}


def read_committed(
    kafka: Kafka, topic: str, decode: Callable[[bytes], dict[str, Any]], idle_s: float = 3.0
) -> list[dict[str, Any]]:
    """Every committed record of ``topic`` from its beginning, until it has been idle."""
    # A group of its own, joined and never committed.
    consumer = Consumer(consumer_config(kafka, f"reader-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic])
    values: list[dict[str, Any]] = []
    give_up = time.monotonic() + 30  # joining the group takes a moment
    last_seen: float | None = None  # the idle clock starts once partitions are assigned
    try:
        while True:
            messages = consumer.consume(500, 0.5)
            for message in messages:
                if message.error() is None:
                    values.append(decode(message.value()))
            now = time.monotonic()
            if messages or (last_seen is None and consumer.assignment()):
                last_seen = now
            if (last_seen is not None and now - last_seen > idle_s) or (
                last_seen is None and now > give_up
            ):
                break
    finally:
        consumer.close()
    return values
