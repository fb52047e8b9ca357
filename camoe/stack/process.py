"""A service process started in its own session, with its log in a file and a health check."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from camoe.stack.exceptions import PortBusyError, ServiceStartError


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def claim_port(port: int | None, service: str) -> int:
    """The configured port if it is free (else PortBusyError), or any free port."""
    if port is None:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections of a previous run in TIME_WAIT must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise PortBusyError(
                f"{service}: port 127.0.0.1:{port} is busy; stop what uses it "
                f"(`ss -ltnp | grep :{port}`) or choose another port"
            ) from None
    return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)
                if finished:
                    return
            except ChildProcessError:  # not our child: poll for its end instead
                if not pid_alive(pid):
                    return
            time.sleep(0.1)


def start_process(
    name: str,
    command: list[str],
    log_path: Path,
    healthy: Callable[[], bool],
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Starts ``command`` detached, waits until ``healthy()``; returns its pid.

    Raises ServiceStartError naming the log when it exits or stays unhealthy.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # its own process group: stop_pid ends it whole
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceStartError(
                f"{name} exited with code {process.returncode} while starting; see {log_path}"
            )
        try:
            if healthy():
                return process.pid
        except Exception:  # not up yet: the health probe's errors are expected here
            pass
        time.sleep(0.25)
    stop_pid(process.pid)
    raise ServiceStartError(
        f"{name} did not become healthy within {timeout_s:.0f}s; see {log_path}"
    )
