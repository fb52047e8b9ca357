"""Every way the stack can fail to start says what failed and what to do, in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from camoe.settings import ROOT, Settings
from camoe.stack import kafka, redis, triton
from camoe.stack.exceptions import PortBusyError, PrerequisiteError, ServiceStartError, StackError
from camoe.stack.process import claim_port, pid_alive, start_process, stop_pid
from camoe.stack.stack import Stack


def test_process_that_exits_names_its_log(tmp_path):
    log = tmp_path / "svc.log"
    with pytest.raises(ServiceStartError) as error:
        start_process(
            "svc",
            [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
            log,
            healthy=lambda: False,
            timeout_s=10,
        )
    message = str(error.value)
    assert "exited with code 3" in message and str(log) in message and "\n" not in message
    assert "boom" in log.read_text()


def test_process_that_never_gets_healthy_is_stopped_and_names_its_log(tmp_path):
    log = tmp_path / "svc.log"
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match="did not become healthy within 1s") as error:
        start_process(
            "svc",
            [sys.executable, "-c", "import time; time.sleep(60)"],
            log,
            healthy=lambda: False,
            timeout_s=1,
        )
    assert str(log) in str(error.value)
    assert time.monotonic() - started < 20
    out = subprocess.run(["pgrep", "-f", "time.sleep(60)"], capture_output=True, text=True)
    assert out.stdout.strip() == "", "the unhealthy process was left running"


def test_stop_pid_ends_the_process_group(tmp_path):
    pid = start_process(
        "svc",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        tmp_path / "log",
        healthy=lambda: True,
        timeout_s=5,
    )
    assert pid_alive(pid)
    stop_pid(pid)
    assert not pid_alive(pid)


def test_busy_port_is_one_clear_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortBusyError) as error:
            claim_port(port, "kafka")
    message = str(error.value)
    assert f"127.0.0.1:{port} is busy" in message and "\n" not in message
    assert claim_port(None, "kafka") > 0


def test_busy_configured_port_stops_stack_up(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        settings = Settings(stack={"state_dir": tmp_path, "ports": {"redis": port}})
        with pytest.raises(PortBusyError, match="redis"):
            Stack(settings).up(("redis",))
    assert Stack(settings).status()["redis"] == "down"


def test_a_configured_address_is_not_recorded_as_the_stacks(tmp_path):
    elsewhere = Settings(kafka={"bootstrap_servers": "127.0.0.1:1"}, stack={"state_dir": tmp_path})
    assert Stack(elsewhere).up(()).kafka == "127.0.0.1:1"
    # A later process without the setting must not take that broker for the stack's own.
    assert Stack(Settings(stack={"state_dir": tmp_path})).endpoints().kafka is None


def test_missing_java_maven_and_redis(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tool is found
    with pytest.raises(PrerequisiteError, match="Java 17"):
        kafka.java()
    with pytest.raises(PrerequisiteError, match="Maven is missing"):
        kafka.ensure_jars(tmp_path / "no-jars")
    with pytest.raises(PrerequisiteError, match="redis-server is missing"):
        redis.start_server(tmp_path, tmp_path / "redis.log", timeout_s=1)


def test_missing_triton_runtime(tmp_path):
    with pytest.raises(PrerequisiteError, match="make setup"):
        triton.runtime_paths(tmp_path)


def test_cli_prints_one_line_for_a_missing_prerequisite(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "CAMOE_STACK__STATE_DIR": str(tmp_path / "s")}
    result = subprocess.run(
        [sys.executable, "-m", "camoe.cli", "stack", "up"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("camoe: ") and "Java 17+ is missing" in last


def test_a_secured_kafka_needs_a_configured_cluster(tmp_path):
    secured = Settings(
        kafka={"security": {"protocol": "SASL_SSL", "username": "camoe", "password": "pw"}},
        stack={"state_dir": tmp_path},
    )
    with pytest.raises(StackError, match=r"stack's broker is plaintext: set kafka\.bootstrap"):
        Stack(secured).up(("kafka",))
