"""Apache Kafka (KRaft, one combined broker+controller) as a local process: plaintext,
or SASL_SSL with SCRAM-SHA-512 users."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from camoe.clients.kafka import Kafka, KafkaConnection, admin
from camoe.settings import ROOT, KafkaSecurity, KafkaSettings
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


@dataclass(frozen=True)
class SaslSsl:
    """A SASL_SSL listener: the broker's private key and certificate chain (one PEM file,
    the key unencrypted PKCS#8), the CA that signed it, and the SCRAM-SHA-512 user the
    cluster is formatted with. The broker reaches itself as that user; add others through
    the admin API (``AdminClient.alter_user_scram_credentials``)."""

    keystore: Path
    ca_file: Path
    username: str
    password: SecretStr

    def client(self) -> KafkaSecurity:
        """The security settings of a client logging in as the formatted user."""
        return KafkaSecurity(
            protocol="SASL_SSL",
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
        )

    def properties(self) -> list[str]:
        password = self.password.get_secret_value()
        if '"' in password or "\\" in password:
            raise ValueError("the broker's SCRAM password cannot hold '\"' or '\\'")
        return [
            "inter.broker.listener.name=SASL_SSL",
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{self.username}" password="{password}";',
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={self.ca_file}",
        ]


def start_broker(
    settings: KafkaSettings,
    data_dir: Path,
    log_path: Path,
    timeout_s: float,
    port: int | None = None,
    sasl_ssl: SaslSsl | None = None,
) -> tuple[int, str]:
    """Formats a fresh KRaft log folder and starts a broker, plaintext or with a
    ``sasl_ssl`` listener; returns (pid, bootstrap)."""
    libs = ensure_jars()
    port, controller_port = claim_port(port, "kafka"), free_port()
    # The stack's broker always starts empty. A log folder left by one that died without
    # `camoe stack down` holds another cluster's id, and formatting would refuse it.
    shutil.rmtree(data_dir / "logs", ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    properties = data_dir / "server.properties"
    listener = "PLAINTEXT" if sasl_ssl is None else "SASL_SSL"
    properties.touch(mode=0o600)  # a SASL_SSL broker's file holds its user's password
    properties.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                f"listeners={listener}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
                f"advertised.listeners={listener}://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,{listener}:{listener}",
                *(sasl_ssl.properties() if sasl_ssl else []),
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
    users = []
    if sasl_ssl is not None:  # SCRAM users of KRaft are written at format time (KIP-900)
        password = sasl_ssl.password.get_secret_value()
        users = ["--add-scram", f"SCRAM-SHA-512=[name={sasl_ssl.username},password={password}]"]
    _storage_tool(jvm, "format", "-t", cluster_id, "-c", str(properties), *users)
    bootstrap = f"127.0.0.1:{port}"
    probe = bootstrap if sasl_ssl is None else KafkaConnection(bootstrap, sasl_ssl.client())
    return _run(jvm, properties, probe, log_path, timeout_s)


def restart_broker(
    settings: KafkaSettings, data_dir: Path, log_path: Path, timeout_s: float
) -> tuple[int, str]:
    """Starts a plaintext broker again on the log folder and ports ``start_broker`` gave
    it (after a crash, say): its topics, offsets and transactions are where it left them."""
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
    jvm: list[str], properties: Path, kafka: Kafka, log_path: Path, timeout_s: float
) -> tuple[int, str]:
    pid = start_process(
        "kafka",
        [*jvm, "kafka.Kafka", str(properties)],
        log_path,
        healthy=lambda: broker_ready(kafka),
        timeout_s=timeout_s,
    )
    return pid, str(kafka)


def _storage_tool(jvm: list[str], *args: str) -> str:
    """Runs Kafka's StorageTool; its output, or ServiceStartError with its last words."""
    done = subprocess.run([*jvm, "kafka.tools.StorageTool", *args], capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise ServiceStartError(f"kafka: StorageTool {args[0]} failed: {said[-1]}")
    return done.stdout.strip()


def broker_ready(kafka: Kafka, timeout_s: float = 1.0) -> bool:
    host, port = str(kafka).split(",")[0].rsplit(":", 1)
    # A plain TCP probe first: librdkafka logs every refused connection while it retries.
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass
    return bool(admin(kafka).list_topics(timeout=timeout_s).brokers)
