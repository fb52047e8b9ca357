"""A real Prometheus scrapes the scorer, the labeler and the trainer on loopback while the
whole loop runs; promtool checks every endpoint's exposition, and every query of the
Grafana dashboard is accepted and returns series."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from camoe.sim.loop import demo_settings, run_loop
from camoe.stack import prometheus
from camoe.stack.process import free_port, stop_pid
from tests.unit.test_dashboard import queries as dashboard_queries

JOBS = {"scoring": "scoring", "labeler": "labeler", "trainer": "trainer"}  # job -> app label


def test_prometheus_scrapes_every_component_while_the_loop_runs(services, tmp_path):
    settings, _ = services
    ports = {job: free_port() for job in JOBS}
    settings = demo_settings(settings)
    settings = settings.model_copy(
        update={
            section: getattr(settings, section).model_copy(update={"metrics_port": port})
            for section, port in ports.items()
        }
    )
    pid, url = prometheus.start_server(
        prometheus.scrape_config(ports), tmp_path / "prometheus", tmp_path / "prometheus.log"
    )

    @contextmanager
    def watch(*_: Any) -> Iterator[dict[str, Any]]:
        seen: dict[str, Any] = {}
        yield seen
        # The traffic has stopped; the components still run and serve.
        for job, port in ports.items():
            address = f"http://127.0.0.1:{port}/metrics"
            text = urllib.request.urlopen(address, timeout=5).read().decode()
            seen[f"promtool {job}"] = prometheus.check_metrics(text)
        for name, promql in {
            "up": "up",
            "consumed": "increase(camoe_stream_consumed_total[30s])",
            "lag": "camoe_stream_consumer_lag",
            "scored": "increase(camoe_scoring_requests_total[30s])",
            "labels": "increase(camoe_labeler_labels_total[30s])",
            "freshness": "camoe_trainer_freshness_seconds_count",
            "version": "camoe_trainer_served_version",
        }.items():
            seen[name] = prometheus.query(url, promql)
        # Every query of the Grafana dashboard, as Grafana would send it.
        seen["dashboard"] = {
            (title, promql): prometheus.query(url, promql.replace("$__rate_interval", "30s"))
            for title, promql in dashboard_queries()
        }

    try:
        summary = run_loop(settings, duration_s=45.0, drain_s=5.0, watch=watch)
    finally:
        stop_pid(pid)
    assert summary["component_failures"] == {}
    seen = summary["watch"]
    for job in JOBS:
        check = seen[f"promtool {job}"]
        assert check.returncode == 0, (job, check.stdout, check.stderr)

    def by(name: str, label: str) -> dict[str, float]:
        return {r["metric"][label]: float(r["value"][1]) for r in seen[name]}

    assert by("up", "job") == dict.fromkeys(JOBS, 1.0)
    consumed = by("consumed", "app")
    assert set(consumed) == set(JOBS.values()) and min(consumed.values()) > 0, consumed
    assert set(by("lag", "app")) == set(JOBS.values())
    assert sum(r for r in by("scored", "job").values()) > 0
    assert sum(by("labels", "kind").values()) > 0
    assert by("freshness", "job")["trainer"] > 0  # clicks learned by published versions
    assert by("version", "job")["trainer"] >= 2
    empty = [query for query, result in seen["dashboard"].items() if not result]
    assert empty == [], empty
