"""Kafka streaming: the app object, Avro codecs and topic administration."""

from streaming.app import Output, Record, StreamApp
from streaming.avro import AvroCodec, codec_for

__all__ = ["AvroCodec", "Output", "Record", "StreamApp", "codec_for"]
