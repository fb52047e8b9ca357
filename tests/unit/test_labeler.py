"""consumers/labeler.py: joining the feature log with clicks into labelled events."""

from __future__ import annotations

import copy

import pytest

from consumers.labeler import Labeler
from streaming.app import BatchResult, Record
from streaming.avro import AvroCodec

FEATURE_LOG = "feature-log"
CLICKS = "ad-clicks"
LABELLED = "labelled-events"
WINDOW_S = 10.0
WINDOW_MS = 10_000
T0 = 1_700_000_000_000


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


class Harness:
    def __init__(self, push_counters=None):
        self.clock = FakeClock()
        self.offsets = Offsets()
        self.labeler = Labeler(
            FEATURE_LOG, LABELLED, WINDOW_S, push_counters=push_counters, clock_ms=self.clock
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
        return Record(CLICKS, partition, offset, request_id.encode(), value, b"")

    def __call__(self, *records, now=None):
        if now is not None:
            self.clock.now_ms = now
        result = self.labeler(list(records))
        assert isinstance(result, BatchResult)
        return result


@pytest.fixture
def h():
    return Harness()


LABELLED_CODEC = AvroCodec("labelled_event")


def only_output(result):
    assert len(result.outputs) == 1, result.outputs
    output = result.outputs[0]
    assert output.topic == LABELLED
    # The output must honour the labelled-events contract.
    LABELLED_CODEC.decode(LABELLED_CODEC.encode(output.value))
    return output


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
    assert h(now=T0 + 5 * WINDOW_MS).outputs == []


def test_click_in_a_later_batch_inside_window(h):
    assert h(h.impression("r1", T0), now=T0).outputs == []
    out = only_output(h(h.click("r1", T0 + 9_000), now=T0 + 9_100))
    assert out.value["label"] == 1 and out.value["click_delay_ms"] == 9_000


def test_no_click_is_a_negative_only_once_the_window_closes(h):
    assert h(h.impression("r1", T0), now=T0 + 1_000).outputs == []
    assert h(now=T0 + WINDOW_MS - 1).outputs == []
    out = only_output(h(now=T0 + WINDOW_MS))
    assert out.key == "r1"
    assert out.value["label"] == 0
    assert out.value["click_delay_ms"] is None
    assert out.value["late_positive"] is False
    assert h.labeler.counts["negatives"] == 1
    assert h(now=T0 + 3 * WINDOW_MS).outputs == []  # emitted once


def test_event_time_of_later_records_closes_windows_even_if_the_clock_lags(h):
    h(h.impression("r1", T0), now=T0)
    out = only_output(h(h.impression("r2", T0 + WINDOW_MS), now=T0))
    assert out.key == "r1" and out.value["label"] == 0


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
    assert h(h.click("r1", T0 + 12_000), now=T0 + 13_000).outputs == []
    assert h.labeler.counts["duplicate_clicks"] == 1


def test_duplicate_click_counts_once(h):
    result = h(
        h.impression("r1", T0), h.click("r1", T0 + 1_000), h.click("r1", T0 + 1_000), now=T0 + 2_000
    )
    assert only_output(result).value["label"] == 1
    assert h(h.click("r1", T0 + 1_000), now=T0 + 3_000).outputs == []  # a redelivery, later
    assert h.labeler.counts["duplicate_clicks"] == 2
    assert h.labeler.counts["positives"] == 1
    assert h.labeler.user_counters["user-1"] == [1, 1]
    assert h.labeler.ad_counters["ad-1"] == [1, 1]
    assert h(now=T0 + 5 * WINDOW_MS).outputs == []


def test_click_before_its_impression_is_held_then_joined(h):
    result = h(h.click("r1", T0 + 2_000), now=T0 + 2_100)
    assert result.outputs == [] and result.dead_letters == []
    out = only_output(h(h.impression("r1", T0), now=T0 + 2_200))
    assert out.value["label"] == 1
    assert out.value["click_delay_ms"] == 2_000
    assert out.value["late_positive"] is False
    assert h.labeler.orphans == {}
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
    assert result.outputs == []
    assert len(result.dead_letters) == 1
    record, reason = result.dead_letters[0]
    assert record is click
    assert "unknown impression" in reason and "ghost" in reason
    assert h.labeler.counts["unknown_clicks"] == 1
    assert h(now=T0 + 3 * WINDOW_MS).dead_letters == []  # dead-lettered once


def test_click_naming_another_ad_is_dead_lettered(h):
    wrong = h.click("r1", T0 + 1_000, ad_id="ad-2")
    result = h(h.impression("r1", T0, ad_id="ad-1"), wrong, now=T0 + 1_500)
    assert result.outputs == []
    assert len(result.dead_letters) == 1
    record, reason = result.dead_letters[0]
    assert record is wrong
    assert "ad-2" in reason and "r1" in reason
    assert h.labeler.ad_counters["ad-1"] == [1, 0]
    # The impression still waits for its own click, and closes as a negative without one.
    assert only_output(h(now=T0 + WINDOW_MS)).value["label"] == 0


def test_orphan_click_naming_another_ad_is_dead_lettered_when_the_impression_arrives(h):
    wrong = h.click("r1", T0 + 1_000, ad_id="ad-2")
    h(wrong, now=T0 + 1_000)
    result = h(h.impression("r1", T0, ad_id="ad-1"), now=T0 + 1_100)
    assert result.outputs == []
    assert [record for record, _ in result.dead_letters] == [wrong]


def test_late_click_naming_another_ad_is_dead_lettered(h):
    h(h.impression("r1", T0, ad_id="ad-1"), now=T0)
    h(now=T0 + WINDOW_MS)  # the negative
    result = h(h.click("r1", T0 + 12_000, ad_id="ad-2"), now=T0 + 12_500)
    assert result.outputs == []
    assert len(result.dead_letters) == 1


def test_duplicate_impression_counted_once(h):
    first = h.impression("r1", T0)
    again = h.impression("r1", T0)
    assert h(first, again, now=T0).outputs == []
    assert h.labeler.counts["duplicate_impressions"] == 1
    assert h.labeler.user_counters["user-1"] == [1, 0]
    assert only_output(h(now=T0 + WINDOW_MS)).value["label"] == 0
    # Re-scored again after it was labelled: still a duplicate, no second label.
    assert h(h.impression("r1", T0), now=T0 + WINDOW_MS + 1).outputs == []
    assert h.labeler.counts["duplicate_impressions"] == 2
    assert h.labeler.user_counters["user-1"] == [1, 0]


# --- offsets ----------------------------------------------------------------------------


def committed(offsets):
    return {(tp.topic, tp.partition): tp.offset for tp in offsets}


def test_safe_offsets_stop_at_the_oldest_pending_item():
    h = Harness()
    h.offsets.next = {(FEATURE_LOG, 0): 10, (FEATURE_LOG, 1): 3, (CLICKS, 2): 5}
    batch = [
        h.impression("r1", T0, partition=0),  # feature-log/0 @10, clicked below
        h.impression("r2", T0, partition=0),  # feature-log/0 @11, pending
        h.impression("r3", T0, partition=0),  # feature-log/0 @12, pending
        h.impression("r4", T0, partition=1),  # feature-log/1 @3, pending
        h.click("r1", T0 + 1, partition=2),  # ad-clicks/2 @5, joined
        h.click("ghost", T0 + 2, partition=2),  # ad-clicks/2 @6, orphan
        h.click("r1", T0 + 3, partition=2),  # ad-clicks/2 @7, duplicate
    ]
    h(*batch, now=T0 + 100)
    assert committed(h.labeler.safe_offsets(batch)) == {
        (FEATURE_LOG, 0): 11,
        (FEATURE_LOG, 1): 3,
        (CLICKS, 2): 6,
    }


def test_safe_offsets_are_last_plus_one_when_nothing_waits():
    h = Harness()
    h.offsets.next = {(FEATURE_LOG, 0): 40, (CLICKS, 1): 7}
    batch = [h.impression("r1", T0), h.click("r1", T0 + 5, partition=1)]
    h(*batch, now=T0 + 10)
    assert committed(h.labeler.safe_offsets(batch)) == {(FEATURE_LOG, 0): 41, (CLICKS, 1): 8}


def test_safe_offsets_advance_as_windows_close():
    h = Harness()
    first = [h.impression("r1", T0), h.impression("r2", T0 + 5_000)]  # @0, @1
    h(*first, now=T0 + 5_000)
    assert committed(h.labeler.safe_offsets(first)) == {(FEATURE_LOG, 0): 0}
    second = [h.impression("r3", T0 + WINDOW_MS)]  # @2; closes r1's window by event time
    h(*second, now=T0 + WINDOW_MS)
    assert committed(h.labeler.safe_offsets(second)) == {(FEATURE_LOG, 0): 1}
    third = [h.impression("r4", T0 + 3 * WINDOW_MS)]  # @3; closes r2 and r3
    h(*third, now=T0 + 3 * WINDOW_MS)
    assert committed(h.labeler.safe_offsets(third)) == {(FEATURE_LOG, 0): 3}


def test_safe_offsets_advance_a_partition_once_its_last_pending_item_is_labelled():
    h = Harness()
    first = [h.impression("r1", T0)]  # feature-log/0 @0
    h(*first, now=T0)
    assert committed(h.labeler.safe_offsets(first)) == {(FEATURE_LOG, 0): 0}
    second = [h.click("r1", T0 + 1_000, partition=3)]  # ad-clicks/3 @0 labels r1 positive
    assert only_output(h(*second, now=T0 + 1_000)).value["label"] == 1
    assert committed(h.labeler.safe_offsets(second)) == {(CLICKS, 3): 1, (FEATURE_LOG, 0): 1}


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


def test_without_push_counters_the_labeler_still_counts(h):
    h(h.impression("r1", T0), h.click("r1", T0 + 1), now=T0 + 2)
    assert h.labeler.user_counters == {"user-1": [1, 1]}
    assert h.labeler.ad_counters == {"ad-1": [1, 1]}
