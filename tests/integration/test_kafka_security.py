"""Kafka over SASL_SSL with SCRAM-SHA-512: a broker with a TLS listener on 127.0.0.1 and a
certificate from a CA made for the test, a user created through the admin API, the whole
loop run over it; a wrong password or an untrusted certificate is one line naming the
setting to fix, and the client stops instead of retrying."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import (
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from pydantic import SecretStr

from camoe.clients.kafka import KafkaConnection, admin, read_committed
from camoe.settings import KafkaSecurity, Settings
from camoe.sim.loop import demo_settings, run_loop
from camoe.stack import kafka
from camoe.stack.process import stop_pid
from camoe.streaming.avro import AvroCodec
from camoe.supervisor import secret_environment, write_settings
from tests.certificates import issue_server_certificate, make_ca

log = logging.getLogger(__name__)
ADMIN_PASSWORD = "broker-admin-pw-for-the-test"
PASSWORD = "camoe-scram-pw-for-the-test"


def add_scram_user(connection: KafkaConnection, name: str, password: str) -> None:
    """Creates (or updates) a SCRAM-SHA-512 user through the admin API."""
    upsert = UserScramCredentialUpsertion(
        name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), password.encode()
    )
    client = admin(connection)  # kept: the futures die with their client
    for future in client.alter_user_scram_credentials([upsert]).values():
        future.result(30)


@pytest.fixture(scope="module")
def secure_broker(services, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A SASL_SSL broker of these tests' own, the user ``camoe`` made through the admin
    API, the CA that signed the broker's certificate and one that did not."""
    settings, _ = services
    folder = tmp_path_factory.mktemp("secure-broker")
    ca_file, ca_key, ca = make_ca(folder, "test-ca")
    other_ca = make_ca(folder, "other-ca")[0]
    listener = kafka.SaslSsl(
        keystore=issue_server_certificate(folder, ca_key, ca),
        ca_file=ca_file,
        username="admin",
        password=SecretStr(ADMIN_PASSWORD),
    )
    pid, bootstrap = kafka.start_broker(
        settings.kafka,
        folder,
        folder / "kafka.log",
        settings.stack.startup_timeout_s,
        sasl_ssl=listener,
    )
    add_scram_user(KafkaConnection(bootstrap, listener.client()), "camoe", PASSWORD)
    yield {"bootstrap": bootstrap, "ca_file": ca_file, "other_ca": other_ca, "folder": folder}
    stop_pid(pid)


def secured(settings: Settings, broker: dict[str, Any], **security: Any) -> Settings:
    """``settings`` pointed at the secure broker as user ``camoe``."""
    values = {
        "protocol": "SASL_SSL",
        "username": "camoe",
        "password": SecretStr(PASSWORD),
        "ca_file": broker["ca_file"],
        **security,
    }
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={
                    "bootstrap_servers": broker["bootstrap"],
                    "security": KafkaSecurity(**values),
                }
            )
        }
    )


def test_the_whole_loop_runs_over_sasl_ssl(services, secure_broker):
    settings = secured(demo_settings(services[0]), secure_broker)
    seen: dict[str, str] = {}

    def report(run: Settings, endpoints: Any) -> dict[str, Any]:
        seen["updates"] = run.kafka.topics.model_updates.name
        seen["state"] = str(run.stack.state_dir)
        connection = endpoints.kafka_at(run.kafka.security)
        updates = read_committed(connection, seen["updates"], AvroCodec("model_update").decode)
        return {"published": len(updates)}

    summary = run_loop(settings, duration_s=30.0, drain_s=20.0, report=report)
    log.info("over SASL_SSL: %s", {k: summary[k] for k in ("requests", "scored", "labels")})
    assert summary["component_failures"] == {}
    assert summary["scored"] == summary["requests"] > 0, summary
    assert summary["labels"] == summary["requests"] + summary["clicks"], summary
    assert summary["loop"]["published"] > 0, "the trainer announced no version over SASL_SSL"
    # The password reached the components by environment only: not in their settings
    # file, not in any log.
    state = Path(seen["state"])
    assert PASSWORD not in (state / "settings.yaml").read_text()
    for path in (state / "logs").glob("*.log"):
        assert PASSWORD not in path.read_text(errors="replace"), path


def run_component(
    settings: Settings, tmp_path: Path, name: str = "label"
) -> tuple[int, str, float]:
    """``camoe <name>`` with ``settings`` until it exits (at most 60 s): its exit code,
    its output and how long it ran."""
    config = write_settings(settings, tmp_path / "settings.yaml")
    env = {
        **os.environ,
        "CAMOE_CONFIG": str(config),
        "PYTHONFAULTHANDLER": "1",
        **secret_environment(settings),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "camoe.cli", name],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    ("security", "says"),
    [
        (
            {"password": SecretStr("not-the-password")},
            "check kafka.security.username and kafka.security.password",
        ),
        ({"ca_file": None}, "check kafka.security.ca_file"),  # the system's CAs
        ("other", "check kafka.security.ca_file"),
    ],
    ids=["wrong-password", "no-ca", "untrusted-ca"],
)
def test_a_refused_client_stops_with_one_line(services, secure_broker, tmp_path, security, says):
    if security == "other":
        security = {"ca_file": secure_broker["other_ca"]}
    settings = secured(services[0], secure_broker, **security)
    code, output, took_s = run_component(settings, tmp_path)
    assert code == 1, output[-2000:]
    last = output.strip().splitlines()[-1]
    log.info("refused after %.1f s: %s", took_s, last)
    assert last.startswith("camoe: kafka refused the ") and says in last, output[-2000:]
    # One line, not one per attempt; and the password never shown.
    assert output.count("SASL authentication error") + output.count("SSL handshake") == 1, output
    assert "not-the-password" not in output and PASSWORD not in output
    assert took_s < 45, f"took {took_s:.0f} s to give up"
