"""The labeler: joins the feature log with clicks into labelled events.

It labels in one of two modes (``labeler.feedback``):

* ``window``: a click inside the attribution window labels its impression 1 (emitted at
  once); an impression whose window closes without a click is emitted as 0. A click
  after that is a *late positive*: emitted again with label 1 and ``late_positive=True``,
  never dropped.
* ``fake-negative`` (Ktena et al., RecSys 2019): every impression is emitted as a 0 as
  soon as it is read, and every click once more as a 1 (in the window or late), with
  ``fake_negative=True``; nothing waits for a window, and the trainer's fake-negative
  weighting removes the bias of the early negatives. The window only bounds how long an
  impression is remembered for its click.

In both, negatives can be sampled: a share of them (``negative_sampling_rate``, chosen by
a hash of the request id) each weighted by the inverse of that share, so that the
trainer's loss stays unbiased and the served pCTR calibrated while it trains on a
fraction of the events. A duplicate click counts once; a click whose impression never
shows up (within the window) goes to the dead-letter topic.

Time is per input partition and per topic, in event time (advanced by the wall clock
since the last read): a window closes once the clicks of its partition have been read
past it (a click read later is late), a click is
unknown once the impressions of its partition have been read a window past it, and a
labelled impression is forgotten once the clicks have been read ten windows past it. So
catching up after a crash decides as the live run would have. A topic of a partition
from which nothing was read for a window of wall-clock time counts as read up to the wall
clock, so a quiet stream still emits its negatives and its unknown clicks (a partition
just assigned has that window to fetch its backlog).

Delivery guarantee: exactly-once (the StreamApp's ``exactly-once`` mode, required).
feature-log and ad-clicks are keyed by request id with one partition count, so an
impression and its clicks share a partition number n (the range assignor gives both
partitions n to one worker). Every change of the state of partition n (pending and
labelled impressions, orphan clicks, counters) is written to partition n of the compacted
changelog topic (``kafka.topics.labeler_state``) in the Kafka transaction that also holds
the batch's labels, dead letters and consumed offsets: all of it is committed, or none.
On assignment the labeler reads its partitions' changelog back (``read_committed``) and
goes on from the committed offsets, so a crash loses no label and emits none twice.
At-least-once is refused: without the transaction a crash could leave the changelog
ahead of the labels it goes with, and those labels would be lost.

It also keeps per-user and per-ad impression and click counters and writes them into
Feast's counter views (the online store), so scoring sees fresh counters. One user's
impressions come from every input partition, so the counts are repartitioned by entity,
as Kafka Streams does: each batch's increments go to the ``counter-updates`` topic keyed
``user:<id>`` / ``ad:<id>`` (in the batch's transaction), and the labeler reads that
topic back as a third input. Every increment of an entity lands in one partition, held
by one worker, which sums them into its state (the changelog, in the same transaction
as the increments' offsets) and writes the total: exact however many labeler workers
run. A write happens before its transaction commits; a crash before the commit is
corrected by the write of the replayed batch. While the store cannot be written,
labelling goes on and the changed counters wait; once a write gets through again, the
labeler materialises the profiles again and writes every counter it holds, since a
store without persistence comes back empty.
"""

from __future__ import annotations

import heapq
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TopicPartition

from camoe.clients.feature_store import FeatureStoreDown
from camoe.streaming.app import BatchResult, Output, Record

log = logging.getLogger(__name__)

# Reads the changelog of the given partitions: partition -> key -> latest value.
ReadState = Callable[[list[int]], dict[int, dict[str, dict[str, Any]]]]
PushCounters = Callable[[dict[str, list[int]], dict[str, list[int]]], None]


@dataclass
class Pending:
    """An impression waiting for its click or for its window to close."""

    impression: dict[str, Any]
    closes_at_ms: int


@dataclass
class Decided:
    """A labelled impression, remembered for later duplicate or late clicks."""

    label: int
    forget_at_ms: int
    impression: dict[str, Any]


@dataclass
class Progress:
    """How far one input topic of a partition has been read."""

    event_ms: int = 0  # the latest event time read
    read_at_ms: int | None = None  # wall clock of the last read; None: never

    def read(self, event_ms: int, clock_ms: int) -> None:
        self.event_ms = max(self.event_ms, event_ms)
        self.read_at_ms = clock_ms

    def now(self, clock_ms: int, window_ms: int) -> int:
        """The event time read so far, advanced by the wall clock since that read (a live
        stream keeps up with the clock, a backlog stays behind it); the wall clock once
        nothing was read for a window (then nothing older is on its way)."""
        if self.read_at_ms is None or clock_ms - self.read_at_ms >= window_ms:
            return clock_ms
        return self.event_ms + clock_ms - self.read_at_ms


