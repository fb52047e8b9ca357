"""The incremental trainer: learns from labelled-events as they come and rolls out versions.

Events are trained in impression order once a negative as recent as their impression
has arrived (see ``IncrementalTrainer._release``: in the labeler's window mode fresh
clicks arrive before the negatives of their time and would bias the model upwards; in
its fake-negative mode the negatives come with the impressions, so nothing waits), in
whole mini-batches of
``online_batch_size`` however the stream splits them into polls (a poll at 50 events/s
holds a handful: a step per poll made the steps noisy enough that the gate held every
candidate back for minutes). Test-then-train: every event is first scored by the current
model (the prequential AUC-PR, logloss and ECE per format over the last
``prequential_window`` events), then trained on. One event in ``holdout_every`` is kept
out of training for the quality gate instead.

On a cadence (``publish_every_examples`` or ``publish_every_s``) the current model is a
candidate. It must have finite weights and a held-out logloss no worse than the serving
version's (within ``gate_tolerance``); the released events short of a mini-batch are
trained first, so a version has learned all it could. Then the Publisher writes, loads and checks it
(trainer/export.py). A rejected candidate is not published; a non-finite one is also
replaced by the serving weights so training goes on from a sound model. While an operator
has pinned a version (``camoe models``, trainer/versions.py) the turns publish nothing:
training goes on, and the pin is put back if Triton has restarted without it.

Delivery guarantee: each labelled event is trained into the model's lineage exactly once.
The checkpoint holds the weights (the trainer's and the served version's), the optimiser
state, the events read but not yet trained, and the next offset of every partition,
written together (one file, renamed into place) at every turn of the cadence, whether
the candidate was published or not.
On (re)assignment the trainer seeks to the checkpoint's offsets, so events after the
checkpoint are trained again on top of the checkpointed weights, and events before it
never are. The group's committed offsets are the last checkpoint's (``committable``), so
a partition the checkpoint does not know (a crash before the first one) is read again
from the start, not from past events never trained. Announcements on model-updates are
at-least-once (keyed by version): the checkpoint's version is announced again after a
restart.

Late positives (a click after the attribution window, when the negative was already
trained) are trained as positives: together with the earlier negative the impression
counts once each way. Events of the labeler's fake-negative mode (``fake_negative``: every
impression a negative at once, every click a positive more) are trained with fake-negative
weighting (``trainer.model.fake_negative_weights``), so their model estimates the true
pCTR; they are released at once, since their negatives come with the impressions. The
gate's logloss and the prequential figures compare such events' labels with the click
rate that stream shows (``observed_pctr``), not with the pCTR served.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import zlib
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import OFFSET_INVALID, TopicPartition
from prometheus_client import CollectorRegistry
from torch import nn

from camoe.features import format_index
from camoe.settings import Settings
from camoe.streaming.app import BatchResult, Output, Record
from trainer.export import Batch, Publisher, PublishError, PublishHeld
from trainer.metrics import per_format
from trainer.model import fake_negative_weights, masked_bce, observed_pctr, select_task
from trainer.monitoring import TrainerMetrics
from trainer.train import to_tensors
from trainer.versions import keep_served

log = logging.getLogger(__name__)
CHECK_ROWS = 64  # rows of the last trained batch a candidate is checked on in Triton


@dataclass
class Examples:
    """Labelled events as arrays: categorical (B, C), numeric (B, N), format (B,), label (B,),
    weight (B,): the importance weight of a sampled event (1 when nothing was sampled),
    fake_negative (B,) bool: from the labeler's fake-negative mode."""

    categorical: np.ndarray
    numeric: np.ndarray
    fmt: np.ndarray
    label: np.ndarray
    weight: np.ndarray
    fake_negative: np.ndarray

    @classmethod
    def from_events(cls, events: list[dict[str, Any]]) -> Examples:
        impressions = [e["impression"] for e in events]
        return cls(
            np.asarray([i["categorical"] for i in impressions], dtype=np.int64),
            np.asarray([i["numeric"] for i in impressions], dtype=np.float32),
            np.asarray([format_index(i["format"]) for i in impressions], dtype=np.int64),
            np.asarray([e["label"] for e in events], dtype=np.float32),
            np.asarray([e.get("weight", 1.0) for e in events], dtype=np.float32),
            np.asarray([e.get("fake_negative", False) for e in events], dtype=bool),
        )

    @classmethod
    def unweighted(
        cls, categorical: np.ndarray, numeric: np.ndarray, fmt: np.ndarray, label: np.ndarray
    ) -> Examples:
        """Examples of weight 1, none of them from a fake-negative stream."""
        n = len(label)
        return cls(categorical, numeric, fmt, label, np.ones(n, np.float32), np.zeros(n, bool))

    def __len__(self) -> int:
        return len(self.label)

    def rows(self, index: np.ndarray | slice) -> Examples:
        """The examples at ``index`` (an index array or a slice), in its order."""
        return Examples(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def held_out(request_id: str, every: int) -> bool:
    """Whether the events of ``request_id`` are kept out of training for the quality gate:
    one request in ``every``, by a hash of its id (a replay decides the same)."""
    return zlib.crc32(request_id.encode()) % every == 0


def adam(model: nn.Module, learning_rate: float) -> torch.optim.Adam:
    """Adam with its fused kernel: one pass over all parameters per step instead of one
    per tensor, the larger part of a small model's step on a CPU."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)


def train_steps(
    model: nn.Module, optimiser: torch.optim.Optimizer, x: Examples, batch_size: int
) -> None:
    """One optimiser step per mini-batch of ``batch_size`` rows of ``x``, in order: adaptive
    loss masking, each row weighted by its importance weight and, where it comes from a
    fake-negative stream, by fake-negative weighting."""
    tensors = (
        *to_tensors(x.categorical, x.numeric, x.fmt, x.label),
        torch.from_numpy(x.weight),
        torch.from_numpy(x.fake_negative),
    )
    model.train()
    for start in range(0, len(x), batch_size):
        c, n, f, y, w, fake = (t[start : start + batch_size] for t in tensors)
        logits = model(c, n)
        if fake.any():
            w = w * fake_negative_weights(logits, y, f, fake)
        loss = masked_bce(logits, y, f, sample_weights=w)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def predict(model: nn.Module, x: Examples, observed: bool = False) -> np.ndarray:
    """Calibrated pCTR of each example's own format, (B,); with ``observed``, the click
    rate its event's stream shows (``observed_pctr``), what its label is compared with."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x.categorical), torch.from_numpy(x.numeric))
        p = torch.sigmoid(select_task(logits, torch.from_numpy(x.fmt)))
        if observed:
            p = observed_pctr(p, torch.from_numpy(x.fake_negative))
        return p.numpy()


def logloss(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.average(y * np.log(p) + (1 - y) * np.log(1 - p), weights=weights))


def finite(model: nn.Module) -> bool:
    return all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    )


