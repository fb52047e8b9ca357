"""The incremental trainer's logic: windows, the quality gate, cadence, checkpoints and
resuming (publishing without Triton; tests/integration covers the served side)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import OFFSET_INVALID, TopicPartition

from camoe.settings import Settings
from camoe.sim.traffic import World
from camoe.streaming.app import Record
from tests.factories import labelled_events
from trainer.export import Publisher, versions
from trainer.model import build_served_camoe
from trainer.online import Checkpoint, Examples, IncrementalTrainer, Window, quality_gate
from trainer.train import fit
from trainer.versions import PIN, read_record, write_json

TOPIC = "labelled-events"


@pytest.fixture(scope="module")
def world_and_model() -> tuple[Settings, dict[str, np.ndarray], Any]:
    settings = Settings(
        simulator={"click_boost": 5.0},
        trainer={
            "publish_every_examples": 400,
            "publish_every_s": 3600.0,
            "holdout_every": 5,
            "pretrain_batch_size": 128,
            "gate_tolerance": 1.0,  # only a far worse candidate fails: these runs are tiny
        },
    )
    history = World(settings.simulator).history(3000, hours=0.0)
    model = build_served_camoe(settings)
    fit(model, {k: v[:1500] for k, v in history.items()}, epochs=1)
    return settings, history, model.state_dict()


def records(values: list[dict[str, Any]], first_offset: int) -> list[Record]:
    return [
        Record(TOPIC, 0, first_offset + k, v["impression"]["request_id"].encode(), v, b"")
        for k, v in enumerate(values)
    ]


def trainer_for(
    settings: Settings, state: dict[str, torch.Tensor], root: Path, resume: Checkpoint | None
) -> IncrementalTrainer:
    model = build_served_camoe(settings)
    model.load_state_dict(state)
    (root / "repo" / "camoe").mkdir(parents=True, exist_ok=True)
    publisher = Publisher(root / "repo", "camoe", client=None)
    return IncrementalTrainer(settings, model, publisher, root / "trainer.pt", "cluster-a", resume)


def test_window_keeps_the_most_recent_rows():
    window = Window(size=5)
    for start in range(0, 12, 3):
        window.add(np.arange(start, start + 3))
    (kept,) = window.arrays()
    assert kept.tolist()[-5:] == [7, 8, 9, 10, 11]
    assert 5 <= len(kept) < 5 + 3  # whole batches: at most one batch more than asked


def test_gate_rejects_non_finite_and_worse_candidates(world_and_model):
    settings, history, state = world_and_model
    serving = build_served_camoe(settings)
    serving.load_state_dict(state)
    held = Examples.unweighted(
        history["categorical"][2000:],
        history["numeric"][2000:],
        history["format"][2000:],
        history["label"][2000:],
    )
    assert quality_gate(serving, serving, held, 0.0).passed

    broken = build_served_camoe(settings)
    broken.load_state_dict(state)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    verdict = quality_gate(broken, serving, held, 0.01)
    assert not verdict.passed and "not finite" in verdict.reason

    untrained = build_served_camoe(settings)  # random weights: far worse held-out logloss
    verdict = quality_gate(untrained, serving, held, 0.01)
    assert not verdict.passed and "worse than serving" in verdict.reason
    assert verdict.candidate_logloss > verdict.serving_logloss


def test_trainer_publishes_on_cadence_and_checkpoints_with_offsets(world_and_model, tmp_path):
    settings, history, state = world_and_model
    trainer = trainer_for(settings, state, tmp_path, None)
    result = trainer(records(labelled_events(history, 1500, 300), 0))
    assert result.outputs == [] and trainer.since_publish > 0  # below the cadence
    assert trainer.committable([]) == []  # nothing is in a checkpoint yet
    result = trainer(records(labelled_events(history, 1800, 300), 300))
    (update,) = result.outputs
    assert update.value["version"] == 1 and versions(tmp_path / "repo" / "camoe") == [1]
    assert update.value["examples_trained"] == trainer.examples
    assert 400 <= trainer.examples < 600  # one in five events held out for the gate
    assert trainer.events == 600
    metrics = update.value["metrics"]
    assert any(k.endswith("_auc_pr") for k in metrics) and "audio_logloss" in metrics
    clicks = [e for e in labelled_events(history, 1500, 600) if e["label"] == 1]
    assert 0 < len(update.value["learned_click_times"]) <= len(clicks)

    saved = Checkpoint.load(tmp_path / "trainer.pt")
    assert saved is not None
    assert saved.offsets == {f"{TOPIC}:0": 600}
    assert (saved.version, saved.examples, saved.events) == (1, trainer.examples, 600)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(saved.model[name], tensor)
    trainer(records(labelled_events(history, 2100, 10), 600))  # read, not checkpointed
    assert [(p.topic, p.partition, p.offset) for p in trainer.committable([])] == [(TOPIC, 0, 600)]


def test_trainer_metrics_count_what_it_trained_judged_and_published(world_and_model, tmp_path):
    settings, history, state = world_and_model
    trainer = trainer_for(settings, state, tmp_path, None)
    trainer(records(labelled_events(history, 1500, 600), 0))
    trainer(records(labelled_events(history, 2100, 10), 600))
    value = trainer.metrics.registry.get_sample_value
    assert value("camoe_trainer_examples_total") == trainer.examples > 0
    assert value("camoe_trainer_events_total") == 610
    assert value("camoe_trainer_served_version") == 1
    assert value("camoe_trainer_minibatch_size") == settings.trainer.online_batch_size
    passed = sum(
        value("camoe_trainer_gate_decisions_total", {"outcome": "passed", "check": check}) or 0
        for check in ("logloss", "no_held_out")
    )
    assert passed == 1
    announced = trainer.announcement
    assert announced is not None
    learned = announced["learned_click_times"]
    assert value("camoe_trainer_freshness_seconds_count") == len(learned) > 0
    expected = sum(announced["published_at"] - t for t in learned) / 1000
    assert value("camoe_trainer_freshness_seconds_sum") == pytest.approx(expected)
    for step in ("write", "rename"):
        assert value("camoe_trainer_publish_step_seconds_count", {"step": step}) == 1
    audio = value("camoe_trainer_prequential", {"format": "audio", "metric": "logloss"})
    assert audio == pytest.approx(announced["metrics"]["audio_logloss"])


def test_resume_starts_at_the_checkpoint_and_announces_its_version_again(world_and_model, tmp_path):
    settings, history, state = world_and_model
    first = trainer_for(settings, state, tmp_path, None)
    first(records(labelled_events(history, 1500, 600), 0))
    first(records(labelled_events(history, 2100, 100), 600))  # trained after the checkpoint: lost
    saved = Checkpoint.load(tmp_path / "trainer.pt")

    resumed = trainer_for(settings, state, tmp_path, saved)
    start = resumed.on_assign([TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
    assert [(p.partition, p.offset) for p in start] == [(0, 600), (1, OFFSET_INVALID)]
    assert resumed.examples == saved.examples
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(saved.model[name], tensor)
    again = resumed(records(labelled_events(history, 2100, 10), 600))
    assert [o.value["version"] for o in again.outputs] == [1]

    other_cluster = IncrementalTrainer(
        settings, build_served_camoe(settings), resumed.publisher, tmp_path / "x.pt", "b", saved
    )
    assert other_cluster.on_assign([TopicPartition(TOPIC, 0)])[0].offset == OFFSET_INVALID


def test_a_non_finite_candidate_is_not_published_and_training_goes_on_from_serving(
    world_and_model, tmp_path
):
    settings, history, state = world_and_model
    trainer = trainer_for(settings, state, tmp_path, None)
    trainer(records(labelled_events(history, 1500, 200), 0))
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    result = trainer(records(labelled_events(history, 1700, 400), 200))
    assert result.outputs == [] and trainer.rejected == 1
    assert versions(tmp_path / "repo" / "camoe") == []
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(trainer.serving.state_dict()[name], tensor)


def test_a_rejected_candidate_is_still_checkpointed(world_and_model, tmp_path):
    settings, history, state = world_and_model
    strict = settings.model_copy(
        update={"trainer": settings.trainer.model_copy(update={"gate_tolerance": -0.5})}
    )
    trainer = trainer_for(strict, state, tmp_path, None)
    result = trainer(records(labelled_events(history, 1500, 600), 0))
    assert result.outputs == [] and trainer.rejected == 1  # no candidate is 50% better

    saved = Checkpoint.load(tmp_path / "trainer.pt")
    assert saved is not None and saved.version == 0 and saved.events == 600
    assert saved.offsets == {f"{TOPIC}:0": 600}
    assert any(not torch.equal(saved.model[k], saved.serving[k]) for k in saved.model)
    for name, tensor in state.items():
        assert torch.equal(saved.serving[name], tensor)  # the gate compares with this one


def test_training_steps_on_whole_mini_batches_however_the_stream_is_polled(
    world_and_model, tmp_path
):
    """A poll holds whatever had arrived (a handful of events at tens per second): the
    model must come out the same as from one big poll, or the steps get noisy."""
    settings, history, state = world_and_model
    values = labelled_events(history, 1500, 390)
    torch.manual_seed(0)
    one_poll = trainer_for(settings, state, tmp_path / "one", None)
    one_poll(records(values, 0))
    torch.manual_seed(0)
    small_polls = trainer_for(settings, state, tmp_path / "small", None)
    for start in range(0, len(values), 3):
        small_polls(records(values[start : start + 3], start))

    batch = settings.trainer.online_batch_size
    for trainer in (one_poll, small_polls):
        assert trainer.examples % batch == 0 and 0 < len(trainer.ready) < batch
    assert len(one_poll.ready) == len(small_polls.ready)
    for name, tensor in one_poll.model.state_dict().items():
        assert torch.equal(small_polls.model.state_dict()[name], tensor), name

    update = small_polls(records(labelled_events(history, 1890, 150), 390))  # the cadence
    assert update.outputs and small_polls.ready == []  # a version learns every ready event
    assert update.outputs[0].value["examples_trained"] == small_polls.examples


def test_events_wait_until_the_negatives_of_their_time_have_arrived(world_and_model, tmp_path):
    """Clicks come before the negatives of their time; training them first would inflate
    pCTR, so each event waits for a negative at least as recent as its impression."""
    settings, history, state = world_and_model
    trainer = trainer_for(settings, state, tmp_path, None)
    now = int(time.time() * 1000)
    values = labelled_events(history, 1500, 40)
    for k, value in enumerate(values):
        value["impression"]["event_time"] = now + k * 100
        value["label"], value["click_delay_ms"] = (1, 500) if k % 4 == 0 else (0, None)
    clicks = [v for k, v in enumerate(values) if k % 4 == 0]
    trainer(records(clicks, 0))
    assert trainer.examples == 0 and len(trainer.waiting) == 10  # only clicks so far

    negatives = [v for k, v in enumerate(values) if k % 4 and k < 21]  # impressions up to 20
    trainer(records(negatives, 10))
    released = {e["impression"]["request_id"] for e in values[:20]}  # the last negative: 19
    assert {e["impression"]["request_id"] for e in trainer.waiting} == {
        v["impression"]["request_id"]
        for v in clicks
        if v["impression"]["request_id"] not in released
    }
    assert trainer.events == 10 + len(negatives)

    saved_waiting = list(trainer.waiting)
    trainer._checkpoint()
    resumed = trainer_for(settings, state, tmp_path, Checkpoint.load(tmp_path / "trainer.pt"))
    assert resumed.waiting == saved_waiting and resumed.closed_ms == trainer.closed_ms
    assert resumed.ready == trainer.ready


def test_sampled_events_weigh_in_training_the_gate_and_the_live_metrics(world_and_model, tmp_path):
    """Negatives the labeler sampled at a tenth carry weight 10: the trainer's steps and
    metrics count each as ten events, as if none had been dropped."""
    settings, history, state = world_and_model
    values = labelled_events(history, 1500, 640)
    for value in values:
        value["weight"] = 1.0 if value["label"] else 10.0
    torch.manual_seed(0)
    weighted = trainer_for(settings, state, tmp_path / "weighted", None)
    weighted(records(values, 0))
    _, _, _, weights = weighted.recent.arrays()
    assert set(weights.tolist()) <= {1.0, 10.0} and 10.0 in weights.tolist()
    assert weighted.held_out.arrays()[4].max() == 10.0
    torch.manual_seed(0)
    plain = trainer_for(settings, state, tmp_path / "plain", None)
    plain(records([{**v, "weight": 1.0} for v in values], 0))
    differs = [
        name
        for name, tensor in plain.model.state_dict().items()
        if tensor.is_floating_point() and not torch.equal(weighted.model.state_dict()[name], tensor)
    ]
    assert differs  # the weights changed the steps


def test_turns_take_at_most_their_share_of_the_trainers_time(
    world_and_model, tmp_path, monkeypatch
):
    """At a high rate publish_every_examples is reached every poll: the trainer must still
    spend most of its time training, not publishing."""
    settings, history, state = world_and_model
    s = settings.model_copy(
        update={
            "trainer": settings.trainer.model_copy(
                update={"publish_every_examples": 100, "publish_time_share": 0.25}
            )
        }
    )
    trainer = trainer_for(s, state, tmp_path, None)
    clock = [1000.0]
    monkeypatch.setattr("trainer.online.time.monotonic", lambda: clock[0])
    real_publish = trainer._publish
    turns = []

    def slow_publish():  # a publish that takes 2 s on the trainer's clock
        turns.append(clock[0])
        clock[0] += 2.0
        return real_publish()

    monkeypatch.setattr(trainer, "_publish", slow_publish)
    trainer(records(labelled_events(history, 1500, 200), 0))
    assert len(turns) == 1 and trainer.turn_s == pytest.approx(2.0)
    clock[0] += 5.9  # training goes on for 2 x 0.75 / 0.25 = 6 s before the next turn
    trainer(records(labelled_events(history, 1700, 200), 200))
    assert len(turns) == 1
    clock[0] += 0.2
    trainer(records(labelled_events(history, 1900, 200), 400))
    assert len(turns) == 2


def test_fake_negative_events_train_at_once_with_their_weights(world_and_model, tmp_path):
    """In the labeler's fake-negative mode each impression comes as a negative when it is
    served and each click as one more positive: nothing waits for a window, the steps
    apply fake-negative weighting, and the gate's rows keep their flag."""
    settings, history, state = world_and_model
    now = int(time.time() * 1000)
    stream = []
    for k, value in enumerate(labelled_events(history, 1500, 640)):
        value["impression"]["event_time"] = now - 1_000 + k  # recent: the window is open
        stream.append({**value, "label": 0, "click_delay_ms": None, "fake_negative": True})
        if value["label"]:
            stream.append({**value, "fake_negative": True})
    assert len(stream) > 650  # the history has clicks
    torch.manual_seed(0)
    weighted = trainer_for(settings, state, tmp_path / "weighted", None)
    weighted(records(stream, 0))
    assert weighted.waiting == [] and weighted.events == len(stream)
    assert weighted.examples + len(weighted.ready) + weighted.held_out.count == len(stream)
    assert weighted.held_out.arrays()[5].all()
    torch.manual_seed(0)
    plain = trainer_for(settings, state, tmp_path / "plain", None)
    plain(records([{**v, "fake_negative": False} for v in stream], 0))
    differs = [
        name
        for name, tensor in plain.model.state_dict().items()
        if tensor.is_floating_point() and not torch.equal(weighted.model.state_dict()[name], tensor)
    ]
    assert differs  # the fake-negative weights changed the steps


