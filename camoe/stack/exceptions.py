"""Errors of the service stack, under one root; each message is one line that says what to do."""


class StackError(Exception):
    """Root of every service-stack error."""


class PrerequisiteError(StackError):
    """A tool the stack needs (Java, Maven, redis-server, the Triton runtime) is missing."""


class ServiceStartError(StackError):
    """A service did not come up; the message names its log file."""


class PortBusyError(StackError):
    """A configured port is already taken by another process."""
