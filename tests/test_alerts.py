"""The alert rules and the dashboard that come with serve (``config/alerts``,
``config/dashboards``): valid for Prometheus (``promtool``, Debian's ``prometheus`` package),
each alert firing on the series it is for and not before its time, and every metric they
name one that serve exports.

Without ``promtool`` the promtool tests skip, except under ``CI=true`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client import generate_latest

from tests.conftest import IN_CI
from worker.service.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "alerts" / "reaper-rules.yaml"
RULE_TESTS = ROOT / "tests" / "alerts" / "reaper-rules.test.yaml"
DASHBOARD = ROOT / "config" / "dashboards" / "reaper.json"
ALERTS = {
    "ReaperReplicaNotReady", "ReaperLagGrowing", "ReaperDeadLettered", "ReaperThrottled",
    "ReaperStalled", "ReaperCredentialsRefused", "ReaperRegionApiDown",
}  # fmt: skip


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("promtool is required under CI=true (apt-get install prometheus)")
        pytest.skip("no promtool on this machine (Debian: apt-get install prometheus)")
    return found


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_each_alert_fires_on_its_series_and_not_before(tmp_path: Path) -> None:
    """``promtool test rules``; the expected annotations are the rule's own (static text)."""
    annotations = {rule["alert"]: rule["annotations"] for rule in _rules()}
    spec = yaml.safe_load(RULE_TESTS.read_text())
    spec["rule_files"] = [str(RULES)]
    tested: set[str] = set()
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            tested.add(check["alertname"])
            for alert in check["exp_alerts"]:
                alert["exp_annotations"] = annotations[check["alertname"]]
    assert tested == ALERTS
    written = tmp_path / "rules.test.yaml"
    written.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [_promtool(), "test", "rules", str(written)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_names_a_runbook_section_that_exists() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {_anchor(line) for line in runbook.splitlines() if line.startswith("#")}
    rules = _rules()
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/runbook.md" and anchor in anchors, rule["alert"]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _exported() -> set[str]:
    text = generate_latest(ServiceMetrics().registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def _named(text: str) -> set[str]:
    return set(re.findall(r"devserver_reaper_[a-z_]+", text))


def test_the_rules_and_the_dashboard_name_only_metrics_serve_exports() -> None:
    exported = _exported()
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    in_rules = _named(RULES.read_text())
    in_dashboard = _named("\n".join(exprs))
    assert in_rules <= exported, in_rules - exported
    assert in_dashboard <= exported, in_dashboard - exported
    assert len(in_dashboard) >= 12  # every family serve exports has a panel
    assert dashboard["uid"] and all(panel["targets"] for panel in dashboard["panels"])
