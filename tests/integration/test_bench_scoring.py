"""The scoring benchmark runs end to end on a small configuration (no figure asserted)."""

from __future__ import annotations

import json
import math

from camoe.bench import scoring


def test_scoring_benchmark_writes_its_results(services, tmp_path):
    settings, _ = services
    lines: list[str] = []
    result = scoring.run(
        settings,
        tmp_path,
        requests=1500,
        rate=100.0,
        seconds=3.0,
        progress=lines.append,
        warmup_s=2.0,
    )

    saved = json.loads((tmp_path / "scoring.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["saturation"]["requests_per_s"] > 0
    fixed = saved["fixed_load"]
    assert fixed["p50_ms"] <= fixed["p99_ms"]
    assert len(fixed["p99_ms_by_10s"]) == 1 and fixed["p99_ms_by_10s"][0] == fixed["p99_ms"]
    cpu = fixed["cpu"]  # the machine's state while the latency was timed
    assert 0 < cpu["busy_pct"] <= 100 and 0 <= cpu["steal_pct"] < 100
    assert len(cpu["steal_pct_by_10s"]) == 1
    relay = saved["floors"]["relay_at_fixed_load"]  # the latency floor, timed the same way
    assert 0 < relay["p50_ms"] <= relay["p99_ms"] and relay["seconds"] == fixed["seconds"]
    assert len(relay["p99_ms_by_10s"]) == 1 and len(relay["cpu"]["steal_pct_by_10s"]) == 1
    for name in (
        "latency_p50_to_relay",
        "latency_p99_to_relay",
        "kafka_passthrough",
        "model_forward",
        "redis_read",
    ):
        ratio = saved["ratios_pipeline_to_floor"][name]
        assert math.isfinite(ratio) and ratio > 0, name
    png = (tmp_path / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert any(line.startswith("saturation") for line in lines)
    assert any(line.startswith("latency floor") for line in lines)
