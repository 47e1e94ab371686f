"""deploy/compose.yaml: parses, follows the Compose specification, and runs the services the way
the README does (same commands, same ports), with the Kubernetes probes as healthchecks; two auth
replicas on one PostgreSQL, one Redis and one signing key, behind the gateway's round robin."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.common.settings import SettingsError, load_settings
from tests.conftest import REPO
from tests.deploy.conftest import DEPLOY, PREFIXES, readme_ports, run, setting_names, settings_class, tool

COMPOSE_FILE = DEPLOY / "compose.yaml"
# compose service -> the platform service it runs (its command, settings prefix and README ports).
CONTAINERS = {"auth-a": "auth", "auth-b": "auth", "gateway": "gateway", "inference": "inference"}
AUTH_REPLICAS = ("auth-a", "auth-b")
KEY_SERVICE = "auth-key"
STORES = ("postgres", "redis")
HEALTHCHECK_SCRIPT = "/opt/ml-platform/healthcheck.py"
# Variables that are not settings but libpq's own, read by auth's PostgreSQL driver (README: the
# password outside the URL).
LIBPQ = {"PGPASSWORD"}
# Official images, pinned by version (a tag that names a release, optionally a digest too).
OFFICIAL_IMAGES = {
    "postgres": r"postgres:\d+\.\d+(-[a-z0-9.]+)?(@sha256:[0-9a-f]{64})?",
    "redis": r"redis:\d+\.\d+\.\d+(-[a-z0-9.]+)?(@sha256:[0-9a-f]{64})?",
}
DATA_DIRS = {"postgres": "/var/lib/postgresql/data", "redis": "/data"}


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


def mounts(compose: dict[str, Any], service: str) -> dict[str, tuple[str, str]]:
    """{path in the container: (volume or host path, mode)} of a service's short-syntax volumes."""
    result = {}
    for entry in compose["services"][service].get("volumes", []):
        source, target, *mode = entry.split(":")
        result[target] = (source, mode[0] if mode else "rw")
    return result


def published(compose: dict[str, Any], service: str) -> dict[int, tuple[str, int]]:
    """{container port: (host address, host port)} of a service's published ports."""
    result = {}
    for entry in compose["services"][service].get("ports", []):
        address, host_port, container_port = entry.split(":")
        result[int(container_port)] = (address, int(host_port))
    return result


def test_compose_runs_the_platform_its_stores_and_prometheus(compose):
    assert set(compose["services"]) == {*CONTAINERS, KEY_SERVICE, *STORES, "prometheus"}


def test_compose_follows_the_compose_specification():
    out = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_command_is_the_readme_command(compose, container):
    command = ["python", "-m", f"services.{CONTAINERS[container]}"]
    assert compose["services"][container]["command"] == command
    assert " ".join(command) in (REPO / "README.md").read_text()


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_ports_are_the_readme_ports(compose, container):
    """Inside, every container listens on its service's README ports; the first replica publishes them as they are."""
    service = CONTAINERS[container]
    grpc_port, metrics_port = readme_ports()[service]
    prefix = PREFIXES[service]
    env = environment(compose, container)
    assert int(env[f"{prefix}PORT"]) == grpc_port
    assert int(env[f"{prefix}METRICS_PORT"]) == metrics_port
    assert env[f"{prefix}HOST"] == "0.0.0.0"  # noqa: S104  (inside the container)
    ports = published(compose, container)
    assert set(ports) == {grpc_port, metrics_port}
    assert {address for address, _ in ports.values()} == {"127.0.0.1"}
    if container != "auth-b":
        assert ports == {grpc_port: ("127.0.0.1", grpc_port), metrics_port: ("127.0.0.1", metrics_port)}


def test_no_host_port_is_published_twice(compose):
    host_ports = [port for service in compose["services"] for _, port in published(compose, service).values()]
    assert len(host_ports) == len(set(host_ports)), sorted(host_ports)


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_healthcheck_is_the_liveness_and_readiness_probe(compose, container):
    service = CONTAINERS[container]
    grpc_port, _ = readme_ports()[service]
    check = compose["services"][container]["healthcheck"]
    assert check["test"] == ["CMD", "python", HEALTHCHECK_SCRIPT, f"127.0.0.1:{grpc_port}", "liveness", "readiness"]
    assert seconds(check["timeout"]) <= seconds(check["interval"])
    if service == "inference":  # the startupProbe's part: models load before the first failure counts
        start_timeout = float(
            environment(compose, container).get(
                "INFERENCE_WORKER_START_TIMEOUT_SECONDS",
                settings_class(service).model_fields["worker_start_timeout_seconds"].default,
            )
        )
        assert seconds(check["start_period"]) > start_timeout


