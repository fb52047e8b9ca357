"""Runs components as processes: ``camoe <component>`` each, started together, ready
once each has joined its consumer group, stopped together."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Event

import yaml

from camoe.clients.kafka import KafkaConnection, group_members
from camoe.settings import Settings
from camoe.stack.stack import Endpoints

log = logging.getLogger(__name__)

COMPONENTS = ("score", "label", "train")


class ComponentError(RuntimeError):
    """A component process failed to start or died."""


def write_settings(settings: Settings, path: Path) -> Path:
    """Writes the settings as a config file, so child processes share them exactly; the
    passwords stay out of it (``secret_environment`` hands them over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = settings.model_dump(
        mode="json", exclude={"redis": {"password"}, "kafka": {"security": {"password"}}}
    )
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def secret_environment(settings: Settings) -> dict[str, str]:
    """The secrets a child process needs, as the environment variables settings read."""
    secrets = {
        "CAMOE_REDIS__PASSWORD": settings.redis.password,
        "CAMOE_KAFKA__SECURITY__PASSWORD": settings.kafka.security.password,
    }
    return {name: s.get_secret_value() for name, s in secrets.items() if s is not None}


@contextmanager
def components(
    settings: Settings,
    endpoints: Endpoints,
    names: tuple[str, ...] = COMPONENTS,
    workers: int = 1,
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Runs ``camoe <name>`` for each component in its own process (``workers`` scoring
    processes, ``score-0`` ...), waits until each has joined its consumer group, and stops
    them all on exit."""
    state = Path(settings.stack.state_dir)
    config = write_settings(settings, state / "settings.yaml")
    env = {
        **os.environ,
        "CAMOE_CONFIG": str(config),
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka or "",
        **secret_environment(settings),
    }
    if endpoints.triton:
        env["TRITON_URL"] = endpoints.triton
    if endpoints.redis:
        env["REDIS_URL"] = endpoints.redis
    groups = {
        "score": settings.scoring.group_id,
        "label": settings.labeler.group_id,
        "train": settings.trainer.group_id,
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in names:
            for worker in range(workers if name == "score" else 1):
                label = f"{name}-{worker}" if name == "score" and workers > 1 else name
                log_path = state / "logs" / f"{label}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("ab") as out:
                    processes[label] = subprocess.Popen(
                        [sys.executable, "-m", "camoe.cli", name],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env={**env, "CAMOE_WORKER_ID": str(worker)},
                    )
        for label, process in processes.items():
            name = label.split("-")[0]
            members = workers if name == "score" else 1
            _wait_ready(
                label,
                process,
                endpoints.kafka_at(settings.kafka.security),
                groups[name],
                members,
                state / "logs" / f"{label}.log",
            )
        yield processes
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for label, process in processes.items():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 30s; killing it", label)
                process.kill()
                process.wait()


def supervise(settings: Settings, endpoints: Endpoints, workers: int, stop: Event) -> int:
    """``camoe score --workers N``: N scoring processes in one consumer group, until
    stopped; returns non-zero when a worker died (its partitions moved to the others)."""
    with components(settings, endpoints, ("score",), workers=workers) as processes:
        log.info("%d scoring workers running", workers)
        while not stop.is_set():
            died = {label: p.returncode for label, p in processes.items() if p.poll() is not None}
            if died:
                log.error(
                    "scoring workers exited: %s; see %s",
                    died,
                    Path(settings.stack.state_dir) / "logs",
                )
                return 1
            stop.wait(1.0)
    return 0


def _wait_ready(
    name: str,
    process: subprocess.Popen[bytes],
    kafka: KafkaConnection,
    group_id: str,
    members: int,
    log_path: Path,
    timeout_s: float = 180.0,
) -> None:
    """Waits until the component's consumer holds its partitions (it has joined its group)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ComponentError(
                f"camoe {name} exited with code {process.returncode} while starting; see {log_path}"
            )
        try:
            if group_members(kafka, group_id) >= members:
                log.info("camoe %s is consuming", name)
                return
        except Exception:  # the group does not exist until the consumer first joins
            pass
        time.sleep(0.5)
    raise ComponentError(
        f"camoe {name} did not join its consumer group within {timeout_s:.0f}s; see {log_path}"
    )
