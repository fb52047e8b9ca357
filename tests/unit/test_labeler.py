"""consumers/labeler.py: joining the feature log with clicks into labelled events."""

from __future__ import annotations

import copy
import logging
import zlib

import pytest
from confluent_kafka import TopicPartition

from camoe.clients.feature_store import FeatureStoreDown
from camoe.streaming.app import BatchResult, Record
from camoe.streaming.avro import AvroCodec
from consumers.labeler import Labeler, keeps_negative

FEATURE_LOG = "feature-log"
CLICKS = "ad-clicks"
LABELLED = "labelled-events"
STATE = "labeler-state"
COUNTERS = "counter-updates"
WINDOW_S = 10.0
WINDOW_MS = 10_000
T0 = 1_700_000_000_000

LABELLED_CODEC = AvroCodec("labelled_event")
STATE_CODEC = AvroCodec("labeler_state")


def home(key):
    """The counter-updates partition of a counter key (the tests' partitioner)."""
    return zlib.crc32(key.encode()) % 4


class FakeClock:
    """The labeler's injectable wall clock, in epoch milliseconds."""

    def __init__(self, now_ms=T0):
        self.now_ms = now_ms

    def __call__(self):
        return self.now_ms


class Offsets:
    """Hands out increasing offsets per (topic, partition), like a broker would."""

    def __init__(self):
        self.next = {}

    def __call__(self, topic, partition):
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + 1
        return offset


class Changelog:
    """The labeler's changelog outputs, compacted as Kafka would keep them: per partition,
    each key's latest value (encoded and decoded with the topic's Avro codec), tombstoned
    keys gone."""

    def __init__(self):
        self.state = {}

    def write(self, outputs):
        for output in outputs:
            if output.topic != STATE:
                continue
            assert output.partition is not None, "changelog records are pinned"
            entries = self.state.setdefault(output.partition, {})
            if output.value is None:
                entries.pop(output.key, None)
            else:
                entries[output.key] = STATE_CODEC.decode(STATE_CODEC.encode(output.value))

    def read(self, partitions):
        return {p: copy.deepcopy(self.state.get(p, {})) for p in partitions}


class Harness:
    def __init__(
        self,
        push_counters=None,
        changelog=None,
        clock=None,
        negative_sampling_rate=1.0,
        fake_negative=False,
        restore_store=None,
    ):
        self.clock = clock or FakeClock()
        self.offsets = Offsets()
        self.changelog = changelog or Changelog()
        self.labeler = Labeler(
            FEATURE_LOG,
            LABELLED,
            STATE,
            COUNTERS,
            WINDOW_S,
            read_state=self.changelog.read,
            push_counters=push_counters,
            clock_ms=self.clock,
            negative_sampling_rate=negative_sampling_rate,
            fake_negative=fake_negative,
            restore_store=restore_store,
        )

    def impression(self, request_id, t, ad_id="ad-1", user_id="user-1", partition=0):
        value = {
            "request_id": request_id,
            "user_id": user_id,
            "ad_id": ad_id,
            "format": "audio",
            "event_time": t,
            "model_version": "1",
            "pctr": 0.01,
            "feature_service": "camoe_v1",
            "categorical": [1, 2, 2, 1, 22, 3, 4, 7, 2, 12, 5],
            "numeric": [0.5] * 15,
        }
        offset = self.offsets(FEATURE_LOG, partition)
        return Record(FEATURE_LOG, partition, offset, request_id.encode(), value, b"")

    def click(self, request_id, t, ad_id="ad-1", user_id="user-1", partition=0):
        value = {"request_id": request_id, "ad_id": ad_id, "user_id": user_id, "event_time": t}
        offset = self.offsets(CLICKS, partition)
        return Record(CLICKS, partition, offset, request_id.encode(), value, b"click")

    def __call__(self, *records, now=None):
        """One batch, and the counter increments it produced read back as the next one
        (partition: the key's CRC mod 4, as a broker's partitioner would spread them);
        the outputs and dead letters of both."""
        if now is not None:
            self.clock.now_ms = now
        result = self.labeler(list(records))
        assert isinstance(result, BatchResult)
        self.changelog.write(result.outputs)
        increments = [
            Record(
                COUNTERS,
                home(o.key),
                self.offsets(COUNTERS, home(o.key)),
                o.key.encode(),
                o.value,
                b"",
            )
            for o in result.outputs
            if o.topic == COUNTERS
        ]
        if increments:
            counted = self.labeler(increments)
            self.changelog.write(counted.outputs)
            result.outputs.extend(counted.outputs)
            result.dead_letters.extend(counted.dead_letters)
        return result


