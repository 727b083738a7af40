"""The Prometheus rules and the Grafana dashboard in contrib/: structure, and metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from formcraftd.ops.http import bound_port
from tests.conftest import DaemonFactory
from tests.support import Names, make_config

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
ALERTS = CONTRIB / "prometheus" / "alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "formcraftd.json"

SEVERITIES = {"critical", "warning", "info"}
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"(?<![A-Za-z0-9_:])(?:formcraftd|process)_[A-Za-z0-9_]+")
DURATION = re.compile(r"^\d+[smhd]$")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def load_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml, flattened over its groups."""
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict)
    groups = document["groups"]
    assert isinstance(groups, list)
    assert groups
    rules: list[dict[str, Any]] = []
    for group in groups:
        assert isinstance(group["name"], str)
        assert group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that is not a row (rows may also nest collapsed panels)."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def expressions() -> list[str]:
    """Every PromQL expression of both files."""
    exprs = [str(rule["expr"]) for rule in load_rules()]
    for panel in dashboard_panels(load_dashboard()):
        exprs.extend(str(target["expr"]) for target in panel["targets"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """The formcraftd_* and process_* names `expr` uses (not words inside label values)."""
    return set(METRIC.findall(QUOTED.sub('""', expr)))


def exposed_names(text: str) -> set[str]:
    """Every sample name the families of a /metrics page may produce, from its TYPE lines."""
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, family, kind = line.split(" ", 3)
        suffixes = SUFFIXES.get(kind, ())
        base = family.removesuffix("_total") if kind == "counter" else family
        names.update({family, base, *(base + suffix for suffix in suffixes)})
    return names


def test_rules_have_expr_duration_severity_and_summary() -> None:
    """Each alerting rule has a unique name, an expr, a `for:`, a severity and a summary."""
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert isinstance(rule["expr"], str)
        assert rule["expr"].strip()
        assert DURATION.match(str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_rules_cover_the_monitored_conditions() -> None:
    """Rules cover backlog, error rate, broker, processing delay, daemon alerts, up/absent."""
    exprs = " ".join(" ".join(rule["expr"].split()) for rule in load_rules())
    for needle in (
        "formcraftd_queue_depth",
        'outcome=~"retry|dead_letter"',
        'outcome!="delayed"',
        "formcraftd_broker_connected{",
        'alert=~"processing_delay:.*"',
        'formcraftd_alert_active{job="formcraftd"} == 1',
        "up{",
        "absent(up{",
    ):
        assert needle in exprs


def test_dashboard_has_a_datasource_input_and_panels_with_targets() -> None:
    """The dashboard imports with a Prometheus input and every panel queries through it."""
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    [source] = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 9
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["expr"].strip()
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_has_the_expected_panels() -> None:
    """The panels an operator looks for are there, with the queries they need."""
    exprs = {
        panel["title"]: " ".join(target["expr"] for target in panel["targets"])
        for panel in dashboard_panels(load_dashboard())
    }
    wanted = {
        "Jobs/s by outcome per queue": "formcraftd_jobs_total",
        "In flight vs concurrency limit": "formcraftd_concurrency_limit",
        "Queue depth and dead letters": "formcraftd_dead_letter_depth",
        "Job duration p50 / p95 / p99": "histogram_quantile(0.99",
        "Circuit breakers": "formcraftd_breaker_state",
        "Broker connected and reconnects": "formcraftd_reconnects_total",
        "Alerts active": "formcraftd_alert_active",
        "Process memory": "process_resident_memory_bytes",
        "Config reloads": "formcraftd_config_reloads_total",
    }
    for title, needle in wanted.items():
        assert needle in exprs[title], title


def test_metric_names_are_found_in_label_free_text_only() -> None:
    """The extractor skips label values and keeps histogram suffixes for the family check."""
    expr = (
        'histogram_quantile(0.5, rate(formcraftd_job_duration_seconds_bucket{q="formcraftd_x"}'
        '[5m])) + on() label_replace(up, "a", "$1", "b", "process_y")'
    )
    assert metric_names(expr) == {"formcraftd_job_duration_seconds_bucket"}


@pytest.mark.e2e
async def test_every_metric_used_is_exported_by_the_daemon(
    names: Names, start_daemon: DaemonFactory
) -> None:
    """Each metric the rules and the dashboard use is a family on a running daemon's /metrics."""
    daemon = await start_daemon(make_config(names))
    assert daemon.http_runner is not None
    url = f"http://127.0.0.1:{bound_port(daemon.http_runner)}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    exposed = exposed_names(text)
    used = set().union(*(metric_names(expr) for expr in expressions()))
    assert {"formcraftd_jobs_total", "process_resident_memory_bytes"} <= used
    assert sorted(used - exposed) == []
