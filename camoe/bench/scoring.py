"""Scoring benchmark: the scoring consumer through the real broker, Feast (Redis) and
Triton, next to three floors measured in the same run.

* fixed load: ``rate`` requests/s for ``warmup_s`` then ``seconds`` (4 candidates each,
  as the simulator makes them) into a running scorer, from a client that sends every
  5 ms (``_produce``); latency is request event time to the scores record read back,
  p50 / p99 over the ``seconds`` after the warm-up, with a histogram, and the p99 of
  each 10 s of them (one slow stretch shows there). The warm-up is the same traffic,
  not counted. It is long because the broker is a JVM: in three runs its JIT compiler
  took 87 to 98% of a core for the first 20 to 30 s of traffic and 57 to 72% in the
  next 10, against 40 to 50% once warm, and requests waited hundreds of ms behind it.
  That is start-up, not the latency a running system serves.
* saturation: that scorer stops; ``requests`` requests are produced, then a fresh
  scoring process drains them; requests/s and candidates/s from its first to its last
  score (the records' produce timestamps, read back without decoding). The scores are
  read once the scorer has committed the whole backlog, so that, like the passthrough
  floor, it has the machine to itself (a reader alongside took about a tenth of it).
* latency floor: the same fixed load (a 10 s warm-up, then ``seconds``) through a raw
  relay (``relay``: consume what has arrived, decode, encode, produce, as the scorer's
  loop does, without the scoring or its batch interval) between topics of its own; timed
  the same way. The broker's hops and the machine's own pauses are in it, so the
  pipeline's latency is also given as a ratio to it.
* throughput floors, each the same work done by the simplest real thing:
  - Kafka passthrough: consume ``requests`` of the same topic, decode, encode, produce,
    flush;
  - model forward: the in-process CAMoE forward on the same batches (torch, no Triton);
  - Redis read: the same feature hashes read with one pipelined HMGET per entity and
    view, without Feast (no protobuf parsing, no response building).
Every figure is reported with its ratio to the pipeline.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from camoe.bench.figures import pyplot, save
from camoe.clients.kafka import (
    Kafka,
    committed_offsets,
    consumer_config,
    create_topics,
    producer_config,
)
from camoe.features import FeatureLayout
from camoe.settings import Settings, TopicSpec
from camoe.sim.loop import prepare, run_topics
from camoe.sim.traffic import World
from camoe.stack.stack import Endpoints, Stack
from camoe.streaming.app import consume_batch
from camoe.streaming.avro import AvroCodec
from camoe.supervisor import secret_environment, write_settings

log = logging.getLogger(__name__)

REQUESTS = AvroCodec("ad_request")
SCORES = AvroCodec("ad_scores")
TICK_S = 0.005  # the fixed load's client sends every 5 ms
WINDOW_S = 10  # the fixed load's p99 and steal are also given per 10 s
RELAY_WARMUP_S = 10  # the broker is warm by then: only the relay's own start-up


def _bench_settings(settings: Settings, endpoints: Endpoints, state: Path) -> Settings:
    """Own topics (so earlier traffic never counts), Redis as the online store, and the
    running services' addresses for the scoring subprocess."""
    settings = run_topics(settings, "bench")
    suffix = settings.kafka.topics.ad_requests.name.rsplit("-", 1)[-1]
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": endpoints.kafka}),
            "triton": settings.triton.model_copy(update={"url": endpoints.triton}),
            "redis": settings.redis.model_copy(update={"url": endpoints.redis}),
            "feast": settings.feast.model_copy(update={"online_store": "redis"}),
            "scoring": settings.scoring.model_copy(update={"group_id": f"bench-scoring-{suffix}"}),
            "stack": settings.stack.model_copy(update={"state_dir": state}),
        }
    )