@pytest.fixture
def h():
    return Harness()


def labels(result):
    """The labelled-events outputs (the rest are changelog records)."""
    outputs = [o for o in result.outputs if o.topic not in (STATE, COUNTERS)]
    assert all(o.topic == LABELLED for o in outputs)
    for output in outputs:  # each must honour the labelled-events contract
        LABELLED_CODEC.decode(LABELLED_CODEC.encode(output.value))
    return outputs


def only_output(result):
    outputs = labels(result)
    assert len(outputs) == 1, outputs
    return outputs[0]


# --- labels ---------------------------------------------------------------------------


def test_click_inside_window_is_a_positive_at_once(h):
    imp = h.impression("r1", T0)
    result = h(imp, h.click("r1", T0 + 2_500), now=T0 + 3_000)
    out = only_output(result)
    assert out.key == "r1"
    assert out.value["label"] == 1
    assert out.value["click_delay_ms"] == 2_500
    assert out.value["late_positive"] is False
    assert out.value["labelled_at"] == T0 + 3_000
    assert out.value["impression"] == imp.value
    assert result.dead_letters == []
    assert h.labeler.counts["positives"] == 1
    # Nothing is emitted again when the window closes.
    assert labels(h(now=T0 + 5 * WINDOW_MS)) == []


def test_click_in_a_later_batch_inside_window(h):
    assert labels(h(h.impression("r1", T0), now=T0)) == []
    out = only_output(h(h.click("r1", T0 + 9_000), now=T0 + 9_100))
    assert out.value["label"] == 1 and out.value["click_delay_ms"] == 9_000


def test_no_click_is_a_negative_only_once_the_window_closes(h):
    assert labels(h(h.impression("r1", T0), now=T0 + 1_000)) == []
    assert labels(h(now=T0 + WINDOW_MS - 1)) == []
    out = only_output(h(now=T0 + WINDOW_MS))
    assert out.key == "r1"
    assert out.value["label"] == 0
    assert out.value["click_delay_ms"] is None
    assert out.value["late_positive"] is False
    assert h.labeler.counts["negatives"] == 1
    assert labels(h(now=T0 + 3 * WINDOW_MS)) == []  # emitted once


def test_event_time_of_later_clicks_closes_windows_even_if_the_clock_lags(h):
    h(h.impression("r1", T0), h.impression("r2", T0 + 5_000), now=T0)
    result = h(h.click("r2", T0 + WINDOW_MS), now=T0)
    assert [(o.key, o.value["label"]) for o in labels(result)] == [("r2", 1), ("r1", 0)]


def test_click_after_window_closed_is_a_late_positive(h):
    h(h.impression("r1", T0), now=T0)
    assert only_output(h(now=T0 + WINDOW_MS)).value["label"] == 0
    out = only_output(h(h.click("r1", T0 + 12_000), now=T0 + 12_500))
    assert out.key == "r1"
    assert out.value["label"] == 1
    assert out.value["late_positive"] is True
    assert out.value["click_delay_ms"] == 12_000
    assert h.labeler.counts["late_positives"] == 1
    assert h.labeler.user_counters["user-1"] == [1, 1]
    # A second copy of the late click is a duplicate, not another event.
    assert labels(h(h.click("r1", T0 + 12_000), now=T0 + 13_000)) == []
    assert h.labeler.counts["duplicate_clicks"] == 1


# --- negative sampling ----------------------------------------------------------------


