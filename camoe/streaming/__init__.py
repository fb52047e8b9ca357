"""Kafka streaming: the app object and the Avro codecs of the topics."""

from camoe.streaming.app import Output, Record, StreamApp
from camoe.streaming.avro import AvroCodec, codec_for

__all__ = ["AvroCodec", "Output", "Record", "StreamApp", "codec_for"]
