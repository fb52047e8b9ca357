"""monitoring/: the scrape configuration and alert rules are valid for promtool, every
alert fires on the history it is for and not on a healthy one (alerts_test.yml), and the
rules name only metrics the components serve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from camoe.settings import ROOT, Settings
from camoe.streaming.metrics import StreamCollector
from consumers.labeler import Labeler
from consumers.metrics import LabelerCollector, ScoringMetrics
from trainer.monitoring import TrainerMetrics

MONITORING = ROOT / "monitoring"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ],
)
def test_promtool_accepts_the_configuration_and_the_rules_pass_their_tests(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def served_samples() -> list[tuple[str, set[str]]]:
    """(name, label names) of every sample the components' metrics expose, with each
    labelled metric observed once."""
    registry = CollectorRegistry()
    ScoringMetrics(registry).stage_seconds.labels("total").observe(0.001)
    registry.register(LabelerCollector(Labeler("f", "l", "s", "c", 10.0)))
    app = SimpleNamespace(
        name="app",
        counters=dict.fromkeys(("consumed", "produced", "dead_letters", "batches"), 0)
        | {"retried_batches": 0},
        lag={("topic", 0): 0},
    )
    registry.register(StreamCollector(app))
    trainer = SimpleNamespace(
        t=Settings().trainer,
        examples=0,
        events=0,
        rejected=0,
        version=0,
        pinned=0,
        waiting=[],
        ready=[],
    )
    metrics = TrainerMetrics(trainer, registry)
    metrics.gate.labels("passed", "logloss").inc()
    metrics.prequential({"audio_ece": 0.0})
    metrics.steps({"write": 0.1})
    text = generate_latest(registry).decode()
    families = text_string_to_metric_families(text)
    return [(s.name, set(s.labels)) for f in families for s in f.samples]


def served_names() -> set[str]:
    """Every sample name the components' metrics expose."""
    return {name for name, _ in served_samples()}


def test_the_rules_name_only_served_metrics():
    named = set(re.findall(r"\bcamoe_[a-z_]+", (MONITORING / "alerts.yml").read_text()))
    assert named, "the rules name no metric"
    assert named <= served_names(), named - served_names()


def test_the_rule_tests_feed_only_served_metrics():
    text = Path(MONITORING / "alerts_test.yml").read_text()
    fed = set(re.findall(r"series: '(camoe_[a-z_]+)", text))
    assert fed <= served_names(), fed - served_names()