def test_sampled_negatives_carry_the_inverse_rate_and_positives_are_all_kept():
    h = Harness(negative_sampling_rate=0.25)
    n = 2_000
    impressions = [h.impression(f"r{i}", T0 + i) for i in range(n)]
    clicks = [h.click(f"r{i}", T0 + i + 500) for i in range(0, n, 20)]
    out = labels(h(*impressions, *clicks, now=T0 + n))
    out += labels(h(now=T0 + n + 3 * WINDOW_MS))  # every window closed
    positives = [o for o in out if o.value["label"] == 1]
    negatives = [o for o in out if o.value["label"] == 0]
    assert len(positives) == len(clicks) and {o.value["weight"] for o in positives} == {1.0}
    assert {o.value["weight"] for o in negatives} == {4.0}
    kept = {f"r{i}" for i in range(n) if i % 20 and keeps_negative(f"r{i}", 0.25)}
    assert {o.key for o in negatives} == kept
    assert 0.2 < len(kept) / (n - len(clicks)) < 0.3
    # Each negative is decided once: emitted or sampled out, and counted either way.
    assert h.labeler.counts["negatives"] == n - len(clicks)
    assert h.labeler.counts["negatives_sampled_out"] == n - len(clicks) - len(kept)
    assert h.labeler.user_counters["user-1"] == [n, len(clicks)]


def test_a_late_click_after_a_sampled_out_negative_is_still_a_late_positive():
    h = Harness(negative_sampling_rate=0.01)
    dropped = next(f"r{i}" for i in range(1000) if not keeps_negative(f"r{i}", 0.01))
    h(h.impression(dropped, T0), now=T0)
    assert labels(h(now=T0 + WINDOW_MS)) == []  # its negative sampled out
    out = only_output(h(h.click(dropped, T0 + 12_000), now=T0 + 12_500))
    assert out.value["label"] == 1 and out.value["late_positive"] is True
    assert out.value["weight"] == 1.0


# --- fake-negative mode ------------------------------------------------------------------


def test_fake_negative_mode_emits_each_impression_at_once_and_each_click_once_more():
    h = Harness(fake_negative=True)
    negative = only_output(h(h.impression("r1", T0), now=T0))
    assert negative.value["label"] == 0 and negative.value["fake_negative"] is True
    assert negative.value["click_delay_ms"] is None
    h(h.impression("r2", T0 + 5), now=T0 + 5)
    positive = only_output(h(h.click("r1", T0 + 2_000), now=T0 + 2_100))
    assert (positive.key, positive.value["label"], positive.value["late_positive"]) == (
        "r1",
        1,
        False,
    )
    assert positive.value["click_delay_ms"] == 2_000 and positive.value["fake_negative"] is True
    # A duplicate click is nothing more; the windows closing emit nothing (negatives went).
    assert labels(h(h.click("r1", T0 + 2_500), now=T0 + 2_600)) == []
    assert labels(h(now=T0 + 3 * WINDOW_MS)) == []
    # A click after r2's window is one more positive, flagged late.
    late = only_output(h(h.click("r2", T0 + 3 * WINDOW_MS), now=T0 + 3 * WINDOW_MS))
    assert (late.key, late.value["label"], late.value["late_positive"]) == ("r2", 1, True)
    assert dict(h.labeler.counts) == {
        "negatives": 2,
        "positives": 1,
        "late_positives": 1,
        "duplicate_clicks": 1,
    }
    assert h.labeler.user_counters["user-1"] == [2, 2]


def test_fake_negative_mode_samples_its_negatives_and_keeps_every_click():
    h = Harness(fake_negative=True, negative_sampling_rate=0.25)
    n = 400
    out = labels(h(*[h.impression(f"r{i}", T0 + i) for i in range(n)], now=T0 + n))
    kept = {f"r{i}" for i in range(n) if keeps_negative(f"r{i}", 0.25)}
    assert {o.key for o in out} == kept and {o.value["weight"] for o in out} == {4.0}
    clicks = labels(h(*[h.click(f"r{i}", T0 + i + 500) for i in range(0, n, 10)], now=T0 + 600))
    assert len(clicks) == n // 10 and {o.value["weight"] for o in clicks} == {1.0}


def test_the_sampling_decision_is_a_function_of_the_request_id():
    ids = [f"r{i}" for i in range(500)]
    assert [keeps_negative(r, 0.3) for r in ids] == [keeps_negative(r, 0.3) for r in ids]
    assert all(keeps_negative(r, 1.0) for r in ids)
    with pytest.raises(ValueError, match="negative_sampling_rate"):
        Harness(negative_sampling_rate=0.0)