@dataclass
class PartitionState:
    """Everything the labeler holds for input partition n (feature-log n, ad-clicks n,
    counter-updates n); keys are the changelog's: request ids, and ``user:<id>`` /
    ``ad:<id>`` counters."""

    pending: dict[str, Pending] = field(default_factory=dict)
    orphans: dict[str, Record] = field(default_factory=dict)  # clicks before impressions
    decided: dict[str, Decided] = field(default_factory=dict)
    # (time, request id) heaps of when pending windows close and decided ones are
    # forgotten, so a batch visits only what is due (an entry whose key has gone or has
    # another time since is skipped).
    closing: list[tuple[int, str]] = field(default_factory=list)
    forgetting: list[tuple[int, str]] = field(default_factory=list)

    def wait(self, request_id: str, pending: Pending) -> None:
        self.pending[request_id] = pending
        heapq.heappush(self.closing, (pending.closes_at_ms, request_id))

    def decide(self, request_id: str, decided: Decided) -> None:
        self.decided[request_id] = decided
        heapq.heappush(self.forgetting, (decided.forget_at_ms, request_id))

    def due(self, now_ms: int) -> list[str]:
        """The pending request ids whose windows have closed by ``now_ms``, oldest first."""
        return _pop_due(
            self.closing, now_ms, lambda k: p.closes_at_ms if (p := self.pending.get(k)) else None
        )

    def forgettable(self, now_ms: int) -> list[str]:
        """The decided request ids to forget by ``now_ms``."""
        return _pop_due(
            self.forgetting,
            now_ms,
            lambda k: d.forget_at_ms if (d := self.decided.get(k)) else None,
        )

    counters: dict[str, list[int]] = field(default_factory=dict)  # [impressions, clicks]
    impressions: Progress = field(default_factory=Progress)
    clicks: Progress = field(default_factory=Progress)


def _pop_due(
    heap: list[tuple[int, str]], now_ms: int, current: Callable[[str], int | None]
) -> list[str]:
    """Pops the entries of ``heap`` due by ``now_ms``; returns, oldest first and once each,
    the keys whose ``current`` time is still the entry's (a key gone, or pushed again with
    another time, is skipped; one pushed twice with the same time, as a late positive's
    decision is, counts once)."""
    due: dict[str, None] = {}
    while heap and heap[0][0] <= now_ms:
        at, key = heapq.heappop(heap)
        if current(key) == at:
            due[key] = None
    return list(due)


def _wrong_ad(click: dict[str, Any]) -> str:
    return f"click on ad {click['ad_id']} that request {click['request_id']} did not serve"


def keeps_negative(request_id: str, rate: float) -> bool:
    """Whether the negative of ``request_id`` is emitted when negatives are sampled at
    ``rate``: a hash of the id, not a draw, so a replay after a crash decides the same."""
    return rate >= 1.0 or zlib.crc32(f"negative:{request_id}".encode()) < rate * 2**32


