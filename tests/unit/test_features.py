"""camoe/features.py: raw context, candidate and store values -> model arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from camoe.features import (
    AD_COUNTERS,
    AD_PROFILE,
    DEVICES,
    FORMATS,
    NUMERIC_FEATURES,
    PLACEMENTS,
    USER_COUNTERS,
    USER_PROFILE,
    FeatureLayout,
    format_index,
)

N_CAMPAIGNS = 40
CATEGORICAL = [
    "format",
    "content_type",
    "foreground",
    "device",
    "hour",
    "placement",
    "age_bucket",
    "country",
    "premium",
    "campaign_index",
    "category",
]


@pytest.fixture
def layout():
    return FeatureLayout(N_CAMPAIGNS)


def context(**overrides):
    return {
        "content_type": "podcast",
        "foreground": True,
        "device": "desktop",
        "hour": 21,
        "placement": "podcast_host_read",
        **overrides,
    }


def candidate(**overrides):
    return {"ad_id": "ad-007", "format": "video", "campaign_id": "c12", "bid": 1.5, **overrides}


def user(**overrides):
    return {
        "age_bucket": 3,
        "country": 10,
        "premium": 2,
        "activity": 1.2,
        "affinity_0": 0.1,
        "affinity_1": -0.2,
        "affinity_2": 0.3,
        "affinity_3": -0.4,
        "user_impressions": 9,
        "user_clicks": 1,
        **overrides,
    }


def ad(**overrides):
    return {
        "campaign_index": 40,
        "category": 7,
        "quality": 0.8,
        "ad_affinity_0": 0.5,
        "ad_affinity_1": -0.6,
        "ad_affinity_2": 0.7,
        "ad_affinity_3": -0.8,
        "ad_impressions": 99,
        "ad_clicks": 0,
        **overrides,
    }


def named(layout, row):
    categorical, numeric, complete = row
    assert len(categorical) == layout.n_categorical
    assert len(numeric) == layout.n_numeric
    return (
        dict(zip(CATEGORICAL, categorical, strict=True)),
        dict(zip(layout.numeric, numeric, strict=True)),
        complete,
    )


def test_layout_shape(layout):
    assert [f.name for f in layout.categorical] == CATEGORICAL
    assert layout.n_categorical == 11
    assert layout.n_numeric == len(NUMERIC_FEATURES) == 15
    assert dict((f.name, f.cardinality) for f in layout.categorical)["campaign_index"] == 41
    # Every feature the store serves is read, counters as log1p.
    assert set(USER_PROFILE + AD_PROFILE) <= set(CATEGORICAL) | set(NUMERIC_FEATURES)
    assert {f"log1p_{c}" for c in USER_COUNTERS + AD_COUNTERS} <= set(NUMERIC_FEATURES)


def test_known_values_map_to_expected_indices(layout):
    cat, num, complete = named(layout, layout.row(context(), candidate(), user(), ad()))
    assert cat == {
        "format": 2,  # video
        "content_type": 2,  # podcast
        "foreground": 2,
        "device": 2,  # desktop
        "hour": 22,  # hour + 1
        "placement": 3,  # podcast_host_read
        "age_bucket": 3,
        "country": 10,  # the largest valid country
        "premium": 2,
        "campaign_index": 40,  # the largest valid campaign
        "category": 7,
    }
    assert complete is True
    assert num["bid"] == 1.5
    assert num["activity"] == pytest.approx(1.2)
    assert num["affinity_3"] == pytest.approx(-0.4)
    assert num["quality"] == pytest.approx(0.8)
    assert num["ad_affinity_2"] == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"foreground": False}, 1),
        ({"foreground": True}, 2),
    ],
)
def test_foreground_is_1_or_2(layout, overrides, expected):
    cat, _, _ = named(layout, layout.row(context(**overrides), candidate(), user(), ad()))
    assert cat["foreground"] == expected


@pytest.mark.parametrize(("fmt", "expected"), [("audio", 1), ("video", 2), ("display", 3)])
def test_format_indices(layout, fmt, expected):
    cat, _, _ = named(layout, layout.row(context(), candidate(format=fmt), user(), ad()))
    assert cat["format"] == expected


@pytest.mark.parametrize(
    ("content_type", "expected"), [("music", 1), ("podcast", 2), ("audiobook", 3)]
)
def test_content_type_indices(layout, content_type, expected):
    cat, _, _ = named(
        layout, layout.row(context(content_type=content_type), candidate(), user(), ad())
    )
    assert cat["content_type"] == expected


def test_device_and_placement_indices_cover_their_vocabularies(layout):
    for i, device in enumerate(DEVICES, start=1):
        cat, _, _ = named(layout, layout.row(context(device=device), candidate(), user(), ad()))
        assert cat["device"] == i
    for i, placement in enumerate(PLACEMENTS, start=1):
        row = layout.row(context(placement=placement), candidate(), user(), ad())
        assert named(layout, row)[0]["placement"] == i


@pytest.mark.parametrize(("hour", "expected"), [(0, 1), (12, 13), (23, 24), (24, 0), (-1, 0)])
def test_hour_is_shifted_by_one_and_bounded(layout, hour, expected):
    cat, _, _ = named(layout, layout.row(context(hour=hour), candidate(), user(), ad()))
    assert cat["hour"] == expected


@pytest.mark.parametrize(
    ("where", "overrides"),
    [
        ("candidate", {"format": "hologram"}),
        ("context", {"content_type": "radio"}),
        ("context", {"device": "fridge"}),
        ("context", {"placement": "billboard"}),
        ("context", {"content_type": "Music"}),  # case matters
    ],
)
def test_unknown_category_strings_map_to_0(layout, where, overrides):
    ctx = context(**overrides) if where == "context" else context()
    cand = candidate(**overrides) if where == "candidate" else candidate()
    cat, _, complete = named(layout, layout.row(ctx, cand, user(), ad()))
    (field,) = overrides
    assert cat["format" if field == "format" else field] == 0
    assert complete is True  # request context is not a store value


@pytest.mark.parametrize(
    ("source", "name", "value"),
    [
        ("user", "age_bucket", 7),
        ("user", "age_bucket", 0),
        ("user", "age_bucket", -1),
        ("user", "country", 11),
        ("user", "premium", 3),
        ("user", "premium", float("nan")),
        ("user", "premium", None),
        ("ad", "campaign_index", N_CAMPAIGNS + 1),
        ("ad", "campaign_index", 10**9),
        ("ad", "category", 11),
    ],
)
def test_out_of_range_store_ints_map_to_0(layout, source, name, value):
    u = user(**{name: value}) if source == "user" else user()
    a = ad(**{name: value}) if source == "ad" else ad()
    cat, _, _ = named(layout, layout.row(context(), candidate(), u, a))
    assert cat[name] == 0
    others = {k: v for k, v in cat.items() if k != name}
    assert 0 not in others.values()


def test_campaign_range_follows_n_campaigns():
    small = FeatureLayout(5)
    cat, _, _ = named(small, small.row(context(), candidate(), user(), ad(campaign_index=5)))
    assert cat["campaign_index"] == 5
    cat, _, _ = named(small, small.row(context(), candidate(), user(), ad(campaign_index=6)))
    assert cat["campaign_index"] == 0


@pytest.mark.parametrize("missing", ["user", "ad", "both"])
def test_missing_user_or_ad_is_incomplete_with_zero_numerics(layout, missing):
    u = {} if missing in ("user", "both") else user()
    a = {} if missing in ("ad", "both") else ad()
    cat, num, complete = named(layout, layout.row(context(), candidate(), u, a))
    assert complete is False
    assert num["bid"] == 1.5  # the candidate's own value is never missing
    user_side = ["activity"] + [f"affinity_{i}" for i in range(4)]
    ad_side = ["quality"] + [f"ad_affinity_{i}" for i in range(4)]
    for name in (user_side if not u else []) + (ad_side if not a else []):
        assert num[name] == 0.0, name
    for name in (user_side if u else []) + (ad_side if a else []):
        assert num[name] != 0.0, name
    if not u:
        assert cat["age_bucket"] == cat["country"] == cat["premium"] == 0
        assert num["log1p_user_impressions"] == num["log1p_user_clicks"] == 0.0
    if not a:
        assert cat["campaign_index"] == cat["category"] == 0
        assert num["log1p_ad_impressions"] == num["log1p_ad_clicks"] == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
@pytest.mark.parametrize(("source", "name"), [("user", "affinity_2"), ("ad", "quality")])
def test_nan_or_missing_numeric_marks_incomplete(layout, source, name, bad):
    u = user(**{name: bad}) if source == "user" else user()
    a = ad(**{name: bad}) if source == "ad" else ad()
    _, num, complete = named(layout, layout.row(context(), candidate(), u, a))
    assert complete is False
    assert num[name] == 0.0
    assert all(math.isfinite(v) for v in num.values())


def test_nan_numpy_value_marks_incomplete(layout):
    _, num, complete = named(
        layout, layout.row(context(), candidate(), user(activity=np.float64("nan")), ad())
    )
    assert complete is False and num["activity"] == 0.0


def test_counters_none_are_log1p_0_and_keep_the_row_complete(layout):
    u = user(user_impressions=None, user_clicks=None)
    a = ad(ad_impressions=None, ad_clicks=float("nan"))
    _, num, complete = named(layout, layout.row(context(), candidate(), u, a))
    assert complete is True
    for name in USER_COUNTERS + AD_COUNTERS:
        assert num[f"log1p_{name}"] == 0.0


def test_absent_counter_keys_keep_the_row_complete(layout):
    u = {k: v for k, v in user().items() if k not in USER_COUNTERS}
    a = {k: v for k, v in ad().items() if k not in AD_COUNTERS}
    _, num, complete = named(layout, layout.row(context(), candidate(), u, a))
    assert complete is True
    assert num["log1p_user_impressions"] == 0.0


def test_counters_become_log1p(layout):
    _, num, _ = named(layout, layout.row(context(), candidate(), user(), ad()))
    assert num["log1p_user_impressions"] == pytest.approx(math.log(10))
    assert num["log1p_user_clicks"] == pytest.approx(math.log(2))
    assert num["log1p_ad_impressions"] == pytest.approx(math.log(100))
    assert num["log1p_ad_clicks"] == 0.0


def test_negative_counter_is_clamped_to_0(layout):
    _, num, _ = named(layout, layout.row(context(), candidate(), user(user_clicks=-3), ad()))
    assert num["log1p_user_clicks"] == 0.0


def test_missing_categorical_store_value_marks_incomplete(layout):
    _, _, complete = layout.row(context(), candidate(), user(country=None), ad())
    assert complete is False


@pytest.mark.parametrize(("fmt", "expected"), [("audio", 0), ("video", 1), ("display", 2)])
def test_format_index(fmt, expected):
    assert format_index(fmt) == expected
    assert FORMATS[format_index(fmt)] == fmt


@pytest.mark.parametrize("bad", ["hologram", "", "Audio"])
def test_format_index_rejects_unknown_formats(bad):
    with pytest.raises(ValueError, match=f"unknown ad format {bad!r}"):
        format_index(bad)


def test_a_batch_encodes_each_candidate_as_it_would_alone(layout):
    """The scorer's batches (users and ads shared between requests, unknown ones, missing
    and NaN values, a bid that is not a number) give each candidate the row it gets alone."""
    users = {
        "u1": user(),
        "u2": user(activity=float("nan"), user_clicks=None),
        "u3": user(country=None),
        "u4": {},
    }
    ads = {"a1": ad(), "a2": ad(quality=None, ad_impressions=5), "a3": ad(category=99)}
    requests = [
        {
            "user_id": u,
            "context": context(hour=h, device=d),
            "candidates": [
                candidate(ad_id=a, format=f, bid=b)
                for a, f, b in zip(
                    ["a1", "a2", "a3", "a9"][: n + 1],
                    ["audio", "video", "display", "video"],
                    [1.0, 0.5, float("inf"), 2.0],
                    strict=False,
                )
            ],
        }
        for n, (u, h, d) in enumerate(
            [("u1", 0, "tv"), ("u2", 23, "mobile"), ("u1", 7, "desktop"), ("u4", 12, "x")]
        )
    ] + [{"user_id": "u3", "context": context(), "candidates": [candidate(ad_id="a1")]}]

    encoded = layout.encode(requests, users, ads)

    k = 0
    for r, request in enumerate(requests):
        for c in request["candidates"]:
            cat, num, complete = layout.row(
                request["context"], c, users.get(request["user_id"], {}), ads.get(c["ad_id"], {})
            )
            assert encoded.categorical[k].tolist() == cat
            np.testing.assert_array_equal(encoded.numeric[k], np.asarray(num, np.float32))
            assert encoded.complete[k] == complete
            assert encoded.request[k] == r
            assert encoded.fmt[k] == FORMATS.index(c["format"])
            assert encoded.unknown_user[k] == (request["user_id"] == "u4")
            assert encoded.unknown_ad[k] == (c["ad_id"] == "a9")
            k += 1
    assert k == len(encoded.fmt) == 11
    assert encoded.categorical.dtype == np.int64 and encoded.numeric.dtype == np.float32


def test_encode_of_no_requests_keeps_the_width(layout):
    encoded = layout.encode([], {}, {})
    assert encoded.categorical.shape == (0, layout.n_categorical)
    assert encoded.numeric.shape == (0, layout.n_numeric)


def test_stored_values_that_are_no_numbers_are_defaults_and_mark_incomplete(layout):
    cat, num, complete = named(
        layout, layout.row(context(), candidate(), user(activity="high", country=math.inf), ad())
    )
    assert complete is False
    assert num["activity"] == 0.0 and cat["country"] == 0
    assert cat["age_bucket"] == 3  # the rest of the row is read as usual