def test_duplicate_click_counts_once(h):
    result = h(
        h.impression("r1", T0), h.click("r1", T0 + 1_000), h.click("r1", T0 + 1_000), now=T0 + 2_000
    )
    assert only_output(result).value["label"] == 1
    assert labels(h(h.click("r1", T0 + 1_000), now=T0 + 3_000)) == []  # a redelivery, later
    assert h.labeler.counts["duplicate_clicks"] == 2
    assert h.labeler.counts["positives"] == 1
    assert h.labeler.user_counters["user-1"] == [1, 1]
    assert h.labeler.ad_counters["ad-1"] == [1, 1]
    assert labels(h(now=T0 + 5 * WINDOW_MS)) == []


def test_click_before_its_impression_is_held_then_joined(h):
    result = h(h.click("r1", T0 + 2_000), now=T0 + 2_100)
    assert labels(result) == [] and result.dead_letters == []
    out = only_output(h(h.impression("r1", T0), now=T0 + 2_200))
    assert out.value["label"] == 1
    assert out.value["click_delay_ms"] == 2_000
    assert out.value["late_positive"] is False
    assert h.labeler.partitions[0].orphans == {}
    assert h(now=T0 + 5 * WINDOW_MS).dead_letters == []


def test_duplicated_click_before_its_impression_labels_once(h):
    h(h.click("r1", T0 + 2_000), h.click("r1", T0 + 2_000), now=T0 + 2_100)
    assert only_output(h(h.impression("r1", T0), now=T0 + 2_200)).value["label"] == 1
    assert h.labeler.counts["duplicate_clicks"] == 1


def test_click_for_unknown_impression_is_dead_lettered_after_the_window(h):
    click = h.click("ghost", T0)
    assert h(click, now=T0 + 1_000).dead_letters == []
    assert h(now=T0 + WINDOW_MS - 1).dead_letters == []
    result = h(now=T0 + WINDOW_MS)
    assert labels(result) == []
    assert len(result.dead_letters) == 1
    record, reason = result.dead_letters[0]
    assert record is click
    assert "unknown impression" in reason and "ghost" in reason
    assert h.labeler.counts["unknown_clicks"] == 1
    assert h(now=T0 + 3 * WINDOW_MS).dead_letters == []  # dead-lettered once


def test_an_input_far_ahead_of_the_clock_is_dead_lettered_and_closes_no_window(h):
    h(h.impression("r1", T0), now=T0 + 100)
    future_click = h.click("r1", T0 + 3_600_000)  # an hour ahead: would close every window
    future_row = h.impression("r2", T0 + 3_600_000)
    result = h(future_click, future_row, now=T0 + 200)
    assert [record for record, _ in result.dead_letters] == [future_click, future_row]
    assert all("ahead of the clock" in reason for _, reason in result.dead_letters)
    assert labels(result) == [] and "r1" in h.labeler.partitions[0].pending  # still open
    assert h.labeler.counts["future_events"] == 2
    out = only_output(h(h.click("r1", T0 + 1_000), now=T0 + 1_100))  # the real click
    assert out.value["label"] == 1 and out.value["late_positive"] is False


def test_an_impression_from_long_ago_is_labelled_at_once(h):
    # 1970: not an error. No click has been read for a window, so the clicks' time is
    # the clock's, and that impression's window closed long ago: a negative now.
    result = h(h.impression("old", 1_000), now=T0)
    assert result.dead_letters == [] and h.labeler.counts["future_events"] == 0
    assert only_output(result).value["label"] == 0


def test_click_naming_another_ad_is_dead_lettered(h):
    wrong = h.click("r1", T0 + 1_000, ad_id="ad-2")
    result = h(h.impression("r1", T0, ad_id="ad-1"), wrong, now=T0 + 1_500)
    assert labels(result) == []
    assert len(result.dead_letters) == 1
    record, reason = result.dead_letters[0]
    assert record is wrong
    assert "ad-2" in reason and "r1" in reason
    assert h.labeler.ad_counters["ad-1"] == [1, 0]
    # The impression still waits for its own click, and closes as a negative without one
    # (once the clicks, read 0.5 s behind the clock, have passed its window).
    assert labels(h(now=T0 + 500 + WINDOW_MS - 1)) == []
    assert only_output(h(now=T0 + 500 + WINDOW_MS)).value["label"] == 0


