"""Kafka and Redis through testcontainers when a Docker daemon answers.

Without a daemon, testcontainers raises ``docker.errors.DockerException`` within
milliseconds, in the container's constructor; then the caller starts the same service
as a local process (camoe.stack.stack). The choice is logged either way. Test support:
testcontainers is a development dependency.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from docker.errors import DockerException

log = logging.getLogger(__name__)

KAFKA_IMAGE = "apache/kafka:4.1.1"
REDIS_IMAGE = "redis:7"


@dataclass
class Started:
    """A running container and the address it serves."""

    container: Any
    address: str


def _container(service: str) -> Any:
    if service == "kafka":
        from testcontainers.community.kafka import KafkaContainer

        return KafkaContainer(KAFKA_IMAGE).with_kraft()
    if service == "redis":
        from testcontainers.community.redis import RedisContainer

        return RedisContainer(REDIS_IMAGE)
    raise ValueError(f"no container for {service!r}; choose kafka or redis")


def start_container(service: str) -> Started | None:
    """Starts ``service`` in a container, or returns None when no Docker daemon answers."""
    try:
        container = _container(service)
    except DockerException as error:
        log.info(
            "%s: no Docker daemon (%s); using a local process instead",
            service,
            str(error).splitlines()[0][:120],
        )
        return None
    container.start()
    if service == "kafka":
        address = container.get_bootstrap_server()
    else:
        host = container.get_container_host_ip()
        address = f"redis://{host}:{container.get_exposed_port(6379)}/0"
    log.info("%s: running in container %s at %s", service, container.image, address)
    return Started(container, address)