@dataclass
class Gate:
    """The quality gate's verdict on one candidate."""

    passed: bool
    check: str  # what decided: finite_weights, finite_scores, logloss, no_held_out
    reason: str
    candidate_logloss: float = float("nan")
    serving_logloss: float = float("nan")


def quality_gate(
    candidate: nn.Module, serving: nn.Module, held_out: Examples | None, tolerance: float
) -> Gate:
    """Passes a candidate with finite weights and scores whose held-out logloss is at most
    ``(1 + tolerance)`` times the serving version's. Logloss, not AUC-PR: it is stable on
    a few thousand events with few positives, and it also catches a miscalibrated model."""
    if not finite(candidate):
        return Gate(False, "finite_weights", "weights are not finite")
    if held_out is None or len(held_out) == 0 or held_out.label.min() == held_out.label.max():
        return Gate(
            True, "no_held_out", "no held-out events with both labels yet: checked finiteness only"
        )
    p = predict(candidate, held_out, observed=True)
    if not np.isfinite(p).all():
        return Gate(False, "finite_scores", "held-out scores are not finite")
    mine = logloss(p, held_out.label, held_out.weight)
    theirs = logloss(predict(serving, held_out, observed=True), held_out.label, held_out.weight)
    if mine > theirs * (1 + tolerance):
        reason = f"held-out logloss {mine:.4f} worse than serving {theirs:.4f}"
        return Gate(False, "logloss", reason, mine, theirs)
    reason = f"held-out logloss {mine:.4f} vs serving {theirs:.4f}"
    return Gate(True, "logloss", reason, mine, theirs)


