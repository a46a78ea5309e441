"""The Prometheus alert rules in deploy/prometheus: valid (promtool check rules), each alert
tested (promtool test rules), and every metric they use really exported by the relay."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from relay.metrics import Metrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; .ci/run adds it)"
)


def exported_names(metrics: Metrics) -> set[str]:
    """Every series name the relay can export, including labelled ones not yet used."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        names |= {family.name} | {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_rules_are_valid() -> None:
    result = promtool("check", "rules", "oauth-relay-rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


@needs_promtool
def test_each_alert_fires_when_it_should_and_not_before() -> None:
    result = promtool("test", "rules", "oauth-relay-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_and_uses_only_exported_metrics() -> None:
    rules = (RULES / "oauth-relay-rules.yml").read_text(encoding="utf-8")
    tests = (RULES / "oauth-relay-rules.test.yml").read_text(encoding="utf-8")
    alerts = re.findall(r"alert: (\w+)", rules)
    assert len(alerts) == 5
    for alert in alerts:
        assert f"alertname: {alert}" in tests, alert
    metrics = Metrics()
    metrics.watch_queue(lambda: {"incoming": 0}, lambda: None)
    exported = {
        sample.name for family in metrics.registry.collect() for sample in family.samples
    } | {family.name for family in metrics.registry.collect()}
    used = set(re.findall(r"\b(relay_[a-z_]+)", rules))
    assert used, "no metric found in the rules"
    assert used <= exported, used - exported


def test_dashboard_queries_only_exported_metrics() -> None:
    import json

    dashboard = json.loads(
        (RULES.parent / "grafana" / "oauth-relay-dashboard.json").read_text(encoding="utf-8")
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    metrics = Metrics()
    metrics.watch_queue(lambda: {"incoming": 0}, lambda: None)
    names = exported_names(metrics)
    used = {m for e in exprs for m in re.findall(r"\b(relay_[a-z_]+)", e)}
    assert used <= names, used - names