def test_a_pin_holds_publishing_while_training_goes_on(world_and_model, tmp_path, caplog):
    settings, history, state = world_and_model
    often = settings.trainer.model_copy(
        update={"publish_every_examples": 150, "publish_time_share": 1.0}
    )
    trainer = trainer_for(settings.model_copy(update={"trainer": often}), state, tmp_path, None)
    model_dir = tmp_path / "repo" / "camoe"
    trainer(records(labelled_events(history, 1500, 300), 0))
    assert versions(model_dir) == [1]
    write_json(model_dir / PIN, {"version": 1, "reason": "rollback", "at_ms": 0})
    examples = trainer.examples
    for start in (300, 500, 700):  # three turns of the cadence
        assert trainer(records(labelled_events(history, 1500 + start, 200), start)).outputs == []
    assert trainer.examples > examples  # it learned
    assert versions(model_dir) == [1]  # and published nothing
    assert trainer.metrics.registry.get_sample_value("camoe_trainer_pinned_version") == 1
    assert caplog.text.count("publishing held") == 1  # one line for the state change

    (model_dir / PIN).unlink()
    (update,) = trainer(records(labelled_events(history, 2400, 300), 900)).outputs
    assert update.value["version"] == 2 and versions(model_dir) == [1, 2]
    assert trainer.metrics.registry.get_sample_value("camoe_trainer_pinned_version") == 0
    assert "publishing resumed" in caplog.text
    record = read_record(model_dir / "2")
    assert record["examples_trained"] == trainer.examples
    assert record["clicks_learned"] == len(update.value["learned_click_times"]) > 0
    assert record["first_click_ms"] == min(update.value["learned_click_times"])
    assert record["metrics"]["audio_logloss"] == update.value["metrics"]["audio_logloss"]
