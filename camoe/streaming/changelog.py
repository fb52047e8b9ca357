"""Restoring a changelog-backed state store, Kafka Streams style.

A stateful handler writes every change of its state as a keyed record to a compacted
changelog topic: partition n of the changelog holds the state of input partition n, the
latest record of a key is its value and a tombstone (value None) deletes it. Written in
the same Kafka transaction as the handler's outputs and consumed offsets, the changelog
read with ``isolation.level=read_committed`` holds exactly the state that goes with the
committed offsets: reading it back on assignment restores the state of a crashed (or
moved) worker, and processing resumes from the committed offsets as if nothing happened.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from camoe.clients.kafka import Kafka, consumer_config

log = logging.getLogger(__name__)

# partition -> key -> latest value
State = dict[int, dict[str, dict[str, Any]]]


def read_changelog(
    kafka: Kafka,
    topic: str,
    codec: Any,
    partitions: list[int],
    timeout_s: float = 120.0,
) -> State:
    """The committed state of ``partitions`` of ``topic``: each key's latest value, deleted
    keys left out. Reads each partition from its beginning to its end with a consumer of
    its own (no group: it commits nothing)."""
    state: State = {p: {} for p in partitions}
    if not partitions:
        return state
    # The group is required by the client and never joined; read-committed: aborted
    # transactions (a crashed worker's last batch) are not state. The end of a partition
    # (its last stable offset) is reported as an event: offsets alone cannot tell,
    # transaction markers occupy offsets too.
    consumer = Consumer(
        consumer_config(kafka, f"{topic}-restore", **{"enable.partition.eof": True})
    )
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        remaining = set(partitions)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic}: partitions {sorted(remaining)} not read to their end "
                    f"within {timeout_s:.0f}s"
                )
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(message.partition())
                    elif error.fatal():
                        raise KafkaException(error)
                    else:
                        log.warning("%s: restore consumer error %s", topic, error)
                    continue
                key = message.key().decode()
                if message.value() is None:
                    state[message.partition()].pop(key, None)
                else:
                    state[message.partition()][key] = codec.decode(message.value())
    finally:
        consumer.close()
    return state