def test_orphan_click_naming_another_ad_is_dead_lettered_when_the_impression_arrives(h):
    wrong = h.click("r1", T0 + 1_000, ad_id="ad-2")
    h(wrong, now=T0 + 1_000)
    result = h(h.impression("r1", T0, ad_id="ad-1"), now=T0 + 1_100)
    assert labels(result) == []
    assert [record for record, _ in result.dead_letters] == [wrong]


def test_late_click_naming_another_ad_is_dead_lettered(h):
    h(h.impression("r1", T0, ad_id="ad-1"), now=T0)
    h(now=T0 + WINDOW_MS)  # the negative
    result = h(h.click("r1", T0 + 12_000, ad_id="ad-2"), now=T0 + 12_500)
    assert labels(result) == []
    assert len(result.dead_letters) == 1


def test_duplicate_impression_counted_once(h):
    first = h.impression("r1", T0)
    again = h.impression("r1", T0)
    assert labels(h(first, again, now=T0)) == []
    assert h.labeler.counts["duplicate_impressions"] == 1
    assert h.labeler.user_counters["user-1"] == [1, 0]
    assert only_output(h(now=T0 + WINDOW_MS)).value["label"] == 0
    # Re-scored again after it was labelled: still a duplicate, no second label.
    assert labels(h(h.impression("r1", T0), now=T0 + WINDOW_MS + 1)) == []
    assert h.labeler.counts["duplicate_impressions"] == 2
    assert h.labeler.user_counters["user-1"] == [1, 0]


def test_a_request_id_reused_with_other_content_keeps_the_first(h):
    h(h.impression("r1", T0, ad_id="ad-1"), now=T0)
    other = h.impression("r1", T0 + 500, ad_id="ad-9", user_id="someone-else")
    assert labels(h(other, now=T0 + 600)) == []
    assert h.labeler.counts["duplicate_impressions"] == 1
    assert "someone-else" not in h.labeler.user_counters
    result = h(h.click("r1", T0 + 700, ad_id="ad-9"), now=T0 + 800)  # the second's ad
    assert labels(result) == [] and len(result.dead_letters) == 1
    out = only_output(h(h.click("r1", T0 + 900, ad_id="ad-1"), now=T0 + 1_000))
    assert out.value["label"] == 1 and out.value["impression"]["ad_id"] == "ad-1"


# --- state changelog -------------------------------------------------------------------


def changelog(result):
    return {(o.partition, o.key): o.value for o in result.outputs if o.topic == STATE}


def test_every_state_change_is_a_changelog_record_pinned_to_its_input_partition(h):
    result = h(h.impression("r1", T0, partition=2), h.click("ghost", T0, partition=3), now=T0)
    assert changelog(result) == {
        (2, "r1"): {"impression": h.labeler.partitions[2].pending["r1"].impression, "label": None},
        (home("user:user-1"), "user:user-1"): {"counter": {"impressions": 1, "clicks": 0}},
        (home("ad:ad-1"), "ad:ad-1"): {"counter": {"impressions": 1, "clicks": 0}},
        (3, "ghost"): {
            "orphan_click": {
                "click": {
                    "request_id": "ghost",
                    "ad_id": "ad-1",
                    "user_id": "user-1",
                    "event_time": T0,
                },
                "topic": CLICKS,
                "offset": 0,
                "key": b"ghost",
                "raw": b"click",
            }
        },
    }
    # One record per changed key and batch, holding its latest value: pending, then labelled.
    result = h(h.click("r1", T0 + 1_000, partition=2), now=T0 + 1_000)
    assert changelog(result) == {
        (2, "r1"): {"impression": h.labeler.partitions[2].decided["r1"].impression, "label": 1},
        (home("user:user-1"), "user:user-1"): {"counter": {"impressions": 1, "clicks": 1}},
        (home("ad:ad-1"), "ad:ad-1"): {"counter": {"impressions": 1, "clicks": 1}},
    }
    assert h(now=T0 + 2_000).outputs == []  # nothing changed, nothing written


def test_entries_that_go_away_are_tombstones(h):
    h(h.impression("r1", T0), h.click("ghost", T0), now=T0)
    result = h(now=T0 + WINDOW_MS)  # r1 labelled 0, the ghost click dead-lettered
    assert changelog(result) == {
        (0, "r1"): {"impression": h.labeler.partitions[0].decided["r1"].impression, "label": 0},
        (0, "ghost"): None,
    }
    assert changelog(h(now=T0 + 10 * WINDOW_MS)) == {(0, "r1"): None}  # forgotten
    assert h.changelog.state[0] == {}  # the counters live in their entities' partitions
    assert "user:user-1" in h.changelog.state[home("user:user-1")]


