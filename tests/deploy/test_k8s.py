"""The Kubernetes manifests (deploy/k8s), as kubectl kustomize renders each overlay.

Every rendered object validates against the schemas of a pinned Kubernetes version, and the
objects have the properties the services rely on: gRPC probes with the right health names,
headless upstream Services, a locked-down securityContext, a grace period longer than the
servers' drain, settings that exist, NetworkPolicies, autoscaling and disruption budgets.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.common.settings import SettingsError, load_settings
from tests.deploy.conftest import (
    DEPLOY,
    K8S,
    KUBERNETES_VERSION,
    NAMESPACES,
    NOT_YET_READ,
    OPERATOR_SECRET,
    PREFIXES,
    REPO,
    TLS_SECRETS,
    Rendered,
    decode,
    readme_ports,
    run,
    service_of,
    setting_names,
    settings_class,
)

SERVICE_NAMES = sorted(PREFIXES)
UPSTREAMS = ("auth", "inference")
AUTOSCALED = ("gateway", "inference")
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
ANYONE = "anyone"


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def port(overlay: Rendered, service: str, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in overlay.container(service)["ports"]}
    assert name in ports, f"{overlay.overlay}: {service} has no container port named {name}"
    return int(ports[name])


# -- rendering and schemas -----------------------------------------------------------------------


def test_overlay_renders_the_whole_platform(overlay):
    kinds = {(obj["kind"], obj["metadata"]["name"].split("-")[0]) for obj in overlay.objects}
    for service in SERVICE_NAMES:
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap"):
            assert (kind, service) in kinds, f"{overlay.overlay}: no {kind} for {service}"
    for obj in overlay.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == overlay.namespace, obj["metadata"]


def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: pip install 'kubernetes-validate==1.37.0' (make setup does)",
            pytrace=False,
        )
    failures = []
    for obj in overlay.objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}")
    assert not failures, "\n".join(failures)


def secret_refs(overlay: Rendered, service: str) -> list[tuple[str, str | None, bool]]:
    """(Secret name, key or None for all of it, optional) of every reference a service's pods make to a Secret."""
    spec = overlay.pod_spec(service)
    refs: list[tuple[str, str | None, bool]] = []
    for container in containers(spec):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                refs.append((source["secretRef"]["name"], None, bool(source["secretRef"].get("optional"))))
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], ref["key"], bool(ref.get("optional"))))
    for volume in spec["volumes"]:
        if "secret" in volume:
            secret = volume["secret"]
            for item in secret.get("items", [{"key": None}]):
                refs.append((secret["secretName"], item["key"], bool(secret.get("optional"))))
    return refs


def test_prod_renders_as_committed_with_no_secret(rendered):
    """No Secret, placeholder or real, can be applied with the overlay: every reference names the operator's."""
    prod = rendered["prod"]
    assert not prod.all("Secret")
    names = {name for service in SERVICE_NAMES for name, _, _ in secret_refs(prod, service)}
    assert names == {OPERATOR_SECRET, *TLS_SECRETS}


def test_the_operators_secret_command_makes_the_secret_prod_needs(rendered, prod_secret):
    """deploy/README.md's command (run in client dry-run) makes a valid Secret with every key prod refers to."""
    import kubernetes_validate
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    assert prod_secret["kind"] == "Secret"
    assert prod_secret["metadata"] == {"name": OPERATOR_SECRET, "namespace": NAMESPACES["prod"]}
    kubernetes_validate.validate(prod_secret, KUBERNETES_VERSION, strict=True)
    keys = set(decode(prod_secret))
    referenced = {key for name, key, _ in secret_refs(rendered["prod"], "auth") if name == OPERATOR_SECRET}
    assert keys == referenced, "the command makes exactly the keys the auth pods read"
    table = (DEPLOY / "README.md").read_text().split("| key | what | required |", 1)[1].split("\n\n", 1)[0]
    first_cells = [row.strip().split("|")[1] for row in table.splitlines()[2:]]
    documented = {name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)}
    assert documented == keys, "deploy/README.md's table of the Secret's keys"
    key = load_pem_private_key(decode(prod_secret)["signing_key.pem"].encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)


def test_prod_requires_the_shared_stores_and_the_key(rendered):
    """A pod without the database URL, the Redis URL or the key does not start, never on a store of its own."""
    required = {key for name, key, optional in secret_refs(rendered["prod"], "auth") if not optional}
    assert {"AUTH_DATABASE_URL", "AUTH_RATE_LIMIT_STORAGE_URI", "signing_key.pem"} <= required
    for name in ("AUTH_DATABASE_URL", "AUTH_RATE_LIMIT_STORAGE_URI"):
        assert name not in rendered["prod"].get("ConfigMap", "auth-settings")["data"], f"{name} is a secret"