def test_the_healthcheck_script_is_in_the_image():
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert f"COPY deploy/docker/healthcheck.py {HEALTHCHECK_SCRIPT}" in dockerfile


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_environment_names_real_settings_that_load(compose, container, monkeypatch):
    service = CONTAINERS[container]
    env = environment(compose, container)
    allowed = setting_names(service) | (LIBPQ if service == "auth" else set())
    unknown = set(env) - allowed
    assert not unknown, f"{container}: not settings: {sorted(unknown)}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        load_settings(settings_class(service))
    except SettingsError as error:
        pytest.fail(f"{container} would refuse to start: {error}", pytrace=False)


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_stop_grace_period_covers_the_drain(compose, container):
    """SIGKILL never cuts the shutdown short: delay (NOT_SERVING, still serving) + grace (+ the workers' stop)."""
    service = CONTAINERS[container]
    env, prefix = environment(compose, container), PREFIXES[service]
    defaults = settings_class(service).model_fields
    grace = float(env[f"{prefix}GRACE_SECONDS"])
    delay = float(env.get(f"{prefix}SHUTDOWN_DELAY_SECONDS", defaults["shutdown_delay_seconds"].default))
    needed = delay + grace
    if service == "inference":
        needed += float(env.get("INFERENCE_WORKER_STOP_GRACE_SECONDS", defaults["worker_stop_grace_seconds"].default))
    assert seconds(compose["services"][container]["stop_grace_period"]) > needed


def test_auth_replicas_wait_out_the_gateways_move_before_refusing(compose):
    """Two replicas behind one balancer: each says NOT_SERVING for a while before it stops accepting."""
    for replica in AUTH_REPLICAS:
        assert float(environment(compose, replica)["AUTH_SHUTDOWN_DELAY_SECONDS"]) > 0, replica


@pytest.mark.parametrize("container", sorted([*CONTAINERS, KEY_SERVICE]))
def test_containers_are_locked_down(compose, container):
    spec = compose["services"][container]
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
    assert depends == {name: {"condition": "service_healthy"} for name in (*AUTH_REPLICAS, "inference")}


def test_the_gateway_balances_over_both_auth_replicas(compose):
    """`auth` is no service's name but the alias of exactly the two replicas: its DNS answer lists both."""
    assert "auth" not in compose["services"]
    aliased = {
        name
        for name, spec in compose["services"].items()
        if isinstance(spec.get("networks"), dict)
        and "auth" in (spec["networks"].get("platform") or {}).get("aliases", [])
    }
    assert aliased == set(AUTH_REPLICAS)
    assert environment(compose, "gateway")["GATEWAY_AUTH_TARGET"].startswith("dns:///auth:")  # round robin over DNS


@pytest.mark.parametrize("replica", AUTH_REPLICAS)
def test_auth_trusts_exactly_the_gateway(compose, replica):
    address = compose["services"]["gateway"]["networks"]["platform"]["ipv4_address"]
    assert json.loads(environment(compose, replica)["AUTH_TRUSTED_PROXIES"]) == [f"{address}/32"]


# -- auth across replicas: one store, one limit, one key ---------------------------------------


def test_auth_replicas_are_alike_but_for_host_ports_and_data(compose):
    a, b = (compose["services"][replica] for replica in AUTH_REPLICAS)
    different = {key for key in {*a, *b} if a.get(key) != b.get(key)}
    assert different == {"ports", "volumes"}
    data = {mounts(compose, replica)[environment(compose, replica)["AUTH_DATA_DIR"]][0] for replica in AUTH_REPLICAS}
    assert len(data) == len(AUTH_REPLICAS), "each replica's outbox on a volume of its own"


