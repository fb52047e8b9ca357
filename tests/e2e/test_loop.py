"""The walking skeleton end to end: every hop real, and model version 2 reaches scoring."""

from __future__ import annotations

from camoe.pipeline import run_loop


def test_loop_scores_with_a_retrained_version(services):
    settings, _ = services
    settings = settings.model_copy(
        update={
            "simulator": settings.simulator.model_copy(
                update={"requests_per_second": 40.0, "click_boost": 2.0}
            ),
        }
    )
    lines: list[str] = []
    summary = run_loop(settings, duration_s=25.0, progress=lines.append, drain_s=15.0)

    assert summary["component_failures"] == {}
    assert summary["requests"] >= 900
    assert summary["scored"] == summary["requests"]
    assert summary["clicks"] > 0
    assert summary["labels"] >= summary["scored"]  # every impression labelled (late ones twice)
    assert summary["positive_labels"] == summary["clicks"]
    versions = summary["model_versions"]
    assert "1" in versions and "2" in versions, versions
    assert lines, "progress was reported"