def test_prod_auth_replicas_share_postgresql_and_redis(rendered, monkeypatch):
    prod = rendered["prod"]
    assert prod.get("Deployment", "auth")["spec"]["replicas"] >= 2
    for name, value in prod.settings("auth").items():
        monkeypatch.setenv(name, value)
    settings = load_settings(settings_class("auth"))
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value().startswith("postgresql://")
    assert settings.rate_limit_storage_uri.startswith(("redis://", "rediss://"))
    assert settings.signing_key_file is not None


def test_no_secret_material_is_committed():
    old_layout = K8S / "overlays" / "prod" / "secrets"  # where secret files lived before the operator's Secret
    for path in (old_layout / "auth.env", old_layout / "signing_key.pem", K8S / "overlays" / "prod" / "key.pem"):
        ignored = run(["git", "-C", str(REPO), "check-ignore", "--quiet", str(path)])
        assert ignored.returncode == 0, f"git must ignore {path}"
    for path in K8S.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY-----" not in path.read_text(errors="replace"), path


# -- containers -------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_command_image_and_ports(overlay, service):
    container = overlay.container(service)
    assert container["command"] == ["python", "-m", f"services.{service}"]
    images = {c["image"] for spec in [overlay.pod_spec(s) for s in SERVICE_NAMES] for c in containers(spec)}
    assert len(images) == 1, f"one image for every service, not {images}"
    image = images.pop()
    assert ":" in image.rsplit("/", 1)[-1], f"untagged image {image}"
    assert not image.endswith(":latest"), image
    settings = overlay.settings(service)
    prefix = PREFIXES[service]
    grpc_port, metrics_port = readme_ports()[service]
    assert port(overlay, service, "grpc") == int(settings[f"{prefix}PORT"]) == grpc_port
    assert port(overlay, service, "metrics") == int(settings[f"{prefix}METRICS_PORT"]) == metrics_port
    assert settings[f"{prefix}HOST"] == "0.0.0.0"  # noqa: S104  (the pod IP, not loopback)


def probe_port(overlay: Rendered, service: str) -> int:
    """The port kubelet's gRPC probes ask: the plaintext health port when the gRPC port speaks TLS."""
    settings, prefix = overlay.settings(service), PREFIXES[service]
    if f"{prefix}TLS_CERT_FILE" not in settings:
        return port(overlay, service, "grpc")
    assert port(overlay, service, "health") == int(settings[f"{prefix}HEALTH_PORT"]), "the health port is probed"
    return port(overlay, service, "health")


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_native_grpc_probes_ask_for_liveness_and_readiness(overlay, service):
    container = overlay.container(service)
    probed = probe_port(overlay, service)
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["grpc"] == {"port": probed, "service": "liveness"}
    assert readiness["grpc"] == {"port": probed, "service": "readiness"}
    for probe in (liveness, readiness):
        assert probe.get("timeoutSeconds", 1) < probe.get("periodSeconds", 10)


