"""The whole stack over TLS and mutual TLS (a CA made here): register, login and inference through the gateway
with grpc, tritonclient (ssl=True) and grpcurl (-cacert, -cert/-key), and errors and trace IDs unchanged."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from auth.v1 import auth_pb2 as auth_pb

from services.common.errors import TRACE_ID_KEY
from services.common.settings import SettingsError, load_settings
from services.gateway.app import build_server as build_gateway
from services.gateway.settings import GatewaySettings
from services.inference import codec
from tests.auth.conftest import PASSWORD
from tests.certs import CertificateAuthority
from tests.gateway.conftest import bearer
from tests.inference.conftest import triton
from tests.rpc import details, rpc_error, violations

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
IRIS = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)


@dataclass
class Pki:
    ca: CertificateAuthority
    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.ca.write(self.folder / "ca.crt")

    def server(self, service: str, *, mutual: bool, **names: Any) -> dict[str, Path]:
        cert, key = self.ca.issue(service, **names).write(self.folder, service)
        files = {"tls_cert_file": cert, "tls_key_file": key}
        if mutual:
            files["tls_client_ca_file"] = self.ca_file
        return files

    def client(self, name: str) -> tuple[Path, Path]:
        return self.ca.issue(name).write(self.folder, name)


async def start_tls_platform(start_platform, tmp_path: Path, *, mutual: bool, models=("iris",)):
    pki = Pki(CertificateAuthority(), tmp_path / "pki")
    # Upstream certificates carry only an internal name, which the gateway is told to check for.
    internal = {"names": ("upstream.internal",), "ips": ()}
    gateway: dict[str, Any] = {
        **pki.server("gateway", mutual=mutual),
        "upstream_tls_ca_file": pki.ca_file,
        "upstream_tls_server_name": "upstream.internal",
    }
    user_cert = user_key = None
    if mutual:
        gateway["upstream_tls_cert_file"], gateway["upstream_tls_key_file"] = pki.client("gateway-client")
        user_cert, user_key = pki.client("user")
    credentials = grpc.ssl_channel_credentials(
        pki.ca.pem,
        user_key.read_bytes() if user_key else None,
        user_cert.read_bytes() if user_cert else None,
    )
    platform = await start_platform(
        models=models,
        auth=pki.server("auth", mutual=mutual, **internal),
        inference=pki.server("inference", mutual=mutual, **internal),
        client_credentials=credentials,
        **gateway,
    )
    ssl: dict[str, str] = {"root_certificates": str(pki.ca_file)}
    if user_cert and user_key:
        ssl |= {"certificate_chain": str(user_cert), "private_key": str(user_key)}
    return platform, ssl


async def check_the_stack(platform, ssl: dict[str, str], grpcurl: str, logs) -> None:
    token = await platform.user_token("tess")
    request = codec.make_infer_request("iris", {"input": ("FP32", IRIS)})
    answer = await platform.infer.ModelInfer(request, timeout=30, metadata=bearer(token))
    assert answer.model_name == "iris"

    # Error details and the trace ID cross both TLS hops unchanged.
    call = platform.accounts.Register(
        auth_pb.RegisterRequest(username="x", email="not an email", password="short"),
        timeout=10,
        metadata=(("traceparent", TRACEPARENT),),
    )
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error)
    assert details(error)["ErrorInfo"].domain == "auth"
    assert dict(error.trailing_metadata())[TRACE_ID_KEY] == TRACE_ID
    assert any(line["service"] == "auth" and line["trace_id"] == TRACE_ID for line in logs.events("rpc.finished"))

    url, headers = platform.address, {"authorization": f"Bearer {token}"}
    infer = {
        "url": url,
        "ssl": ssl,
        "action": "infer",
        "model": "iris",
        "headers": headers,
        "inputs": [{"name": "input", "datatype": "FP32", "data": IRIS.tolist()}],
        "outputs": ["label"],
        "timeout": 30,
    }
    ready, inferred = await asyncio.to_thread(triton, [{**infer, "action": "ready"}, infer])
    assert ready == {"ready": True}
    assert inferred["outputs"]["label"]["data"] == [0], inferred  # setosa

    tls_flags = ["-cacert", ssl["root_certificates"]]
    if "certificate_chain" in ssl:
        tls_flags += ["-cert", ssl["certificate_chain"], "-key", ssl["private_key"]]
    listed = await asyncio.to_thread(
        subprocess.run, [grpcurl, *tls_flags, url, "list"], capture_output=True, text=True, timeout=30, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert "auth.v1.AuthService" in listed.stdout.split()
    login = json.dumps({"username": "tess", "password": PASSWORD})
    called = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, *tls_flags, "-d", login, url, "auth.v1.AuthService/Login"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["access_token"]


async def test_the_stack_over_tls(start_platform, tmp_path, grpcurl, logs):
    platform, ssl = await start_tls_platform(start_platform, tmp_path, mutual=False)
    await check_the_stack(platform, ssl, grpcurl, logs)


async def test_the_stack_over_mutual_tls(start_platform, tmp_path, grpcurl, logs):
    platform, ssl = await start_tls_platform(start_platform, tmp_path, mutual=True)
    await check_the_stack(platform, ssl, grpcurl, logs)
    # Without a client certificate the gateway refuses at the handshake; so does auth to anyone but the gateway.
    no_cert = {**ssl}
    no_cert.pop("certificate_chain")
    no_cert.pop("private_key")
    refused = await asyncio.to_thread(
        triton, {"url": platform.address, "ssl": no_cert, "action": "live", "model": "iris"}
    )
    assert refused["error"]["status"] == "StatusCode.UNAVAILABLE", refused
    direct = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-cacert", ssl["root_certificates"], f"127.0.0.1:{platform.auth.port}", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert direct.returncode != 0


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"GATEWAY_UPSTREAM_TLS_CERT_FILE": "c.crt"},
            "GATEWAY_UPSTREAM_TLS_KEY_FILE is required when GATEWAY_UPSTREAM_TLS_CERT_FILE is set",
        ),
        (
            {"GATEWAY_UPSTREAM_TLS_KEY_FILE": "c.key"},
            "GATEWAY_UPSTREAM_TLS_CERT_FILE is required when GATEWAY_UPSTREAM_TLS_KEY_FILE is set",
        ),
        (
            {"GATEWAY_UPSTREAM_TLS_CERT_FILE": "c.crt", "GATEWAY_UPSTREAM_TLS_KEY_FILE": "c.key"},
            "GATEWAY_UPSTREAM_TLS_CERT_FILE needs GATEWAY_UPSTREAM_TLS_CA_FILE",
        ),
        (
            {"GATEWAY_UPSTREAM_TLS_SERVER_NAME": "auth.internal"},
            "GATEWAY_UPSTREAM_TLS_SERVER_NAME needs GATEWAY_UPSTREAM_TLS_CA_FILE",
        ),
    ],
)
def test_upstream_tls_settings_without_their_partner_are_refused(given, message, monkeypatch):
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings(GatewaySettings)


async def test_a_bad_upstream_file_stops_start_up_naming_its_variable(tmp_path):
    pki = Pki(CertificateAuthority(), tmp_path / "pki")
    cert, key = pki.client("gateway-client")
    cert.write_bytes(pki.ca.issue("someone else").cert)
    for overrides, message in (
        ({"upstream_tls_ca_file": tmp_path / "missing.crt"}, "GATEWAY_UPSTREAM_TLS_CA_FILE: cannot read"),
        (
            {"upstream_tls_ca_file": pki.ca_file, "upstream_tls_cert_file": cert, "upstream_tls_key_file": key},
            "GATEWAY_UPSTREAM_TLS_KEY_FILE: the key in .* does not match",
        ),
    ):
        with pytest.raises(SettingsError, match=message):
            await build_gateway(GatewaySettings(host="127.0.0.1", port=0, metrics_port=0, **overrides))