def test_auth_replicas_share_one_postgresql_database(compose):
    postgres = environment(compose, "postgres")
    for replica in AUTH_REPLICAS:
        env = environment(compose, replica)
        url = urlsplit(env["AUTH_DATABASE_URL"])
        assert url.scheme == "postgresql"
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert url.username == postgres["POSTGRES_USER"]
        assert url.path == f"/{postgres['POSTGRES_DB']}"
        assert url.password is None, "the password goes in PGPASSWORD, not the URL"
        assert env["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]


def test_auth_replicas_count_login_attempts_in_one_redis(compose):
    for replica in AUTH_REPLICAS:
        url = urlsplit(environment(compose, replica)["AUTH_RATE_LIMIT_STORAGE_URI"])
        assert url.scheme == "redis"
        assert (url.hostname, url.port or 6379) == ("redis", 6379)
    assert len({environment(compose, replica)["AUTH_RATE_LIMIT_STORAGE_URI"] for replica in AUTH_REPLICAS}) == 1


def test_auth_replicas_share_one_signing_key(compose):
    """The key file is on one volume: written by auth-key, mounted read-only in both replicas."""
    key_file = environment(compose, KEY_SERVICE)["AUTH_SIGNING_KEY_FILE"]
    directory = str(PurePosixPath(key_file).parent)
    volume, mode = mounts(compose, KEY_SERVICE)[directory]
    assert mode == "rw"
    assert volume in compose["volumes"], "a named volume, kept across `up`s"
    for replica in AUTH_REPLICAS:
        env = environment(compose, replica)
        assert env["AUTH_SIGNING_KEY_FILE"] == key_file
        assert "AUTH_SIGNING_KEY" not in env
        assert mounts(compose, replica)[directory] == (volume, "ro")
    # A new named volume takes the owner of the image's directory: the image's user must be able to write it.
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(rf"install -d -o 10001 -g 10001 -m 0700 [^\n]*{re.escape(directory)}(\s|$)", dockerfile)


def test_auth_replicas_start_after_the_key_and_the_stores(compose):
    key = compose["services"][KEY_SERVICE]
    assert key["restart"] == "no", "a one-shot service: restarting it after it succeeded would never end"
    for replica in AUTH_REPLICAS:
        assert compose["services"][replica]["depends_on"] == {
            KEY_SERVICE: {"condition": "service_completed_successfully"},
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }


def test_the_key_service_makes_one_key_and_keeps_it(compose, tmp_path):
    """auth-key's command, run here as it runs in its container: a key on the first run, the same one after."""
    from services.auth.tokens import KeyRing

    command = compose["services"][KEY_SERVICE]["command"]
    assert command[0] == "python"
    key_file = tmp_path / "auth-keys" / PurePosixPath(environment(compose, KEY_SERVICE)["AUTH_SIGNING_KEY_FILE"]).name
    env = {**os.environ, "AUTH_SIGNING_KEY_FILE": str(key_file)}
    outputs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, *command[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stderr
        outputs.append((out.stdout, key_file.read_bytes()))
    assert outputs[0] == outputs[1], "the second run keeps the first run's key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    ring = KeyRing.load(
        signing_key_pem=None,
        signing_key_file=key_file,
        verification_key_files=(),
        data_dir=tmp_path,
        generate_if_missing=False,
    )
    assert ring.kid in outputs[0][0], "it names the key's id, which the replicas log at start"


# -- PostgreSQL and Redis ------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_stores_run_official_images_pinned_by_version(compose, store):
    image = compose["services"][store]["image"]
    assert re.fullmatch(OFFICIAL_IMAGES[store], image), f"{store}: {image} is not an official image pinned by version"
    assert "build" not in compose["services"][store]


@pytest.mark.parametrize("store", STORES)
def test_stores_keep_their_data_on_a_named_volume(compose, store):
    volume, mode = mounts(compose, store)[DATA_DIRS[store]]
    assert mode == "rw"
    assert volume in compose["volumes"]


@pytest.mark.parametrize("store", STORES)
def test_stores_have_health_checks(compose, store):
    check = compose["services"][store]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert seconds(check["timeout"]) <= seconds(check["interval"])
    assert check["retries"] >= 1
    assert "start_period" in check


def test_postgres_is_healthy_once_it_accepts_auths_connections(compose):
    """Over TCP, as auth connects (the entrypoint's first, initdb server listens on its socket only)."""
    test = compose["services"]["postgres"]["healthcheck"]["test"]
    postgres = environment(compose, "postgres")
    assert test[:2] == ["CMD", "pg_isready"]
    assert "--host=127.0.0.1" in test
    assert f"--username={postgres['POSTGRES_USER']}" in test
    assert f"--dbname={postgres['POSTGRES_DB']}" in test


def test_redis_is_healthy_once_it_answers_ping(compose):
    test = compose["services"]["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    for word in ("redis-cli", "ping", "PONG"):
        assert word in test[1]


@pytest.mark.parametrize("store", STORES)
def test_stores_stay_inside_the_compose_network_and_locked_down(compose, store):
    spec = compose["services"][store]
    assert "ports" not in spec, f"{store} is for the auth replicas only"
    assert spec["networks"] == ["platform"]
    assert spec["restart"] == "unless-stopped"
    assert spec["read_only"] is True
    assert spec["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in spec["security_opt"]
    assert spec["user"] == store, "the image's own user from the start: no root entrypoint, no capabilities"


def test_every_named_volume_is_declared_and_used(compose):
    used = {
        source
        for service in compose["services"]
        for source, _ in mounts(compose, service).values()
        if not source.startswith((".", "/"))
    }
    assert used == set(compose["volumes"])


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
