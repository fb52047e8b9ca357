"""Feast's Redis online store and the fast reader reached as an ACL user with a password:
the stack's Redis enables only that user, and a wrong or missing password is one line."""

from __future__ import annotations

import shutil
import time

import pytest
import redis

from camoe.clients.feature_store import (
    OnlineFeatures,
    apply_and_materialize,
    counter_pusher,
    open_store,
)
from camoe.settings import FeastSettings, RedisSettings
from camoe.sim.traffic import World
from camoe.stack import redis as redis_stack
from camoe.stack.process import stop_pid

PASSWORD = "s3cret-for-the-test"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redis-acl")
    credentials = RedisSettings(username="camoe", password=PASSWORD)
    pid, url = redis_stack.start_server(folder, folder / "redis.log", 30, credentials=credentials)
    yield url, credentials
    stop_pid(pid)


def test_the_acl_user_materialises_reads_and_pushes(acl_redis, services, tmp_path):
    url, credentials = acl_redis
    settings, _ = services
    repo = tmp_path / "feature_repo"
    shutil.copytree(settings.feast.repo_path, repo, ignore=shutil.ignore_patterns("data"))
    world = World(settings.simulator)
    world.write_offline_data(repo / "data")
    store = open_store(FeastSettings(repo_path=repo, online_store="redis"), url, credentials)
    apply_and_materialize(store)
    features = OnlineFeatures(store, settings.feast.feature_service)
    users, ads = features.read(["u42"], ["a7"])
    expected_user, expected_ad = world.features("u42", "a7")
    assert users["u42"]["user_impressions"] == 0
    for name, value in expected_user.items():
        assert users["u42"][name] == pytest.approx(value, rel=1e-6), name
    for name, value in expected_ad.items():
        assert ads["a7"][name] == pytest.approx(value, rel=1e-6), name
    counter_pusher(store)({"u42": [5, 2]}, {"a7": [9, 1]})
    time.sleep(1.1)  # counters are cached for a second by default
    users, _ = features.read(["u42"], ["a7"])
    assert (users["u42"]["user_impressions"], users["u42"]["user_clicks"]) == (5, 2)


def test_only_the_acl_user_gets_in(acl_redis):
    url, _ = acl_redis
    with pytest.raises(redis.AuthenticationError):  # `default` is disabled
        redis.Redis.from_url(url, password=PASSWORD).ping()
    with pytest.raises(redis.AuthenticationError, match="Authentication required"):
        redis.Redis.from_url(url).ping()
    assert redis_stack.ping(url, "camoe", PASSWORD)


@pytest.mark.parametrize(
    ("credentials", "says"),
    [
        (RedisSettings(username="camoe", password="wrong"), "check redis.username and redis"),
        (RedisSettings(), "set redis.username and redis.password"),
    ],
)
def test_a_wrong_or_missing_password_is_one_line(acl_redis, tmp_path, credentials, says):
    url, _ = acl_redis
    with pytest.raises(ValueError, match=says) as refused:
        open_store(FeastSettings(repo_path=tmp_path, online_store="redis"), url, credentials)
    assert "\n" not in str(refused.value) and "wrong" not in str(refused.value)


def test_the_password_can_come_from_a_file(acl_redis, tmp_path):
    url, _ = acl_redis
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    credentials = RedisSettings(username="camoe", password_file=secret)
    assert credentials.secret() == PASSWORD
    assert "s3cret" not in repr(RedisSettings(username="camoe", password=PASSWORD))
    assert redis_stack.ping(url, credentials.username, credentials.secret())
