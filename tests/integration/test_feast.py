"""Features materialised through Feast, read back from SQLite and from Redis."""

from __future__ import annotations

import shutil
import time

import pytest

from camoe.clients.feature_store import (
    OnlineFeatures,
    apply_and_materialize,
    counter_pusher,
    open_store,
)
from camoe.settings import FeastSettings
from camoe.sim.traffic import World


@pytest.mark.parametrize("online_store", ["sqlite", "redis"])
def test_materialised_features_read_back(services, tmp_path, online_store):
    settings, endpoints = services
    repo = tmp_path / "feature_repo"
    shutil.copytree(settings.feast.repo_path, repo, ignore=shutil.ignore_patterns("data"))
    world = World(settings.simulator)
    world.write_offline_data(repo / "data")
    store = open_store(FeastSettings(repo_path=repo, online_store=online_store), endpoints.redis)
    apply_and_materialize(store)
    features = OnlineFeatures(
        store, settings.feast.feature_service, cache_s=settings.scoring.feature_cache_s
    )

    pairs = [("u1", "a3"), ("u42", "a7"), ("nobody", "a1")]
    users, ads = features.read([u for u, _ in pairs], [a for _, a in pairs])
    for user_id, ad_id in pairs[:2]:
        user, ad = users[user_id], ads[ad_id]
        expected_user, expected_ad = world.features(user_id, ad_id)
        assert set(expected_user) <= set(user)
        for name, value in {**expected_user, **expected_ad}.items():
            got = user[name] if name in expected_user else ad[name]
            assert got == pytest.approx(value, rel=1e-6), name
    assert "nobody" not in users  # unknown: absent, so the scorer flags it
    assert users["u1"]["user_impressions"] == 0

    # Counters are kept for a second by default: a push shows once that has passed.
    counter_pusher(store)({"u1": [5, 2]}, {"a3": [9, 1]})
    time.sleep(1.1)
    users, ads = features.read(["u1"], ["a3"])  # a3's profile now from the cache
    assert (users["u1"]["user_impressions"], users["u1"]["user_clicks"]) == (5, 2)
    assert (ads["a3"]["ad_impressions"], ads["a3"]["ad_clicks"]) == (9, 1)


@pytest.mark.parametrize("online_store", ["sqlite", "redis"])
def test_fast_reader_equals_get_online_features(services, tmp_path, online_store):
    """The scorer's reader returns exactly what Feast's get_online_features returns."""
    settings, endpoints = services
    repo = tmp_path / "feature_repo"
    shutil.copytree(settings.feast.repo_path, repo, ignore=shutil.ignore_patterns("data"))
    World(settings.simulator).write_offline_data(repo / "data")
    store = open_store(FeastSettings(repo_path=repo, online_store=online_store), endpoints.redis)
    apply_and_materialize(store)
    counter_pusher(store)({"u3": [7, 1]}, {"a5": [11, 2]})
    service = store.get_feature_service(settings.feast.feature_service)
    users = [f"u{i}" for i in range(0, 400, 7)] + ["stranger"]
    ads = [f"a{i}" for i in range(0, 200, 3)] + ["unknown-ad"]
    pairs = [(u, ads[k % len(ads)]) for k, u in enumerate(users)] + [("u3", "a5")]

    expected = store.get_online_features(
        features=service, entity_rows=[{"user_id": u, "ad_id": a} for u, a in pairs]
    ).to_dict()
    for cache_s in (
        {},
        {"user_profile": 30.0, "ad_profile": 30.0, "user_counters": 30.0, "ad_counters": 30.0},
    ):
        reader = OnlineFeatures(store, settings.feast.feature_service, cache_s=cache_s)
        for _ in range(2):  # the second pass is served partly from the cache
            by_user, by_ad = reader.read([u for u, _ in pairs], [a for _, a in pairs])
            for k, (user_id, ad_id) in enumerate(pairs):
                row = {**by_user.get(user_id, {}), **by_ad.get(ad_id, {})}
                for name, values in expected.items():
                    if name in ("user_id", "ad_id"):
                        continue
                    got = row.get(name)
                    assert got == values[k], (pairs[k], name, got, values[k])
