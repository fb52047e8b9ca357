"""The Kafka broker killed (SIGKILL) mid-run and restarted on the same log folder, with the
scorer (in each delivery guarantee), the labeler and the trainer running: nothing lost,
nothing doubled where exactly-once is promised, the labels those of the simulator's
clicks, and one log line per change of each client's connection, not one per attempt."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from camoe.clients.kafka import read_committed
from camoe.settings import Settings
from camoe.sim.loop import demo_settings, run_loop
from camoe.stack import kafka
from camoe.stack.process import stop_pid
from camoe.streaming.avro import AvroCodec
from tests.integration.conftest import outage

log = logging.getLogger(__name__)
KILL_AFTER_S = 25.0  # the trainer has published before it (its first candidates may be gated)
DOWN_S = 12.0
COMPONENTS = ("score", "label", "train")


@pytest.fixture(scope="module")
def broker(services, tmp_path_factory) -> Iterator[tuple[Path, list[int], str]]:
    """A broker of these tests' own (the session's serves the other tests), as
    (its folder, [its pid, kept current across restarts], its address)."""
    settings, _ = services
    folder = tmp_path_factory.mktemp("broker")
    pid, bootstrap = kafka.start_broker(
        settings.kafka, folder, folder / "kafka.log", settings.stack.startup_timeout_s
    )
    pids = [pid]
    yield folder, pids, bootstrap
    stop_pid(pids[0])


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_broker_killed_and_restarted_mid_run_loses_nothing(services, broker, guarantee):
    settings, _ = services
    folder, pids, bootstrap = broker
    settings = demo_settings(settings)
    settings = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": bootstrap}),
            "scoring": settings.scoring.model_copy(update={"guarantee": guarantee}),
        }
    )
    topics: dict[str, str] = {}

    @contextmanager
    def watch(run: Settings, *_: Any) -> Iterator[dict[str, Any]]:
        """Kills the broker KILL_AFTER_S into the traffic and restarts it DOWN_S later."""
        topics.update(scores=run.kafka.topics.ad_scores.name)
        topics.update(labels=run.kafka.topics.labelled_events.name)
        topics.update(updates=run.kafka.topics.model_updates.name)
        timeout = run.stack.startup_timeout_s
        with outage(
            pids,
            lambda: kafka.restart_broker(run.kafka, folder, folder / "kafka.log", timeout)[0],
            KILL_AFTER_S,
            DOWN_S,
            Path(run.stack.state_dir) / "logs",
            COMPONENTS,
        ) as seen:
            yield seen
        # A producer can take a minute to reconnect once the broker is back (see the
        # README): the trainer's first announcement after the restart may come late.
        updates, deadline = AvroCodec("model_update").decode, time.monotonic() + 90
        while time.monotonic() < deadline and not any(
            u["published_at"] > seen["restarted"]
            for u in read_committed(bootstrap, topics["updates"], updates, idle_s=1.0)
        ):
            time.sleep(2)

    summary = run_loop(settings, duration_s=60.0, drain_s=40.0, watch=watch)
    seen = summary["watch"]
    assert "killed" in seen and "restarted" in seen, seen
    assert summary["component_failures"] == {}

    # Every request scored once as the driver saw it; in exactly-once mode the committed
    # output holds each request's scores exactly once.
    assert summary["scored"] == summary["requests"] > 0, summary
    answers = read_committed(bootstrap, topics["scores"], AvroCodec("ad_scores").decode)
    scored = Counter(s["request_id"] for s in answers)
    assert len(scored) == summary["requests"]
    doubled = sum(n > 1 for n in scored.values())
    if guarantee == "exactly-once":
        assert doubled == 0
    log.info("%s: %d requests, %d scored twice", guarantee, len(scored), doubled)

    # The labeler is exactly-once: one negative per impression (fake-negative mode), one
    # positive per click the simulator sent, nothing more.
    labels = read_committed(bootstrap, topics["labels"], AvroCodec("labelled_event").decode)
    negatives = Counter(e["impression"]["request_id"] for e in labels if e["label"] == 0)
    positives = [e for e in labels if e["label"] == 1]
    unlabelled = {s["request_id"]: s for s in answers if s["request_id"] not in negatives}
    assert not unlabelled, (
        f"{len(unlabelled)} of {len(scored)} scored requests have no label",
        sorted({s["model_version"] for s in unlabelled.values()})[:5],
        list(unlabelled)[:3],
    )
    assert max(negatives.values()) == 1
    assert len(positives) == summary["clicks"] == summary["positive_labels"]
    assert summary["labels"] == summary["requests"] + summary["clicks"]

    # The trainer published on both sides of the outage (its quality gate may hold some
    # candidates back, and its producer can take a while to reconnect).
    published = [
        u["published_at"]
        for u in read_committed(bootstrap, topics["updates"], AvroCodec("model_update").decode)
    ]
    assert min(published) < seen["killed"] and max(published) > seen["restarted"], published

    # No log flood: librdkafka's refused connections (about twenty a second per client
    # while the broker is down) come through once a minute per client at most, and the
    # outage is one line when a client loses the cluster and one when it is back (a
    # client blocked in a call the whole time, like a transaction waiting for the broker,
    # has nothing to report).
    logs = Path(settings.stack.state_dir) / "logs"
    texts = {
        name: (logs / f"{name}.log").read_bytes()[start:].decode()
        for name, start in seen["log_starts"].items()
    }
    for name, text in texts.items():
        assert text.count("Connection refused") <= 6, (name, text[-3000:])
    for name, text in texts.items():
        reported = "broker unreachable" in text and "broker back after" in text
        assert reported or "hung for" in text, (name, "outage not reported", text[-3000:])
    if guarantee == "at-least-once":  # no transaction to block the scorer's callbacks
        assert "broker unreachable" in texts["score"] and "broker back after" in texts["score"]
