"""The labeler: joins the feature log with clicks into labelled events.

* A click inside the attribution window labels its impression 1 (emitted at once).
* An impression whose window closes without a click is emitted as 0.
* A click after that is a *late positive*: emitted again with label 1 and
  ``late_positive=True`` so the trainer can correct the earlier negative (fake-negative
  weighting); it is never dropped.
* A duplicate click counts once; a click whose impression never shows up (within the
  window) goes to the dead-letter topic.

Windows close on the later of the records' event time and the wall clock, so an idle
stream still emits its negatives.

Delivery guarantee: at-least-once. State lives in memory; the offsets committed for a
partition stop below its oldest impression or click still waiting, so a crash re-reads
everything not yet labelled and nothing is lost. Labels emitted before a crash may be
emitted again (keyed by request id).

It also keeps per-user and per-ad impression and click counters and pushes them into
Feast's push sources, so scoring sees fresh counters.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition

from streaming.app import BatchResult, Output, Record

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """An impression waiting for its click or for its window to close."""

    impression: dict[str, Any]
    closes_at_ms: int
    where: tuple[str, int, int]  # topic, partition, offset


@dataclass
class Decided:
    """A labelled impression, remembered for later duplicate or late clicks."""

    label: int
    forget_at_ms: int
    impression: dict[str, Any]


def _wrong_ad(click: dict[str, Any]) -> str:
    return f"click on ad {click['ad_id']} that request {click['request_id']} did not serve"


class Labeler:
    """StreamApp handler over feature-log and ad-clicks.

    Args:
        feature_log_topic, labelled_topic: topic names.
        window_s: attribution window.
        push_counters: called with (user counters, ad counters) to push into Feast, or None.
        clock_ms: the wall clock (milliseconds), replaceable in tests.
    """

    def __init__(
        self,
        feature_log_topic: str,
        labelled_topic: str,
        window_s: float,
        push_counters: Callable[[dict[str, list[int]], dict[str, list[int]]], None] | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.feature_log_topic = feature_log_topic
        self.labelled_topic = labelled_topic
        self.window_ms = int(window_s * 1000)
        self.push_counters = push_counters
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.pending: dict[str, Pending] = {}
        self.orphans: dict[str, Record] = {}  # clicks whose impression has not arrived yet
        self.decided: dict[str, Decided] = {}
        self.watermark_ms = 0
        self.counts: Counter[str] = Counter()
        self.user_counters: dict[str, list[int]] = {}  # user_id -> [impressions, clicks]
        self.ad_counters: dict[str, list[int]] = {}
        self._dirty_users: set[str] = set()
        self._dirty_ads: set[str] = set()
        self._read: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset read

    # --- the batch -----------------------------------------------------------------

    def __call__(self, records: list[Record]) -> BatchResult:
        result = BatchResult()
        for record in records:
            self.watermark_ms = max(self.watermark_ms, record.value["event_time"])
            if record.topic == self.feature_log_topic:
                self._on_impression(record, result)
            else:
                self._on_click(record, result)
        now = max(self.watermark_ms, self.clock_ms())
        self._close_windows(now, result)
        self._expire_orphans(now, result)
        self.decided = {k: d for k, d in self.decided.items() if d.forget_at_ms > now}
        if self.push_counters and (self._dirty_users or self._dirty_ads):
            self.push_counters(
                {u: self.user_counters[u] for u in self._dirty_users},
                {a: self.ad_counters[a] for a in self._dirty_ads},
            )
            self._dirty_users.clear()
            self._dirty_ads.clear()
        return result

    def _on_impression(self, record: Record, result: BatchResult) -> None:
        row = record.value
        request_id = row["request_id"]
        if request_id in self.pending or request_id in self.decided:
            self.counts["duplicate_impressions"] += 1  # re-scored after a scorer crash
            return
        self._count(row["user_id"], row["ad_id"], impressions=1, clicks=0)
        self.pending[request_id] = Pending(
            row,
            row["event_time"] + self.window_ms,
            (record.topic, record.partition, record.offset),
        )
        orphan = self.orphans.pop(request_id, None)
        if orphan is not None:  # the click overtook its impression
            self._on_click(orphan, result)

    def _on_click(self, record: Record, result: BatchResult) -> None:
        click = record.value
        request_id = click["request_id"]
        pending = self.pending.get(request_id)
        if pending is not None and click["event_time"] > pending.closes_at_ms:
            # Its window closed in event time before the click: the negative stands first.
            self._emit(self.pending.pop(request_id).impression, None, late=False, result=result)
            pending = None
        if pending is not None:
            if click["ad_id"] != pending.impression["ad_id"]:
                result.dead_letters.append((record, _wrong_ad(click)))
                return
            del self.pending[request_id]
            self._emit(pending.impression, click, late=False, result=result)
            return
        decided = self.decided.get(request_id)
        if decided is not None:
            if click["ad_id"] != decided.impression["ad_id"]:
                result.dead_letters.append((record, _wrong_ad(click)))
            elif decided.label == 1:
                self.counts["duplicate_clicks"] += 1
            else:
                self._emit(decided.impression, click, late=True, result=result)
            return
        if request_id in self.orphans:
            self.counts["duplicate_clicks"] += 1
            return
        # Unknown so far: wait one window for its impression before calling it unknown.
        self.orphans[request_id] = record

    def _close_windows(self, now_ms: int, result: BatchResult) -> None:
        for request_id in [k for k, p in self.pending.items() if p.closes_at_ms <= now_ms]:
            self._emit(self.pending.pop(request_id).impression, None, late=False, result=result)

    def _expire_orphans(self, now_ms: int, result: BatchResult) -> None:
        expired = [
            k for k, r in self.orphans.items() if r.value["event_time"] + self.window_ms <= now_ms
        ]
        for request_id in expired:
            self.counts["unknown_clicks"] += 1
            result.dead_letters.append(
                (
                    self.orphans.pop(request_id),
                    f"click for unknown impression {request_id} "
                    "(none within the attribution window)",
                )
            )

    # --- outputs -------------------------------------------------------------------

    def _emit(
        self,
        impression: dict[str, Any],
        click: dict[str, Any] | None,
        late: bool,
        result: BatchResult,
    ) -> None:
        label = 1 if click is not None else 0
        delay = click["event_time"] - impression["event_time"] if click else None
        if label:
            self._count(impression["user_id"], impression["ad_id"], impressions=0, clicks=1)
        self.counts["late_positives" if late else ("positives" if label else "negatives")] += 1
        # Remember the decision for ten windows: later clicks are duplicates or late positives.
        self.decided[impression["request_id"]] = Decided(
            label, impression["event_time"] + 10 * self.window_ms, impression
        )
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
                },
            )
        )

    def _count(self, user_id: str, ad_id: str, impressions: int, clicks: int) -> None:
        for table, key, dirty in (
            (self.user_counters, user_id, self._dirty_users),
            (self.ad_counters, ad_id, self._dirty_ads),
        ):
            counter = table.setdefault(key, [0, 0])
            counter[0] += impressions
            counter[1] += clicks
            dirty.add(key)

    # --- offsets -------------------------------------------------------------------

    def safe_offsets(self, records: list[Record]) -> list[TopicPartition]:
        """Per partition read so far: the oldest offset still waiting, else past the last read.

        Covers every partition read since start, not only this batch's: a batch that
        decides an impression may hold no record of the impression's own partition.
        """
        for record in records:
            key = (record.topic, record.partition)
            self._read[key] = max(self._read.get(key, -1), record.offset)
        next_offsets = {key: offset + 1 for key, offset in self._read.items()}
        places = [p.where for p in self.pending.values()] + [
            (r.topic, r.partition, r.offset) for r in self.orphans.values()
        ]
        for topic, partition, offset in places:
            key = (topic, partition)
            next_offsets[key] = min(next_offsets.get(key, offset), offset)
        return [TopicPartition(t, p, offset) for (t, p), offset in next_offsets.items()]
