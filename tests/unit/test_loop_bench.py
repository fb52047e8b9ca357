"""camoe/bench/loop.py: keeping up, lag and CPU from samples (no services)."""

from __future__ import annotations

import os
import time

import pytest

from camoe.bench.loop import INPUTS, KEPT_UP_S, components_report, cpu_seconds


def samples(lags: dict[str, list[int]], rate: float = 100.0, every_s: float = 2.0) -> list:
    out = []
    for k in range(len(next(iter(lags.values())))):
        t = k * every_s
        end = int(rate * t)
        out.append(
            {
                "t": t,
                "offsets": {
                    name: {"end": end, "committed": end - lags[name][k]} for name in INPUTS
                },
                "cpu_s": {"score": 0.5 * t, "kafka (service)": 0.25 * t},
            }
        )
    return out


def test_a_bounded_lag_keeps_up_and_a_growing_one_does_not():
    steady = [0, 50, 20, 60, 30, 40]
    growing = [0, 400, 800, 1200, 1600, 2400]  # 24 s of input behind at the end
    report = components_report(
        samples({"score": steady, "label": steady, "train": growing}), traffic_s=10.0
    )
    assert report["score"]["kept_up"] and report["label"]["kept_up"]
    assert not report["train"]["kept_up"]
    assert report["train"]["lag_at_end_s_of_input"] == pytest.approx(24.0)
    assert report["train"]["lag_at_end_s_of_input"] > KEPT_UP_S
    assert report["score"]["input_per_s"] == pytest.approx(100.0)
    assert report["score"]["cpu_cores"] == pytest.approx(0.5)
    assert report["kafka (service)"]["cpu_cores"] == pytest.approx(0.25)
    assert [t for t, _ in report["train"]["lag"]] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_samples_after_the_traffic_do_not_count_for_keeping_up():
    lag = [0, 10, 10, 10, 5000, 9000]  # the drain after the traffic: nothing arrives
    report = components_report(samples({n: lag for n in INPUTS}), traffic_s=6.0)
    assert report["score"]["lag_at_end"] == 10 and report["score"]["kept_up"]


def test_cpu_seconds_counts_this_process():
    started = cpu_seconds({"me": os.getpid()})["me"]
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert cpu_seconds({"me": os.getpid()})["me"] - started >= 0.15