class Window:
    """The most recent ``size`` rows of a few parallel arrays, kept as a ring of batches
    (held-out events for the gate; scored events for the prequential metrics)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: deque[tuple[np.ndarray, ...]] = deque()
        self.count = 0

    def add(self, *arrays: np.ndarray) -> None:
        if len(arrays[0]):
            self.parts.append(arrays)
            self.count += len(arrays[0])
        while self.parts and self.count - len(self.parts[0][0]) >= self.size:
            self.count -= len(self.parts.popleft()[0])

    def arrays(self) -> tuple[np.ndarray, ...] | None:
        if not self.parts:
            return None
        return tuple(np.concatenate(column) for column in zip(*self.parts, strict=True))


@dataclass
class Checkpoint:
    """What the trainer resumes from: its weights and the served version's, the optimiser,
    offsets, counters, the last version and the clicks learned since."""

    model: dict[str, torch.Tensor]
    serving: dict[str, torch.Tensor]
    optimiser: dict[str, Any] | None = None
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset
    cluster_id: str | None = None  # offsets mean nothing on another Kafka cluster
    examples: int = 0  # trained on
    events: int = 0  # read: trained on or held out
    version: int = 0
    announcement: dict[str, Any] | None = None  # the last version's model-update record
    learned_clicks: list[int] = field(default_factory=list)  # not yet in a served version
    waiting: list[dict[str, Any]] = field(default_factory=list)  # read, window still open
    ready: list[dict[str, Any]] = field(default_factory=list)  # released, short of a batch
    closed_ms: int = 0

    def save(self, path: Path) -> None:
        """Atomic: written beside, flushed to disk, renamed over the previous one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("wb") as out:
            torch.save(self.__dict__, out)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        if not path.exists():
            return None
        return cls(**torch.load(path, weights_only=False))


def _key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def _partition_of(key: str) -> tuple[str, int]:
    topic, partition = key.rsplit(":", 1)
    return topic, int(partition)