class Labeler:
    """StreamApp handler over feature-log and ad-clicks, and its ``PartitionHooks``.

    Args:
        feature_log_topic, labelled_topic, state_topic, counter_topic: topic names (state:
            the changelog; counter: the counter increments, keyed by entity).
        window_s: attribution window.
        read_state: reads the changelog of partitions on assignment; None starts empty.
        push_counters: called with (user counters, ad counters) to push into Feast, or None;
            it raises ``FeatureStoreDown`` when the store cannot be written.
        restore_store: called when the store is back after being down, before every
            counter is pushed again (the profiles' materialisation), or None.
        max_clock_skew_s: an input whose event time is further ahead of the clock is
            dead-lettered (it would close every open window of its partition at once).
        clock_ms: the wall clock (milliseconds), replaceable in tests.
        negative_sampling_rate: the share of negatives emitted (see ``keeps_negative``);
            each carries weight ``1 / negative_sampling_rate``.
        fake_negative: the ``fake-negative`` mode (see the module's docstring); else the
            ``window`` mode.
    """

    def __init__(
        self,
        feature_log_topic: str,
        labelled_topic: str,
        state_topic: str,
        counter_topic: str,
        window_s: float,
        read_state: ReadState | None = None,
        push_counters: PushCounters | None = None,
        clock_ms: Callable[[], int] | None = None,
        negative_sampling_rate: float = 1.0,
        fake_negative: bool = False,
        restore_store: Callable[[], None] | None = None,
        max_clock_skew_s: float = 300.0,
    ) -> None:
        if not 0 < negative_sampling_rate <= 1:
            raise ValueError(
                f"negative_sampling_rate must be in (0, 1], got {negative_sampling_rate}"
            )
        self.feature_log_topic = feature_log_topic
        self.negative_sampling_rate = negative_sampling_rate
        self.fake_negative = fake_negative
        self.labelled_topic = labelled_topic
        self.state_topic = state_topic
        self.counter_topic = counter_topic
        self.window_ms = int(window_s * 1000)
        self.read_state = read_state
        self.push_counters = push_counters
        self.restore_store = restore_store
        self.max_skew_ms = int(max_clock_skew_s * 1000)
        self._store_down_since: float | None = None  # monotonic; None while writes work
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.partitions: dict[int, PartitionState] = {}
        self.counts: Counter[str] = Counter()
        self._changed: dict[int, set[str]] = {}  # keys changed in this batch, per partition
        self._unpushed: set[str] = set()  # counter keys changed since the last push
        self._increments: dict[str, list[int]] = {}  # this batch's, by counter key

    # --- partitions ------------------------------------------------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Restores the state of the newly assigned partition numbers from the changelog;
        reading resumes at the committed offsets, which go with that state."""
        numbers = sorted({tp.partition for tp in partitions} - set(self.partitions))
        state = self.read_state(numbers) if self.read_state and numbers else {}
        for n in numbers:
            self.restore(n, state.get(n, {}))
        return partitions

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        for n in {tp.partition for tp in partitions}:
            self.partitions.pop(n, None)

    def restore(self, partition: int, entries: dict[str, dict[str, Any]]) -> None:
        """Sets the state of ``partition`` from its changelog entries (key -> latest value)."""
        clock = self.clock_ms()
        # Both topics count as being read: the backlog decides in event time, not the clock.
        state = PartitionState(impressions=Progress(0, clock), clicks=Progress(0, clock))
        for key, entry in entries.items():
            if entry["counter"] is not None:
                state.counters[key] = [entry["counter"]["impressions"], entry["counter"]["clicks"]]
            elif entry["orphan_click"] is not None:
                o = entry["orphan_click"]
                state.orphans[key] = Record(
                    o["topic"], partition, o["offset"], o["key"], o["click"], o["raw"]
                )
            elif entry["label"] is None:
                state.wait(key, self._pending(entry["impression"]))
            else:
                state.decide(key, self._decided(entry["label"], entry["impression"]))
        self.partitions[partition] = state
        log.info(
            "partition %d restored: %d pending, %d orphan clicks, %d labelled, %d counters",
            partition,
            len(state.pending),
            len(state.orphans),
            len(state.decided),
            len(state.counters),
        )

    # --- the batch -----------------------------------------------------------------

    def __call__(self, records: list[Record]) -> BatchResult:
        result = BatchResult()
        clock = self.clock_ms()
        for record in records:
            n = record.partition
            state = self.partitions.setdefault(n, PartitionState())
            if record.topic == self.counter_topic:
                self._add(n, state, record, result)
                continue
            ahead_ms = record.value["event_time"] - clock
            if ahead_ms > self.max_skew_ms:
                self.counts["future_events"] += 1
                result.dead_letters.append(
                    (
                        record,
                        f"event time {ahead_ms / 1000:.0f} s ahead of the clock, more than "
                        f"labeler.max_clock_skew_s={self.max_skew_ms / 1000:g}",
                    )
                )
                continue
            if record.topic == self.feature_log_topic:
                state.impressions.read(record.value["event_time"], clock)
                self._on_impression(n, state, record, result)
            else:
                state.clicks.read(record.value["event_time"], clock)
                self._on_click(n, state, record, result)
        for n, state in self.partitions.items():
            self._close_windows(n, state, state.clicks.now(clock, self.window_ms), result)
            self._expire_orphans(n, state, state.impressions.now(clock, self.window_ms), result)
            self._forget(n, state, state.clicks.now(clock, self.window_ms))
        result.outputs.extend(self._changelog())
        result.outputs.extend(
            Output(self.counter_topic, key, {"impressions": i, "clicks": c})
            for key, (i, c) in sorted(self._increments.items())
        )
        self._increments.clear()
        if self.push_counters and self._unpushed:
            self._push(self.push_counters)
        return result

    def _push(self, push: PushCounters) -> None:
        """Pushes the counters changed since the last push, or, the first time the store
        answers after being down, the profiles and every counter."""
        down_since = self._store_down_since
        keys = self._counter_keys() if down_since is not None else self._unpushed
        try:
            if down_since is not None and self.restore_store:
                self.restore_store()
            push(*self._totals(keys))
        except FeatureStoreDown as error:
            self.counts["counter_push_failures"] += 1
            if down_since is None:
                self._store_down_since = time.monotonic()
                log.warning("feature store unreachable (%s): counters wait for it", error)
            return
        if down_since is not None:
            log.info(
                "feature store back after %.1f s: every counter pushed again (%d)",
                time.monotonic() - down_since,
                len(keys),
            )
            self._store_down_since = None
        self.counts["counter_pushes"] += 1
        self.counts["counters_pushed"] += len(keys)
        self._unpushed.clear()

    def _on_impression(
        self, n: int, state: PartitionState, record: Record, result: BatchResult
    ) -> None:
        row = record.value
        request_id = row["request_id"]
        if request_id in state.pending or request_id in state.decided:
            self.counts["duplicate_impressions"] += 1  # re-scored after a scorer crash
            return
        self._count(row["user_id"], row["ad_id"], impressions=1, clicks=0)
        state.wait(request_id, self._pending(row))
        self._changed_key(n, request_id)
        if self.fake_negative:
            self._output(row, None, False, result)
        orphan = state.orphans.pop(request_id, None)
        if orphan is not None:  # the click overtook its impression
            self._on_click(n, state, orphan, result)

    def _on_click(self, n: int, state: PartitionState, record: Record, result: BatchResult) -> None:
        click = record.value
        request_id = click["request_id"]
        pending = state.pending.get(request_id)
        if pending is not None and click["event_time"] > pending.closes_at_ms:
            # Its window closed in event time before the click: the negative stands first.
            self._close(n, state, request_id, result)
            pending = None
        if pending is not None:
            if click["ad_id"] != pending.impression["ad_id"]:
                result.dead_letters.append((record, _wrong_ad(click)))
                return
            del state.pending[request_id]
            self._emit(n, state, pending.impression, click, False, result)
            return
        decided = state.decided.get(request_id)
        if decided is not None:
            if click["ad_id"] != decided.impression["ad_id"]:
                result.dead_letters.append((record, _wrong_ad(click)))
            elif decided.label == 1:
                self.counts["duplicate_clicks"] += 1
            else:
                self._emit(n, state, decided.impression, click, True, result)
            return
        if request_id in state.orphans:
            self.counts["duplicate_clicks"] += 1
            return
        # Unknown so far: wait one window for its impression before calling it unknown.
        state.orphans[request_id] = record
        self._changed_key(n, request_id)

    def _close_windows(
        self, n: int, state: PartitionState, now_ms: int, result: BatchResult
    ) -> None:
        for request_id in state.due(now_ms):
            self._close(n, state, request_id, result)

    def _close(self, n: int, state: PartitionState, request_id: str, result: BatchResult) -> None:
        """Its window closed without a click: labelled 0 (already emitted when fake-negative)."""
        impression = state.pending.pop(request_id).impression
        if self.fake_negative:
            state.decide(request_id, self._decided(0, impression))
            self._changed_key(n, request_id)
        else:
            self._emit(n, state, impression, None, False, result)

    def _expire_orphans(
        self, n: int, state: PartitionState, now_ms: int, result: BatchResult
    ) -> None:
        expired = [
            k for k, r in state.orphans.items() if r.value["event_time"] + self.window_ms <= now_ms
        ]
        for request_id in expired:
            self.counts["unknown_clicks"] += 1
            self._changed_key(n, request_id)
            result.dead_letters.append(
                (
                    state.orphans.pop(request_id),
                    f"click for unknown impression {request_id} "
                    "(none within the attribution window)",
                )
            )

    def _forget(self, n: int, state: PartitionState, now_ms: int) -> None:
        for request_id in state.forgettable(now_ms):
            del state.decided[request_id]
            self._changed_key(n, request_id)

    # --- state -----------------------------------------------------------------------

    def _pending(self, impression: dict[str, Any]) -> Pending:
        return Pending(impression, impression["event_time"] + self.window_ms)

    def _decided(self, label: int, impression: dict[str, Any]) -> Decided:
        # Remembered for ten windows: later clicks are duplicates or late positives.
        return Decided(label, impression["event_time"] + 10 * self.window_ms, impression)

    def _changed_key(self, n: int, key: str) -> None:
        self._changed.setdefault(n, set()).add(key)

    def _changelog(self) -> list[Output]:
        """One changelog record per key changed in this batch, holding its latest value
        (None: a tombstone), in the partition of the inputs that changed it."""
        outputs = [
            Output(self.state_topic, key, self._entry(self.partitions[n], key), partition=n)
            for n, keys in self._changed.items()
            for key in sorted(keys)
        ]
        self._changed.clear()
        return outputs

    @staticmethod
    def _entry(state: PartitionState, key: str) -> dict[str, Any] | None:
        """The changelog value of ``key`` (the labeler_state schema), None when it is gone."""
        if key in state.counters:
            impressions, clicks = state.counters[key]
            return {"counter": {"impressions": impressions, "clicks": clicks}}
        if key in state.pending:
            return {"impression": state.pending[key].impression, "label": None}
        if key in state.decided:
            decided = state.decided[key]
            return {"impression": decided.impression, "label": decided.label}
        if key in state.orphans:
            r = state.orphans[key]
            orphan = {"click": r.value, "topic": r.topic, "offset": r.offset, "key": r.key}
            return {"orphan_click": {**orphan, "raw": r.raw}}
        return None

    # --- outputs -------------------------------------------------------------------

    def _emit(
        self,
        n: int,
        state: PartitionState,
        impression: dict[str, Any],
        click: dict[str, Any] | None,
        late: bool,
        result: BatchResult,
    ) -> None:
        """Decides ``impression``'s label (1 with a click) and emits it."""
        if click is not None:
            self._count(impression["user_id"], impression["ad_id"], 0, 1)
        state.decide(impression["request_id"], self._decided(int(click is not None), impression))
        self._changed_key(n, impression["request_id"])
        self._output(impression, click, late, result)

    def _output(
        self,
        impression: dict[str, Any],
        click: dict[str, Any] | None,
        late: bool,
        result: BatchResult,
    ) -> None:
        """The labelled event of ``impression`` (a positive with ``click``), unless it is a
        negative that sampling leaves out."""
        label = 1 if click is not None else 0
        delay = click["event_time"] - impression["event_time"] if click else None
        self.counts["late_positives" if late else ("positives" if label else "negatives")] += 1
        weight = 1.0
        if not label:
            if not keeps_negative(impression["request_id"], self.negative_sampling_rate):
                self.counts["negatives_sampled_out"] += 1
                return
            weight = 1.0 / self.negative_sampling_rate
        result.outputs.append(
            Output(
                self.labelled_topic,
                impression["request_id"],
                {
                    "impression": impression,
                    "label": label,
                    "click_delay_ms": delay,
                    "late_positive": late,
                    "labelled_at": self.clock_ms(),
                    "weight": weight,
                    "fake_negative": self.fake_negative,
                },
            )
        )

    # --- counters ------------------------------------------------------------------

    def _count(self, user_id: str, ad_id: str, impressions: int, clicks: int) -> None:
        """Adds to this batch's increments of the user's and the ad's counters."""
        for key in (f"user:{user_id}", f"ad:{ad_id}"):
            increment = self._increments.setdefault(key, [0, 0])
            increment[0] += impressions
            increment[1] += clicks

    def _add(self, n: int, state: PartitionState, record: Record, result: BatchResult) -> None:
        """An increment read back from counter-updates: into the entity's total."""
        key = (record.key or b"").decode(errors="replace")
        if not key.startswith(("user:", "ad:")):
            result.dead_letters.append((record, f"counter key {key!r} is not user:<id> or ad:<id>"))
            return
        counter = state.counters.setdefault(key, [0, 0])
        counter[0] += record.value["impressions"]
        counter[1] += record.value["clicks"]
        self._changed_key(n, key)
        self._unpushed.add(key)

    def _totals(self, keys: set[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """(user id -> [impressions, clicks], ad id -> ...) for the counter keys given:
        each is in one partition of this worker's (counter-updates is keyed by entity)."""
        users: dict[str, list[int]] = {}
        ads: dict[str, list[int]] = {}
        for key in keys:
            kind, _, entity = key.partition(":")
            total = [0, 0]
            for state in self.partitions.values():
                counter = state.counters.get(key, (0, 0))
                total = [total[0] + counter[0], total[1] + counter[1]]
            (users if kind == "user" else ads)[entity] = total
        return users, ads

    @property
    def user_counters(self) -> dict[str, list[int]]:
        """user id -> [impressions, clicks] of the users whose counters this worker holds."""
        return self._totals(self._counter_keys())[0]

    @property
    def ad_counters(self) -> dict[str, list[int]]:
        """ad id -> [impressions, clicks] of the ads whose counters this worker holds."""
        return self._totals(self._counter_keys())[1]

    def _counter_keys(self) -> set[str]:
        return {key for state in self.partitions.values() for key in state.counters}
