"""Feast, configured from the settings: apply the repository, materialise, read online.

The repository's ``feature_store.yaml`` stays the default for the ``feast`` CLI; here the
same definitions are applied with the online store the settings pick (SQLite embedded,
or Redis at the stack's address), so tests and the demo never edit that file.
"""

from __future__ import annotations

import importlib.util
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from camoe.features import AD_COUNTERS, AD_PROFILE, USER_COUNTERS, USER_PROFILE
from camoe.settings import FeastSettings

log = logging.getLogger(__name__)

USER_FEATURES = USER_PROFILE + USER_COUNTERS
AD_FEATURES = AD_PROFILE + AD_COUNTERS


def redis_connection_string(url: str) -> str:
    """``redis://host:port/0`` -> Feast's ``host:port``."""
    parsed = urlparse(url if "://" in url else f"redis://{url}")
    return f"{parsed.hostname}:{parsed.port or 6379}"


def open_store(settings: FeastSettings, redis_url: str | None = None) -> Any:
    """A FeatureStore over ``settings.repo_path`` with the chosen online store."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    repo = Path(settings.repo_path).resolve()
    data = repo / "data"
    data.mkdir(parents=True, exist_ok=True)
    if settings.online_store == "redis":
        if not redis_url:
            raise ValueError(
                "feast.online_store is redis but no Redis URL: start the stack "
                "(`camoe stack up`) or set REDIS_URL"
            )
        online: dict[str, Any] = {
            "type": "redis",
            "connection_string": redis_connection_string(redis_url),
        }
    else:
        online = {"type": "sqlite", "path": str(data / "online_store.db")}
    config = RepoConfig(
        project="camoe",
        provider="local",
        registry=str(data / f"registry_{settings.online_store}.db"),
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=str(repo),
    )
    return FeatureStore(repo_path=str(repo), config=config)


def apply_and_materialize(store: Any) -> None:
    """``feast apply`` of the repository's definitions, then materialise profiles online."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    repo = Path(store.repo_path)
    # Feast's own parse_repo needs the process to chdir into the repository; load the
    # definitions module by path instead.
    spec = importlib.util.spec_from_file_location("camoe_feature_repo", repo / "definitions.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no Feast definitions at {repo / 'definitions.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, DataSource, FeatureView, FeatureService)
    objects = [value for value in vars(module).values() if isinstance(value, kinds)]
    store.apply(objects)
    log.info("feast: applied %d objects from %s", len(objects), repo)
    store.materialize_incremental(end_date=datetime.now(UTC))


class OnlineFeatures:
    """Reads the model's user and ad features for (user, ad) pairs from the online store.

    A batch of requests names few distinct users and ads many times over, so each distinct
    user and each distinct ad is read once (one Feast call per entity), not once per pair.
    The features are those of the feature service (the model's input contract).
    """

    def __init__(self, store: Any, feature_service: str) -> None:
        self._store = store
        service = store.get_feature_service(feature_service)
        refs = {
            f"{projection.name_to_use()}:{feature.name}": feature.name
            for projection in service.feature_view_projections
            for feature in projection.features
        }
        self._user_refs = [r for r, name in refs.items() if name in USER_FEATURES]
        self._ad_refs = [r for r, name in refs.items() if name in AD_FEATURES]

    def _read(
        self, refs: list[str], key: str, ids: list[str], names: list[str], profile: str
    ) -> dict[str, dict[str, Any]]:
        response = self._store.get_online_features(
            features=refs, entity_rows=[{key: i} for i in ids]
        ).to_dict()
        found = {}
        for k, entity in enumerate(ids):
            # One the store has never seen comes back with all-None profile values.
            if response[profile][k] is not None:
                found[entity] = {name: response[name][k] for name in names}
        return found

    def read(self, pairs: list[tuple[str, str]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(user features, ad features) per pair; ``{}`` for an unknown user or ad."""
        if not pairs:
            return []
        users = self._read(
            self._user_refs,
            "user_id",
            sorted({u for u, _ in pairs}),
            USER_FEATURES,
            USER_PROFILE[0],
        )
        ads = self._read(
            self._ad_refs, "ad_id", sorted({a for _, a in pairs}), AD_FEATURES, AD_PROFILE[0]
        )
        return [(users.get(u, {}), ads.get(a, {})) for u, a in pairs]


def counter_pusher(store: Any) -> Any:
    """A function that pushes fresh counters through the repository's push sources."""
    import pandas as pd

    def push(users: dict[str, list[int]], ads: dict[str, list[int]]) -> None:
        now = pd.Timestamp.now(tz="UTC")
        if users:
            store.push(
                "user_counters_push_source",
                pd.DataFrame(
                    {
                        "user_id": list(users),
                        "event_timestamp": now,
                        "user_impressions": [c[0] for c in users.values()],
                        "user_clicks": [c[1] for c in users.values()],
                    }
                ),
            )
        if ads:
            store.push(
                "ad_counters_push_source",
                pd.DataFrame(
                    {
                        "ad_id": list(ads),
                        "event_timestamp": now,
                        "ad_impressions": [c[0] for c in ads.values()],
                        "ad_clicks": [c[1] for c in ads.values()],
                    }
                ),
            )

    return push
