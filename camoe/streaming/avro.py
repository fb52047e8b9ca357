"""Avro codecs for every topic, with schemas kept in ``schemas/`` beside this module.

Without a schema registry a record is framed with Avro *single-object encoding*:
``C3 01`` + the writer schema's CRC-64-AVRO fingerprint (8 bytes, little-endian) + the
binary body. The fingerprint tells a reader which writer schema to resolve against, so a
reader built for an older or newer schema reads the record as long as the change is
compatible (for example a new field with a default).

With ``kafka.schema_registry_url`` set, records use the Confluent wire format instead
(``00`` + a 4-byte schema id), the ids being registered and looked up through
confluent-kafka's registry client.
"""

from __future__ import annotations

import io
import json
import struct
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from camoe.streaming.exceptions import DecodeError, SchemaIncompatible

SCHEMA_DIR = Path(__file__).parent / "schemas"
SINGLE_OBJECT_MARKER = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"

# Topic contract -> schema file. labelled_event embeds feature_log, so order matters.
SCHEMA_FILES = {
    "ad_request": "ad_request.avsc",
    "ad_scores": "ad_scores.avsc",
    "feature_log": "feature_log.avsc",
    "ad_click": "ad_click.avsc",
    "labelled_event": "labelled_event.avsc",
    "model_update": "model_update.avsc",
    "dead_letter": "dead_letter.avsc",
    "labeler_state": "labeler_state.avsc",
    "counter_update": "counter_update.avsc",
}
# Records a schema embeds by name from other files (each at most once per schema).
EMBEDS = {
    "labelled_event": {"camoe.FeatureLogRow": "feature_log"},
    "labeler_state": {"camoe.FeatureLogRow": "feature_log", "camoe.AdClick": "ad_click"},
}


def _inline_named(node: Any, named: dict[str, Any]) -> Any:
    """Replaces references to named records defined in other files by their definition."""
    if isinstance(node, str) and node in named:
        return named[node]
    if isinstance(node, list):
        return [_inline_named(item, named) for item in node]
    if isinstance(node, dict):
        return {key: _inline_named(value, named) for key, value in node.items()}
    return node


@cache
def schema_json(name: str) -> dict[str, Any]:
    """The schema of one topic contract as JSON, other files' records inlined."""
    if name not in SCHEMA_FILES:
        raise KeyError(f"no schema named {name!r}; known: {', '.join(SCHEMA_FILES)}")
    named = {full: schema_json(other) for full, other in EMBEDS.get(name, {}).items()}
    return _inline_named(json.loads((SCHEMA_DIR / SCHEMA_FILES[name]).read_text()), named)


class SchemaStore:
    """Every writer schema this process can read, by single-object fingerprint.

    Holds the repository's current schemas; ``register`` adds other versions (older
    writers still on the topic, or newer ones a reader meets before its upgrade).
    """

    def __init__(self) -> None:
        self._by_fingerprint: dict[bytes, dict[str, Any]] = {}
        for name in SCHEMA_FILES:
            self.register(schema_json(name))

    def register(self, schema: dict[str, Any]) -> bytes:
        canonical = to_parsing_canonical_form(parse_schema(schema, _write_hint=False))
        # The fingerprint is of the canonical form, so it is a little-endian CRC-64 per spec.
        key = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        # Kept with fastavro's "parsed" hint: without it every read parses the schema again.
        self._by_fingerprint[key] = parse_schema(schema)
        return key

    def writer_schema(self, fp: bytes) -> dict[str, Any]:
        try:
            return self._by_fingerprint[fp]
        except KeyError:
            raise DecodeError(
                f"unknown writer schema (fingerprint {fp.hex()}): register it or upgrade"
            ) from None


_STORE = SchemaStore()


def _read_body(
    name: str, data: bytes, start: int, writer: dict[str, Any], reader: dict[str, Any] | None
) -> dict[str, Any]:
    """Reads the body after the header; the record must use every remaining byte."""
    buffer = io.BytesIO(data)
    buffer.seek(start)
    try:
        record = schemaless_reader(buffer, writer, reader)
    except Exception as error:  # fastavro raises many types for corrupt bodies
        raise DecodeError(f"{name}: corrupt Avro body or incompatible schema: {error}") from None
    if buffer.tell() != len(data):
        raise DecodeError(f"{name}: {len(data) - buffer.tell()} bytes after the record")
    return record


