"""The demo's picture of a run, and the driver's latency per window it draws."""

from __future__ import annotations

import pytest

from camoe.bench.freshness import demo_plot
from camoe.features import FORMATS
from camoe.sim.driver import TrafficStats


def test_latency_windows_hold_each_windows_percentiles():
    stats = TrafficStats()
    stats.answered_s = [0.5, 1.0, 9.9, 10.0, 25.0]
    stats.latencies_ms = [10.0, 20.0, 30.0, 100.0, 5.0]
    windows = stats.latency_windows(10.0)
    assert [w["start_s"] for w in windows] == [0.0, 10.0, 20.0]
    assert windows[0]["p50_ms"] == 20.0 and windows[0]["p99_ms"] == pytest.approx(29.8)
    assert windows[1]["p50_ms"] == windows[1]["p99_ms"] == 100.0
    assert TrafficStats().latency_windows() == []


def test_the_demo_picture_is_written_from_a_report(tmp_path):
    figures = {"online_auc_pr": 0.2, "frozen_auc_pr": 0.1, "true_auc_pr": 0.3}
    report = {
        "windows": [{"start_s": s, **{f: figures for f in FORMATS}} for s in (0.0, 30.0)],
        "published_s": [3.0, 8.5, 14.0],
        "freshness_samples_s": [2.0, 3.0, 4.5, 9.0],
        "latest": {f: figures for f in FORMATS},
    }
    latency = [{"start_s": 0.0, "p50_ms": 12.0, "p99_ms": 40.0}]
    path = demo_plot(report, latency, tmp_path / "demo.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    demo_plot({}, [], tmp_path / "empty.png")  # a run that produced nothing still draws
