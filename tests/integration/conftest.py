"""Fixtures of the integration tests: the incremental trainer as a process, and a
service killed and restarted mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from camoe.clients.kafka import create_topics
from camoe.clients.triton import TritonClient
from camoe.settings import Settings
from camoe.sim.traffic import World
from trainer.export import Publisher
from trainer.model import build_served_camoe
from trainer.train import fit, save_model

EVENTS = 8_000  # labelled events the trainer's world has history for, beyond version 1's


@pytest.fixture
def trainer_world(services, tmp_path):
    """Own topics, model name and checkpoint folder; version 1 published and saved."""
    settings, endpoints = services
    suffix = uuid.uuid4().hex[:6]
    name = f"camoe_trainer_faults_{suffix}"  # a model of its own per test: a fresh repository
    topics = settings.kafka.topics
    renamed = topics.model_copy(
        update={
            f: getattr(topics, f).model_copy(update={"name": f"{getattr(topics, f).name}-{suffix}"})
            for f in ("labelled_events", "model_updates", "dead_letters")
        }
    )
    source = settings.triton.model_repo / "camoe"
    target = settings.triton.model_repo / name
    target.mkdir()
    config = (source / "config.pbtxt").read_text()
    (target / "config.pbtxt").write_text(re.sub(r'name: "camoe"', f'name: "{name}"', config))
    s = Settings(
        **{
            **settings.model_dump(),
            "kafka": {**settings.kafka.model_dump(), "topics": renamed.model_dump()},
            "triton": {**settings.triton.model_dump(), "model_name": name},
            "trainer": {
                **settings.trainer.model_dump(),
                "checkpoint_dir": tmp_path / "trainer",
                "publish_every_examples": 400,
                "publish_every_s": 2.0,
                "pretrain_batch_size": 128,
            },
            "stack": {**settings.stack.model_dump(), "state_dir": tmp_path / "stack"},
        }
    )
    create_topics(endpoints.kafka, s.kafka.topics.all())
    history = World(s.simulator).history(EVENTS + 1000, hours=0.0)
    model = build_served_camoe(s)
    fit(model, {k: v[:1000] for k, v in history.items()}, epochs=1)
    save_model(model, s.trainer.checkpoint_dir / "model.pt")
    client = TritonClient(endpoints.triton, name)
    check = (history["categorical"][:8], history["numeric"][:8], history["format"][:8])
    Publisher(s.triton.model_repo, name, client).publish(model, check)
    yield s, endpoints, history, client
    client.close()


def start_trainer(config: Path, endpoints, log) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CAMOE_CONFIG": str(config),
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka,
        "TRITON_URL": endpoints.triton,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "camoe.cli", "train"], stdout=log, stderr=subprocess.STDOUT, env=env
    )


@contextmanager
def outage(
    pids: list[int],
    restart: Callable[[], int],
    kill_after_s: float,
    down_s: float,
    logs: Path,
    components: tuple[str, ...],
) -> Iterator[dict[str, Any]]:
    """SIGKILLs the service whose pid is ``pids[0]`` ``kill_after_s`` from now and calls
    ``restart`` (which returns its new pid, kept in ``pids[0]``) ``down_s`` later. Yields
    what it saw: both times (epoch ms, "killed" and "restarted") and where each
    component's log in ``logs`` stood at the start ("log_starts": they are appended to)."""
    seen: dict[str, Any] = {
        "log_starts": {name: (logs / f"{name}.log").stat().st_size for name in components}
    }

    def kill_and_restart() -> None:
        time.sleep(kill_after_s)
        os.kill(pids[0], signal.SIGKILL)
        seen["killed"] = time.time() * 1000
        time.sleep(down_s)
        pids[0] = restart()
        seen["restarted"] = time.time() * 1000

    thread = threading.Thread(target=kill_and_restart, daemon=True)
    thread.start()
    yield seen
    thread.join(120)
