"""Redis (Debian's redis-server) as a local process: loopback only, no persistence."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from camoe.stack.exceptions import PrerequisiteError
from camoe.stack.process import claim_port, start_process


def ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0)
    try:
        return bool(client.ping())
    finally:
        client.close()


def start_server(
    data_dir: Path, log_path: Path, timeout_s: float, port: int | None = None
) -> tuple[int, str]:
    """Starts redis-server on loopback (``port``, or a free one); returns (pid, url)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise PrerequisiteError(
            "redis-server is missing: run `make setup` or `apt-get install redis-server`"
        )
    port = claim_port(port, "redis")
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"redis://127.0.0.1:{port}/0"
    command = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
    ]
    pid = start_process("redis", command, log_path, healthy=lambda: ping(url), timeout_s=timeout_s)
    return pid, url
