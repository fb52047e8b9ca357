"""The local service stack: Kafka, Triton and Redis as processes on 127.0.0.1.

Used alike by the CLI (``camoe stack up|down|status``), the tests and the benchmarks.
A service whose address is configured (``KAFKA_BOOTSTRAP_SERVERS``, ``TRITON_URL``,
``REDIS_URL``) is used as it is and never started. What was started is recorded in
``<state_dir>/state.json`` so a later process (or ``down``) finds it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from camoe.clients.kafka import KafkaConnection, create_topics
from camoe.settings import KafkaSecurity, Settings
from camoe.stack import kafka, redis, triton
from camoe.stack.exceptions import StackError
from camoe.stack.process import pid_alive, stop_pid

log = logging.getLogger(__name__)

SERVICES = ("kafka", "triton", "redis")


@dataclass
class Endpoints:
    """Where each service answers."""

    kafka: str | None = None
    triton: str | None = None  # gRPC host:port
    triton_http: str | None = None
    redis: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    def kafka_at(self, security: KafkaSecurity) -> KafkaConnection:
        """The cluster's address with the security its clients reach it with."""
        if self.kafka is None:
            raise StackError(
                "kafka is not running: start the stack (`camoe stack up`) "
                "or set KAFKA_BOOTSTRAP_SERVERS"
            )
        return KafkaConnection(self.kafka, security)


class Stack:
    """Starts, finds and stops the services the settings do not point elsewhere."""

    def __init__(self, settings: Settings, state_dir: Path | None = None) -> None:
        self.settings = settings
        self.state_dir = Path(state_dir or settings.stack.state_dir)
        self.state_file = self.state_dir / "state.json"

    # --- state ---------------------------------------------------------------------

    def _load(self) -> Endpoints:
        if not self.state_file.exists():
            return Endpoints()
        endpoints = Endpoints(**json.loads(self.state_file.read_text()))
        for name, pid in list(endpoints.pids.items()):
            if not pid_alive(pid):  # died or stopped elsewhere: forget it
                endpoints.pids.pop(name)
                setattr(endpoints, name, None)
                if name == "triton":
                    endpoints.triton_http = None
        return endpoints

    def _save(self, endpoints: Endpoints) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(asdict(endpoints), indent=2))

    def endpoints(self) -> Endpoints:
        """Configured addresses override the running stack's."""
        return self._configured(self._load())

    def _configured(self, own: Endpoints) -> Endpoints:
        endpoints = replace(own, pids=dict(own.pids), logs=dict(own.logs))
        s = self.settings
        endpoints.kafka = s.kafka.bootstrap_servers or endpoints.kafka
        endpoints.triton = s.triton.url or endpoints.triton
        endpoints.triton_http = s.triton.http_url or endpoints.triton_http
        endpoints.redis = s.redis.url or endpoints.redis
        return endpoints

    # --- lifecycle -----------------------------------------------------------------

    def up(self, services: tuple[str, ...] = SERVICES) -> Endpoints:
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise StackError(f"unknown services {sorted(unknown)}; choose from {SERVICES}")
        # Only what this stack runs is recorded: a configured address (another broker, say)
        # must not become the stack's for a later process without that setting.
        own = self._load()
        endpoints = self._configured(own)
        protocol = self.settings.kafka.security.protocol
        if "kafka" in services and endpoints.kafka is None and protocol != "PLAINTEXT":
            raise StackError(
                f"kafka.security.protocol is {protocol} but the stack's broker is plaintext: "
                "set kafka.bootstrap_servers (KAFKA_BOOTSTRAP_SERVERS) to your cluster"
            )
        timeout = self.settings.stack.startup_timeout_s
        logs = self.state_dir / "logs"
        ports = self.settings.stack.ports
        try:
            if "kafka" in services and endpoints.kafka is None:
                endpoints.pids["kafka"], endpoints.kafka = kafka.start_broker(
                    self.settings.kafka,
                    self.state_dir / "kafka",
                    logs / "kafka.log",
                    timeout,
                    port=ports.get("kafka"),
                )
                endpoints.logs["kafka"] = str(logs / "kafka.log")
                log.info("kafka up at %s", endpoints.kafka)
            if "redis" in services and endpoints.redis is None:
                endpoints.pids["redis"], endpoints.redis = redis.start_server(
                    self.state_dir / "redis",
                    logs / "redis.log",
                    timeout,
                    port=ports.get("redis"),
                    credentials=self.settings.redis,
                )
                endpoints.logs["redis"] = str(logs / "redis.log")
                log.info("redis up at %s", endpoints.redis)
            if "triton" in services and endpoints.triton is None:
                repo = Path(self.settings.triton.model_repo)
                name = self.settings.triton.model_name
                has_version = any(p.name.isdigit() for p in (repo / name).glob("*"))
                pid, endpoints.triton, endpoints.triton_http = triton.start_server(
                    repo,
                    logs / "triton.log",
                    timeout,
                    load=[name] if has_version else [],
                    grpc_port=ports.get("triton"),
                )
                endpoints.pids["triton"] = pid
                endpoints.logs["triton"] = str(logs / "triton.log")
                log.info("triton up at %s (gRPC)", endpoints.triton)
        finally:
            for name in set(endpoints.pids) - set(own.pids):  # started by this call
                setattr(own, name, getattr(endpoints, name))
                own.pids[name], own.logs[name] = endpoints.pids[name], endpoints.logs[name]
                if name == "triton":
                    own.triton_http = endpoints.triton_http
            self._save(own)
        if "kafka" in services:
            create_topics(
                endpoints.kafka_at(self.settings.kafka.security), self.settings.kafka.topics.all()
            )
        return endpoints

    def down(self) -> list[str]:
        """Stops every service this stack started and removes their data."""
        endpoints = self._load()
        stopped = []
        for name, pid in endpoints.pids.items():
            stop_pid(pid)
            stopped.append(name)
        for folder in ("kafka", "redis"):
            shutil.rmtree(self.state_dir / folder, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, str]:
        endpoints = self.endpoints()
        lines = {}
        for name in SERVICES:
            address = getattr(endpoints, name)
            if address is None:
                lines[name] = "down"
            elif name in endpoints.pids:
                lines[name] = (
                    f"up at {address} (pid {endpoints.pids[name]}, log {endpoints.logs[name]})"
                )
            else:
                lines[name] = f"external at {address}"
        return lines
