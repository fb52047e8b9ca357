"""Feast, configured from the settings: apply the repository, materialise, read online.

The repository's ``feature_store.yaml`` stays the default for the ``feast`` CLI; here the
same definitions are applied with the online store the settings pick (SQLite embedded,
or Redis at the stack's address), so tests and the demo never edit that file.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from camoe.features import AD_PROFILE, USER_PROFILE
from camoe.settings import FeastSettings

log = logging.getLogger(__name__)


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
    # The whole history, not materialize_incremental: the registry remembers the last
    # run, but a freshly started online store (a new Redis) holds nothing of it.
    now = datetime.now(UTC)
    store.materialize(start_date=now - MATERIALIZE_HISTORY, end_date=now)


MATERIALIZE_HISTORY = timedelta(days=366)  # the longest feature-view TTL, plus a day


class OnlineFeatures:
    """Reads the model's user and ad features for (user, ad) pairs from the online store.

    Feast stays the source of truth: its definitions name the features, its online store
    (SQLite or Redis) holds them, and its own ``provider.online_read`` reads them. What
    this skips is ``get_online_features``' per-call work (resolving the feature service,
    assembling a response proto, converting it to columns), which dominates at batch
    sizes of a scorer. Two more savings, both exact:

    * a batch names few distinct users and ads many times over: each is read once;
    * rows are kept for the seconds ``cache_s`` gives their view
      (``scoring.feature_cache_s``): profiles change only when materialised (30 s);
      counters change with every push of the labeler, so they are kept for a second (at
      hundreds of requests/s most users and ads recur within it, and the labeler's
      counters are seconds old anyway). A view not named is read every time.

    Values older than their feature view's TTL count as missing, as in Feast.
    """

    def __init__(
        self,
        store: Any,
        feature_service: str,
        cache_s: dict[str, float] | None = None,
    ) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        self._store = store
        self._entity_key, self._value, self._to_python = (
            EntityKey,
            Value,
            feast_value_type_to_python_type,
        )
        service = store.get_feature_service(feature_service)
        self._views: dict[str, list[tuple[Any, list[str]]]] = {"user_id": [], "ad_id": []}
        for projection in service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            names = [f.name for f in projection.features]
            self._views[view.join_keys[0]].append((view, names))
        self._cache_s = cache_s or {}
        self._cache: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}

    def _read_view(
        self, view: Any, names: list[str], key: str, ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        ttl = self._cache_s.get(view.name, 0.0)
        cached = ttl > 0
        now = time.monotonic()
        found: dict[str, dict[str, Any]] = {}
        missing = []
        for entity in ids:
            hit = self._cache.get((view.name, entity)) if cached else None
            if hit is not None and hit[0] > now:
                if hit[1] is not None:
                    found[entity] = hit[1]
            else:
                missing.append(entity)
        if not missing:
            return found
        keys = [
            self._entity_key(join_keys=[key], entity_values=[self._value(string_val=e)])
            for e in missing
        ]
        rows = self._store.provider.online_read(self._store.config, view, keys, names)
        oldest = datetime.now(UTC) - view.ttl if view.ttl else None
        for entity, (stamp, values) in zip(missing, rows, strict=True):
            fresh = values is not None and (
                oldest is None or stamp is None or stamp.replace(tzinfo=UTC) >= oldest
            )
            row = (
                {n: self._to_python(values[n]) if n in values else None for n in names}
                if fresh
                else None
            )
            if row is not None:
                found[entity] = row
            if cached:
                self._cache[(view.name, entity)] = (now + ttl, row)
        return found

    def _read(self, key: str, ids: list[str], profile: str) -> dict[str, dict[str, Any]]:
        """Merged rows of every view of one entity; only entities with a ``profile``."""
        merged: dict[str, dict[str, Any]] = {}
        for view, names in self._views[key]:
            for entity, row in self._read_view(view, names, key, ids).items():
                merged.setdefault(entity, {}).update(row)
        # One the store has never seen has no profile: it is unknown, counters or not.
        return {e: row for e, row in merged.items() if row.get(profile) is not None}

    def read(self, pairs: list[tuple[str, str]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(user features, ad features) per pair; ``{}`` for an unknown user or ad.
        Features the store lacks for a known entity (no counters yet) are None."""
        if not pairs:
            return []
        users = self._read("user_id", sorted({u for u, _ in pairs}), USER_PROFILE[0])
        ads = self._read("ad_id", sorted({a for _, a in pairs}), AD_PROFILE[0])
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
