"""monitoring/grafana/dashboards/camoe.json: a Grafana dashboard over the provisioned
Prometheus whose queries name only metrics and labels the components serve (the
integration test test_prometheus.py also evaluates every query against a real Prometheus
while the loop runs)."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from camoe.settings import ROOT
from tests.unit.test_alerts import served_names, served_samples

GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "camoe.json"
# Each panel the issue of operating the loop asks for, by a word of its title.
SHOWN = ("consumed", "latency", "lag", "freshness", "auc-pr", "ece", "gate", "version")


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (panel["title"], target["expr"])
        for panel in panels
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def test_the_dashboard_reads_the_provisioned_prometheus():
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    (source,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["uid"] and panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in panels)
    assert all(word in titles for word in SHOWN), [w for w in SHOWN if w not in titles]


def test_the_dashboard_queries_name_only_served_metrics():
    served = served_names()
    for title, promql in queries():
        named = set(re.findall(r"\bcamoe_[a-z_]+", promql))
        assert named, f"{title}: {promql} names no camoe metric"
        assert named <= served, (title, named - served)


def test_the_dashboard_queries_group_and_select_by_served_labels():
    labels: dict[str, set[str]] = {}
    for name, sample_labels in served_samples():
        labels.setdefault(name, set()).update(sample_labels)
    for title, promql in queries():
        names = set(re.findall(r"\bcamoe_[a-z_]+", promql))
        known = set().union(*(labels[n] for n in names)) | {"le", "job", "instance"}
        used = set(re.findall(r"\b([a-z_]+)\s*(?:=~|!=|=)\s*\"", promql))
        for group in re.findall(r"\bby \(([^)]*)\)", promql):
            used |= {label.strip() for label in group.split(",")}
        assert used <= known, (title, used - known)
