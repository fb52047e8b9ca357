"""camoe/streaming/avro.py's Confluent wire format, against confluent-kafka's in-process
``mock://`` schema registry: every topic contract, compatible evolution read by old and
new readers, and an incompatible change refused."""

from __future__ import annotations

import struct
import uuid

import pytest

from camoe.streaming.avro import SCHEMA_FILES, ConfluentAvroCodec, codec_for, registry_client
from camoe.streaming.exceptions import DecodeError, SchemaIncompatible
from tests.unit.test_avro import CLICK, SAMPLES, ad_click_with_source, assert_same

pytestmark = pytest.mark.unit


@pytest.fixture
def url() -> str:
    return f"mock://{uuid.uuid4().hex[:8]}"  # a registry of its own per test


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_every_contract_round_trips_in_the_wire_format(url, name):
    codec = codec_for(name, url, topic=f"topic-{name}")
    data = codec.encode(SAMPLES[name])
    registered = registry_client(url).get_latest_version(f"topic-{name}-value")
    assert data[:5] == b"\x00" + struct.pack(">I", registered.schema_id)
    assert_same(codec.decode(data), SAMPLES[name])


def test_a_reader_elsewhere_in_the_process_resolves_the_writer_by_id(url):
    writer = ConfluentAvroCodec("ad_click", url, "clicks-value")
    reader = ConfluentAvroCodec("ad_click", url, "clicks-value")  # the same version: one id
    assert reader.decode(writer.encode(CLICK)) == CLICK


def test_a_new_field_with_a_default_is_read_by_old_and_new_readers(url):
    old = ConfluentAvroCodec("ad_click", url, "clicks-value")
    new = ConfluentAvroCodec("ad_click", url, "clicks-value", schema=ad_click_with_source())
    assert sorted(registry_client(url).get_versions("clicks-value")) == [1, 2]
    from_new = new.encode({**CLICK, "source": "web"})
    assert from_new[1:5] != old.encode(CLICK)[1:5]  # another schema id
    assert old.decode(from_new) == CLICK  # the old reader drops the new field
    assert new.decode(old.encode(CLICK)) == {**CLICK, "source": "app"}  # default filled


def test_a_new_field_without_a_default_is_refused_in_one_line(url):
    ConfluentAvroCodec("ad_click", url, "clicks-value")
    with pytest.raises(SchemaIncompatible) as refused:
        ConfluentAvroCodec(
            "ad_click", url, "clicks-value", schema=ad_click_with_source(default=False)
        )
    message = str(refused.value)
    assert "version 1 of clicks-value" in message and "give new fields a default" in message
    assert "\n" not in message
    assert registry_client(url).get_versions("clicks-value") == [1]  # nothing registered


def test_a_removed_field_without_a_default_is_refused_for_old_readers(url):
    ConfluentAvroCodec("ad_click", url, "clicks-value", schema=ad_click_with_source(False))
    with pytest.raises(SchemaIncompatible, match="its reader fails"):
        ConfluentAvroCodec("ad_click", url, "clicks-value")


def test_an_id_the_registry_does_not_know_is_a_decode_error(url):
    codec = ConfluentAvroCodec("ad_click", url, "clicks-value")
    data = codec.encode(CLICK)
    with pytest.raises(DecodeError, match="writer schema id 999 unknown to the registry"):
        codec.decode(data[:1] + struct.pack(">I", 999) + data[5:])


@pytest.mark.parametrize("data", [None, b"", b"\x00\x00", b"\xc3\x01" + bytes(12)])
def test_bytes_not_in_the_wire_format_are_a_decode_error(url, data):
    with pytest.raises(DecodeError, match="not a Confluent wire-format record"):
        ConfluentAvroCodec("ad_click", url, "clicks-value").decode(data)


def test_a_record_not_matching_the_schema_names_it(url):
    codec = ConfluentAvroCodec("ad_click", url, "clicks-value")
    with pytest.raises(ValueError, match="ad_click: record does not match its schema"):
        codec.encode({**CLICK, "event_time": "soon"})