def scenario(h, n):
    """Batch ``n`` of a little world: clicks in and after the window, duplicates, clicks
    before their impressions, unknown and wrong-ad clicks, over two partitions."""
    t = T0 + n * 3_000
    batches = [
        [h.impression("a", t, partition=0), h.impression("b", t, user_id="u2", partition=1)],
        [h.click("a", t - 1_000, partition=0), h.click("c", t, partition=1)],
        [h.impression("c", t - 5_000, partition=1), h.click("a", t - 2_000, partition=0)],
        [h.impression("d", t, ad_id="ad-2", partition=0), h.click("ghost", t, partition=1)],
        [h.click("d", t, ad_id="ad-9", partition=0), h.impression("e", t, partition=1)],
        [],
        [],
        [h.click("b", t, user_id="u2", partition=1)],  # after b's window: a late positive
        [h.click("e", t, partition=1), h.click("b", t, user_id="u2", partition=1)],
        [h.impression("f", t, partition=0)],
        [],
        [],
    ]
    return h(*batches[n], now=t)


def decisions(results):
    """Labels and dead letters, sorted: a restored partition's time starts afresh, so a
    decision may come a batch earlier or later, but it must be the same decision."""
    return (
        sorted(
            (o.key, o.value["label"], o.value["late_positive"], o.value["click_delay_ms"])
            for r in results
            for o in labels(r)
        ),
        sorted(
            (record.topic, record.partition, record.offset, reason)
            for r in results
            for record, reason in r.dead_letters
        ),
    )


@pytest.mark.parametrize("fake_negative", [False, True], ids=["window", "fake-negative"])
@pytest.mark.parametrize("crash_after", [1, 3, 5, 8, 10])
def test_state_restored_from_the_changelog_gives_identical_decisions(crash_after, fake_negative):
    whole = Harness(fake_negative=fake_negative)
    expected = decisions([scenario(whole, n) for n in range(12)])
    assert len(expected[0]) >= 6 and len(expected[1]) == 2  # the scenario is not trivial

    first = Harness(fake_negative=fake_negative)
    before = [scenario(first, n) for n in range(crash_after)]
    # A fresh labeler takes over both partitions, restored from the compacted changelog.
    again = Harness(changelog=first.changelog, clock=first.clock, fake_negative=fake_negative)
    again.offsets = first.offsets
    assignment = [TopicPartition(t, p) for t in (FEATURE_LOG, CLICKS, COUNTERS) for p in range(4)]
    assert again.labeler.on_assign(assignment) == assignment
    after = [scenario(again, n) for n in range(crash_after, 12)]
    assert decisions(before + after) == expected
    assert again.labeler.user_counters == whole.labeler.user_counters
    assert again.labeler.ad_counters == whole.labeler.ad_counters


def test_a_backlog_read_after_a_restart_is_decided_in_event_time():
    h = Harness()
    h(h.impression("neg", T0), h.impression("late", T0), now=T0)
    h(h.click("late-anchor", T0 + WINDOW_MS), now=T0 + WINDOW_MS)  # closes both windows
    restarted = Harness(changelog=h.changelog)
    restarted.offsets = h.offsets
    # Long after, the restarted labeler reads its backlog: a click before its impression,
    # and a late click for an impression labelled ages ago by the wall clock.
    restarted.clock.now_ms = T0 + 100 * WINDOW_MS
    restarted.labeler.on_assign([TopicPartition(FEATURE_LOG, 0), TopicPartition(CLICKS, 0)])
    result = restarted(
        restarted.click("r1", T0 + 2 * WINDOW_MS + 500),
        restarted.click("late", T0 + 2 * WINDOW_MS),
    )
    assert result.dead_letters == []  # the orphan waits for the impressions to catch up
    assert [(o.key, o.value["late_positive"]) for o in labels(result)] == [("late", True)]
    out = only_output(restarted(restarted.impression("r1", T0 + 2 * WINDOW_MS)))
    assert out.key == "r1" and out.value["label"] == 1 and not out.value["late_positive"]