class AvroCodec:
    """Encodes and decodes one topic's records with single-object encoding.

    Example::

        codec = AvroCodec("ad_click")
        data = codec.encode({"request_id": "r1", "ad_id": "a1", "user_id": "u1",
                             "event_time": 0})
        assert codec.decode(data)["ad_id"] == "a1"
    """

    def __init__(
        self,
        name: str,
        schema: dict[str, Any] | None = None,
        store: SchemaStore = _STORE,
    ) -> None:
        self.name = name
        self._store = store
        self._fingerprint = store.register(schema or schema_json(name))
        self._schema = store.writer_schema(self._fingerprint)
        self._header = SINGLE_OBJECT_MARKER + self._fingerprint

    def encode(self, record: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        buffer.write(self._header)
        try:
            schemaless_writer(buffer, self._schema, record)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{self.name}: record does not match its schema: {error}") from None
        return buffer.getvalue()

    def decode(self, data: bytes | None) -> dict[str, Any]:
        if not data or len(data) < 10 or data[:2] != SINGLE_OBJECT_MARKER:
            raise DecodeError(f"{self.name}: not an Avro single-object encoded record")
        fp = bytes(data[2:10])
        if fp == self._fingerprint:  # written with this schema: nothing to resolve
            return _read_body(self.name, data, 10, self._schema, None)
        return _read_body(self.name, data, 10, self._store.writer_schema(fp), self._schema)


@cache
def registry_client(url: str) -> Any:
    """One registry client per URL in a process, so every codec shares its cache (and,
    with ``mock://``, confluent-kafka's in-process registry)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"url": url})


def incompatibility(writer: dict[str, Any], reader: dict[str, Any]) -> str | None:
    """Why records written with ``writer`` cannot be read with ``reader`` (None: they can).
    Checked by resolving generated records of every branch the writer allows."""
    from fastavro.utils import generate_many

    parsed_writer, parsed_reader = parse_schema(writer), parse_schema(reader)
    for record in generate_many(parsed_writer, 20):
        buffer = io.BytesIO()
        schemaless_writer(buffer, parsed_writer, record)
        buffer.seek(0)
        try:
            schemaless_reader(buffer, parsed_writer, parsed_reader)
        except Exception as error:  # fastavro's resolution errors have several types
            return str(error)
    return None


class ConfluentAvroCodec:
    """Confluent wire format (``00`` + the 4-byte schema id) against a schema registry.

    The codec registers its schema under ``subject`` unless the subject's latest version
    cannot read records of it or it cannot read the latest version's records (a change
    both old and new readers survive, FULL in the registry's terms, is a new field with
    a default): it raises ``SchemaIncompatible`` then, as a registry server does.

    Example::

        codec = ConfluentAvroCodec("ad_click", "mock://local", "ad-clicks-value")
        data = codec.encode({"request_id": "r1", "ad_id": "a1", "user_id": "u1",
                             "event_time": 0})
        assert data[:1] == b"\\x00" and codec.decode(data)["ad_id"] == "a1"
    """

    def __init__(
        self, name: str, registry_url: str, subject: str, schema: dict[str, Any] | None = None
    ) -> None:
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        self.name = name
        self._client = registry_client(registry_url)
        self._json = schema or schema_json(name)
        self._schema = parse_schema(self._json)
        try:
            self._check_against_latest(subject)
            self._schema_id = self._client.register_schema(
                subject, Schema(json.dumps(self._json), "AVRO")
            )
        except SchemaRegistryError as error:
            raise SchemaIncompatible(
                f"schema registry at {registry_url} refused {name}'s schema for {subject}: "
                f"{error.error_message}; check kafka.schema_registry_url and the change"
            ) from None
        self._writers: dict[int, dict[str, Any]] = {self._schema_id: self._schema}

    def _check_against_latest(self, subject: str) -> None:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            latest = self._client.get_latest_version(subject)
        except SchemaRegistryError as error:
            if error.http_status_code == 404:  # a new subject
                return
            raise
        registered = json.loads(latest.schema.schema_str)
        directions = ((registered, self._json, "this"), (self._json, registered, "its"))
        for writer, reader, who in directions:
            why = incompatibility(writer, reader)
            if why is not None:
                raise SchemaIncompatible(
                    f"{self.name}: schema incompatible with version {latest.version} of "
                    f"{subject} ({who} reader fails: {why}); give new fields a default, "
                    "or write to a new subject"
                )

    def encode(self, record: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        buffer.write(CONFLUENT_MAGIC + struct.pack(">I", self._schema_id))
        try:
            schemaless_writer(buffer, self._schema, record)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{self.name}: record does not match its schema: {error}") from None
        return buffer.getvalue()

    def decode(self, data: bytes | None) -> dict[str, Any]:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if not data or len(data) < 5 or data[:1] != CONFLUENT_MAGIC:
            raise DecodeError(f"{self.name}: not a Confluent wire-format record")
        schema_id = struct.unpack(">I", data[1:5])[0]
        if schema_id not in self._writers:
            try:
                fetched = self._client.get_schema(schema_id)
            except SchemaRegistryError as error:
                raise DecodeError(
                    f"{self.name}: writer schema id {schema_id} unknown to the registry: "
                    f"{error.error_message}"
                ) from None
            self._writers[schema_id] = parse_schema(json.loads(fetched.schema_str))
        return _read_body(self.name, data, 5, self._writers[schema_id], self._schema)


def codec_for(name: str, registry_url: str | None = None, topic: str | None = None) -> Any:
    """The codec the settings call for: single-object encoding, or Confluent's with a registry."""
    if registry_url:
        return ConfluentAvroCodec(name, registry_url, subject=f"{topic or name}-value")
    return AvroCodec(name)
