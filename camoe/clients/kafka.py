"""Kafka client configuration, built in one place, and topic administration.

Every consumer, producer and admin client of the product, the simulator and the
benchmarks is configured here, so a setting that must hold everywhere is set once:

- consumers never auto-commit (offsets are committed after the output is acknowledged)
  and read only committed records (``isolation.level=read_committed``), so the records
  of an aborted transaction are never seen;
- producers are idempotent and wait for every in-sync replica (``acks=all``); with a
  ``transactional_id`` they write exactly-once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from camoe.settings import TopicSpec


def consumer_config(bootstrap: str, group_id: str, **extra: Any) -> dict[str, Any]:
    """A consumer in ``group_id`` that commits only when told and reads committed records,
    from the earliest offset when its group has none; ``extra`` adds or overrides keys."""
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        **extra,
    }


def producer_config(
    bootstrap: str, linger_ms: float = 5.0, transactional_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An idempotent producer acknowledged by all in-sync replicas, transactional when
    ``transactional_id`` is given; ``extra`` adds or overrides keys."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        **extra,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
    return config


def admin(bootstrap: str) -> AdminClient:
    """An admin client that logs only errors (it is short-lived and often retried)."""
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})


def create_topics(bootstrap: str, topics: list[TopicSpec], timeout_s: float = 30.0) -> None:
    """Creates the topics that do not exist yet (idempotent)."""
    client = admin(bootstrap)
    existing = set(client.list_topics(timeout=timeout_s).topics)
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


def cluster_id(bootstrap: str, timeout_s: float = 10.0) -> str | None:
    """The cluster's id: a checkpoint's offsets are only valid on the cluster that gave them."""
    client = admin(bootstrap)
    return client.list_topics(timeout=timeout_s).cluster_id


def group_members(bootstrap: str, group_id: str, timeout_s: float = 5.0) -> int:
    """How many consumers hold partitions in a stable consumer group (0 while rebalancing)."""
    from confluent_kafka import ConsumerGroupState

    client = admin(bootstrap)
    description = client.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id]
    group = description.result(timeout_s)
    return len(group.members) if group.state == ConsumerGroupState.STABLE else 0


def committed_offsets(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Partition -> the offset ``consumer``'s group committed in ``topic`` (negative: none)."""
    partitions = consumer.list_topics(topic, timeout_s).topics[topic].partitions
    committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout_s)
    return {p.partition: p.offset for p in committed}


def read_committed(
    bootstrap: str, topic: str, decode: Callable[[bytes], dict[str, Any]], idle_s: float = 3.0
) -> list[dict[str, Any]]:
    """Every committed record of ``topic`` from its beginning, until it has been idle."""
    # A group of its own, joined and never committed.
    consumer = Consumer(consumer_config(bootstrap, f"reader-{uuid.uuid4().hex[:8]}"))
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