def test_on_assign_restores_only_new_partitions_and_on_revoke_drops_them(h):
    h(h.impression("r1", T0, partition=0), h.impression("r2", T0, partition=1), now=T0)
    fresh = Harness(changelog=h.changelog)
    fresh.labeler.on_assign([TopicPartition(FEATURE_LOG, 1), TopicPartition(CLICKS, 1)])
    assert set(fresh.labeler.partitions) == {1}
    assert set(fresh.labeler.partitions[1].pending) == {"r2"}
    fresh.labeler.partitions[1].pending.clear()
    fresh.labeler.on_assign([TopicPartition(FEATURE_LOG, p) for p in (0, 1)])
    assert set(fresh.labeler.partitions[0].pending) == {"r1"}
    assert fresh.labeler.partitions[1].pending == {}  # held, so not read again
    fresh.labeler.on_revoke([TopicPartition(FEATURE_LOG, 0), TopicPartition(CLICKS, 0)])
    assert set(fresh.labeler.partitions) == {1}


def test_counters_are_repartitioned_by_entity_and_summed_where_they_land():
    pushes = []
    h = Harness(push_counters=lambda users, ads: pushes.append(copy.deepcopy((users, ads))))
    result = h(h.impression("r1", T0, partition=0), h.impression("r2", T0, partition=3), now=T0)
    # One increment per entity and batch, keyed by it, whatever partitions it came from.
    increments = {o.key: o.value for o in result.outputs if o.topic == COUNTERS}
    assert increments == {
        "user:user-1": {"impressions": 2, "clicks": 0},
        "ad:ad-1": {"impressions": 2, "clicks": 0},
    }
    assert pushes == [({"user-1": [2, 0]}, {"ad-1": [2, 0]})]
    holder = home("user:user-1")
    assert h.labeler.partitions[holder].counters["user:user-1"] == [2, 0]
    assert all(
        "user:user-1" not in state.counters
        for n, state in h.labeler.partitions.items()
        if n != holder
    )
    # The worker that takes the entity's partition gets its whole count.
    other = Harness(changelog=h.changelog)
    other.labeler.on_assign([TopicPartition(COUNTERS, holder)])
    assert other.labeler.user_counters == {"user-1": [2, 0]}


def test_a_counter_update_with_a_key_that_is_no_entity_is_dead_lettered(h):
    bad = Record(COUNTERS, 0, 0, b"nobody", {"impressions": 1, "clicks": 0}, b"x")
    result = h(bad, now=T0)
    assert [reason for _, reason in result.dead_letters] == [
        "counter key 'nobody' is not user:<id> or ad:<id>"
    ]
    assert h.labeler.user_counters == {}


# --- counters -------------------------------------------------------------------------


def test_push_counters_receives_per_user_and_per_ad_counts():
    pushes = []
    h = Harness(push_counters=lambda users, ads: pushes.append(copy.deepcopy((users, ads))))
    h(
        h.impression("r1", T0, user_id="u1", ad_id="a1"),
        h.impression("r2", T0, user_id="u1", ad_id="a2"),
        h.impression("r3", T0, user_id="u2", ad_id="a1"),
        h.click("r1", T0 + 500, user_id="u1", ad_id="a1"),
        now=T0 + 1_000,
    )
    assert pushes == [
        (
            {"u1": [2, 1], "u2": [1, 0]},
            {"a1": [2, 1], "a2": [1, 0]},
        )
    ]
    # Nothing new: no push. Negatives do not change counters.
    h(now=T0 + WINDOW_MS)
    assert len(pushes) == 1
    # A late positive pushes only what changed, with running totals.
    h(h.click("r2", T0 + 11_000, user_id="u1", ad_id="a2"), now=T0 + 11_000)
    assert pushes[1] == ({"u1": [2, 2]}, {"a2": [1, 1]})


class FlakyStore:
    """Counter pushes and restores that fail while ``down``, as a killed Redis does."""

    def __init__(self):
        self.down = False
        self.pushes = []
        self.restores = 0

    def push(self, users, ads):
        if self.down:
            raise FeatureStoreDown("online store unreachable: Connection refused")
        self.pushes.append(copy.deepcopy((users, ads)))

    def restore(self):
        if self.down:
            raise FeatureStoreDown("online store unreachable: Connection refused")
        self.restores += 1


