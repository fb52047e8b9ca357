"""Feast definitions, in dependency order: entities, sources, feature views, push sources,
feature services. Offline data is written into ``data/`` by the traffic simulator. The fields
and their types are the feature schema of camoe/features.py (tests/unit/test_schema.py)."""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Float32, Int64
from feast.value_type import ValueType

# --- entities ----------------------------------------------------------------------
user = Entity(
    name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="A listener."
)
ad = Entity(
    name="ad",
    join_keys=["ad_id"],
    value_type=ValueType.STRING,
    description="An ad creative (audio, video or display).",
)

# --- batch sources -----------------------------------------------------------------
user_profile_source = FileSource(
    name="user_profile_source",
    path="data/user_profiles.parquet",
    timestamp_field="event_timestamp",
)
ad_profile_source = FileSource(
    name="ad_profile_source",
    path="data/ad_profiles.parquet",
    timestamp_field="event_timestamp",
)
user_counters_source = FileSource(
    name="user_counters_source",
    path="data/user_counters.parquet",
    timestamp_field="event_timestamp",
)
ad_counters_source = FileSource(
    name="ad_counters_source",
    path="data/ad_counters.parquet",
    timestamp_field="event_timestamp",
)

# --- push sources: the labeler writes fresh counters through these --------------------
user_counters_push_source = PushSource(
    name="user_counters_push_source", batch_source=user_counters_source
)
ad_counters_push_source = PushSource(
    name="ad_counters_push_source", batch_source=ad_counters_source
)

# --- feature views -----------------------------------------------------------------
user_profile_fv = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=365),  # profiles change slowly; a stale one beats none
    schema=[
        Field(name="age_bucket", dtype=Int64),
        Field(name="country", dtype=Int64),
        Field(name="premium", dtype=Int64),
        Field(name="activity", dtype=Float32),
        Field(name="affinity_0", dtype=Float32),
        Field(name="affinity_1", dtype=Float32),
        Field(name="affinity_2", dtype=Float32),
        Field(name="affinity_3", dtype=Float32),
    ],
    source=user_profile_source,
    online=True,
)
ad_profile_fv = FeatureView(
    name="ad_profile",
    entities=[ad],
    ttl=timedelta(days=365),
    schema=[
        Field(name="campaign_index", dtype=Int64),
        Field(name="category", dtype=Int64),
        Field(name="quality", dtype=Float32),
        Field(name="ad_affinity_0", dtype=Float32),
        Field(name="ad_affinity_1", dtype=Float32),
        Field(name="ad_affinity_2", dtype=Float32),
        Field(name="ad_affinity_3", dtype=Float32),
    ],
    source=ad_profile_source,
    online=True,
)
user_counters_fv = FeatureView(
    name="user_counters",
    entities=[user],
    ttl=timedelta(days=1),  # counters older than a day are no longer "recent"
    schema=[
        Field(name="user_impressions", dtype=Int64),
        Field(name="user_clicks", dtype=Int64),
    ],
    source=user_counters_push_source,
    online=True,
)
ad_counters_fv = FeatureView(
    name="ad_counters",
    entities=[ad],
    ttl=timedelta(days=1),
    schema=[
        Field(name="ad_impressions", dtype=Int64),
        Field(name="ad_clicks", dtype=Int64),
    ],
    source=ad_counters_push_source,
    online=True,
)

# --- feature services: one per model input layout ----------------------------------
camoe_v1 = FeatureService(
    name="camoe_v1",
    features=[user_profile_fv, ad_profile_fv, user_counters_fv, ad_counters_fv],
)
