"""Kafka clients log one line per change of their connection, and librdkafka's own
lines at most once a minute per kind (camoe/clients/kafka.py)."""

from __future__ import annotations

import json
import logging

import pytest
from confluent_kafka import KafkaError

import camoe.clients.kafka as kafka
from camoe.clients.kafka import BrokerWatch, RateLimit, consumer_config, producer_config


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, message, None, None)


def test_rate_limit_lets_one_line_of_a_kind_through_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(kafka.time, "monotonic", lambda: clock[0])
    limit = RateLimit(interval_s=60.0)
    refused = "FAIL [rdkafka#consumer-1] [thrd:b]: Connect to 127.0.0.1:9 failed: refused"
    assert limit.filter(_record(refused))
    assert not any(limit.filter(_record(refused)) for _ in range(500))  # 10 s of attempts
    assert limit.filter(_record("FAIL [rdkafka#producer-2] [thrd:b]: refused"))  # another client
    assert limit.filter(_record("REQTMOUT [rdkafka#consumer-1] timed out"))  # another kind
    clock[0] += 61.0
    record = _record(refused)
    assert limit.filter(record)
    assert record.getMessage().endswith("(500 more like it held back)")


def _stats(*states: tuple[int, str]) -> str:
    return json.dumps({"brokers": {f"b{n}": {"nodeid": n, "state": state} for n, state in states}})


def test_broker_watch_logs_each_change_of_the_connection_once(caplog, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(kafka.time, "monotonic", lambda: clock[0])
    watch = BrokerWatch("consumer camoe-scoring")
    caplog.set_level(logging.INFO, logger="camoe.clients.kafka")
    watch.on_stats(_stats((1, "UP")))  # up all along: nothing to say
    for _ in range(200):
        watch.on_error(KafkaError(KafkaError._TRANSPORT, "Connect to 127.0.0.1:9 failed"))
    watch.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    clock[0] = 12.4
    watch.on_stats(_stats((-1, "UP"), (1, "CONNECT")))  # the bootstrap connection only
    watch.on_stats(_stats((-1, "UP"), (1, "UP")))
    watch.on_stats(_stats((1, "UP")))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "consumer camoe-scoring: broker unreachable (Connect to 127.0.0.1:9 failed), retrying",
        "consumer camoe-scoring: broker back after 12 s",
    ]
    watch.on_error(KafkaError(KafkaError._MSG_TIMED_OUT, "message timed out"))
    assert caplog.records[-1].levelno == logging.WARNING


@pytest.mark.parametrize(
    "config", [consumer_config("127.0.0.1:9", "g"), producer_config("127.0.0.1:9")]
)
def test_every_client_config_routes_its_reports_to_a_watch(config):
    assert config["logger"] is kafka.LIBRDKAFKA_LOG
    assert config["error_cb"].__self__.__class__ is BrokerWatch
    assert config["stats_cb"].__self__ is config["error_cb"].__self__
    assert config["statistics.interval.ms"] == BrokerWatch.STATS_INTERVAL_MS


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (KafkaError._AUTHENTICATION, "check kafka.security.username and kafka.security.password"),
        (KafkaError._SSL, "check kafka.security.ca_file"),
    ],
)
def test_a_refusal_stops_the_client_with_one_line_and_librdkafkas_copy_is_dropped(code, says):
    watch = BrokerWatch("consumer camoe-labeler")
    reason = "sasl_ssl://127.0.0.1:1/bootstrap: certificate verify failed (after 5ms in state X)"
    with pytest.raises(kafka.KafkaAccessError) as refused:
        watch.on_error(KafkaError(code, reason))
    line = str(refused.value)
    assert line.startswith("kafka refused the consumer camoe-labeler: sasl_ssl://")
    assert says in line and "\n" not in line and "after 5ms" not in line
    # A TLS connection cut mid-stream is not a refusal: the client retries it.
    watch.on_error(KafkaError(KafkaError._SSL, "SSL transport error: connection reset"))
    assert not kafka.Refusals().filter(_record("FAIL [rdkafka#consumer-1] SSL handshake failed"))
    assert kafka.Refusals().filter(_record("FAIL [rdkafka#consumer-1] Connection refused"))
