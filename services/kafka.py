"""Apache Kafka (KRaft, one combined broker+controller) as a local process, and topic admin."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from camoe.settings import ROOT, KafkaSettings, TopicSpec
from services.exceptions import PrerequisiteError, ServiceStartError
from services.process import claim_port, free_port, start_process

HERE = Path(__file__).parent
LIBS = ROOT / ".cache" / "kafka" / "libs"


def ensure_jars(libs: Path = LIBS) -> Path:
    """Resolves the broker's jars from Maven Central once (services/pom.xml)."""
    if any(libs.glob("kafka_2.13-*.jar")):
        return libs
    if shutil.which("mvn") is None:
        raise PrerequisiteError(
            "Maven is missing: install it (`apt-get install maven`) or run `make setup`"
        )
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(HERE / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise PrerequisiteError(
            f"Maven could not resolve the Kafka jars (exit {result.returncode}): "
            f"{(result.stdout + result.stderr).strip().splitlines()[-1:]}; "
            "check access to Maven Central"
        )
    return libs


def java() -> str:
    path = shutil.which("java")
    if path is None:
        raise PrerequisiteError(
            "Java 17+ is missing: install it (`apt-get install openjdk-17-jre-headless`)"
        )
    return path


def start_broker(
    settings: KafkaSettings,
    data_dir: Path,
    log_path: Path,
    timeout_s: float,
    port: int | None = None,
) -> tuple[int, str]:
    """Formats a fresh KRaft log folder and starts a broker; returns (pid, bootstrap)."""
    libs = ensure_jars()
    port, controller_port = claim_port(port, "kafka"), free_port()
    # The stack's broker always starts empty. A log folder left by one that died without
    # `camoe stack down` holds another cluster's id, and formatting would refuse it.
    shutil.rmtree(data_dir / "logs", ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    properties = data_dir / "server.properties"
    properties.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={data_dir / 'logs'}",
                "num.partitions=1",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=false",
                "",
            ]
        )
    )
    classpath = f"{libs}/*"
    jvm = [
        java(),
        f"-Xmx{settings.heap_mb}m",
        f"-Xms{min(settings.heap_mb, 256)}m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={HERE / 'kafka-log4j2.properties'}",
        "-cp",
        classpath,
    ]
    cluster_id = _storage_tool(jvm, "random-uuid").splitlines()[-1]
    _storage_tool(jvm, "format", "-t", cluster_id, "-c", str(properties))
    bootstrap = f"127.0.0.1:{port}"
    pid = start_process(
        "kafka",
        [*jvm, "kafka.Kafka", str(properties)],
        log_path,
        healthy=lambda: broker_ready(bootstrap),
        timeout_s=timeout_s,
    )
    return pid, bootstrap


def _storage_tool(jvm: list[str], *args: str) -> str:
    """Runs Kafka's StorageTool; its output, or ServiceStartError with its last words."""
    done = subprocess.run([*jvm, "kafka.tools.StorageTool", *args], capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise ServiceStartError(f"kafka: StorageTool {args[0]} failed: {said[-1]}")
    return done.stdout.strip()


def broker_ready(bootstrap: str, timeout_s: float = 1.0) -> bool:
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    # A plain TCP probe first: librdkafka logs every refused connection while it retries.
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    return bool(admin.list_topics(timeout=timeout_s).brokers)


def create_topics(bootstrap: str, topics: list[TopicSpec], timeout_s: float = 30.0) -> None:
    """Creates the topics that do not exist yet (idempotent)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
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
    for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout_s)
        except Exception as error:
            if "TOPIC_ALREADY_EXISTS" not in str(error):
                raise RuntimeError(f"could not create topic {name}: {error}") from None


def cluster_id(bootstrap: str, timeout_s: float = 10.0) -> str | None:
    """The cluster's id: a checkpoint's offsets are only valid on the cluster that gave them."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    return admin.list_topics(timeout=timeout_s).cluster_id


def group_members(bootstrap: str, group_id: str, timeout_s: float = 5.0) -> int:
    """How many consumers hold partitions in a stable consumer group (0 while rebalancing)."""
    from confluent_kafka import ConsumerGroupState

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    description = admin.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id]
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
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",  # joined, never committed
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
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