def _produce(
    kafka: Kafka,
    topic: str,
    requests: list[dict[str, Any]],
    rate: float | None = None,
    started: ProcessEvent | None = None,
) -> None:
    """Produces requests; ``started``, an Event, is set when the producer is ready, just
    before the first goes out.

    Without ``rate``: all at once, event_time = the start. At ``rate`` per second: as an
    ad server's client that sends every ``TICK_S``: request i arrives at ``i / rate`` s
    (its event_time) and goes out with the others due at the next tick, so its wait for
    the tick counts in its latency as a client's linger would. (Sleeping until each
    request's own time, with a 5 ms linger, sent the same produce requests to the broker
    but took a quarter of a core here: 1,000 timer wake-ups a second.)
    """
    # The requests are never freed while producing: frozen, no garbage collection walks
    # them (each would hold the load up for 50 ms, then send it in a burst).
    gc.collect()
    gc.freeze()
    producer = Producer(producer_config(kafka, linger_ms=0.5))
    # Connected, with the topic's partitions known, before the first stamp: otherwise the
    # first records wait for that and their latency is the load generator's start-up.
    producer.list_topics(topic, timeout=10)
    if started is not None:
        started.set()
    begun, begun_ms = time.monotonic(), time.time() * 1000
    sent, tick = 0, 0
    while sent < len(requests):
        if rate is None:
            due = len(requests)
        else:
            # The next tick; after a stall, the last one passed: what is due goes at once,
            # and the ticks missed are not run one by one.
            tick = max(tick + 1, int((time.monotonic() - begun) / TICK_S))
            time.sleep(max(0.0, begun + tick * TICK_S - time.monotonic()))
            due = min(len(requests), int((time.monotonic() - begun) * rate) + 1)
        batch = []
        for i in range(sent, due):
            request = requests[i]
            request["event_time"] = int(begun_ms + (0 if rate is None else 1000 * i / rate))
            batch.append({"key": request["request_id"], "value": REQUESTS.encode(request)})
        producer.produce_batch(topic, batch)
        refused = [m["_error"] for m in batch if "_error" in m]
        if refused:
            raise RuntimeError(f"the load generator could not queue requests: {refused[0]}")
        producer.poll(0)
        sent = due
    producer.flush(30)


def _fresh_consumer(kafka: Kafka) -> Consumer:
    """A consumer in a group of its own, reading from the start, committing only when told."""
    return Consumer(consumer_config(kafka, uuid.uuid4().hex))


class ScoreReader:
    """Reads ad-scores (or, with ``codec``, another topic keyed by request id whose
    records carry its event time) back as they arrive.

    ``received``: request id -> (receive time, event time), from decoded records.
    ``produced``: request id -> when the scorer produced its scores (the record's
    timestamp), read without decoding, so that reading takes little CPU from a saturated
    scorer on the same cores. ``stages``: the scorer's timings, from the decoded records.
    """

    def __init__(self, kafka: Kafka, topic: str, codec: AvroCodec = SCORES) -> None:
        self._codec = codec
        self._consumer = _fresh_consumer(kafka)
        # Assigned, not subscribed: no group to be dropped from while the saturation
        # bench waits for the scorer without reading.
        partitions = self._consumer.list_topics(topic, 10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.received: dict[str, tuple[float, int]] = {}
        self.produced: dict[str, int] = {}
        self.stages: list[dict[str, float]] = []  # the scorer's own per-wave timings

    def read_until(
        self,
        expected: set[str],
        timeout_s: float,
        decode_every: int = 1,
        answering: Callable[[], bool] | None = None,
    ) -> None:
        """Reads until every id of ``expected`` has its scores; decodes one record in
        ``decode_every``. ``answering``: whether the process that answers still runs (when
        it has stopped, waiting out the timeout would only hide why)."""
        deadline = time.monotonic() + timeout_s
        left = set(expected) - set(self.produced)
        seen = 0
        while left and time.monotonic() < deadline:
            if answering is not None and not answering():
                raise RuntimeError(f"the process answering stopped; {len(left)} requests wait")
            for message in consume_batch(self._consumer, 1000, 0.1):
                if message.error() is not None:
                    continue
                request_id = message.key().decode()
                self.produced.setdefault(request_id, message.timestamp()[1])
                left.discard(request_id)
                seen += 1
                if seen % decode_every == 0:
                    now = time.time() * 1000
                    value = self._codec.decode(message.value())
                    self.received.setdefault(request_id, (now, value["event_time"]))
                    if "timings_ms" in value:
                        self.stages.append(value["timings_ms"])
        if left:
            raise RuntimeError(f"{len(left)} requests were not scored within {timeout_s}s")

    def close(self) -> None:
        self._consumer.close()


def _start_scorer(settings: Settings, config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "camoe.cli", "score"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CAMOE_CONFIG": str(config), **secret_environment(settings)},
        )


def _cpu_jiffies() -> list[int]:
    """The machine's CPU time so far by state (the ``cpu`` line of /proc/stat)."""
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:]]


