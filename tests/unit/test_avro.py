"""camoe/streaming/avro.py: single-object encoding, schema evolution and decode errors."""

from __future__ import annotations

import copy
import random

import pytest
from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

from camoe.streaming.avro import (
    SCHEMA_FILES,
    SINGLE_OBJECT_MARKER,
    AvroCodec,
    SchemaStore,
    schema_json,
)
from camoe.streaming.exceptions import DecodeError

T0 = 1_700_000_000_000  # epoch ms

FEATURE_LOG_ROW = {
    "request_id": "req-000123",
    "user_id": "user-0042",
    "ad_id": "ad-007",
    "format": "audio",
    "event_time": T0,
    "model_version": "3",
    "pctr": 0.0123,
    "feature_service": "camoe_v1",
    "categorical": [1, 2, 2, 1, 22, 3, 4, 7, 2, 12, 5],
    "numeric": [1.1, 1.25, 0.3, -0.7, 0.05, 1.9, 0.82, -0.4, 0.6, 0.0, 1.3, 3.4, 0.69, 8.1, 2.3],
}

SAMPLES = {
    "ad_request": {
        "request_id": "req-000123",
        "user_id": "user-0042",
        "event_time": T0,
        "context": {
            "content_type": "podcast",
            "foreground": True,
            "device": "mobile",
            "hour": 21,
            "placement": "podcast_host_read",
        },
        "candidates": [
            {"ad_id": "ad-007", "format": "audio", "campaign_id": "c12", "bid": 1.25},
            {"ad_id": "ad-113", "format": "video", "campaign_id": "c3", "bid": 2.4},
        ],
    },
    "ad_scores": {
        "request_id": "req-000123",
        "user_id": "user-0042",
        "event_time": T0,
        "model_version": "3",
        "scores": [
            {"ad_id": "ad-007", "format": "audio", "bid": 1.25, "pctr": 0.0123},
            {"ad_id": "ad-113", "format": "video", "bid": 2.4, "pctr": 0.0041},
        ],
        "winner_ad_id": "ad-007",
        "flags": ["unknown_ad"],
        "timings_ms": {"features": 1.7, "inference": 3.2, "total": 5.4},
    },
    "feature_log": FEATURE_LOG_ROW,
    "ad_click": {
        "request_id": "req-000123",
        "ad_id": "ad-007",
        "user_id": "user-0042",
        "event_time": T0 + 2_300,
    },
    "labelled_event": {
        "impression": FEATURE_LOG_ROW,
        "label": 1,
        "click_delay_ms": 2_300,
        "late_positive": False,
        "labelled_at": T0 + 2_400,
        "weight": 10.0,
        "fake_negative": True,
    },
    "model_update": {
        "model_name": "camoe",
        "version": 4,
        "published_at": T0,
        "examples_trained": 6_000,
        "metrics": {"auc": 0.71, "logloss": 0.052},
        "learned_click_times": [T0 - 9_000, T0 - 4_000],
    },
    "counter_update": {"impressions": 3, "clicks": 1},
    "labeler_state": {
        "impression": None,
        "label": None,
        "orphan_click": {
            "click": {
                "request_id": "req-000123",
                "ad_id": "ad-007",
                "user_id": "user-0042",
                "event_time": T0 + 2_300,
            },
            "topic": "ad-clicks",
            "offset": 1_234,
            "key": b"req-000123",
            "raw": b"\xc3\x01 the click as read",
        },
        "counter": None,
    },
    "dead_letter": {
        "source_topic": "ad-clicks",
        "partition": 2,
        "offset": 1_234,
        "key": b"req-000123",
        "value": b"\xc3\x01\x00\xff garbage",
        "reason": "click for unknown impression req-000123",
        "consumer": "labeler",
        "failed_at": T0,
    },
}

CLICK = SAMPLES["ad_click"]


