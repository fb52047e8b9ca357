"""Redis, Feast's online store, killed (SIGKILL) mid-run and restarted empty, with the
scorer, the labeler and the trainer running: every request is scored (from cached or
default features, flagged), the labels are unaffected, and once Redis is back the
labeler re-materialises the profiles and pushes every counter it holds again."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from camoe.clients.feature_store import (
    FeatureStoreDown,
    OnlineFeatures,
    apply_and_materialize,
    counter_pusher,
    open_store,
    profile_restorer,
)
from camoe.clients.kafka import read_committed
from camoe.features import USER_PROFILE
from camoe.settings import FeastSettings, Settings
from camoe.sim.loop import demo_settings, run_loop
from camoe.sim.traffic import World
from camoe.stack import redis as redis_stack
from camoe.stack.process import free_port, stop_pid
from camoe.streaming.avro import AvroCodec
from tests.integration.conftest import outage

PROFILE = USER_PROFILE[0]  # a field of the user's profile
KILL_AFTER_S = 12.0
DOWN_S = 8.0


@pytest.fixture
def own_redis(tmp_path) -> Iterator[tuple[Path, list[int], int]]:
    """A Redis of this test's own: (its folder, [its pid, kept current], its port)."""
    folder, port = tmp_path / "redis", free_port()
    pid, _ = redis_stack.start_server(folder, folder / "redis.log", 30, port=port)
    pids = [pid]
    yield folder, pids, port
    stop_pid(pids[0])


def test_reads_answer_from_the_cache_while_redis_is_down_and_writes_raise(
    services, own_redis, tmp_path
):
    settings, _ = services
    folder, pids, port = own_redis
    repo = tmp_path / "feature_repo"
    shutil.copytree(settings.feast.repo_path, repo, ignore=shutil.ignore_patterns("data"))
    World(settings.simulator).write_offline_data(repo / "data")
    store = open_store(
        FeastSettings(repo_path=repo, online_store="redis"), f"redis://127.0.0.1:{port}/0"
    )
    apply_and_materialize(store)
    reader = OnlineFeatures(store, settings.feast.feature_service, cache_s={"user_profile": 0.1})
    before, _ = reader.read(["u1"], [])
    assert "u1" in before and not reader.unavailable

    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)  # the cached row has expired: an expired row is still served
    during, _ = reader.read(["u1", "u2"], [])
    assert reader.unavailable
    assert during["u1"][PROFILE] == before["u1"][PROFILE]
    assert "u2" not in during  # never read: no row to serve, the scorer uses defaults
    with pytest.raises(FeatureStoreDown, match="online store unreachable"):
        counter_pusher(store)({"u1": [1, 0]}, {})
    with pytest.raises(FeatureStoreDown):
        profile_restorer(store)()

    pids[0], _ = redis_stack.start_server(folder, folder / "redis.log", 30, port=port)
    empty, _ = reader.read(["u1"], [])
    assert not reader.unavailable and "u1" not in empty  # back, and empty
    profile_restorer(store)()
    time.sleep(0.2)
    again, _ = reader.read(["u1"], [])
    assert again["u1"][PROFILE] == before["u1"][PROFILE]


def test_redis_killed_and_restarted_empty_mid_run(services, own_redis):
    settings, endpoints = services
    folder, pids, port = own_redis
    settings = demo_settings(settings)
    settings = settings.model_copy(
        update={
            "feast": settings.feast.model_copy(update={"online_store": "redis"}),
            "redis": settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"}),
        }
    )
    topics: dict[str, str] = {}

    @contextmanager
    def watch(run: Settings, *_: Any) -> Iterator[dict[str, Any]]:
        topics.update(scores=run.kafka.topics.ad_scores.name)
        topics.update(labels=run.kafka.topics.labelled_events.name)
        with outage(
            pids,
            lambda: redis_stack.start_server(folder, folder / "redis.log", 30, port=port)[0],
            KILL_AFTER_S,
            DOWN_S,
            Path(run.stack.state_dir) / "logs",
            ("score", "label"),
        ) as seen:
            yield seen

    summary = run_loop(settings, duration_s=40.0, drain_s=20.0, watch=watch)
    seen = summary["watch"]
    assert "killed" in seen and "restarted" in seen, seen
    assert summary["component_failures"] == {}

    # Nothing lost: every request scored; those read while Redis was down are flagged.
    assert summary["scored"] == summary["requests"] > 0, summary
    answers = read_committed(endpoints.kafka, topics["scores"], AvroCodec("ad_scores").decode)
    assert len({a["request_id"] for a in answers}) == summary["requests"]
    down = [a for a in answers if "features_unavailable" in a["flags"]]
    assert down, "no request was flagged while the feature store was down"

    # The labels do not depend on Redis: one negative per impression, one positive per click.
    labels = read_committed(endpoints.kafka, topics["labels"], AvroCodec("labelled_event").decode)
    assert summary["labels"] == summary["requests"] + summary["clicks"]

    # Redis came back empty; the labeler put the profiles and its counters back: every
    # user's counters equal its impressions and clicks in the labels.
    impressions = Counter(e["impression"]["user_id"] for e in labels if e["label"] == 0)
    clicks = Counter(e["impression"]["user_id"] for e in labels if e["label"] == 1)
    store = open_store(settings.feast, settings.redis.url, settings.redis)
    users, _ = OnlineFeatures(store, settings.feast.feature_service).read(impressions, [])
    assert set(users) == set(impressions), "profiles not re-materialised"
    counted = {u: (users[u]["user_impressions"], users[u]["user_clicks"]) for u in users}
    assert counted == {u: (impressions[u], clicks[u]) for u in impressions}

    # One line when the store goes, one when it is back, per component.
    logs = Path(settings.stack.state_dir) / "logs"
    for name, start in seen["log_starts"].items():
        text = (logs / f"{name}.log").read_bytes()[start:].decode()
        assert text.count("feature store unreachable") == 1, (name, text[-3000:])
        assert text.count("feature store back after") == 1, (name, text[-3000:])