def _cpu_during(
    started: ProcessEvent, start_s: float, seconds: float
) -> Callable[[], dict[str, Any]]:
    """Measures in a thread, from ``start_s`` after the Event ``started`` on for
    ``seconds``, how busy the cores were and how much time the hypervisor gave to other
    machines (steal), over the whole and per ``WINDOW_S``: the latency tail moves with
    both. Returns a function that waits for the figures (none off Linux)."""
    figures: dict[str, Any] = {}

    def shares(before: list[int], after: list[int]) -> tuple[float, float]:
        # user nice system idle iowait irq softirq steal (guest time is within user)
        delta = [b - a for a, b in zip(before[:8], after[:8], strict=True)]
        total, idle, steal = max(sum(delta), 1), delta[3] + delta[4], delta[7]
        return 100 * (total - idle - steal) / total, 100 * steal / total

    def measure() -> None:
        if not os.path.exists("/proc/stat") or not started.wait(300):
            return
        time.sleep(start_s)
        begun = time.monotonic()
        marks = [_cpu_jiffies()]
        while time.monotonic() - begun < seconds - 1e-3:
            time.sleep(max(0.0, begun + min(len(marks) * WINDOW_S, seconds) - time.monotonic()))
            marks.append(_cpu_jiffies())
        figures["busy_pct"], figures["steal_pct"] = shares(marks[0], marks[-1])
        figures["steal_pct_by_10s"] = [shares(a, b)[1] for a, b in itertools.pairwise(marks)]

    thread = threading.Thread(target=measure, daemon=True)
    thread.start()

    def result() -> dict[str, Any]:
        thread.join()
        return figures

    return result


