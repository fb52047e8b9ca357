"""The scorer sorts Triton's answers by cause: the server's state, or the request's fault."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from consumers.scoring import _server_state


@pytest.mark.parametrize(
    "status",
    [
        "StatusCode.UNAVAILABLE",  # down or restarting
        "StatusCode.NOT_FOUND",  # no available version: the model did not load
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.CANCELLED",
        "StatusCode.ABORTED",
    ],
)
def test_the_servers_state_gets_the_policy(status):
    assert _server_state(InferenceServerException("camoe has no available versions", status))


@pytest.mark.parametrize(
    "status", ["StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.UNKNOWN", None]
)
def test_the_requests_fault_is_dead_lettered(status):
    assert not _server_state(InferenceServerException("unexpected shape for input", status))
