"""The testcontainers-or-local-process choice."""

from __future__ import annotations

import logging
import time

import pytest
from docker.errors import DockerException

from tests.containers import start_container


def test_no_daemon_falls_back_fast_and_says_so(monkeypatch, caplog):
    # A socket nobody listens on: what testcontainers meets on a machine without Docker.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    caplog.set_level(logging.INFO, logger="tests.containers")
    for service in ("kafka", "redis"):
        started = time.monotonic()
        assert start_container(service) is None
        assert time.monotonic() - started < 5
    assert "kafka: no Docker daemon" in caplog.text
    assert "redis: no Docker daemon" in caplog.text


def test_the_no_daemon_signal_is_dockers_own_exception(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    from testcontainers.community.redis import RedisContainer

    with pytest.raises(DockerException):
        RedisContainer("redis:7")


def test_unknown_service_is_rejected():
    with pytest.raises(ValueError, match="no container"):
        start_container("postgres")
