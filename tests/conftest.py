"""Session fixtures: the real services, started once for the whole test session.

Kafka and Redis run in testcontainers when a Docker daemon answers, else as local
processes (the stack); Triton always runs as the local CPU server. Everything works in
temporary copies of the Feast and model repositories and stops at the end.

Each test is marked by its folder: ``unit`` (logic, no service; ``make unit``),
``integration`` (against the real services) and ``e2e`` (the whole loop).
"""

from __future__ import annotations

import gc
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from camoe.settings import ROOT, Settings
from camoe.stack.stack import Endpoints, Stack
from tests.containers import start_container

log = logging.getLogger(__name__)

KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test with its folder's kind, so ``-m unit`` selects the fast loop."""
    for item in items:
        kind = item.path.parent.name
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(KINDS)}}}/")
        item.add_marker(kind)


def copy_repos(root: Path) -> tuple[Path, Path]:
    """Fresh copies of feature_repo/ and model_repo/ (definitions and config only)."""
    feature_repo = root / "feature_repo"
    feature_repo.mkdir()
    for name in ("feature_store.yaml", "definitions.py"):
        shutil.copy2(ROOT / "feature_repo" / name, feature_repo / name)
    model_dir = root / "model_repo" / "camoe"
    model_dir.mkdir(parents=True)
    shutil.copy2(ROOT / "model_repo" / "camoe" / "config.pbtxt", model_dir / "config.pbtxt")
    return feature_repo, root / "model_repo"


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Endpoints]]:
    root = tmp_path_factory.mktemp("camoe")
    feature_repo, model_repo = copy_repos(root)
    containers = {name: start_container(name) for name in ("kafka", "redis")}
    overrides: dict[str, dict[str, object]] = {
        "triton": {"model_repo": model_repo},
        "feast": {"repo_path": feature_repo},
        "stack": {"state_dir": root / "stack"},
        "trainer": {
            "checkpoint_dir": root / "trainer",
            "pretrain_requests": 3000,
            "publish_every_examples": 300,
        },
    }
    if containers["kafka"]:
        overrides["kafka"] = {"bootstrap_servers": containers["kafka"].address}
    if containers["redis"]:
        overrides["redis"] = {"url": containers["redis"].address}
    settings = Settings(**overrides)
    stack = Stack(settings)
    try:
        endpoints = stack.up()
        yield settings, endpoints
    finally:
        gc.collect()  # Kafka clients left by tests end before the broker, not after it
        stack.down()
        for started in containers.values():
            if started is not None:
                started.container.stop()
