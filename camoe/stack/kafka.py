"""Apache Kafka (KRaft, one combined broker+controller) as a local process."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from camoe.clients.kafka import admin
from camoe.settings import ROOT, KafkaSettings
from camoe.stack.exceptions import PrerequisiteError, ServiceStartError
from camoe.stack.process import claim_port, free_port, start_process

HERE = Path(__file__).parent
LIBS = ROOT / ".cache" / "kafka" / "libs"


def ensure_jars(libs: Path = LIBS) -> Path:
    """Resolves the broker's jars from Maven Central once (``pom.xml`` beside this module)."""
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
    jvm = _jvm(settings, libs)
    cluster_id = _storage_tool(jvm, "random-uuid").splitlines()[-1]
    _storage_tool(jvm, "format", "-t", cluster_id, "-c", str(properties))
    return _run(jvm, properties, f"127.0.0.1:{port}", log_path, timeout_s)


def restart_broker(
    settings: KafkaSettings, data_dir: Path, log_path: Path, timeout_s: float
) -> tuple[int, str]:
    """Starts a broker again on the log folder and ports ``start_broker`` gave it (after
    a crash, say): its topics, offsets and transactions are where it left them."""
    properties = data_dir / "server.properties"
    if not properties.exists():
        raise ServiceStartError(f"kafka: no broker was started in {data_dir}: nothing to restart")
    listeners = dict(
        line.split("=", 1) for line in properties.read_text().splitlines() if "=" in line
    )["advertised.listeners"]
    bootstrap = listeners.removeprefix("PLAINTEXT://")
    return _run(_jvm(settings, ensure_jars()), properties, bootstrap, log_path, timeout_s)


def _jvm(settings: KafkaSettings, libs: Path) -> list[str]:
    return [
        java(),
        f"-Xmx{settings.heap_mb}m",
        f"-Xms{min(settings.heap_mb, 256)}m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={HERE / 'kafka-log4j2.properties'}",
        "-cp",
        f"{libs}/*",
    ]


def _run(
    jvm: list[str], properties: Path, bootstrap: str, log_path: Path, timeout_s: float
) -> tuple[int, str]:
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
    return bool(admin(bootstrap).list_topics(timeout=timeout_s).brokers)
