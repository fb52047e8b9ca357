"""Scoring under faults: Triton outages, and the scoring process killed with SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from camoe.clients.feature_store import OnlineFeatures, apply_and_materialize, open_store
from camoe.clients.kafka import create_topics, group_members
from camoe.clients.triton import TritonClient
from camoe.settings import StreamSettings, TopicSpec
from camoe.sim.loop import run_topics
from camoe.sim.traffic import World
from camoe.stack import triton
from camoe.stack.process import stop_pid
from camoe.streaming.app import Record, StreamApp
from camoe.streaming.avro import AvroCodec
from camoe.streaming.metrics import serve
from camoe.supervisor import write_settings
from consumers.scoring import Scorer
from tests.conftest import copy_repos
from trainer.export import Publisher
from trainer.model import build_served_camoe
from trainer.train import fit

REQUESTS = AvroCodec("ad_request")
SCORES = AvroCodec("ad_scores")


@pytest.fixture(scope="module")
def world(services, tmp_path_factory):
    """Own topics, feature repository and Triton (this test stops it), model version 1."""
    settings, endpoints = services
    root = tmp_path_factory.mktemp("trouble")
    feature_repo, model_repo = copy_repos(root)
    renamed = run_topics(settings, "trouble").kafka.topics
    s = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"topics": renamed}),
            "feast": settings.feast.model_copy(
                update={"repo_path": feature_repo, "online_store": "sqlite"}
            ),
            "triton": settings.triton.model_copy(update={"model_repo": model_repo}),
        }
    )
    sim = World(s.simulator)
    sim.write_offline_data(feature_repo / "data")
    apply_and_materialize(open_store(s.feast))
    create_topics(endpoints.kafka, s.kafka.topics.all())
    server = {"log": root / "triton.log"}
    server["pid"], server["grpc"], _ = triton.start_server(model_repo, server["log"], 90, [])
    model = build_served_camoe(s)
    history = sim.history(1000)
    fit(model, history, epochs=1)
    check = (history["categorical"][:8], history["numeric"][:8], history["format"][:8])
    Publisher(model_repo, "camoe", TritonClient(server["grpc"])).publish(model, check)
    yield s, endpoints, sim, server, model_repo
    stop_pid(server["pid"])


def _send(producer, topic, sim, rng, n):
    ids = []
    for _ in range(n):
        request = sim.request(rng, int(time.time() * 1000))
        producer.produce(topic, key=request["request_id"], value=REQUESTS.encode(request))
        ids.append(request["request_id"])
    assert producer.flush(10) == 0
    return ids


def _read_until(consumer, scores, expected, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not expected <= set(scores) and time.monotonic() < deadline:
        for message in consumer.consume(500, 0.2):
            if message.error() is None:
                value = SCORES.decode(message.value())
                scores.setdefault(value["request_id"], []).append(value)


@pytest.mark.parametrize("policy", ["fallback", "hold"])
def test_triton_outage(world, policy, tmp_path):
    """Triton killed, then back without a loadable model, then back with it: every request
    is scored (held or answered by the fallback, as the policy says), none dead-lettered."""
    settings, endpoints, sim, server, model_repo = world
    s = settings.model_copy(
        update={
            "scoring": settings.scoring.model_copy(
                update={"triton_policy": policy, "hold_retry_s": 0.5, "triton_retries": 2}
            )
        }
    )
    topics = s.kafka.topics
    group = f"scoring-{policy}-{uuid.uuid4().hex[:6]}"
    broken_repo = tmp_path / "broken_repo"
    shutil.copytree(model_repo, broken_repo)
    for model_file in broken_repo.glob("camoe/[0-9]*/model.onnx"):
        model_file.write_bytes(b"not an onnx file")
    scorer = Scorer(
        s,
        OnlineFeatures(open_store(s.feast), s.feast.feature_service),
        TritonClient(server["grpc"], timeout_s=1.0),
    )
    app = StreamApp(
        "scoring",
        endpoints.kafka,
        {topics.ad_requests.name: REQUESTS},
        {topics.ad_scores.name: SCORES, topics.feature_log.name: AvroCodec("feature_log")},
        topics.dead_letters.name,
        StreamSettings(group_id=group, batch_size=64, poll_timeout_s=0.05),
    )
    stop = threading.Event()
    thread = threading.Thread(target=app.run, args=(scorer, stop), daemon=True)
    thread.start()
    consumer = Consumer(
        {
            "bootstrap.servers": endpoints.kafka,
            "group.id": uuid.uuid4().hex,
            # From the start: a reader that joins after the first scores would miss them.
            # The other policy's scores on these topics have other request ids.
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topics.ad_scores.name])
    producer = Producer({"bootstrap.servers": endpoints.kafka})
    rng = np.random.default_rng(1)
    scores: dict[str, list[dict]] = {}
    try:
        before = set(_send(producer, topics.ad_requests.name, sim, rng, 200))
        _read_until(consumer, scores, before, 60)
        assert before <= set(scores)

        grpc_port = int(server["grpc"].rsplit(":", 1)[1])
        stop_pid(server["pid"])
        during = set(_send(producer, topics.ad_requests.name, sim, rng, 200))
        time.sleep(4)
        # Back, but its model cannot load: Triton answers NOT_FOUND ("no available
        # versions"), which is the server's state, not the requests' fault.
        server["pid"], server["grpc"], _ = triton.start_server(
            broken_repo, server["log"], 90, ["camoe"], grpc_port=grpc_port
        )
        no_model = set(_send(producer, topics.ad_requests.name, sim, rng, 200))
        time.sleep(4)
        stop_pid(server["pid"])
        server["pid"], server["grpc"], _ = triton.start_server(
            model_repo, server["log"], 90, ["camoe"], grpc_port=grpc_port
        )
        after = set(_send(producer, topics.ad_requests.name, sim, rng, 200))
        _read_until(consumer, scores, before | during | no_model | after, 90)
    finally:
        stop.set()
        thread.join(30)
        consumer.close()

    sent = before | during | no_model | after
    assert sent <= set(scores), f"{len(sent - set(scores))} requests never scored"
    assert app.counters["dead_letters"] == 0, "valid requests dead-lettered for Triton's state"
    versions = {v["model_version"] for r in sent for v in scores[r]}
    fallback = [v for r in during | no_model for v in scores[r] if v["model_version"] == "fallback"]
    if policy == "fallback":
        assert fallback, "no request was answered by the fallback during the outage"
        assert any(v["model_version"] == "fallback" for r in no_model for v in scores[r]), (
            "no request was answered by the fallback while the model could not load"
        )
        assert all("fallback" in v["flags"] for v in fallback)
        assert scorer.counts["fallback_batches"] > 0
    else:
        assert versions == {"1"}, versions  # held until Triton was back: real scores only
        assert app.counters["retried_batches"] > 0


def _scoring_settings(world, tmp_path, **scoring):
    """The world's settings for `camoe score` subprocesses, written to a config file."""
    settings, endpoints, _, server, _ = world
    s = settings.model_copy(
        update={
            "scoring": settings.scoring.model_copy(
                update={"group_id": f"scoring-{uuid.uuid4().hex[:6]}", **scoring}
            ),
            "triton": settings.triton.model_copy(update={"url": server["grpc"]}),
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": endpoints.kafka}),
            "stack": settings.stack.model_copy(update={"state_dir": tmp_path}),
        }
    )
    return s, write_settings(s, tmp_path / "settings.yaml")


