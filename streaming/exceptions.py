"""Errors of the streaming layer, under one root."""


class StreamingError(Exception):
    """Root of every streaming error."""


class DecodeError(StreamingError):
    """A record's bytes are not a valid record of the expected schema."""


class DeliveryError(StreamingError):
    """The broker did not acknowledge a produced record; offsets stay uncommitted."""