def test_inference_has_a_startup_probe_long_enough_for_model_loading(overlay):
    container = overlay.container("inference")
    startup = container["startupProbe"]
    assert startup["grpc"] == {"port": probe_port(overlay, "inference"), "service": "readiness"}
    window = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup["failureThreshold"]
    start_timeout = float(
        overlay.settings("inference").get(
            "INFERENCE_WORKER_START_TIMEOUT_SECONDS",
            settings_class("inference").model_fields["worker_start_timeout_seconds"].default,
        )
    )
    assert window > start_timeout, f"startupProbe gives up after {window}s, a worker may load for {start_timeout}s"


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_grace_period_covers_prestop_and_the_servers_drain(overlay, service):
    spec = overlay.pod_spec(service)
    container = overlay.container(service)
    settings = overlay.settings(service)
    prefix = PREFIXES[service]
    assert f"{prefix}GRACE_SECONDS" in settings, f"{prefix}GRACE_SECONDS must be set explicitly"
    grace = float(settings[f"{prefix}GRACE_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0
    defaults = settings_class(service).model_fields
    delay = float(settings.get(f"{prefix}SHUTDOWN_DELAY_SECONDS", defaults["shutdown_delay_seconds"].default))
    assert delay > 0, f"{prefix}SHUTDOWN_DELAY_SECONDS: report NOT_SERVING a while before refusing RPCs"
    needed = pre_stop + delay + grace
    if service == "inference":  # then the workers get SIGTERM and this long before SIGKILL
        needed += float(
            settings.get("INFERENCE_WORKER_STOP_GRACE_SECONDS", defaults["worker_stop_grace_seconds"].default)
        )
    assert spec["terminationGracePeriodSeconds"] > needed, (
        f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} <= preStop {pre_stop}"
        f" + delay {delay} + grace {grace}{' + worker stop grace' if service == 'inference' else ''}"
    )


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_security_context_is_locked_down(overlay, service):
    spec = overlay.pod_spec(service)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "service links inject e.g. GATEWAY_PORT=tcp://...: a setting"
    for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(host_namespace), host_namespace
    assert all("hostPath" not in volume for volume in spec.get("volumes", []))
    for container in containers(spec):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert not context.get("privileged"), container["name"]


def test_namespace_enforces_the_restricted_pod_security_standard(overlay):
    namespace = overlay.get("Namespace", overlay.namespace)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_requests_and_limits(overlay, service):
    for container in containers(overlay.pod_spec(service)):
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) >= {"cpu", "memory"}, (container["name"], kind)


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_writable_paths_are_volumes(overlay, service):
    """With a read-only root filesystem every path a service writes must be a mount."""
    spec = overlay.pod_spec(service)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in overlay.container(service)["volumeMounts"]}
    assert "/tmp" in mounts  # noqa: S108
    for mount in mounts.values():
        assert mount["name"] in volumes, mount
    settings = overlay.settings(service)
    if service == "auth":
        data = mounts[settings["AUTH_DATA_DIR"]]
        assert not data.get("readOnly")
        kind = "persistentVolumeClaim" if overlay.overlay == "dev" else "emptyDir"
        assert kind in volumes[data["name"]], f"{overlay.overlay}: auth data should be a {kind}"
    if service == "inference":
        models = mounts[settings["INFERENCE_MODEL_REPOSITORY"]]
        assert models.get("readOnly") is True
        if overlay.overlay == "prod":
            assert "persistentVolumeClaim" in volumes[models["name"]]
        shm = volumes[mounts["/dev/shm"]["name"]]  # noqa: S108  (the shared-memory tmpfs)
        assert shm["emptyDir"]["medium"] == "Memory"


