"""Feast, configured from the settings: apply the repository, materialise, read online.

The repository's ``feature_store.yaml`` stays the default for the ``feast`` CLI; here the
same definitions are applied with the online store the settings pick (SQLite embedded,
or Redis at the stack's address), so tests and the demo never edit that file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import random
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from camoe.features import AD_COUNTERS, AD_PROFILE, USER_COUNTERS, USER_PROFILE
from camoe.settings import FeastSettings, RedisSettings

log = logging.getLogger(__name__)


# A Redis that does not answer within these is treated as down (seconds).
FAIL_FAST_TIMEOUTS = ",socket_connect_timeout=1,socket_timeout=2"


def redis_connection_string(url: str, credentials: RedisSettings | None = None) -> str:
    """``redis://host:port/0`` and the ACL user -> Feast's ``host:port[,username=..]``."""
    parsed = urlparse(url if "://" in url else f"redis://{url}")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}"]
    password = credentials.secret() if credentials else None
    if password is not None:
        if "," in password or "=" in password:
            raise ValueError("redis.password: Feast's connection string cannot hold ',' or '='")
        if credentials and credentials.username:
            parts.append(f"username={credentials.username}")
        parts.append(f"password={password}")
    return ",".join(parts)


def check_redis(url: str, credentials: RedisSettings | None = None) -> None:
    """Raises ValueError, in one line naming the setting to fix, when Redis at ``url`` is
    unreachable or refuses the configured user (the password is never shown)."""
    address = redis_connection_string(url).split(",")[0]
    password = credentials.secret() if credentials else None
    client = redis.Redis.from_url(
        url if "://" in url else f"redis://{url}",
        username=credentials.username if credentials else None,
        password=password,
        socket_timeout=5.0,
    )
    try:
        client.ping()
    except redis.AuthenticationError as error:
        if password is None:
            raise ValueError(
                f"Redis at {address} needs a password: set redis.username and redis.password"
            ) from None
        raise ValueError(
            f"Redis at {address} refused the credentials ({error}): "
            "check redis.username and redis.password"
        ) from None
    except redis.ConnectionError as error:
        raise ValueError(
            f"Redis at {address} is not reachable ({error}): start it or check REDIS_URL"
        ) from None
    finally:
        client.close()


