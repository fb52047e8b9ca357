"""The whole loop on simulated traffic: prepares features and the first model, runs the
scoring consumer, the labeler and the trainer as processes, and drives the traffic."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from camoe.clients.feature_store import apply_and_materialize, open_store
from camoe.clients.kafka import create_topics
from camoe.clients.triton import TritonClient
from camoe.settings import Settings
from camoe.sim.driver import TrafficDriver, TrafficStats
from camoe.sim.traffic import World
from camoe.stack.stack import Endpoints, Stack
from camoe.supervisor import components
from trainer.export import Publisher
from trainer.train import load_model, pretrain, save_model
from trainer.versions import PIN, broken_dir, load_served, serving_lock, versions

log = logging.getLogger(__name__)

# Entered with the components running, exited when the traffic ends; what it yields
# (filled in by then) is the run's summary's ``watch``.
Watch = Callable[
    [Settings, Endpoints, dict[str, subprocess.Popen[bytes]]],
    AbstractContextManager[dict[str, Any]],
]


def prepare(settings: Settings, endpoints: Endpoints, fresh: bool = False) -> None:
    """Feast offline data + apply + materialise, and model version 1 if there is none.

    ``fresh``: start the model over (remove its versions and the trainer's checkpoint),
    so a bounded run learns from version 1 whatever ran before it.
    """
    world = World(settings.simulator)
    repo = Path(settings.feast.repo_path)
    world.write_offline_data(repo / "data")
    apply_and_materialize(open_store(settings.feast, endpoints.redis, settings.redis))
    model_dir = Path(settings.triton.model_repo) / settings.triton.model_name
    checkpoint = settings.trainer.checkpoint_dir / "model.pt"
    client = (
        TritonClient(endpoints.triton, settings.triton.model_name) if endpoints.triton else None
    )
    if fresh:
        for version in versions(model_dir):
            shutil.rmtree(model_dir / str(version))
        (model_dir / PIN).unlink(missing_ok=True)
        (settings.trainer.checkpoint_dir / "trainer.pt").unlink(missing_ok=True)
    elif versions(model_dir) and load_model(settings, checkpoint) is not None:
        if client is not None:
            with serving_lock(model_dir):
                repo, staging = settings.triton.model_repo, settings.triton.staging_dir
                load_served(client, model_dir, broken_dir(repo, model_dir.name, staging))
        return
    log.info(
        "training version 1 offline on %d simulated requests", settings.trainer.pretrain_requests
    )
    history = world.history(
        settings.trainer.pretrain_requests, hours=settings.trainer.pretrain_hours
    )
    model = pretrain(settings, history)
    save_model(model, checkpoint)
    check = (history["categorical"][:64], history["numeric"][:64], history["format"][:64])
    publisher = Publisher(
        settings.triton.model_repo,
        settings.triton.model_name,
        client,
        keep=settings.trainer.keep_versions,
        staging=settings.triton.staging_dir,
    )
    version = publisher.publish(
        model, check, {"examples_trained": len(history["label"]), "source": "offline pretraining"}
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
    driver = TrafficDriver(
        settings, endpoints.kafka_at(settings.kafka.security), World(settings.simulator)
    )
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
    watch: Watch | None = None,
) -> dict[str, Any]:
    """The whole loop for a bounded time on the stack, on topics of its own and from a
    fresh version 1; returns the driver's summary (with its latency per 10 s window under
    ``latency_windows``), with ``report``'s result under
    ``loop`` (it runs after the traffic, while the services still run) and what
    ``watch`` (entered while the traffic runs) gathered under ``watch``."""
    stack = Stack(settings)
    before = stack.endpoints()
    endpoints = stack.up()
    started_here = [n for n in ("kafka", "triton", "redis") if getattr(before, n) is None]
    settings = run_topics(settings, "loop")
    try:
        create_topics(endpoints.kafka_at(settings.kafka.security), settings.kafka.topics.all())
        prepare(settings, endpoints, fresh=True)
        with components(settings, endpoints) as processes:
            watching = watch(settings, endpoints, processes) if watch else nullcontext({})
            with watching as watched:
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
        summary["latency_windows"] = stats.latency_windows()
        if watch is not None:
            summary["watch"] = watched
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