def test_every_referenced_object_is_rendered(overlay):
    """Rendered, or (prod's Secret) the operator's; a key a pod requires is in the Secret."""
    for service in SERVICE_NAMES:
        spec = overlay.pod_spec(service)
        for container in containers(spec):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    overlay.by_name("ConfigMap", source["configMapRef"]["name"])
        for name, key, optional in secret_refs(overlay, service):
            secret = overlay.lookup("Secret", name) if overlay.overlay == "prod" else overlay.by_name("Secret", name)
            if key is not None and not optional:
                assert key in decode(secret), (name, key)
        for volume in spec["volumes"]:
            if "persistentVolumeClaim" in volume:
                overlay.by_name("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert spec["serviceAccountName"] in {sa["metadata"]["name"] for sa in overlay.all("ServiceAccount")}


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_configmap_names_only_real_settings_of_its_service(overlay, service):
    configmap = overlay.get("ConfigMap", f"{service}-settings")
    names = set(configmap["data"])
    unknown = names - setting_names(service)
    assert not unknown, f"{configmap['metadata']['name']}: not settings of {service}: {sorted(unknown)}"
    refs = [source["configMapRef"]["name"] for source in overlay.container(service).get("envFrom", [])]
    assert refs == [configmap["metadata"]["name"]]


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_every_variable_a_container_gets_is_a_setting(overlay, service):
    for container in containers(overlay.pod_spec(service)):
        for item in container.get("env", []):
            name = item["name"]
            owner = service_of(name)
            assert owner == service, f"{container['name']}: {name} is not a {service} setting"
            assert name in setting_names(service) | NOT_YET_READ, f"{container['name']}: {name} is not a setting"


def test_names_not_read_yet_are_still_not_settings():
    """When a NOT_YET_READ name becomes a setting, drop it there and the 'not read yet' notes in deploy/."""
    for name in NOT_YET_READ:
        owner = service_of(name)
        assert owner is not None
        assert name not in setting_names(owner)


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_the_service_accepts_its_rendered_settings(overlay, service, monkeypatch):
    for name, value in overlay.settings(service).items():
        monkeypatch.setenv(name, value)
    try:
        load_settings(settings_class(service))
    except SettingsError as error:
        pytest.fail(f"{overlay.overlay}: {service} would refuse to start: {error}", pytrace=False)


def test_secrets_come_from_the_secret(overlay):
    container = overlay.container("auth")
    from_secret = {
        item["name"]: item["valueFrom"]["secretKeyRef"]["key"]
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert {"AUTH_BOOTSTRAP_ADMIN_USERNAME", "AUTH_BOOTSTRAP_ADMIN_PASSWORD"} <= set(from_secret)
    configmap = overlay.get("ConfigMap", "auth-settings")["data"]
    assert not {"AUTH_SIGNING_KEY", "AUTH_BOOTSTRAP_ADMIN_PASSWORD", "AUTH_SMTP_PASSWORD"} & set(configmap)
    if overlay.overlay == "prod":
        assert configmap["AUTH_ENV"] == "production"
        assert from_secret.get("AUTH_DATABASE_URL") == "AUTH_DATABASE_URL"
        assert from_secret.get("AUTH_RATE_LIMIT_STORAGE_URI") == "AUTH_RATE_LIMIT_STORAGE_URI"
        key_file = configmap["AUTH_SIGNING_KEY_FILE"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volume = next(
            v for v in overlay.pod_spec("auth")["volumes"] if v.get("secret", {}).get("secretName") == OPERATOR_SECRET
        )
        mount = mounts[volume["name"]]
        assert mount.get("readOnly") is True
        item = next(i for i in volume["secret"]["items"] if f"{mount['mountPath']}/{i['path']}" == key_file)
        assert item["key"] == "signing_key.pem"
        assert volume["secret"]["defaultMode"] & 0o007 == 0, "the key must not be world-readable"


# -- Services -----------------------------------------------------------------------------------


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_service_selects_its_pods_on_the_grpc_port(overlay, service):
    svc = overlay.get("Service", service)
    deployment = overlay.get("Deployment", service)
    assert matches(svc["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert matches(deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == port(overlay, service, "grpc")
    assert ports["grpc"]["targetPort"] in ("grpc", port(overlay, service, "grpc"))


@pytest.mark.parametrize("service", UPSTREAMS)
def test_upstreams_are_headless_and_the_gateway_resolves_every_pod(overlay, service):
    svc = overlay.get("Service", service)
    assert svc["spec"]["clusterIP"] == "None", f"{service} must be headless for the gateway's round_robin"
    assert not svc["spec"].get("publishNotReadyAddresses"), "DNS must list only ready pods"
    target = overlay.settings("gateway")[f"GATEWAY_{service.upper()}_TARGET"]
    assert target == f"dns:///{service}.{overlay.namespace}.svc.cluster.local:{port(overlay, service, 'grpc')}"


def test_gateway_is_the_entry_point(overlay):
    svc = overlay.get("Service", "gateway")
    assert svc["spec"].get("clusterIP") != "None"
    assert svc["spec"]["type"] == ("LoadBalancer" if overlay.overlay == "prod" else "ClusterIP")
    for service in UPSTREAMS:
        assert overlay.get("Service", service)["spec"].get("type", "ClusterIP") == "ClusterIP"


# -- scaling and disruptions --------------------------------------------------------------------


@pytest.mark.parametrize("service", AUTOSCALED)
def test_autoscaled_deployments(overlay, service):
    hpa = overlay.get("HorizontalPodAutoscaler", service)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert "replicas" not in overlay.get("Deployment", service)["spec"], "the HPA owns the replica count"


def test_only_gateway_and_inference_are_autoscaled(overlay):
    targets = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in overlay.all("HorizontalPodAutoscaler")}
    assert targets == set(AUTOSCALED)


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_disruption_budget(overlay, service):
    pdb = overlay.get("PodDisruptionBudget", service)
    labels = overlay.get("Deployment", service)["spec"]["template"]["metadata"]["labels"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def test_dev_auth_owns_its_volume_alone(rendered):
    auth = rendered["dev"].get("Deployment", "auth")["spec"]
    assert auth["replicas"] == 1
    assert auth["strategy"]["type"] == "Recreate"


# -- NetworkPolicies --------------------------------------------------------------------------


def peers(overlay: Rendered, service: str, port_number: int) -> list[Any]:
    """Who may open a connection to ``service``'s pods on ``port_number``: rules' peers, or ANYONE."""
    labels = overlay.get("Deployment", service)["spec"]["template"]["metadata"]["labels"]
    names = {p["name"]: p["containerPort"] for p in overlay.container(service)["ports"]}
    allowed: list[Any] = []
    for policy in overlay.all("NetworkPolicy"):
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
            continue
        if not matches(spec["podSelector"].get("matchLabels", {}), labels):
            continue
        for rule in spec.get("ingress", []):
            rule_ports = [names.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            if rule_ports and port_number not in rule_ports:
                continue
            allowed.extend(rule["from"] if rule.get("from") else [ANYONE])
    return allowed


def test_ingress_is_denied_by_default(overlay):
    deny = [
        p
        for p in overlay.all("NetworkPolicy")
        if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
    ]
    assert deny, "a NetworkPolicy selecting every pod with no ingress rule"


def test_gateway_is_reachable_from_anywhere_on_grpc_only(overlay):
    assert peers(overlay, "gateway", port(overlay, "gateway", "grpc")) == [ANYONE]
    assert peers(overlay, "gateway", port(overlay, "gateway", "metrics")) == [PROMETHEUS]
    assert peers(overlay, "gateway", 22) == []


@pytest.mark.parametrize("service", UPSTREAMS)
def test_upstreams_accept_only_the_gateway_and_prometheus(overlay, service):
    gateway_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}
    assert peers(overlay, service, port(overlay, service, "grpc")) == [gateway_pods]
    assert peers(overlay, service, port(overlay, service, "metrics")) == [PROMETHEUS]
    for other in (22, *(port(overlay, s, "grpc") for s in SERVICE_NAMES if s != service)):
        assert peers(overlay, service, other) == []


def test_auth_trusts_the_gateways_x_forwarded_for(overlay, monkeypatch):
    """AUTH_TRUSTED_PROXIES must name networks (the pod CIDR) or auth sees the gateway as every client."""
    for name, value in overlay.settings("auth").items():
        monkeypatch.setenv(name, value)
    assert load_settings(settings_class("auth")).trusted_proxies


# -- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_pods_are_annotated_for_prometheus(overlay, service):
    annotations = overlay.get("Deployment", service)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port(overlay, service, "metrics"))
    assert annotations["prometheus.io/path"] == "/metrics"


# -- TLS in prod ----------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_prod_serves_mutual_tls_from_mounted_secrets(rendered, service):
    """Every TLS file a prod service reads is a key of a documented kubernetes.io/tls-style Secret, mounted whole
    (no subPath, so renewals reach the running pod); auth and inference ask for client certificates; the gateway
    presents one to them."""
    prod = rendered["prod"]
    settings, prefix = prod.settings(service), PREFIXES[service]
    files = {name: value for name, value in settings.items() if name.endswith("_FILE") and "TLS" in name}
    expected = {f"{prefix}TLS_CERT_FILE", f"{prefix}TLS_KEY_FILE"}
    expected |= (
        {"GATEWAY_UPSTREAM_TLS_CA_FILE", "GATEWAY_UPSTREAM_TLS_CERT_FILE", "GATEWAY_UPSTREAM_TLS_KEY_FILE"}
        if service == "gateway"
        else {f"{prefix}TLS_CLIENT_CA_FILE"}
    )
    assert set(files) == expected
    spec = prod.pod_spec(service)
    container = prod.container(service)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name, path in files.items():
        folder, _, file_name = path.rpartition("/")
        mount = mounts[folder]
        assert "subPath" not in mount, f"{name}: a subPath mount never sees a renewed Secret"
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] in TLS_SECRETS, name
        assert not secret.get("optional")
        keys = {item["key"]: item["path"] for item in secret["items"]}
        assert keys.get(file_name) == file_name, f"{name}: {file_name} is not a key of {secret['secretName']}"
        assert file_name in TLS_SECRETS[secret["secretName"]]
    assert settings.get(f"{prefix}ENV") == "production", "production: plaintext off loopback would be refused"
    assert f"{prefix}ALLOW_PLAINTEXT" not in settings


def test_the_tls_secrets_are_documented_with_their_keys():
    readme = (DEPLOY / "README.md").read_text()
    table = readme.split("| Secret | keys | used by |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for row in table.splitlines()[2:]:
        cells = row.strip().split("|")
        names, keys = re.findall(r"`([^`]+)`", cells[1]), set(re.findall(r"`([^`]+)`", cells[2]))
        rows.update({name: keys for name in names})
    assert rows == {name: set(keys) for name, keys in TLS_SECRETS.items()}
    assert "cert-manager" in readme


def test_the_grpc_services_no_longer_say_h2c_in_prod(rendered):
    for service in SERVICE_NAMES:
        for service_port in rendered["prod"].get("Service", service)["spec"]["ports"]:
            assert "appProtocol" not in service_port, f"{service}: TLS, not h2c"
