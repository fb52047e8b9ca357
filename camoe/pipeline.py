"""Runs the whole loop: prepares features and the first model, starts the scoring
consumer, the labeler and the trainer as processes, and drives simulated traffic."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Event
from typing import Any

import yaml

from camoe.feature_store import apply_and_materialize, open_store
from camoe.settings import Settings
from services.kafka import create_topics, group_members
from services.stack import Endpoints, Stack
from services.triton import TritonClient
from simulator.driver import TrafficDriver, TrafficStats
from simulator.traffic import World
from trainer.export import Publisher, versions
from trainer.model import build_served_camoe
from trainer.train import calibrate, fit, load_model, save_model

log = logging.getLogger(__name__)

COMPONENTS = ("score", "label", "train")


class ComponentError(RuntimeError):
    """A component process failed to start or died."""


def prepare(settings: Settings, endpoints: Endpoints, fresh: bool = False) -> None:
    """Feast offline data + apply + materialise, and model version 1 if there is none.

    ``fresh``: start the model over (remove its versions and the trainer's checkpoint),
    so a bounded run learns from version 1 whatever ran before it.
    """
    world = World(settings.simulator)
    repo = Path(settings.feast.repo_path)
    world.write_offline_data(repo / "data")
    apply_and_materialize(open_store(settings.feast, endpoints.redis))
    model_dir = Path(settings.triton.model_repo) / settings.triton.model_name
    checkpoint = settings.trainer.checkpoint_dir / "model.pt"
    client = (
        TritonClient(endpoints.triton, settings.triton.model_name) if endpoints.triton else None
    )
    if fresh:
        for version in versions(model_dir):
            shutil.rmtree(model_dir / str(version))
        (settings.trainer.checkpoint_dir / "trainer.pt").unlink(missing_ok=True)
    elif versions(model_dir) and load_model(settings, checkpoint) is not None:
        if client is not None:
            client.load()
        return
    log.info(
        "training version 1 offline on %d simulated requests", settings.trainer.pretrain_requests
    )
    history = world.history(
        settings.trainer.pretrain_requests, hours=settings.trainer.pretrain_hours
    )
    held_out = len(history["label"]) // 10  # the newest tenth fits the calibration
    train = {k: v[:-held_out] for k, v in history.items()}
    model = build_served_camoe(settings)
    fit(
        model,
        train,
        epochs=2,
        batch_size=settings.trainer.batch_size,
        learning_rate=settings.trainer.learning_rate,
    )
    calibrate(model, {k: v[-held_out:] for k, v in history.items()})
    save_model(model, checkpoint)
    check = (history["categorical"][:64], history["numeric"][:64], history["format"][:64])
    version = Publisher(settings.triton.model_repo, settings.triton.model_name, client).publish(
        model, check
    )
    log.info("published version %d", version)


def run_topics(settings: Settings, prefix: str) -> Settings:
    """The settings with topics of their own (``<prefix>-<topic>-<id>``), so records of
    earlier runs on the same broker never count."""
    suffix = uuid.uuid4().hex[:6]
    topics = settings.kafka.topics
    renamed = topics.model_copy(
        update={
            name: getattr(topics, name).model_copy(
                update={"name": f"{prefix}-{getattr(topics, name).name}-{suffix}"}
            )
            for name in type(topics).model_fields
        }
    )
    return settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topics": renamed})}
    )


def write_settings(settings: Settings, path: Path) -> Path:
    """Writes the settings as a config file, so child processes share them exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path


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
                endpoints.kafka or "",
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
    bootstrap: str,
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
            if group_members(bootstrap, group_id) >= members:
                log.info("camoe %s is consuming", name)
                return
        except Exception:  # the group does not exist until the consumer first joins
            pass
        time.sleep(0.5)
    raise ComponentError(
        f"camoe {name} did not join its consumer group within {timeout_s:.0f}s; see {log_path}"
    )


def progress_line(stats: TrafficStats) -> str:
    s = stats.summary()
    versions = ", ".join(f"v{k}: {n}" for k, n in s["model_versions"].items()) or "-"
    return (
        f"[{s['seconds']:5.0f}s] requests {s['requests']:6d} | scored {s['scored']:6d} | "
        f"clicks {s['clicks']:4d} | labels {s['labels']:6d} | versions {versions} | "
        f"p50 {s['latency_p50_ms']:.0f} ms p99 {s['latency_p99_ms']:.0f} ms"
    )


def drive(
    settings: Settings,
    endpoints: Endpoints,
    duration_s: float,
    progress: Callable[[str], None] | None,
    drain_s: float,
) -> TrafficStats:
    """Simulated traffic for ``duration_s`` (its Kafka clients end with this call)."""
    driver = TrafficDriver(settings, endpoints.kafka or "", World(settings.simulator))
    try:
        return driver.run(
            duration_s,
            progress=(lambda st: progress(progress_line(st))) if progress else None,
            drain_s=drain_s,
        )
    finally:
        driver.close()


def run_loop(
    settings: Settings,
    duration_s: float,
    progress: Callable[[str], None] | None = None,
    drain_s: float | None = None,
    report: Callable[[Settings, Endpoints], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The whole loop for a bounded time on the stack, on topics of its own and from a
    fresh version 1; returns the driver's summary, with ``report``'s result under
    ``loop`` (it runs after the traffic, while the services still run)."""
    stack = Stack(settings)
    before = stack.endpoints()
    endpoints = stack.up()
    started_here = [n for n in ("kafka", "triton", "redis") if getattr(before, n) is None]
    settings = run_topics(settings, "loop")
    try:
        create_topics(endpoints.kafka or "", settings.kafka.topics.all())
        prepare(settings, endpoints, fresh=True)
        with components(settings, endpoints) as processes:
            stats = drive(
                settings,
                endpoints,
                duration_s,
                progress,
                settings.labeler.attribution_window_s + 5 if drain_s is None else drain_s,
            )
            failed = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
        summary = stats.summary()
        summary["component_failures"] = failed
        if report is not None:
            summary["loop"] = report(settings, endpoints)
        return summary
    finally:
        if started_here:
            stack.down()


def demo_settings(settings: Settings) -> Settings:
    """The demo's traffic: its rate, click boost and drift; version 1 trained on history
    of the moment the live traffic starts from."""
    d = settings.demo
    return settings.model_copy(
        update={
            "simulator": settings.simulator.model_copy(
                update={
                    "requests_per_second": d.requests_per_second,
                    "click_boost": d.click_boost,
                    "drift_per_hour": d.drift_per_hour,
                    "effect_drift_per_hour": d.effect_drift_per_hour,
                    "cross_strength": d.cross_strength,
                    "format_shares": d.format_shares,
                }
            ),
            "trainer": settings.trainer.model_copy(update={"pretrain_hours": 0.0}),
        }
    )


def print_summary(summary: dict[str, Any], out: Path | None = None) -> None:
    print("\nsummary")
    for key, value in summary.items():
        print(f"  {key:>18}: {value}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        print(f"  written to {out}")
