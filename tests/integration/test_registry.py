"""Every topic contract through the real broker in the Confluent wire format, with
confluent-kafka's in-process ``mock://`` registry (no registry server installs here):
written by one codec, read back by another that resolves the writer by schema id."""

from __future__ import annotations

import uuid

from confluent_kafka import Producer

from camoe.clients.kafka import create_topics, producer_config, read_committed
from camoe.settings import TopicSpec
from camoe.streaming.avro import SCHEMA_FILES, ConfluentAvroCodec, codec_for
from tests.unit.test_avro import CLICK, SAMPLES, ad_click_with_source, assert_same


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer(producer_config(bootstrap))
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(30) == 0, "records not acknowledged"


def test_every_contract_through_the_broker_in_the_wire_format(services):
    _, endpoints = services
    url, suffix = f"mock://{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:6]
    topics = {name: f"registry-{name}-{suffix}" for name in SCHEMA_FILES}
    create_topics(endpoints.kafka, [TopicSpec(name=t) for t in topics.values()])
    for name, topic in topics.items():
        _produce(endpoints.kafka, topic, [codec_for(name, url, topic).encode(SAMPLES[name])])
    for name, topic in topics.items():
        reader = codec_for(name, url, topic)
        (record,) = read_committed(endpoints.kafka, topic, reader.decode, idle_s=1.0)
        assert_same(record, SAMPLES[name])


def test_old_and_new_writers_on_one_topic_are_read_by_old_and_new_readers(services):
    _, endpoints = services
    url, topic = f"mock://{uuid.uuid4().hex[:8]}", f"registry-clicks-{uuid.uuid4().hex[:6]}"
    create_topics(endpoints.kafka, [TopicSpec(name=topic)])
    subject = f"{topic}-value"
    old = ConfluentAvroCodec("ad_click", url, subject)
    new = ConfluentAvroCodec("ad_click", url, subject, schema=ad_click_with_source())
    _produce(endpoints.kafka, topic, [old.encode(CLICK), new.encode({**CLICK, "source": "web"})])
    assert read_committed(endpoints.kafka, topic, old.decode, idle_s=1.0) == [CLICK, CLICK]
    assert read_committed(endpoints.kafka, topic, new.decode, idle_s=1.0) == [
        {**CLICK, "source": "app"},
        {**CLICK, "source": "web"},
    ]