def assert_same(actual, expected, path="record"):
    """Equality, with floats compared to float32 precision (the ``numeric`` array)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-6), path
    else:
        assert actual == expected and type(actual) is type(expected), path


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) as the Avro specification writes it, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def ad_click_with_source(default=True):
    schema = copy.deepcopy(schema_json("ad_click"))  # schema_json is cached: never mutate it
    field = {"name": "source", "type": "string"}
    if default:
        field["default"] = "app"
    schema["fields"].append(field)
    return schema


# --- round trips ----------------------------------------------------------------------


def test_every_schema_has_a_sample():
    assert set(SAMPLES) == set(SCHEMA_FILES)


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_round_trip(name):
    codec = AvroCodec(name)
    data = codec.encode(SAMPLES[name])
    assert_same(codec.decode(data), SAMPLES[name])


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_header_is_marker_and_little_endian_crc64_fingerprint(name):
    canonical = to_parsing_canonical_form(parse_schema(schema_json(name), _write_hint=False))
    expected = crc64_avro(canonical.encode()).to_bytes(8, "little")
    data = AvroCodec(name).encode(SAMPLES[name])
    assert data[:2] == SINGLE_OBJECT_MARKER == b"\xc3\x01"
    assert data[2:10] == expected


@pytest.mark.parametrize(
    "entry",
    [
        {"impression": FEATURE_LOG_ROW, "label": None},
        {"impression": FEATURE_LOG_ROW, "label": 0},
        {"counter": {"impressions": 12, "clicks": 1}},
    ],
)
def test_labeler_state_entries_round_trip(entry):
    codec = AvroCodec("labeler_state")
    empty = {"impression": None, "label": None, "orphan_click": None, "counter": None}
    assert_same(codec.decode(codec.encode(entry)), {**empty, **entry})


def test_labelled_event_with_null_delay_round_trips():
    record = {**SAMPLES["labelled_event"], "label": 0, "click_delay_ms": None}
    codec = AvroCodec("labelled_event")
    assert_same(codec.decode(codec.encode(record)), record)


def test_defaults_fill_omitted_fields_on_encode():
    scores = {k: v for k, v in SAMPLES["ad_scores"].items() if k not in ("flags", "timings_ms")}
    decoded = AvroCodec("ad_scores").decode(AvroCodec("ad_scores").encode(scores))
    assert decoded["flags"] == [] and decoded["timings_ms"] == {}
    letter = {k: v for k, v in SAMPLES["dead_letter"].items() if k not in ("key", "value")}
    decoded = AvroCodec("dead_letter").decode(AvroCodec("dead_letter").encode(letter))
    assert decoded["key"] is None and decoded["value"] is None


def test_unknown_schema_name_is_a_key_error():
    with pytest.raises(KeyError, match="no schema named 'nope'"):
        schema_json("nope")


# --- schema evolution -----------------------------------------------------------------


def test_compatible_change_reads_both_ways_through_the_shared_store():
    old = AvroCodec("ad_click")
    new = AvroCodec("ad_click", schema=ad_click_with_source())  # registers in the default store
    from_new = new.encode({**CLICK, "source": "web"})
    assert from_new[2:10] != old.encode(CLICK)[2:10]  # a different writer fingerprint
    assert old.decode(from_new) == CLICK  # the new field is dropped for the old reader
    assert new.decode(old.encode(CLICK)) == {**CLICK, "source": "app"}  # default filled
    assert new.decode(from_new) == {**CLICK, "source": "web"}


def test_old_process_reads_a_newer_writer_only_once_it_is_registered():
    # Two processes: each holds the repository's schemas; only the writer knows the new one.
    writer = AvroCodec("ad_click", schema=ad_click_with_source(), store=SchemaStore())
    reader_store = SchemaStore()
    reader = AvroCodec("ad_click", store=reader_store)
    data = writer.encode({**CLICK, "source": "web"})
    with pytest.raises(DecodeError, match="unknown writer schema"):
        reader.decode(data)
    reader_store.register(ad_click_with_source())
    assert reader.decode(data) == CLICK


def test_newer_reader_fills_default_for_records_of_the_old_writer():
    store = SchemaStore()
    old = AvroCodec("ad_click", store=store)
    new = AvroCodec("ad_click", schema=ad_click_with_source(), store=store)
    assert new.decode(old.encode(CLICK)) == {**CLICK, "source": "app"}
    # Each codec registers its writer schema in the store it was given.
    assert new.decode(new.encode({**CLICK, "source": "web"}))["source"] == "web"


def test_incompatible_change_is_a_decode_error():
    store = SchemaStore()
    old = AvroCodec("ad_click", store=store)
    new = AvroCodec("ad_click", schema=ad_click_with_source(default=False), store=store)
    with pytest.raises(DecodeError, match="ad_click"):
        new.decode(old.encode(CLICK))


# --- bytes that are not a record --------------------------------------------------------


def _valid():
    return AvroCodec("ad_click").encode(CLICK)


def _random_bytes():
    data = random.Random(1234).randbytes(64)
    assert data[:2] != SINGLE_OBJECT_MARKER
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "ad_click: not an Avro single-object encoded record", id="empty"),
        pytest.param(None, "ad_click: not an Avro single-object encoded record", id="none"),
        pytest.param(b"\xc3\x01\x00", "ad_click: not an Avro single-object", id="short-header"),
        pytest.param(_random_bytes(), "ad_click: not an Avro single-object", id="random"),
        pytest.param(b"\xc3\x02" + _valid()[2:], "ad_click: not an Avro single", id="wrong-marker"),
        pytest.param(
            b"\x00\x00\x00\x00\x07" + _valid()[10:], "ad_click: not an Avro", id="confluent-frame"
        ),
        pytest.param(_valid()[:10], "ad_click: corrupt Avro body", id="header-only"),
        pytest.param(_valid()[:-1], "ad_click: corrupt Avro body", id="truncated-by-one"),
        pytest.param(_valid()[:16], "ad_click: corrupt Avro body", id="truncated-mid-string"),
        pytest.param(
            AvroCodec("ad_request").encode(SAMPLES["ad_request"]),
            "ad_click: corrupt Avro body",
            id="other-topic-record",
        ),
    ],
)
def test_undecodable_bytes_raise_decode_error(data, message):
    with pytest.raises(DecodeError) as caught:
        AvroCodec("ad_click").decode(data)
    assert str(caught.value).startswith(message)


def test_unknown_fingerprint_names_it():
    fingerprint = bytes(range(1, 9))
    data = SINGLE_OBJECT_MARKER + fingerprint + _valid()[10:]
    with pytest.raises(
        DecodeError, match=rf"unknown writer schema \(fingerprint {fingerprint.hex()}"
    ):
        AvroCodec("ad_click").decode(data)


def test_random_bytes_behind_a_valid_marker_are_an_unknown_writer():
    data = SINGLE_OBJECT_MARKER + random.Random(99).randbytes(40)
    with pytest.raises(DecodeError, match="unknown writer schema"):
        AvroCodec("ad_click").decode(data)


def test_decode_error_is_a_streaming_error():
    from camoe.streaming.exceptions import StreamingError

    with pytest.raises(StreamingError):
        AvroCodec("ad_click").decode(b"")


def test_trailing_bytes_are_a_decode_error():
    with pytest.raises(DecodeError):
        AvroCodec("ad_click").decode(_valid() + b"garbage")


# --- records that do not match the schema ---------------------------------------------


@pytest.mark.parametrize("missing", ["request_id", "ad_id", "user_id", "event_time"])
def test_encoding_a_record_missing_a_field_names_schema_and_field(missing):
    record = {k: v for k, v in CLICK.items() if k != missing}
    with pytest.raises(ValueError, match="ad_click: record does not match its schema") as caught:
        AvroCodec("ad_click").encode(record)
    assert missing in str(caught.value)


def test_encoding_a_wrongly_typed_field_is_a_value_error():
    with pytest.raises(ValueError, match=r"^ad_click: .*event_time"):
        AvroCodec("ad_click").encode({**CLICK, "event_time": "yesterday"})


def test_encoding_a_nested_record_missing_a_field_names_the_schema():
    request = copy.deepcopy(SAMPLES["ad_request"])
    del request["context"]["hour"]
    with pytest.raises(ValueError, match=r"^ad_request: record does not match its schema"):
        AvroCodec("ad_request").encode(request)
