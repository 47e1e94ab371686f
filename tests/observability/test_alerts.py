"""The Prometheus rules and the Grafana dashboard in deploy/: promtool checks them, every rule has unit tests,
and every metric they read is in the catalogue (docs/metrics.md).

promtool is required, not optional: without it these tests fail and say how to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = [PROMETHEUS / "alerts_test.yml", *sorted((PROMETHEUS / "tests").glob("*.yml"))]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"
CATALOGUE = REPO / "docs" / "metrics.md"

INSTALL_PROMTOOL = (
    "promtool not found: install it with `apt-get update && apt-get install -y --no-install-recommends prometheus` "
    "(Debian's package `prometheus` ships /usr/bin/promtool), or set PROMTOOL to a promtool binary"
)
SEVERITIES = {"critical", "warning"}
METRIC_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


# -- helpers (test_metrics_catalogue.py uses them too) ---------------------------------------------------------


def promtool() -> str:
    """The promtool binary; fails the test (never skips) when there is none."""
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not path:
        pytest.fail(INSTALL_PROMTOOL, pytrace=False)
    return path


def run_promtool(*args: str, stdin: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


@dataclass(frozen=True)
class CatalogueRow:
    section: str  # the "## " heading the table is under, e.g. "auth"
    name: str
    type: str
    labels: frozenset[str]


def catalogue(text: str | None = None) -> list[CatalogueRow]:
    """Every row of every `| name | type | labels | meaning |` table in docs/metrics.md."""
    if text is None:
        text = CATALOGUE.read_text()
    rows: list[CatalogueRow] = []
    section, in_table = "", False
    for line in text.splitlines():
        if line.startswith("## "):
            section, in_table = line[3:].strip(), False
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if [cell.lower() for cell in cells[:4]] == ["name", "type", "labels", "meaning"]:
            in_table = True
            continue
        if not in_table or set(cells[0]) <= set("-: "):
            continue
        assert len(cells) == 4, f"docs/metrics.md: a catalogue row needs 4 cells (no '|' in the text): {line}"
        name, kind = cells[0].strip("`"), cells[1]
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), f"docs/metrics.md: not a metric name: {cells[0]}"
        assert kind in METRIC_TYPES, f"docs/metrics.md: {name}: unknown type {kind!r}"
        rows.append(CatalogueRow(section, name, kind, frozenset(re.findall(r"`([^`]+)`", cells[2]))))
    return rows


def family_of(series_name: str, families: dict[str, str]) -> str | None:
    """The metric family (name -> type) a series name belongs to: itself, or a histogram's _bucket/_sum/_count."""
    if series_name in families:
        return series_name
    for suffix in HISTOGRAM_SERIES:
        base = series_name.removesuffix(suffix)
        if base != series_name and families.get(base) in ("histogram", "summary"):
            return base
    return None


_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "inf", "nan",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names left out)."""
    expr = _STRINGS.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = _LABEL_LISTS.sub(" ", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        word = match.group()
        if expr[match.end() :].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or an operator
        names.add(word)
    return names


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def rule_tests() -> list[dict[str, Any]]:
    return [test for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]]


def dashboard_panels(node: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in node.get("panels", []):
        panels.append(panel)
        panels.extend(dashboard_panels(panel))  # collapsed rows keep their panels inside
    return panels


def dashboard_exprs() -> dict[str, str]:
    """Every PromQL query of the dashboard, Grafana's variables replaced, by panel title and refId."""
    exprs = {}
    for panel in dashboard_panels(json.loads(DASHBOARD.read_text())):
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$__interval", "1m")
            expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # $job, ${model}: multi-value regex variables
            exprs[f"{panel['title']} / {target['refId']}"] = expr
    return exprs


def catalogued_families() -> dict[str, str]:
    return {row.name: row.type for row in catalogue()}


def uncatalogued(names: set[str], families: dict[str, str]) -> set[str]:
    return {name for name in names if ":" not in name and family_of(name, families) is None}


# -- promtool ------------------------------------------------------------------------------------------------