def _start_scorer(config, log, worker=0):
    env = {**os.environ, "CAMOE_CONFIG": str(config), "CAMOE_WORKER_ID": str(worker)}
    return subprocess.Popen(
        [sys.executable, "-m", "camoe.cli", "score"], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _wait_members(bootstrap, group, n, processes, log_path, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while group_members(bootstrap, group) < n:
        assert all(p.poll() is None for p in processes), f"a scorer died; see {log_path}"
        assert time.monotonic() < deadline, f"scorers did not join their group; see {log_path}"
        time.sleep(0.3)


def _all_scores(bootstrap, topic, sent, timeout_s):
    """Every score of ``sent`` requests in the committed output, duplicates included."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    scores: dict[str, list[dict]] = {}
    _read_until(consumer, scores, sent, timeout_s)
    _read_until(consumer, scores, sent | {"late duplicates"}, 3)
    consumer.close()
    return scores


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_sigkill_loses_nothing(world, guarantee, tmp_path):
    _, endpoints, sim, _, _ = world
    s, config = _scoring_settings(world, tmp_path, guarantee=guarantee)
    n = 20_000
    producer = Producer({"bootstrap.servers": endpoints.kafka, "linger.ms": 20})
    sent = set(_send(producer, s.kafka.topics.ad_requests.name, sim, np.random.default_rng(7), n))
    rng = np.random.default_rng(3)
    kills = 0
    log_path = tmp_path / "score.log"
    with log_path.open("ab") as log:
        while kills < 5:
            process = _start_scorer(config, log)
            _wait_members(endpoints.kafka, s.scoring.group_id, 1, [process], log_path)
            time.sleep(float(rng.uniform(0.5, 3.0)))  # a random moment mid-batch
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        process = _start_scorer(config, log)
        try:
            scores = _all_scores(endpoints.kafka, s.kafka.topics.ad_scores.name, sent, 300)
        finally:
            process.terminate()
            process.wait(30)

    assert sent <= set(scores), f"{len(sent - set(scores))} of {n} requests never scored"
    duplicates = sum(len(scores[r]) - 1 for r in sent)
    if guarantee == "exactly-once":
        assert duplicates == 0
    else:
        # Each kill can repeat at most the batches produced but not yet committed: those
        # awaiting acknowledgement and the one being produced.
        in_flight = (s.scoring.in_flight_batches + 1) * s.scoring.batch_size
        assert duplicates <= kills * in_flight, duplicates


def test_killed_workers_partitions_move_to_the_other(world, tmp_path):
    _, endpoints, sim, _, _ = world
    s, config = _scoring_settings(world, tmp_path)
    log_path = tmp_path / "score.log"
    with log_path.open("ab") as log:
        workers = [_start_scorer(config, log, worker) for worker in (0, 1)]
        try:
            _wait_members(endpoints.kafka, s.scoring.group_id, 2, workers, log_path)
            producer = Producer({"bootstrap.servers": endpoints.kafka, "linger.ms": 20})
            rng, topic = np.random.default_rng(9), s.kafka.topics.ad_requests.name
            first = set(_send(producer, topic, sim, rng, 4_000))
            _all_scores(endpoints.kafka, s.kafka.topics.ad_scores.name, first, 180)
            workers[1].send_signal(signal.SIGKILL)
            workers[1].wait()
            # Sent after the kill: those on the dead worker's partitions are scored only
            # once its partitions have moved to the survivor.
            sent = first | set(_send(producer, topic, sim, rng, 4_000))
            scores = _all_scores(endpoints.kafka, s.kafka.topics.ad_scores.name, sent, 180)
            members = group_members(endpoints.kafka, s.scoring.group_id)
        finally:
            for worker in workers:
                worker.terminate()
                worker.wait(30)
    assert sent <= set(scores), f"{len(sent - set(scores))} requests never scored"
    assert members == 1  # the survivor holds all four partitions
    assert log_path.read_text().count("assigned 2 partitions") >= 2  # they shared at first


def _malformed(sim, rng, n, max_candidates):
    """Valid requests, byte-level mutations of them, and well-formed but bad requests."""
    records = []
    for i in range(n):
        request = sim.request(rng, int(time.time() * 1000))
        kind = i % 6
        if kind == 1:  # flip, cut or extend the encoded bytes
            data = bytearray(REQUESTS.encode(request))
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            cut = [bytes(data), bytes(data[: int(rng.integers(len(data)))]), bytes(data) + b"!"]
            records.append(cut[int(rng.integers(3))])
            continue
        if kind == 2:  # not Avro, or another topic's record
            records.append(
                [
                    bytes(rng.integers(0, 256, int(rng.integers(0, 64))).tolist()),
                    AvroCodec("ad_click").encode(
                        {"request_id": "r", "ad_id": "a", "user_id": "u", "event_time": 1}
                    ),
                ][int(rng.integers(2))]
            )
            continue
        if kind == 5 and i % 12 == 11:  # valid at the edges: long ago, and at the maximum
            request["event_time"] = 1
            request["candidates"] = (request["candidates"] * max_candidates)[:max_candidates]
        if kind == 3:
            bad = int(rng.integers(7))
            if bad == 0:
                request["candidates"] = []
            elif bad == 1:
                request["candidates"] = request["candidates"] * 40  # over max_candidates
            elif bad == 2:
                request["candidates"][0]["format"] = "hologram"
            elif bad == 3:
                request["candidates"][0]["bid"] = float("nan")
            elif bad == 4:
                request["candidates"][0]["bid"] = -1.0
            elif bad == 5:
                request["candidates"][0]["bid"] = 1e300  # finite, but not as float32
            else:
                request["event_time"] += 86_400_000  # a day ahead of the clock
        if kind == 4:  # scored with defaults and flags: unknown user, ad, context values
            request["user_id"] = f"stranger-{i}"
            request["candidates"][0]["ad_id"] = f"unknown-ad-{i}"
            request["context"].update(device="fridge", placement="moon", hour=99)
        records.append(REQUESTS.encode(request))
    return records


def _scorer(settings, server):
    """An in-process scorer over the world's features and Triton, without caches."""
    return Scorer(
        settings,
        OnlineFeatures(open_store(settings.feast), settings.feast.feature_service),
        TritonClient(server["grpc"]),
    )


def test_malformed_input_is_dead_lettered_or_flagged_never_fatal(world):
    settings, endpoints, sim, server, _ = world
    topics = settings.kafka.topics
    source = f"fuzz-requests-{uuid.uuid4().hex[:6]}"  # holds only this test's records
    create_topics(endpoints.kafka, [TopicSpec(name=source, partitions=4)])
    # Waves of 16: the requests of a batch of 64 that pass validation (flagged strangers
    # among them) go to Triton in up to four waves, the last one short.
    waves = settings.scoring.model_copy(update={"triton_chunk_requests": 16})
    scorer = _scorer(settings.model_copy(update={"scoring": waves}), server)
    app = StreamApp(
        "scoring",
        endpoints.kafka,
        {source: REQUESTS},
        {topics.ad_scores.name: SCORES, topics.feature_log.name: AvroCodec("feature_log")},
        topics.dead_letters.name,
        StreamSettings(group_id=f"fuzz-{uuid.uuid4().hex[:6]}", batch_size=64, poll_timeout_s=0.05),
    )
    n = 3_000
    records = _malformed(sim, np.random.default_rng(11), n, settings.scoring.max_candidates)
    start_scores = _end_offsets(endpoints.kafka, topics.ad_scores.name)
    start_letters = _end_offsets(endpoints.kafka, topics.dead_letters.name)
    producer = Producer({"bootstrap.servers": endpoints.kafka})
    for data in records:
        producer.produce(source, value=data)
    assert producer.flush(10) == 0
    app.run(scorer, threading.Event(), max_idle_s=5.0)  # returns when the input is drained

    scored = _read_from(endpoints.kafka, topics.ad_scores.name, start_scores, SCORES)
    letters = _read_from(
        endpoints.kafka, topics.dead_letters.name, start_letters, AvroCodec("dead_letter")
    )
    assert app.counters["consumed"] == n
    assert len(scored) + len(letters) == n, (len(scored), len(letters))
    assert all(letter["reason"] and letter["consumer"] == "scoring" for letter in letters)
    reasons = " ".join(letter["reason"] for letter in letters)
    for expected in (
        "no candidates",
        "more than scoring.max_candidates",
        "unknown format",
        "invalid bid",
        "not an Avro",
        "ahead of the clock, more than scoring.max_clock_skew_s",
    ):
        assert expected in reasons, expected
    edges = [s for s in scored if s["event_time"] == 1]  # long ago, at the most candidates
    assert edges and all(len(s["scores"]) == settings.scoring.max_candidates for s in edges)
    flagged = [s for s in scored if {"unknown_user", "unknown_ad"} <= set(s["flags"])]
    assert len(flagged) >= n // 6 - 5  # every stranger request scored, and flagged
    assert all(np.isfinite(c["pctr"]) for s in scored for c in s["scores"])


def _end_offsets(bootstrap, topic):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in metadata.partitions
    }
    consumer.close()
    return ends


def _read_from(bootstrap, topic, starts, codec):
    end = _end_offsets(bootstrap, topic)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
    values, remaining = [], sum(end[p] - starts[p] for p in starts)
    deadline = time.monotonic() + 60
    while remaining > 0 and time.monotonic() < deadline:
        for message in consumer.consume(500, 0.5):
            if message.error() is None:
                values.append(codec.decode(message.value()))
                remaining -= 1
    consumer.close()
    return values


def test_metrics_are_served_on_loopback(world):
    settings, _, sim, server, _ = world
    scorer = _scorer(settings, server)
    rng = np.random.default_rng(5)
    records = [
        Record("t", 0, i, None, sim.request(rng, int(time.time() * 1000)), b"") for i in range(10)
    ]
    scorer(records)
    port = serve(scorer.metrics.registry, 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "camoe_scoring_requests_total 10.0" in text
    assert (
        f"camoe_scoring_candidates_total {10 * settings.simulator.candidates_per_request}.0" in text
    )
    assert 'camoe_scoring_stage_seconds_count{stage="inference"} 1.0' in text
    assert "camoe_scoring_model_version 1.0" in text


def test_top_renders_a_scorers_metrics(world):
    from consumers.top import watch

    settings, _, sim, server, _ = world
    scorer = _scorer(settings, server)
    port = serve(scorer.metrics.registry, 0)
    rng = np.random.default_rng(6)
    views: list[str] = []

    def show(view):
        views.append(view)
        records = [
            Record("t", 0, i, None, sim.request(rng, int(time.time() * 1000)), b"")
            for i in range(20)
        ]
        scorer(records)  # traffic between two scrapes

    watch(f"http://127.0.0.1:{port}/metrics", 0.2, show, rounds=2)
    assert "requests 0 " in views[0]
    assert "requests 20 " in views[1] and "/s)" in views[1]
    assert "inference" in views[1] and "end to end" in views[1]


@pytest.mark.parametrize("partitioning", ["batch", "key"])
def test_scores_go_to_one_partition_per_batch_in_turn_or_by_key(world, partitioning):
    settings, _, sim, server, _ = world
    s = settings.model_copy(
        update={
            "scoring": settings.scoring.model_copy(update={"scores_partitioning": partitioning})
        }
    )
    scorer = Scorer(
        s,
        OnlineFeatures(open_store(s.feast), s.feast.feature_service),
        TritonClient(server["grpc"]),
        scores_partitions=3,
    )
    rng = np.random.default_rng(9)
    topics = s.kafka.topics
    chosen = []
    for _ in range(4):
        records = [
            Record("t", 0, i, None, sim.request(rng, int(time.time() * 1000)), b"")
            for i in range(5)
        ]
        outputs = scorer(records).outputs
        scores = [o for o in outputs if o.topic == topics.ad_scores.name]
        assert len(scores) == 5 and all(o.key == o.value["request_id"] for o in scores)
        # The feature log stays partitioned by request id: the labeler joins it with the
        # clicks partition by partition.
        assert all(o.partition is None for o in outputs if o.topic == topics.feature_log.name)
        chosen.append({o.partition for o in scores})
    if partitioning == "batch":
        assert chosen == [{1}, {2}, {0}, {1}]
    else:
        assert chosen == [{None}] * 4