def open_store(
    settings: FeastSettings, redis_url: str | None = None, credentials: RedisSettings | None = None
) -> Any:
    """A FeatureStore over ``settings.repo_path`` with the chosen online store; with Redis,
    reached as ``credentials``' ACL user (checked first, so a wrong password is one line)."""
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
        check_redis(redis_url, credentials)
        online: dict[str, Any] = {
            "type": "redis",
            "connection_string": redis_connection_string(redis_url, credentials)
            + FAIL_FAST_TIMEOUTS,
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
    store = FeatureStore(repo_path=str(repo), config=config)
    if settings.online_store == "redis":
        # redis-py retries a refused connection three times with backoff of up to 10 s:
        # a scorer would stall its batch through an outage, so fail at once instead
        # (``OnlineFeatures`` serves cached rows, the labeler's counters wait).
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        online_store = store._get_provider().online_store
        online_store._get_client(config.online_store).set_retry(Retry(NoBackoff(), 0))
    return store


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
    materialize(store)


def materialize(store: Any) -> None:
    """Writes the offline store's rows of every feature view into the online store."""
    # The whole history, not materialize_incremental: the registry remembers the last
    # run, but a freshly started online store (a new Redis) holds nothing of it.
    now = datetime.now(UTC)
    store.materialize(start_date=now - MATERIALIZE_HISTORY, end_date=now)


MATERIALIZE_HISTORY = timedelta(days=366)  # the longest feature-view TTL, plus a day
# What the online store raises when it cannot be reached (Redis down or restarting; a
# Redis still loading its data answers BUSY LOADING, a ConnectionError too).
STORE_DOWN: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


class FeatureStoreDown(ConnectionError):
    """The online store could not be written; the caller keeps what it wanted to write."""


class OnlineFeatures:
    """Reads the model's user and ad features from the online store.

    Feast stays the source of truth: its definitions name the features, its online store
    (SQLite or Redis) holds them, in Feast's own layout. What this skips is
    ``get_online_features``' per-call work (resolving the feature service, assembling a
    response proto, converting it to columns), which dominates at a scorer's batch sizes:

    * each distinct user and ad of a batch is read once;
    * on Redis, where Feast keeps all views of an entity in one hash, one pipelined HMGET
      per entity fetches every view's fields (Feast's ``online_read`` makes a pipeline per
      view); on SQLite, Feast's provider reads each view;
    * stored values are converted with Feast's own function, once per distinct byte string
      (a few hundred distinct values recur across thousands of rows);
    * rows are kept for up to the seconds ``cache_s`` gives their view
      (``scoring.feature_cache_s``): profiles change only when materialised (30 s);
      counters change with every push of the labeler, so they are kept for a second (at
      hundreds of requests/s most users and ads recur within it, and the labeler's
      counters are seconds old anyway). A view not named is read every time.

    Values older than their feature view's TTL count as missing, as in Feast. A test
    (tests/integration/test_feast.py) checks the rows equal ``get_online_features``'.
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
        self._values: dict[bytes, Any] = {}  # stored bytes -> Python value
        self._jitter = random.Random(0)
        self._redis = store.config.online_store.type == "redis"
        self._redis_keys: dict[tuple[str, str], bytes] = {}
        self._redis_plans: dict[str, tuple[list[Any], list[Any]]] = {}  # per join key
        self.unavailable = False  # the last read could not reach the store
        self._down_since: float | None = None

    def read(
        self, user_ids: Iterable[str], ad_ids: Iterable[str]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(users, ads): the features of each known id; an unknown one (no profile) is
        absent. Features the store lacks for a known entity (no counters yet) are None.

        When the store cannot be reached the read still answers, from the cache (expired
        rows included) and otherwise without the entity, and ``unavailable`` is True
        until a read reaches it again."""
        self.unavailable = False
        return (
            self._read("user_id", sorted(set(user_ids)), USER_PROFILE[0]),
            self._read("ad_id", sorted(set(ad_ids)), AD_PROFILE[0]),
        )

    def _read(self, key: str, ids: list[str], profile: str) -> dict[str, dict[str, Any]]:
        """Merged rows of every view of one entity; only entities with a ``profile``."""
        now = time.monotonic()
        merged: dict[str, dict[str, Any]] = {}
        stale: set[str] = set()
        for view, _ in self._views[key]:
            for entity in ids:
                hit = self._cache.get((view.name, entity))
                if hit is None or hit[0] <= now:
                    stale.add(entity)
                elif hit[1] is not None:
                    merged.setdefault(entity, {}).update(hit[1])
        if stale:
            missing = sorted(stale)
            fetch = self._fetch_redis if self._redis else self._fetch_views
            try:
                fetched = fetch(key, missing)
            except STORE_DOWN as error:
                self._store_down(error)
                # Expired rows are better than defaults while the store cannot answer.
                for view, _ in self._views[key]:
                    for entity in missing:
                        hit = self._cache.get((view.name, entity))
                        if hit is not None and hit[1] is not None:
                            merged.setdefault(entity, {}).update(hit[1])
                fetched = {}
            else:
                self._store_up()
            for (view, entity), row in fetched.items():
                ttl = self._cache_s.get(view.name, 0.0)
                if ttl > 0:
                    # Kept for between half and all of the view's seconds: entities read
                    # together (all of them, at start) must not all expire together, or
                    # one batch re-reads thousands of them every ``ttl``.
                    keep = ttl * (0.5 + 0.5 * self._jitter.random())
                    self._cache[(view.name, entity)] = (now + keep, row)
                if row is not None:
                    merged.setdefault(entity, {}).update(row)
        # One the store has never seen has no profile: it is unknown, counters or not.
        return {e: row for e, row in merged.items() if row.get(profile) is not None}

    def _store_down(self, error: Exception) -> None:
        self.unavailable = True
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "feature store unreachable (%s): serving cached and default features", error
            )

    def _store_up(self) -> None:
        if self._down_since is not None:
            log.info("feature store back after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    def _fetch_views(self, key: str, ids: list[str]) -> dict[tuple[Any, str], dict | None]:
        """Each view's row per entity through Feast's provider (any online store)."""
        keys = [
            self._entity_key(join_keys=[key], entity_values=[self._value(string_val=e)])
            for e in ids
        ]
        rows: dict[tuple[Any, str], dict | None] = {}
        for view, names in self._views[key]:
            read = self._store.provider.online_read(self._store.config, view, keys, names)
            for entity, (stamp, values) in zip(ids, read, strict=True):
                rows[(view, entity)] = self._row(view, names, stamp, values)
        return rows

    def _row(
        self, view: Any, names: list[str], stamp: datetime | None, values: dict | None
    ) -> dict[str, Any] | None:
        oldest = _oldest(view)
        if values is None or (
            oldest is not None and stamp is not None and stamp.replace(tzinfo=UTC) < oldest
        ):
            return None
        return {n: self._to_python(values[n]) if n in values else None for n in names}

    def _fetch_redis(self, key: str, ids: list[str]) -> dict[tuple[Any, str], dict | None]:
        """Every view's row per entity with one pipelined HMGET per entity, through Feast's
        Redis store (its key and field layout, its client)."""
        from google.protobuf.timestamp_pb2 import Timestamp

        online = self._store.provider.online_store
        config = self._store.config
        if key not in self._redis_plans:
            plan = []  # (view, feature names, its slice of the reply)
            fields: list[Any] = []
            for view, names in self._views[key]:
                requested, hset = online._generate_hset_keys_for_features(view, list(names))
                plan.append((view, requested[:-1], slice(len(fields), len(fields) + len(hset))))
                fields += hset  # the view's features, then its "_ts:<view>" field
            self._redis_plans[key] = (plan, fields)
        plan, fields = self._redis_plans[key]
        unknown = [e for e in ids if (key, e) not in self._redis_keys]
        if unknown:
            entity_keys = [
                self._entity_key(join_keys=[key], entity_values=[self._value(string_val=e)])
                for e in unknown
            ]
            generated = online._generate_redis_keys_for_entities(config, entity_keys)
            self._redis_keys.update({(key, e): k for e, k in zip(unknown, generated, strict=True)})
        replies = online._read_hash_fields(
            config, [(self._redis_keys[(key, e)], fields) for e in ids]
        )
        oldest = {view.name: _oldest(view) for view, _, _ in plan}
        rows: dict[tuple[Any, str], dict | None] = {}
        for entity, reply in zip(ids, replies, strict=True):
            for view, names, part in plan:
                *values, stamp = reply[part]
                if stamp is None:  # Feast writes the view's timestamp with every row
                    rows[(view, entity)] = None
                    continue
                ts = Timestamp.FromString(stamp)
                when = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)
                limit = oldest[view.name]
                rows[(view, entity)] = (
                    None
                    if limit is not None and when < limit
                    else {n: self._python(v) for n, v in zip(names, values, strict=True)}
                )
        return rows

    def _python(self, stored: bytes | None) -> Any:
        if stored is None:
            return None
        value = self._values.get(stored)
        if value is None:
            value = self._to_python(self._value.FromString(stored))
            if len(self._values) < 100_000:  # distinct stored values; counters keep growing
                self._values[stored] = value
        return value