def test_promtool_check_rules_passes():
    done = run_promtool("check", "rules", str(RULES.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_rule_unit_tests_pass():
    done = run_promtool("test", "rules", *(str(path.relative_to(REPO)) for path in RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_tests_load_alerts_yml():
    for path in RULE_TESTS:
        files = [(path.parent / name).resolve() for name in yaml.safe_load(path.read_text())["rule_files"]]
        assert files == [RULES], f"{path.name} must test alerts.yml, not {files}"


# -- coverage of the unit tests ---------------------------------------------------------------------------------


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    cases = [case for test in rule_tests() for case in test.get("alert_rule_test", [])]
    tested = {case["alertname"] for case in cases}
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    assert alerts, "alerts.yml has no alert"
    assert not alerts - tested, f"alerts without an alert_rule_test: {sorted(alerts - tested)}"
    # exp_alerts: [] passes for a rule that never fires, so each alert also needs a case where it does.
    assert not alerts - firing, f"alerts never expected to fire in a test: {sorted(alerts - firing)}"
    assert not tested - alerts, f"tests of alerts that do not exist: {sorted(tested - alerts)}"


def test_every_recording_rule_has_a_promql_expr_test():
    records = {rule["record"] for rule in rules() if "record" in rule}
    tested = {
        name
        for test in rule_tests()
        for case in test.get("promql_expr_test", [])
        for name in metric_names(case["expr"])
    }
    assert not records - tested, f"recording rules without a promql_expr_test: {sorted(records - tested)}"


def test_every_alert_has_severity_for_summary_and_description():
    for rule in rules():
        if "alert" not in rule:
            continue
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity must be one of {SEVERITIES}"
        assert "for" in rule, f"{name}: no `for:` duration"
        annotations = rule.get("annotations", {})
        assert {"summary", "description"} <= set(annotations), f"{name}: needs summary and description"
        assert "$labels" in annotations["summary"] + annotations["description"], f"{name}: annotations name no label"


# -- the catalogue ---------------------------------------------------------------------------------------------


def test_metric_names_are_read_from_promql():
    expr = (
        "sum by (job, le) (rate(grpc_server_handling_seconds_bucket{grpc_service!~`grpc\\.health.*`}[5m])) "
        '/ on (job) group_left (x) job:grpc_server_handled:rate5m > 1e3 and absent(up{job="auth"}) '
        "or histogram_quantile(0.99, inference_request_seconds_bucket offset 5m) * bool 2"
    )
    assert metric_names(expr) == {
        "grpc_server_handling_seconds_bucket",
        "job:grpc_server_handled:rate5m",
        "up",
        "inference_request_seconds_bucket",
    }


def test_every_metric_used_by_the_rules_is_catalogued():
    families = catalogued_families()
    used = {name for rule in rules() for name in metric_names(rule["expr"])}
    records = {rule["record"] for rule in rules() if "record" in rule}
    assert not uncatalogued(used, families), f"not in docs/metrics.md: {sorted(uncatalogued(used, families))}"
    recorded = {name for name in used if ":" in name}
    assert recorded <= records, f"rules read recording rules nobody records: {sorted(recorded - records)}"
    assert used & set(families), "no catalogued metric found in alerts.yml: is the extraction broken?"


def test_recording_rules_are_listed_in_the_docs():
    text = CATALOGUE.read_text()
    missing = [rule["record"] for rule in rules() if "record" in rule and f"`{rule['record']}`" not in text]
    assert not missing, f"recording rules missing from docs/metrics.md: {missing}"


def test_alerts_are_listed_in_the_docs():
    text = CATALOGUE.read_text()
    missing = [rule["alert"] for rule in rules() if "alert" in rule and f"`{rule['alert']}`" not in text]
    assert not missing, f"alerts missing from docs/metrics.md: {missing}"


# -- the dashboard ---------------------------------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]


def test_dashboard_shows_what_an_operator_needs():
    used = {name for expr in dashboard_exprs().values() for name in metric_names(expr)}
    expected = {
        "grpc_server_handled_total",  # request rate, errors
        "grpc_server_handling_seconds_bucket",  # p50/p99
        "inference_workers",  # worker states
        "inference_worker_restarts_total",
        "inference_queue_depth",
        "auth_login_attempts_total",  # login outcomes
        "up",
    }
    assert expected <= used, f"dashboard lacks {sorted(expected - used)}"


def test_dashboard_queries_parse_and_use_catalogued_metrics(tmp_path):
    exprs = dashboard_exprs()
    families = catalogued_families()
    used = {name for expr in exprs.values() for name in metric_names(expr)}
    assert not uncatalogued(used, families), f"dashboard metrics not in docs/metrics.md: {uncatalogued(used, families)}"
    # promtool has no "parse this query" command; a rule file of the queries gets them parsed.
    check = tmp_path / "dashboard_queries.yml"
    records = [{"record": f"dashboard:query_{index}", "expr": expr} for index, expr in enumerate(exprs.values())]
    check.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = run_promtool("check", "rules", str(check))
    assert done.returncode == 0, "\n".join([done.stdout + done.stderr, *(f"{k}: {v}" for k, v in exprs.items())])
