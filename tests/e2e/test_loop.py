"""The closed loop end to end on drifting traffic: every hop real, new versions reach
scoring, clicks reach a served version within seconds, every format's served scores rank
clicks well above chance, and after the run the version Triton serves beats a frozen
version 1 on every format."""

from __future__ import annotations

from camoe.bench.freshness import demo_plot, reporter, summary_lines
from camoe.features import FORMATS
from camoe.sim.loop import demo_settings, run_loop


def test_online_loop_on_drifting_traffic(services, tmp_path):
    settings, _ = services
    settings = demo_settings(settings)
    settings = settings.model_copy(  # the conftest's small history makes a weak version 1
        update={"trainer": settings.trainer.model_copy(update={"pretrain_requests": 20_000})}
    )
    lines: list[str] = []
    summary = run_loop(
        settings, duration_s=150.0, progress=lines.append, drain_s=15.0, report=reporter(30.0)
    )
    loop = summary.pop("loop")
    latency = summary.pop("latency_windows")
    print("\n".join(lines + summary_lines(loop)))
    # The demo's picture of the run: latency over every 10 s of traffic, a version marked
    # at each publish.
    assert len(latency) >= 15 and all(w["p99_ms"] >= w["p50_ms"] > 0 for w in latency)
    assert len(loop["published_s"]) == loop["versions"]
    picture = demo_plot(loop, latency, tmp_path / "demo.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert summary["component_failures"] == {}
    assert summary["requests"] >= 6000
    assert summary["scored"] == summary["requests"]
    assert summary["labels"] >= summary["scored"]  # every impression labelled (late ones twice)
    assert summary["positive_labels"] == summary["clicks"]
    assert len(summary["model_versions"]) >= 3, summary["model_versions"]
    assert lines, "progress was reported"

    assert loop["versions"] >= 3  # the gate may hold some candidates back
    assert loop["freshness_s"]["p50"] < 30.0, loop["freshness_s"]
    for fmt, figures in loop["second_half"].items():
        assert figures["clicks"] >= 20, (fmt, figures)
        # AUC-PR of a random ranking is the click rate: the served versions must do clearly
        # better (a broken feature scaling once brought them down to it). Measured: 1.4x
        # (video, 18% CTR) to 3x (audio, 7%).
        click_rate = figures["clicks"] / figures["impressions"]
        assert figures["online_auc_pr"] > 1.2 * click_rate, (fmt, figures)

    # The world has drifted for 150 s: on fresh requests of its current state, features
    # from the online store, the served version (after a bounded number of versions: the
    # run's) ranks each format's clicks better than version 1 frozen.
    latest = loop["latest"]
    assert len(latest["versions"]) == 1 and latest["versions"][0] != "1", latest
    for fmt in FORMATS:
        figures = latest[fmt]
        assert figures["expected_clicks"] >= 1000, (fmt, figures)
        assert figures["online_auc_pr"] > figures["frozen_auc_pr"], (fmt, figures)