def test_a_store_that_is_down_holds_counters_back_and_gets_all_of_them_when_back(caplog):
    store = FlakyStore()
    h = Harness(push_counters=store.push, restore_store=store.restore)
    h(h.impression("r1", T0, user_id="u1", ad_id="a1"), now=T0)
    store.down = True
    with caplog.at_level(logging.INFO, logger="consumers.labeler"):
        for k in range(2, 5):  # labels go on while the store is down
            result = h(h.impression(f"r{k}", T0 + k, user_id=f"u{k}", ad_id="a1"), now=T0 + k)
            assert len(labels(result)) == 0  # window mode: negatives come at expiry
        # Each batch while down tries once (the increments' batch too), one line in all.
        assert h.labeler.counts["counter_push_failures"] >= 3
        assert store.pushes == [({"u1": [1, 0]}, {"a1": [1, 0]})]
        store.down = False  # back, and empty: profiles first, then every counter
        before = len(store.pushes)
        h(h.impression("r5", T0 + 5, user_id="u5", ad_id="a2"), now=T0 + 5)
        assert store.restores == 1
        users, ads = {}, {}
        for pushed_users, pushed_ads in store.pushes[before:]:
            users.update(pushed_users)
            ads.update(pushed_ads)
        assert (users, ads) == (
            {f"u{k}": [1, 0] for k in (1, 2, 3, 4, 5)},
            {"a1": [4, 0], "a2": [1, 0]},
        )
        h(h.impression("r6", T0 + 6, user_id="u6", ad_id="a2"), now=T0 + 6)
        assert store.pushes[-1] == ({"u6": [1, 0]}, {"a2": [2, 0]})  # changes only again
    lines = [r.getMessage() for r in caplog.records]
    assert sum("feature store unreachable" in line for line in lines) == 1
    assert sum("feature store back after" in line for line in lines) == 1


def test_a_store_still_down_when_restoring_keeps_the_counters_waiting():
    store = FlakyStore()
    h = Harness(push_counters=store.push, restore_store=store.restore)
    store.down = True
    h(h.impression("r1", T0, user_id="u1"), now=T0)
    h(h.impression("r2", T0 + 1, user_id="u2"), now=T0 + 1)
    assert store.pushes == [] and store.restores == 0
    store.down = False
    h(now=T0 + 2)  # nothing new this batch: the waiting counters still go out
    assert store.restores == 1
    assert store.pushes == [({"u1": [1, 0], "u2": [1, 0]}, {"ad-1": [2, 0]})]


def test_without_push_counters_the_labeler_still_counts(h):
    h(h.impression("r1", T0), h.click("r1", T0 + 1), now=T0 + 2)
    assert h.labeler.user_counters == {"user-1": [1, 1]}
    assert h.labeler.ad_counters == {"ad-1": [1, 1]}


# --- metrics --------------------------------------------------------------------------


def test_metrics_read_the_labels_clicks_pushes_and_state_at_scrape_time():
    from prometheus_client import CollectorRegistry

    from consumers.metrics import LabelerCollector

    h = Harness(push_counters=lambda users, ads: None)
    registry = CollectorRegistry()
    registry.register(LabelerCollector(h.labeler))
    value = registry.get_sample_value
    h(h.impression("r1", T0), h.impression("r2", T0), now=T0)
    assert value("camoe_labeler_state", {"part": "pending_impressions"}) == 2
    assert value("camoe_labeler_state", {"part": "counters"}) == 2  # user-1 and ad-1
    h(h.click("r1", T0 + 1000), h.click("r1", T0 + 1500), h.click("nobody", T0), now=T0 + 2000)
    assert value("camoe_labeler_labels_total", {"kind": "positive"}) == 1
    assert value("camoe_labeler_clicks_total", {"kind": "duplicate"}) == 1
    h(now=T0 + (WINDOW_S + 1) * 1000)
    assert value("camoe_labeler_labels_total", {"kind": "negative"}) == 1
    assert value("camoe_labeler_state", {"part": "pending_impressions"}) == 0
    assert value("camoe_labeler_state", {"part": "labelled_impressions"}) == 2
    assert value("camoe_labeler_feature_pushes_total") == h.labeler.counts["counter_pushes"] > 0
    assert (
        value("camoe_labeler_clicks_total", {"kind": "unknown"})
        == (h.labeler.counts["unknown_clicks"])
    )
