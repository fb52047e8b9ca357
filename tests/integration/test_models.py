"""``camoe models`` against the real stack: the trainer publishes versions as a process,
an operator lists them, rolls back, pins and resumes, and Triton serves what they say."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Producer

from camoe.stack.process import free_port
from camoe.streaming.avro import AvroCodec
from camoe.supervisor import write_settings
from tests.factories import labelled_events
from tests.integration.conftest import EVENTS, start_trainer
from trainer.versions import PIN, versions


def camoe_models(
    config: Path, triton: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "camoe.cli", "models", *args],
        env={**os.environ, "CAMOE_CONFIG": str(config), "TRITON_URL": triton, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rollback_serves_the_previous_version_until_resume(trainer_world, tmp_path):
    s, endpoints, history, client = trainer_world
    config = write_settings(s, tmp_path / "settings.yaml")
    model_dir = s.triton.model_repo / s.triton.model_name
    codec = AvroCodec("labelled_event")
    producer = Producer({"bootstrap.servers": endpoints.kafka, "linger.ms": 20})
    values = itertools.cycle(labelled_events(history, 1000, EVENTS))

    def feed_until(what: str, done: Callable[[], bool], timeout_s: float = 120.0) -> None:
        """Sends labelled events, 400/s, until ``done()``: the trainer has input throughout."""
        deadline = time.monotonic() + timeout_s
        while not done():
            assert trainer.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what}: {log_path.read_text()[-2000:]}"
            for value in itertools.islice(values, 80):
                producer.produce(
                    s.kafka.topics.labelled_events.name,
                    key=value["impression"]["request_id"],
                    value=codec.encode(value),
                )
            assert producer.flush(10) == 0
            time.sleep(0.2)

    def served() -> str:
        return client.infer(
            history["categorical"][:4], history["numeric"][:4], history["format"][:4]
        )[1]

    log_path = tmp_path / "train.log"
    with log_path.open("ab") as log:
        trainer = start_trainer(config, endpoints, log)
        try:
            feed_until("versions 2 and 3", lambda: len(versions(model_dir)) >= 3, 180)
            listed = camoe_models(config, endpoints.triton, "list", "--json")
            assert listed.returncode == 0, listed.stderr
            listing = json.loads(listed.stdout)
            assert listing["pin"] is None
            rows = {row["version"]: row for row in listing["versions"]}
            newest = max(v for v, row in rows.items() if row["on_disk"])
            assert [v for v, row in rows.items() if row["serving"]] == [newest]
            assert rows[newest]["triton"] == "READY"
            record = rows[newest]["record"]
            assert record["version"] == newest and record["examples_trained"] > 0
            assert "audio_logloss" in record["metrics"]
            assert record["clicks_learned"] > 0 and record["first_click_ms"] > 0
            text = camoe_models(config, endpoints.triton, "list")
            assert text.returncode == 0 and text.stdout.splitlines()[0].startswith("version")

            # Rolled back: the version before the newest serves within seconds.
            started = time.monotonic()
            rolled = camoe_models(config, endpoints.triton, "rollback")
            assert rolled.returncode == 0, rolled.stderr
            pinned = int(rolled.stdout.split()[2])  # "serving version N alone; ..."
            assert served() == str(pinned)
            assert time.monotonic() - started < 15
            on_disk = versions(model_dir)  # the newest is the one that served before
            assert pinned == on_disk[-2]

            # More labels and turns of the cadence: the trainer learns and publishes nothing.
            feed_until("a held turn", lambda: "publishing held" in log_path.read_text())
            turns = log_path.read_text().count("held-out logloss")
            later = time.monotonic() + 3 * s.trainer.publish_every_s
            feed_until("three more turns' time", lambda: time.monotonic() > later)
            assert versions(model_dir) == on_disk
            assert client.ready_versions() == [pinned]
            assert served() == str(pinned)
            assert log_path.read_text().count("held-out logloss") == turns  # nothing judged

            # Pinned to the oldest on disk, then resumed: the trainer's next version serves.
            oldest = on_disk[0]
            pin = camoe_models(config, endpoints.triton, "pin", str(oldest))
            assert pin.returncode == 0, pin.stderr
            assert served() == str(oldest) and client.ready_versions() == [oldest]
            assert (
                json.loads(camoe_models(config, endpoints.triton, "list", "--json").stdout)["pin"][
                    "version"
                ]
                == oldest
            )
            resumed = camoe_models(config, endpoints.triton, "resume")
            assert resumed.returncode == 0, resumed.stderr
            assert served() == str(on_disk[-1])  # the newest serves again at once
            feed_until("a new version", lambda: int(served()) > on_disk[-1])
            assert "publishing resumed" in log_path.read_text()
        finally:
            trainer.kill()
            trainer.wait()


def test_models_commands_say_in_one_line_what_is_unreachable(trainer_world, tmp_path):
    s, endpoints, _, _ = trainer_world
    config = write_settings(s, tmp_path / "settings.yaml")
    nobody = f"127.0.0.1:{free_port()}"
    for action in (["list"], ["rollback"], ["pin", "1"], ["resume"]):
        result = camoe_models(config, nobody, *action)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"camoe: Triton is not reachable at {nobody}: start the stack (`camoe stack up`) or "
            "point TRITON_URL at the server that serves the model repository"
        ]
    missing = camoe_models(
        config, endpoints.triton, "list", env={"CAMOE_TRITON__MODEL_REPO": str(tmp_path / "none")}
    )
    assert missing.returncode == 1
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith(f"camoe: the model repository {tmp_path / 'none'} has no model")
    model_dir = s.triton.model_repo / s.triton.model_name
    before = versions(model_dir)
    absent = camoe_models(config, endpoints.triton, "pin", "999")
    assert absent.returncode == 1
    (line,) = absent.stderr.strip().splitlines()
    assert "version 999 is not in" in line
    assert versions(model_dir) == before and not (model_dir / PIN).exists()