def _wait_for_drain(
    kafka: Kafka, group_id: str, topic: str, scorer: subprocess.Popen[bytes], timeout_s: float
) -> None:
    """Waits until ``group_id`` has committed every record of ``topic``, looking only at
    offsets (no records are fetched)."""
    consumer = Consumer(consumer_config(kafka, group_id))
    try:
        partitions = consumer.list_topics(topic, 10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in partitions
        }
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if scorer.poll() is not None:
                raise RuntimeError(f"the scorer exited with code {scorer.returncode}")
            try:
                committed = committed_offsets(consumer, topic)
            except KafkaException as error:  # the coordinator busy: ask again
                log.warning("committed offsets: %s", error)
                committed = {}
            if committed and all(e == 0 or committed.get(p, -1) >= e for p, e in ends.items()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the scorer did not drain {topic} within {timeout_s:.0f}s")
    finally:
        consumer.close()


def _stop_scorer(scorer: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the scorer drains and commits what it has scored, then exits."""
    scorer.terminate()
    scorer.wait(60)


def relay(kafka: Kafka, source: str, sink: str, stop: ProcessEvent) -> None:
    """The latency floor: a raw consume-decode-encode-produce loop from ``source`` to
    ``sink`` until ``stop`` is set, shaped as the scorer's loop without the scoring and
    without its batch interval (so the floor is the broker's hops alone): batches of what
    has arrived, each to one partition in turn as the scorer's scores, the scorer's 0.5 ms
    linger, offsets committed asynchronously every 0.1 s."""
    consumer = _fresh_consumer(kafka)
    producer = Producer(producer_config(kafka, linger_ms=0.5))
    partitions = len(producer.list_topics(sink, 10).topics[sink].partitions)
    consumer.subscribe([source])
    committed, batches = 0.0, 0
    while not stop.is_set():
        messages = []
        for message in consume_batch(consumer, 512, 0.05):
            if message.error() is None:
                messages.append(message)
            else:
                log.warning("relay: consumer error %s", message.error())
        if not messages:
            continue
        batch = [
            {"key": m.key(), "value": REQUESTS.encode(REQUESTS.decode(m.value()))} for m in messages
        ]
        batches += 1
        producer.produce_batch(sink, batch, partition=batches % partitions)
        if any("_error" in m for m in batch):
            raise RuntimeError(f"relay: records to {sink} could not be queued")
        producer.poll(0)
        if time.monotonic() - committed >= 0.1:
            consumer.commit(asynchronous=True)
            committed = time.monotonic()
    if producer.flush(30):
        raise RuntimeError(f"relay: records to {sink} were not acknowledged")
    consumer.close()


def _fixed_load(
    kafka: Kafka,
    topic: str,
    reader: ScoreReader,
    first: dict[str, Any],
    warmup: list[dict[str, Any]],
    load: list[dict[str, Any]],
    rate: float,
    progress: Callable[[str], None],
    answering: Callable[[], bool],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Sends ``first`` and waits for its answer (so the load starts once whatever answers
    is ready), then ``warmup`` and ``load`` to ``topic`` at ``rate`` requests/s from a
    process of its own, as from an ad server (produced from a thread here, it would share this
    process's interpreter with the reader timing the answers); reads every answer back
    while ``answering`` says the process that answers still runs.
    Returns the measured requests' latencies (ms, in arrival order) and their figures:
    p50, p99, the p99 of each ``WINDOW_S``, the mean, and the cores' state meanwhile."""
    _produce(kafka, topic, [first])
    reader.read_until({first["request_id"]}, 300, answering=answering)
    warmup_s, seconds = len(warmup) / rate, len(load) / rate
    spawn = multiprocessing.get_context("spawn")
    load_started = spawn.Event()
    producer = spawn.Process(
        target=_produce,
        args=(kafka, topic, warmup + load, rate),
        kwargs={"started": load_started},
    )
    producer.start()
    cpu_figures = _cpu_during(load_started, warmup_s, seconds)
    everything = {r["request_id"] for r in warmup + load}
    reader.read_until(everything, warmup_s + seconds + 300, answering=answering)
    producer.join()
    if producer.exitcode:
        raise RuntimeError(f"the load generator failed (exit code {producer.exitcode})")
    latencies = np.array(
        [reader.received[r["request_id"]][0] - reader.received[r["request_id"]][1] for r in load]
    )
    window = int(rate * WINDOW_S)  # the load is in arrival order
    figures = {
        "offered_requests_per_s": rate,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "p99_ms_by_10s": [
            float(np.percentile(latencies[k : k + window], 99))
            for k in range(0, len(latencies), window)
        ],
        "mean_ms": float(latencies.mean()),
        "cpu": cpu_figures(),
    }
    progress(
        f"  p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms "
        f"(by 10 s: {', '.join(f'{v:.0f}' for v in figures['p99_ms_by_10s'])})"
    )
    cpu = figures["cpu"]
    if cpu:
        progress(
            f"  cores {cpu['busy_pct']:.0f}% busy, {cpu['steal_pct']:.1f}% stolen "
            f"(by 10 s: {', '.join(f'{v:.1f}' for v in cpu['steal_pct_by_10s'])})"
        )
    return latencies, figures


def _relay_load(
    kafka: Kafka,
    requests_topic: TopicSpec,
    warmup: list[dict[str, Any]],
    load: list[dict[str, Any]],
    rate: float,
    progress: Callable[[str], None],
) -> tuple[np.ndarray, dict[str, Any]]:
    """The fixed load through ``relay``, in a process of its own, between two topics
    partitioned as the requests topic; the last ``RELAY_WARMUP_S`` of ``warmup`` first."""
    source, sink = f"{requests_topic.name}-relay-in", f"{requests_topic.name}-relay-out"
    create_topics(
        kafka, [TopicSpec(name=t, partitions=requests_topic.partitions) for t in (source, sink)]
    )
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    process = spawn.Process(target=relay, args=(kafka, source, sink, stop))
    process.start()
    reader = ScoreReader(kafka, sink, REQUESTS)
    try:
        first = dict(load[0], request_id=f"{load[0]['request_id']}-first")
        warm = warmup[-int(rate * RELAY_WARMUP_S) :]
        result = _fixed_load(
            kafka, source, reader, first, warm, load, rate, progress, process.is_alive
        )
    finally:
        stop.set()
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()
        reader.close()
    if process.exitcode:
        raise RuntimeError(f"the relay failed (exit code {process.exitcode})")
    return result


def passthrough_floor(kafka: Kafka, source: str, sink: str, n: int) -> float:
    """Requests/s of a raw consume-decode-encode-produce loop over the same records."""
    consumer = _fresh_consumer(kafka)
    producer = Producer(producer_config(kafka, linger_ms=5))
    consumer.subscribe([source])
    done, started = 0, None
    deadline = time.monotonic() + 120
    while done < n and time.monotonic() < deadline:
        messages = consumer.consume(500, 0.5)
        if messages and started is None:
            started = time.monotonic()
        for message in messages:
            if message.error() is None:
                producer.produce(sink, value=REQUESTS.encode(REQUESTS.decode(message.value())))
                done += 1
        producer.poll(0)
        if messages:
            consumer.commit(asynchronous=False)
    if producer.flush(30):
        raise RuntimeError(f"passthrough: records to {sink} were not acknowledged")
    consumer.close()
    return done / (time.monotonic() - (started or time.monotonic()))


def forward_floor(
    settings: Settings, world: World, requests: list[dict[str, Any]], batch: int
) -> float:
    """Candidates/s of the in-process CAMoE forward on the same batches."""
    import torch

    from trainer.model import ServingModel
    from trainer.train import load_model

    model = load_model(settings, settings.trainer.checkpoint_dir / "model.pt")
    if model is None:
        raise RuntimeError("no trained model: run `camoe prepare`")
    serving = ServingModel(model).eval()
    layout = FeatureLayout(settings.features.n_campaigns)
    batches = []
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        users, ads = {}, {}
        for request in chunk:
            for c in request["candidates"]:
                users[request["user_id"]], ads[c["ad_id"]] = world.features(
                    request["user_id"], c["ad_id"]
                )
        x = layout.encode(chunk, users, ads)
        batches.append(
            (
                torch.from_numpy(x.categorical),
                torch.from_numpy(x.numeric),
                torch.from_numpy(x.fmt).view(-1, 1),
            )
        )
    with torch.inference_mode():
        serving(*batches[0])
        started = time.perf_counter()
        candidates = 0
        for inputs in batches:
            serving(*inputs)
            candidates += len(inputs[0])
    return candidates / (time.perf_counter() - started)


def redis_floor(
    settings: Settings, store: Any, requests: list[dict[str, Any]], batch: int
) -> float:
    """Candidates/s of pipelined HMGETs of the same Feast hashes (raw bytes, no Feast)."""
    import redis
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    client = redis.Redis.from_url(
        settings.redis.url or "", username=settings.redis.username, password=settings.redis.secret()
    )
    service = store.get_feature_service(settings.feast.feature_service)
    views: dict[str, list[tuple[str, list[bytes]]]] = {"user_id": [], "ad_id": []}
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        fields = [_mmh3(f"{view.name}:{f.name}") for f in projection.features]
        views[view.join_keys[0]].append((view.name, fields))

    def key(join_key: str, value: str) -> bytes:
        entity = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])
        return _redis_key(store.project, entity, 3)

    started = time.perf_counter()
    candidates = 0
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        users = {r["user_id"] for r in chunk}
        ads = {c["ad_id"] for r in chunk for c in r["candidates"]}
        with client.pipeline(transaction=False) as pipe:
            for join_key, ids in (("user_id", users), ("ad_id", ads)):
                for entity in ids:
                    for _, fields in views[join_key]:
                        pipe.hmget(key(join_key, entity), fields)
            pipe.execute()
        candidates += sum(len(r["candidates"]) for r in chunk)
    client.close()
    return candidates / (time.perf_counter() - started)


def run(
    settings: Settings,
    out: Path,
    requests: int = 20_000,
    rate: float = 1000.0,
    seconds: float = 30.0,
    progress: Callable[[str], None] = print,
    warmup_s: float = 60.0,
) -> dict[str, Any]:
    """The whole benchmark; writes scoring.json and latency.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings)
    before = stack.endpoints()
    endpoints = stack.up()
    started_here = [n for n in ("kafka", "triton", "redis") if getattr(before, n) is None]
    scorer = None
    # The scorer's settings file and log are working files, kept with the stack's logs
    # rather than beside the results.
    state = Path(settings.stack.state_dir) / "bench-scoring"
    try:
        s = _bench_settings(settings, endpoints, state)
        kafka = endpoints.kafka_at(s.kafka.security)
        progress("preparing features (Redis) and the model")
        prepare(s, endpoints)
        create_topics(kafka, s.kafka.topics.all())
        world = World(s.simulator)
        rng = np.random.default_rng(s.simulator.seed)
        topics = s.kafka.topics
        config = write_settings(s, state / "settings.yaml")
        reader = ScoreReader(kafka, topics.ad_scores.name)
        first = world.request(rng, 0)  # the load starts once the scorer answers
        warmup = [world.request(rng, 0) for _ in range(int(rate * warmup_s))]
        load = [world.request(rng, 0) for _ in range(int(rate * seconds))]
        # A full garbage collection of this process's heap (Feast, the requests) takes
        # hundreds of ms: it would stall the reader's clock, not the scorer. Frozen, it is
        # never walked (50,000 requests made after the freeze cost each collection 50 ms).
        gc.collect()
        gc.freeze()

        progress(f"fixed load: {rate:.0f} requests/s, {warmup_s:.0f}s warm-up + {seconds:.0f}s")
        scorer = running = _start_scorer(s, config, state / "score.log")

        def answering() -> bool:
            return running.poll() is None

        latencies, fixed = _fixed_load(
            kafka,
            topics.ad_requests.name,
            reader,
            first,
            warmup,
            load,
            rate,
            progress,
            answering,
        )
        _stop_scorer(scorer)  # everything scored so far is committed
        scorer = None

        progress(f"latency floor: a raw relay, {RELAY_WARMUP_S}s warm-up + {seconds:.0f}s")
        relayed, relay_floor = _relay_load(kafka, topics.ad_requests, warmup, load, rate, progress)

        progress(f"saturation: a fresh scorer drains {requests} requests")
        backlog = [world.request(rng, 0) for _ in range(requests)]
        _produce(kafka, topics.ad_requests.name, backlog)
        reader.stages.clear()
        scorer = _start_scorer(s, config, state / "score.log")
        _wait_for_drain(kafka, s.scoring.group_id, topics.ad_requests.name, scorer, 600)
        reader.read_until({r["request_id"] for r in backlog}, 120, decode_every=50)
        reader.close()
        # Each request of a wave carries that wave's timings: weight by request.
        stages = {k: float(np.mean([t[k] for t in reader.stages])) for k in reader.stages[0]}
        times = [reader.produced[r["request_id"]] for r in backlog]
        saturation = requests / ((max(times) - min(times)) / 1000)
        candidates = sum(len(r["candidates"]) for r in backlog)
        progress(
            f"  {saturation:.0f} requests/s, {saturation * candidates / requests:.0f} candidates/s"
        )

        progress("floors")
        sink = f"{topics.ad_requests.name}-passthrough"
        create_topics(kafka, [TopicSpec(name=sink, partitions=4)])
        passthrough = passthrough_floor(kafka, topics.ad_requests.name, sink, requests)
        batch = s.scoring.batch_size
        forward = forward_floor(s, world, backlog[:5000], batch)
        from camoe.clients.feature_store import open_store

        store = open_store(s.feast, endpoints.redis, s.redis)
        redis_read = redis_floor(s, store, backlog[:5000], batch)
        per_request = candidates / requests
        pipeline_candidates = saturation * per_request
        result = {
            "machine": f"{os.cpu_count()} cores",
            "requests": requests,
            "candidates_per_request": per_request,
            "batch_size": batch,
            "saturation": {"requests_per_s": saturation, "candidates_per_s": pipeline_candidates},
            "scorer_wave_stage_ms_at_saturation": stages,
            "fixed_load": fixed,
            "floors": {
                "relay_at_fixed_load": relay_floor,
                "kafka_passthrough_requests_per_s": passthrough,
                "model_forward_candidates_per_s": forward,
                "redis_pipelined_read_candidates_per_s": redis_read,
            },
            "ratios_pipeline_to_floor": {
                "latency_p50_to_relay": fixed["p50_ms"] / relay_floor["p50_ms"],
                "latency_p99_to_relay": fixed["p99_ms"] / relay_floor["p99_ms"],
                "kafka_passthrough": saturation / passthrough,
                "model_forward": pipeline_candidates / forward,
                "redis_read": pipeline_candidates / redis_read,
            },
        }
        progress(
            f"  Kafka passthrough {passthrough:.0f} requests/s, model forward {forward:.0f} "
            f"candidates/s, Redis read {redis_read:.0f} candidates/s"
        )
        (out / "scoring.json").write_text(json.dumps(result, indent=2))
        plot_latency(latencies, relayed, fixed, relay_floor, out / "latency.png")
        progress(f"written: {out / 'scoring.json'}, {out / 'latency.png'}")
        return result
    finally:
        if scorer is not None:
            _stop_scorer(scorer)
        if started_here:
            stack.down()


def plot_latency(
    latencies: np.ndarray,
    relayed: np.ndarray,
    fixed: dict[str, Any],
    relay_floor: dict[str, Any],
    path: Path,
) -> None:
    """The pipeline's latency histogram over the raw relay's, and beside it each 10 s
    window's p99, the pipeline's then the relay's, with the share of time the hypervisor
    stole in it (the tail on this machine follows it)."""
    plt = pyplot()

    fig, (ax, by_window) = plt.subplots(
        1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]}
    )
    top = float(np.percentile(np.concatenate([latencies, relayed]), 99.9))
    bins = np.linspace(0, top, 61)
    ax.hist(latencies[latencies <= top], bins=bins, color="steelblue", label="pipeline")
    ax.hist(relayed[relayed <= top], bins=bins, histtype="step", color="black", label="relay")
    for q, style in ((50, "-"), (99, "--")):
        value = fixed[f"p{q}_ms"]
        ax.axvline(value, color="crimson", linestyle=style, label=f"pipeline p{q} {value:.1f} ms")
    value = relay_floor["p99_ms"]
    ax.axvline(value, color="black", linestyle="--", label=f"relay p99 {value:.1f} ms")
    ax.set_xlabel("request event time to answer read back (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"Latency at {fixed['offered_requests_per_s']:.0f} requests/s")
    ax.legend()

    # The pipeline's windows, a gap, then the relay's (measured after it).
    stolen = by_window.twinx()
    x = 0
    for name, figures, colour in (
        ("pipeline", fixed, "steelblue"),
        ("relay", relay_floor, "dimgray"),
    ):
        p99 = figures["p99_ms_by_10s"]
        # Requests are counted by arrival and CPU by the clock: when the measured seconds
        # are not whole windows, their last windows may not pair up.
        steal = figures["cpu"].get("steal_pct_by_10s", [])[: len(p99)]
        places = list(range(x, x + len(p99)))
        by_window.bar(places, p99, width=0.8, color=colour, label=name)
        stolen.plot(places[: len(steal)], steal, "o", color="darkorange")
        x += len(p99) + 1
    by_window.set_xticks([])
    by_window.set_xlabel(f"{WINDOW_S} s windows: pipeline, then relay")
    by_window.set_ylabel("p99 (ms)")
    by_window.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    stolen.set_ylabel("time stolen by the hypervisor (%)", color="darkorange")
    stolen.set_ylim(bottom=0)
    by_window.set_title(f"p99 and time stolen, per {WINDOW_S} s")
    fig.tight_layout()
    save(fig, path, bbox_inches="tight")
