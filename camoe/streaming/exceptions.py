"""Errors of the streaming layer, under one root."""


class StreamingError(Exception):
    """Root of every streaming error."""


class DecodeError(StreamingError):
    """A record's bytes are not a valid record of the expected schema."""


class SchemaIncompatible(StreamingError):
    """A schema the registry holds for a subject and ours cannot read each other's records."""


class RetryLater(StreamingError):
    """The handler cannot process the batch now; the app re-reads it after ``retry_after_s``."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class DeliveryError(StreamingError):
    """The broker did not acknowledge a produced record; offsets stay uncommitted."""


class MissingTopicError(StreamingError):
    """A topic the app needs does not exist on the broker."""


class ProducerHung(StreamingError):
    """A transactional call did not return long after its timeout; the producer is replaced."""


class Rejoin(StreamingError):
    """The batch must be read again through a new consumer (StreamApp._rejoin)."""