class IncrementalTrainer:
    """StreamApp handler (and partition hooks) over labelled-events.

    Args:
        settings: the system's settings.
        model: the model to keep training (the served version's weights).
        publisher: writes versions into the model repository and loads them.
        checkpoint_path: where the trainer's checkpoint lives.
        cluster_id: the Kafka cluster's id, stored with the offsets.
        resume: the checkpoint to resume from, if any.
        registry: where its metrics go (its stream app's; None: a registry of its own).
    """

    def __init__(
        self,
        settings: Settings,
        model: nn.Module,
        publisher: Publisher,
        checkpoint_path: Path,
        cluster_id: str | None,
        resume: Checkpoint | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.t = settings.trainer
        self.model = model.eval()
        self.publisher = publisher
        self.topic = settings.kafka.topics.model_updates.name
        self.checkpoint_path = checkpoint_path
        self.cluster_id = cluster_id
        self.optimiser = adam(model, self.t.online_learning_rate)
        self.serving = copy.deepcopy(model).eval()  # the version Triton serves
        self.offsets: dict[str, int] = {}  # "topic:partition" -> next offset to read
        self.checkpointed: dict[str, int] = {}  # the offsets of the last checkpoint
        self.examples = 0
        self.version = 0
        self.since_publish = 0
        self.last_publish = time.monotonic()
        self.turn_ended = 0.0  # when the last cadence turn ended, and how long it took
        self.turn_s = 0.0
        self.learned_clicks: list[int] = []  # click times of positives since the last version
        self.held_out = Window(self.t.holdout_size)
        self.recent = Window(self.t.prequential_window)  # (format, label, pctr before training)
        self.check: Batch | None = None  # recent events for Triton's warm-up and parity
        self.events = 0  # labelled events read (trained, held out or waiting)
        self.waiting: list[dict[str, Any]] = []  # read, not yet released (see _release)
        self.ready: list[dict[str, Any]] = []  # released for training, short of a mini-batch
        self.closed_ms = 0  # the most recent impression time whose negatives have arrived
        self.rejected = 0
        self.pinned = 0  # the version an operator pinned (0: none): nothing is published
        self.announcement: dict[str, Any] | None = None  # the last version's model-update
        self._announce_again = False
        if resume is not None:
            self._restore(resume)
        self.metrics = TrainerMetrics(self, registry)

    def _restore(self, checkpoint: Checkpoint) -> None:
        self.model.load_state_dict(checkpoint.model)
        self.serving.load_state_dict(checkpoint.serving)
        if checkpoint.optimiser is not None:
            self.optimiser.load_state_dict(checkpoint.optimiser)
        if checkpoint.cluster_id == self.cluster_id:
            self.offsets = dict(checkpoint.offsets)
            self.checkpointed = dict(checkpoint.offsets)
        elif checkpoint.offsets:
            log.warning("the checkpoint's offsets belong to another Kafka cluster; ignoring them")
        self.examples = checkpoint.examples
        self.events = checkpoint.events
        self.version = checkpoint.version
        self.learned_clicks = list(checkpoint.learned_clicks)
        self.waiting = list(checkpoint.waiting)
        self.ready = list(checkpoint.ready)
        self.closed_ms = checkpoint.closed_ms
        self.announcement = checkpoint.announcement
        self._announce_again = checkpoint.announcement is not None
        log.info(
            "resumed at version %d after %d examples (%d partition offsets)",
            self.version,
            self.examples,
            len(self.offsets),
        )

    # --- partition hooks ------------------------------------------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Starts each partition at the checkpoint's offset, else at the committed one."""
        return [
            TopicPartition(
                p.topic, p.partition, self.offsets.get(_key(p.topic, p.partition), OFFSET_INVALID)
            )
            for p in partitions
        ]

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Nothing to drop: the model learns from every partition it has read."""

    def committable(self, _records: list[Record]) -> list[TopicPartition]:
        """The StreamApp's commit policy: the last checkpoint's offsets, never further (a
        batch read is not yet in any checkpoint)."""
        return [
            TopicPartition(*_partition_of(key), offset) for key, offset in self.checkpointed.items()
        ]

    # --- the batch --------------------------------------------------------------------

    def __call__(self, records: list[Record]) -> BatchResult:
        result = BatchResult()
        if self._announce_again and self.announcement is not None:
            result.outputs.append(Output(self.topic, str(self.version), self.announcement))
            self._announce_again = False
        for record in records:
            self.offsets[_key(record.topic, record.partition)] = record.offset + 1
            if record.value["impression"]["feature_service"] != self.settings.feast.feature_service:
                result.dead_letters.append((record, "feature layout differs from the model's"))
                continue
            self.events += 1
            self.waiting.append(record.value)
        held = []
        for event in self._release():
            gate = held_out(event["impression"]["request_id"], self.t.holdout_every)
            (held if gate else self.ready).append(event)
        if held:
            h = Examples.from_events(held)
            self.held_out.add(h.categorical, h.numeric, h.fmt, h.label, h.weight, h.fake_negative)
        self._train_ready(whole_batches_only=True)
        if self._cadence_due():
            started = time.monotonic()
            self._train_ready(whole_batches_only=False)
            update = self._publish()
            self._checkpoint()
            self.turn_ended = time.monotonic()
            self.turn_s = self.turn_ended - started
            if update is not None:
                result.outputs.append(update)
        return result

    def _release(self) -> list[dict[str, Any]]:
        """The waiting events whose impressions' windows have closed, oldest first.

        A positive arrives with its click, its impression's negatives a window later:
        trained at once, fresh positives without the negatives of their time would inflate
        the model's pCTR (delayed-feedback bias), the worst at start-up when every label is
        a click. So an event waits until a negative as recent as its impression has arrived,
        or the attribution window has passed on the wall clock (a quiet stream)."""
        negatives = [e["impression"]["event_time"] for e in self.waiting if e["label"] == 0]
        self.closed_ms = max([self.closed_ms, *negatives])
        wall = time.time() * 1000 - self.settings.labeler.attribution_window_s * 1000
        closed = max(self.closed_ms, wall)
        ready = [e for e in self.waiting if e["impression"]["event_time"] <= closed]
        self.waiting = [e for e in self.waiting if e["impression"]["event_time"] > closed]
        return sorted(ready, key=lambda e: e["impression"]["event_time"])

    def _train_ready(self, whole_batches_only: bool) -> None:
        """Scores, then trains on, the ready events: whole mini-batches only, or all."""
        size = self.t.online_batch_size
        count = len(self.ready) - len(self.ready) % size if whole_batches_only else len(self.ready)
        if count == 0:
            return
        train, self.ready = self.ready[:count], self.ready[count:]
        x = Examples.from_events(train)
        self.recent.add(
            x.fmt, x.label, predict(self.model, x, observed=True), x.weight
        )  # test, then train
        self._train(x)
        rows = (x.categorical, x.numeric, x.fmt)
        if self.check is not None and len(x) < CHECK_ROWS:  # a remainder: keep enough rows
            rows = tuple(np.concatenate(pair) for pair in zip(self.check, rows, strict=True))
        self.check = (rows[0][-CHECK_ROWS:], rows[1][-CHECK_ROWS:], rows[2][-CHECK_ROWS:])
        self.learned_clicks += [
            e["impression"]["event_time"] + e["click_delay_ms"]
            for e in train
            if e["label"] == 1 and e["click_delay_ms"] is not None
        ]

    def _train(self, x: Examples) -> None:
        train_steps(self.model, self.optimiser, x, self.t.online_batch_size)
        self.examples += len(x)
        self.since_publish += len(x)

    def _cadence_due(self) -> bool:
        """A turn is due after ``publish_every_examples`` or ``publish_every_s``, but never
        sooner than its share of the trainer's time allows: after a turn of d seconds,
        training goes on for at least d x (1 - share) / share (``publish_time_share``)."""
        learned = self.since_publish + len(self.ready)
        if learned == 0:
            return False
        now = time.monotonic()
        share = self.t.publish_time_share
        if now - self.turn_ended < self.turn_s * (1 - share) / share:
            return False
        waited = now - self.last_publish
        return learned >= self.t.publish_every_examples or waited >= self.t.publish_every_s

    # --- rollout ----------------------------------------------------------------------

    def prequential(self) -> dict[str, float]:
        """Live metrics per format on the recent events, each scored before it was trained."""
        recent = self.recent.arrays()
        if recent is None:
            return {}
        fmt, label, p, weight = recent
        scored = np.isfinite(p)  # a diverged candidate's scores (it was rolled back) say nothing
        fmt, label, p, weight = fmt[scored], label[scored], p[scored], weight[scored]
        figures = {}
        for name_of_format, metrics in per_format(p, label, fmt, weight).items():
            for name in ("auc_pr", "logloss", "ece"):
                if np.isfinite(metrics[name]):
                    figures[f"{name_of_format}_{name}"] = metrics[name]
        return figures

    def _publish(self) -> Output | None:
        """Gate, publish and announce the current model; None when it was rejected or an
        operator's pin holds publishing."""
        self.last_publish = time.monotonic()
        self.since_publish = 0  # a rejected candidate waits for the next turn of the cadence
        if self._held():
            return None
        held = self.held_out.arrays()
        gate = quality_gate(
            self.model, self.serving, Examples(*held) if held else None, self.t.gate_tolerance
        )
        self.metrics.gate.labels("passed" if gate.passed else "rejected", gate.check).inc()
        if not gate.passed:
            self.rejected += 1
            log.warning("candidate rejected by the quality gate: %s", gate.reason)
            if not finite(self.model):
                self.model.load_state_dict(self.serving.state_dict())
                self.optimiser = adam(self.model, self.t.online_learning_rate)
            return None
        assert self.check is not None  # a publish follows training
        quality = self.prequential()
        metrics = {
            **quality,
            "gate_candidate_logloss": gate.candidate_logloss,
            "gate_serving_logloss": gate.serving_logloss,
        }
        record = {
            "examples_trained": self.examples,
            "metrics": metrics,
            "clicks_learned": len(self.learned_clicks),
            "first_click_ms": min(self.learned_clicks, default=None),
            "last_click_ms": max(self.learned_clicks, default=None),
        }
        try:
            version = self.publisher.publish(self.model, self.check, record)
        except PublishHeld:
            self._held()  # pinned while this publish ran
            return None
        except PublishError as error:
            self.rejected += 1
            self.metrics.publish_failures.inc()
            log.error("%s", error)
            return None
        finally:
            self.metrics.steps(self.publisher.steps)
        self.serving.load_state_dict(self.model.state_dict())
        self.version = version
        announcement: dict[str, Any] = {
            "model_name": self.settings.triton.model_name,
            "version": version,
            "published_at": int(time.time() * 1000),
            "examples_trained": self.examples,
            "metrics": {
                **metrics,
                **{f"publish_{step}_s": s for step, s in self.publisher.steps.items()},
            },
            "learned_click_times": self.learned_clicks,
        }
        self.metrics.published(announcement["published_at"], self.learned_clicks)
        self.metrics.prequential(quality)
        self.learned_clicks = []
        self.announcement = announcement
        log.info("published version %d after %d examples (%s)", version, self.examples, gate.reason)
        return Output(self.topic, str(version), announcement)

    def _held(self) -> bool:
        """Whether an operator's pin holds publishing (logged when that changes), after
        making sure Triton serves what it should (``keep_served``)."""
        pin = keep_served(self.publisher.client, self.publisher.model_dir, self.publisher.broken)
        if pin is not None and pin.version != self.pinned:
            log.warning(
                "publishing held: an operator pinned version %d (%s); training goes on, "
                "`camoe models resume` lets new versions serve",
                pin.version,
                pin.reason,
            )
        elif pin is None and self.pinned:
            log.info("publishing resumed: the pin on version %d was lifted", self.pinned)
        self.pinned = pin.version if pin is not None else 0
        return pin is not None

    def _checkpoint(self) -> None:
        """Saves the trainer's whole state at every turn of the cadence, published or not,
        so a restart re-trains at most one cadence's events."""
        Checkpoint(
            model=self.model.state_dict(),
            serving=self.serving.state_dict(),
            optimiser=self.optimiser.state_dict(),
            offsets=dict(self.offsets),
            cluster_id=self.cluster_id,
            examples=self.examples,
            events=self.events,
            version=self.version,
            announcement=self.announcement,
            learned_clicks=list(self.learned_clicks),
            waiting=list(self.waiting),
            ready=list(self.ready),
            closed_ms=self.closed_ms,
        ).save(self.checkpoint_path)
        self.checkpointed = dict(self.offsets)
