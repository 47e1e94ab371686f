"""deploy/compose.yaml: parses, follows the Compose specification, and runs the services the way
the README does (same commands, same ports), with the Kubernetes probes as healthchecks."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from services.common.settings import SettingsError, load_settings
from tests.conftest import REPO
from tests.deploy.conftest import DEPLOY, PREFIXES, readme_ports, run, setting_names, settings_class, tool

COMPOSE_FILE = DEPLOY / "compose.yaml"
SERVICE_NAMES = sorted(PREFIXES)
HEALTHCHECK_SCRIPT = "/opt/ml-platform/healthcheck.py"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict), "compose.yaml is not a mapping"
    return loaded


def seconds(duration: str) -> float:
    """A Compose duration ("1m30s", "180s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(f"{n}{u}" for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


def environment(compose: dict[str, Any], service: str) -> dict[str, str]:
    env = compose["services"][service].get("environment", {})
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return {name: str(value) for name, value in env.items()}


def test_compose_names_the_platform_and_prometheus(compose):
    assert set(compose["services"]) == {*SERVICE_NAMES, "prometheus"}


def test_compose_follows_the_compose_specification():
    out = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_command_is_the_readme_command(compose, service):
    command = ["python", "-m", f"services.{service}"]
    assert compose["services"][service]["command"] == command
    assert " ".join(command) in (REPO / "README.md").read_text()


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_ports_are_the_readme_ports(compose, service):
    grpc_port, metrics_port = readme_ports()[service]
    prefix = PREFIXES[service]
    env = environment(compose, service)
    assert int(env[f"{prefix}PORT"]) == grpc_port
    assert int(env[f"{prefix}METRICS_PORT"]) == metrics_port
    assert env[f"{prefix}HOST"] == "0.0.0.0"  # noqa: S104  (inside the container)
    published = set(compose["services"][service]["ports"])
    assert published == {f"127.0.0.1:{grpc_port}:{grpc_port}", f"127.0.0.1:{metrics_port}:{metrics_port}"}


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_healthcheck_is_the_liveness_and_readiness_probe(compose, service):
    grpc_port, _ = readme_ports()[service]
    check = compose["services"][service]["healthcheck"]
    assert check["test"] == ["CMD", "python", HEALTHCHECK_SCRIPT, f"127.0.0.1:{grpc_port}", "liveness", "readiness"]
    assert seconds(check["timeout"]) <= seconds(check["interval"])
    if service == "inference":  # the startupProbe's part: models load before the first failure counts
        start_timeout = float(
            environment(compose, service).get(
                "INFERENCE_WORKER_START_TIMEOUT_SECONDS",
                settings_class(service).model_fields["worker_start_timeout_seconds"].default,
            )
        )
        assert seconds(check["start_period"]) > start_timeout


def test_the_healthcheck_script_is_in_the_image():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert f"COPY deploy/docker/healthcheck.py {HEALTHCHECK_SCRIPT}" in dockerfile


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_environment_names_real_settings_that_load(compose, service, monkeypatch):
    env = environment(compose, service)
    unknown = set(env) - setting_names(service)
    assert not unknown, f"{service}: not settings: {sorted(unknown)}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        load_settings(settings_class(service))
    except SettingsError as error:
        pytest.fail(f"{service} would refuse to start: {error}", pytrace=False)


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_stop_grace_period_covers_the_drain(compose, service):
    """SIGKILL never cuts the shutdown short: delay (NOT_SERVING, still serving) + grace (+ the workers' stop)."""
    env, prefix = environment(compose, service), PREFIXES[service]
    defaults = settings_class(service).model_fields
    grace = float(env[f"{prefix}GRACE_SECONDS"])
    delay = float(env.get(f"{prefix}SHUTDOWN_DELAY_SECONDS", defaults["shutdown_delay_seconds"].default))
    needed = delay + grace
    if service == "inference":
        needed += float(env.get("INFERENCE_WORKER_STOP_GRACE_SECONDS", defaults["worker_stop_grace_seconds"].default))
    assert seconds(compose["services"][service]["stop_grace_period"]) > needed


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_containers_are_locked_down(compose, service):
    spec = compose["services"][service]
    assert spec["read_only"] is True
    assert any(mount.split(":")[0] == "/tmp" for mount in spec["tmpfs"])  # noqa: S108
    assert spec["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in spec["security_opt"]
    assert not spec.get("privileged")
    assert "user" not in spec, "the image's non-root user"
    assert spec["build"] == {"context": "..", "dockerfile": "deploy/docker/Dockerfile"}


def test_gateway_reaches_the_upstreams_by_service_name(compose):
    env = environment(compose, "gateway")
    ports = readme_ports()
    assert env["GATEWAY_AUTH_TARGET"] == f"dns:///auth:{ports['auth'][0]}"
    assert env["GATEWAY_INFERENCE_TARGET"] == f"dns:///inference:{ports['inference'][0]}"
    depends = compose["services"]["gateway"]["depends_on"]
    assert depends == {name: {"condition": "service_healthy"} for name in ("auth", "inference")}


def test_auth_trusts_exactly_the_gateway(compose):
    address = compose["services"]["gateway"]["networks"]["platform"]["ipv4_address"]
    assert json.loads(environment(compose, "auth")["AUTH_TRUSTED_PROXIES"]) == [f"{address}/32"]


def test_auth_data_is_a_volume(compose):
    data_dir = environment(compose, "auth")["AUTH_DATA_DIR"]
    volumes = compose["services"]["auth"]["volumes"]
    assert any(v.split(":")[1] == data_dir and v.split(":")[0] in compose["volumes"] for v in volumes)


def test_inference_gets_shared_memory(compose):
    size = compose["services"]["inference"]["shm_size"]
    assert re.fullmatch(r"\d+m", size)
    assert int(size[:-1]) > 64, "more /dev/shm than Docker's default 64m"


def test_prometheus_loads_the_scrape_config_and_the_rules(compose):
    spec = compose["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", spec["image"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in spec["volumes"]}
    config = next(arg.split("=", 1)[1] for arg in spec["command"] if arg.startswith("--config.file="))
    directory, name = config.rsplit("/", 1)
    assert mounts[directory] == "./prometheus"
    assert (COMPOSE_FILE.parent / "prometheus" / name).is_file()
