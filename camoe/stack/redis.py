"""Redis (Debian's redis-server) as a local process: loopback only, no persistence; with
a password in the settings, only that ACL user (or ``default``) is enabled."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from camoe.settings import RedisSettings
from camoe.stack.exceptions import PrerequisiteError
from camoe.stack.process import claim_port, start_process


def ping(url: str, username: str | None = None, password: str | None = None) -> bool:
    client = redis.Redis.from_url(url, username=username, password=password, socket_timeout=1.0)
    try:
        return bool(client.ping())
    finally:
        client.close()


def start_server(
    data_dir: Path,
    log_path: Path,
    timeout_s: float,
    port: int | None = None,
    credentials: RedisSettings | None = None,
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
    password = credentials.secret() if credentials else None
    username = credentials.username if credentials else None
    if password is not None:
        command += ["--aclfile", str(_acl_file(data_dir, username, password))]
    pid = start_process(
        "redis",
        command,
        log_path,
        healthy=lambda: ping(url, username, password),
        timeout_s=timeout_s,
    )
    return pid, url


def _acl_file(data_dir: Path, username: str | None, password: str) -> Path:
    """An ACL file readable by its owner only (the password stays off the command line)."""
    path = data_dir / "users.acl"
    users = [f"user {username or 'default'} on >{password} ~* &* +@all"]
    if username and username != "default":
        users.append("user default off")
    path.touch(mode=0o600)
    path.write_text("\n".join(users) + "\n")
    return path
