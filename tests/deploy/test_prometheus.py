"""deploy/prometheus: the scrape configurations name the jobs the alert rules use, on the
services' metrics ports, and load the rules."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, NAMESPACES, PREFIXES, readme_ports

PROMETHEUS = DEPLOY / "prometheus"
JOBS = set(PREFIXES)


def config(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((PROMETHEUS / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def jobs(loaded: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in loaded["scrape_configs"]}


def test_compose_scrape_config_targets_every_metrics_port():
    """One target per container of each service (both auth replicas), on the service's metrics port."""
    scrape = jobs(config("prometheus.yml"))
    assert set(scrape) == JOBS
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for job, (_, metrics_port) in readme_ports().items():
        containers = sorted(
            name for name, spec in services.items() if spec.get("command") == ["python", "-m", f"services.{job}"]
        )
        targets = [t for group in scrape[job]["static_configs"] for t in group["targets"]]
        assert targets == [f"{container}:{metrics_port}" for container in containers]
        assert scrape[job].get("metrics_path", "/metrics") == "/metrics"


def test_both_configs_load_the_alert_rules():
    for name in ("prometheus.yml", "kubernetes.yml"):
        assert config(name)["rule_files"] == ["alerts.yml"], name
    assert (PROMETHEUS / "alerts.yml").is_file()


def test_alert_rules_use_these_job_names():
    rules = (PROMETHEUS / "alerts.yml").read_text()
    matchers = [m for m in re.findall(r'job\s*=~?\s*"([^"]*)"', rules) if "{{" not in m]  # not templates
    for job in JOBS:
        assert any(re.fullmatch(matcher, job) for matcher in matchers), f"alerts.yml has no matcher for job {job}"


def test_kubernetes_scrape_config_finds_the_annotated_pods():
    scrape = jobs(config("kubernetes.yml"))
    assert set(scrape) == JOBS
    for job, spec in scrape.items():
        sd = spec["kubernetes_sd_configs"]
        assert [s["role"] for s in sd] == ["pod"]
        assert set(sd[0]["namespaces"]["names"]) == set(NAMESPACES.values())
        keep = {
            rule["source_labels"][0]: rule["regex"] for rule in spec["relabel_configs"] if rule.get("action") == "keep"
        }
        assert keep == {
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": job,
            "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        }
        targets = {rule.get("target_label") for rule in spec["relabel_configs"]}
        assert {"__address__", "__metrics_path__"} <= targets
