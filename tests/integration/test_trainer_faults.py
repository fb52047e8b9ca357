"""The incremental trainer killed with SIGKILL mid-run: it resumes from its checkpoint,
every labelled event enters the model's lineage exactly once, and versions only rise."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Producer

from camoe.clients.kafka import committed_offsets, read_committed
from camoe.streaming.avro import AvroCodec
from camoe.supervisor import write_settings
from tests.factories import labelled_events
from tests.integration.conftest import EVENTS, start_trainer
from trainer.online import Checkpoint


def _cadence_turns(log_path: Path) -> int:
    """Turns of the publishing cadence so far (each ends with a checkpoint)."""
    return len(re.findall(r"published version|rejected", log_path.read_text()))


def test_sigkill_trainer_resumes_without_training_an_event_twice(trainer_world, tmp_path):
    s, endpoints, history, client = trainer_world
    config = write_settings(s, tmp_path / "settings.yaml")
    codec = AvroCodec("labelled_event")
    producer = Producer({"bootstrap.servers": endpoints.kafka, "linger.ms": 20})
    values = labelled_events(history, 1000, EVENTS)
    waves = np.array_split(np.arange(EVENTS), 4)  # input keeps arriving while the trainer dies
    checkpoint_path = s.trainer.checkpoint_dir / "trainer.pt"
    rng = np.random.default_rng(11)
    log_path = tmp_path / "train.log"
    kills = 0
    lives: list[subprocess.Popen[bytes]] = []  # killed on the way out, whatever happens
    with log_path.open("ab") as log:
        try:
            for wave in range(6):
                saved = Checkpoint.load(checkpoint_path)
                if wave >= len(waves) and saved is not None and saved.events == EVENTS:
                    break  # every event is in the lineage: a further life has nothing to learn
                if wave < len(waves):
                    for i in waves[wave]:
                        value = values[i]
                        producer.produce(
                            s.kafka.topics.labelled_events.name,
                            key=value["impression"]["request_id"],
                            value=codec.encode(value),
                        )
                    assert producer.flush(10) == 0
                turns = _cadence_turns(log_path)
                process = start_trainer(config, endpoints, log)
                lives.append(process)
                # Once it has checkpointed (a turn of the cadence), a random moment: training,
                # exporting, loading into Triton or checkpointing again.
                deadline = time.monotonic() + 180
                # The turn is logged just before its checkpoint is saved: wait for the file too
                # (else a first life killed in between has nothing to resume from).
                while _cadence_turns(log_path) == turns or not checkpoint_path.exists():
                    assert process.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, "the trainer did not publish"
                    time.sleep(0.2)
                time.sleep(float(rng.uniform(0.0, 4.0)))
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1

            process = start_trainer(config, endpoints, log)
            lives.append(process)
            deadline = time.monotonic() + 120
            while log_path.read_text().count("resumed at version") < kills:  # the last restart
                assert process.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the last life did not resume"
                time.sleep(0.2)
            saved = _checkpoint_with(checkpoint_path, EVENTS, process, log_path, 300)

        finally:
            for life in lives:
                if life.poll() is None:
                    life.kill()
                    life.wait()

    held_out = sum(
        zlib.crc32(v["impression"]["request_id"].encode()) % s.trainer.holdout_every == 0
        for v in values
    )
    assert kills >= len(waves)  # killed at least once while input was still arriving
    assert saved.events == EVENTS  # each event read into the lineage once: none lost, none twice
    assert saved.examples == EVENTS - held_out
    assert log_path.read_text().count("resumed at version") == kills  # each restart resumed

    updates = read_committed(
        endpoints.kafka, s.kafka.topics.model_updates.name, AvroCodec("model_update").decode
    )
    announced = [u["version"] for u in updates]
    assert announced == sorted(announced), announced  # a restart may repeat, never go back
    assert announced[-1] == saved.version
    assert saved.version in client.ready_versions()
    _, served = client.infer(
        history["categorical"][:4], history["numeric"][:4], history["format"][:4]
    )
    assert served == str(saved.version)


def _checkpoint_with(
    path: Path, events: int, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float
) -> Checkpoint:
    """Waits until the trainer's checkpoint holds ``events`` events read, then stops it."""
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            saved = Checkpoint.load(path)
            if saved is not None and saved.events >= events:
                return saved
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"stuck at {saved and saved.events} events"
            time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(60)


def _committed(bootstrap: str, group_id: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    try:
        return list(committed_offsets(consumer, topic).values())
    finally:
        consumer.close()


def test_sigkill_before_the_first_checkpoint_loses_no_event(trainer_world, tmp_path):
    """The group's committed offsets are the checkpoint's: a trainer killed after reading
    (and before checkpointing) leaves none, so its successor reads every event again."""
    s, endpoints, history, _ = trainer_world
    never = s.model_copy(
        update={
            "trainer": s.trainer.model_copy(
                update={"publish_every_examples": 10**9, "publish_every_s": 3600.0}
            )
        }
    )
    topic = s.kafka.topics.labelled_events.name
    codec = AvroCodec("labelled_event")
    producer = Producer({"bootstrap.servers": endpoints.kafka, "linger.ms": 20})
    for value in labelled_events(history, 1000, 2_000):
        producer.produce(topic, key=value["impression"]["request_id"], value=codec.encode(value))
    assert producer.flush(10) == 0
    log_path = tmp_path / "train.log"
    with log_path.open("ab") as log:
        process = start_trainer(write_settings(never, tmp_path / "never.yaml"), endpoints, log)
        deadline = time.monotonic() + 120
        while "assigned" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the trainer did not join its group"
            time.sleep(0.2)
        time.sleep(8.0)  # it reads and trains all 2,000 events, and checkpoints none
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert Checkpoint.load(s.trainer.checkpoint_dir / "trainer.pt") is None
        assert all(o < 0 for o in _committed(endpoints.kafka, s.trainer.group_id, topic))

        process = start_trainer(write_settings(s, tmp_path / "settings.yaml"), endpoints, log)
        saved = _checkpoint_with(
            s.trainer.checkpoint_dir / "trainer.pt", 2_000, process, log_path, 180
        )
    assert saved.events == 2_000
    assert sum(max(o, 0) for o in _committed(endpoints.kafka, s.trainer.group_id, topic)) == 2_000