def _oldest(view: Any) -> datetime | None:
    """The oldest timestamp a row of ``view`` may have to count (Feast's TTL)."""
    return datetime.now(UTC) - view.ttl if view.ttl else None


def counter_pusher(store: Any) -> Any:
    """A function that writes fresh counters into the online store's counter views:
    ``users`` and ``ads`` map an id to its counts in the views' field order.

    The rows go straight to the provider's ``online_write_batch``, the write path (and
    key layout) Feast's push ends in, with the views looked up once: ``store.push``
    re-read every view from the registry and built a DataFrame on each call, four fifths
    of the labeler's time."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    provider = store._get_provider()
    views = {
        entity: (store.get_feature_view(f"{entity}_counters"), fields)
        for entity, fields in (("user", USER_COUNTERS), ("ad", AD_COUNTERS))
    }

    def push(users: dict[str, list[int]], ads: dict[str, list[int]]) -> None:
        now = datetime.now(UTC)
        for entity, counts in (("user", users), ("ad", ads)):
            if not counts:
                continue
            view, fields = views[entity]
            rows = [
                (
                    EntityKey(join_keys=[f"{entity}_id"], entity_values=[Value(string_val=key)]),
                    {name: Value(int64_val=int(c[i])) for i, name in enumerate(fields)},
                    now,
                    None,
                )
                for key, c in counts.items()
            ]
            try:
                provider.online_write_batch(store.config, view, rows, None)
            except STORE_DOWN as error:
                raise FeatureStoreDown(f"online store unreachable: {error}") from None

    return push


def profile_restorer(store: Any) -> Callable[[], None]:
    """A function that materialises the profiles again, for an online store that came
    back empty (a Redis restarted without persistence); FeatureStoreDown while it is
    still unreachable."""

    def restore() -> None:
        started = time.monotonic()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # Feast's progress, not a log
                materialize(store)
        except STORE_DOWN as error:
            raise FeatureStoreDown(f"online store unreachable: {error}") from None
        log.info("feast: profiles materialised again in %.1f s", time.monotonic() - started)

    return restore
