"""TLS and mutual TLS on the gRPC port (a CA made here), the plaintext health port, certificate reload,
and the settings that stop start-up."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth import AuthSettings
from services.auth import build_server as build_auth
from services.common.settings import SettingsError, load_settings
from services.gateway import GatewaySettings
from tests.auth.conftest import auth_settings
from tests.certs import CertificateAuthority, Issued
from tests.inference.conftest import eventually_async
from tests.rpc import rpc_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def tls_files(tmp_path: Path, ca: CertificateAuthority, *, mutual: bool = False) -> dict[str, Path]:
    cert, key = ca.issue("auth").write(tmp_path / "tls", "server")
    files = {"tls_cert_file": cert, "tls_key_file": key}
    if mutual:
        files["tls_client_ca_file"] = ca.write(tmp_path / "tls" / "ca.crt")
    return files


def credentials(ca: CertificateAuthority, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca.pem)
    return grpc.ssl_channel_credentials(ca.pem, client.key, client.cert)


async def health_check(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def check_over(port: int, creds: grpc.ChannelCredentials | None, **options: str) -> int:
    target = f"127.0.0.1:{port}"
    channel_options = [(f"grpc.{name}", value) for name, value in options.items()]
    async with (
        grpc.aio.secure_channel(target, creds, options=channel_options)
        if creds is not None
        else grpc.aio.insecure_channel(target)
    ) as channel:
        return await health_check(channel)


def served_certificate(port: int, ca: CertificateAuthority, client: Issued | None, tmp_path: Path) -> x509.Certificate:
    """The certificate the server presents to a new connection (Python's ssl, ALPN h2 like gRPC)."""
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.set_alpn_protocols(["h2"])
    if client is not None:
        cert, key = client.write(tmp_path / "probe", "client")
        context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_tls_port_serves_tls_only_and_the_health_port_plaintext(start_service, tmp_path, ca, logs):
    server = await start_service("auth", health_port=0, **tls_files(tmp_path, ca))
    assert await check_over(server.port, credentials(ca)) == SERVING
    assert await check_over(server.health_port, None) == SERVING
    error = await rpc_error(check_over(server.port, None))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    [started] = logs.events("server.started")
    assert started["transport"] == "tls"
    assert started["health_port"] == server.health_port


async def test_the_health_port_serves_health_only_and_follows_readiness(start_service, tmp_path, ca):
    server = await start_service("auth", health_port=0, **tls_files(tmp_path, ca))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        assert await health_check(channel, "readiness") == SERVING
        await server.set_ready(False)
        assert await health_check(channel, "readiness") == NOT_SERVING
        reflection = channel.unary_unary("/auth.v1.AuthService/Login")
        error = await rpc_error(reflection(b"", timeout=5))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_mutual_tls_accepts_a_client_of_its_ca_and_refuses_others(start_service, tmp_path, ca):
    server = await start_service("auth", **tls_files(tmp_path, ca, mutual=True))
    assert await check_over(server.port, credentials(ca, ca.issue("client"))) == SERVING
    stranger = CertificateAuthority("another CA").issue("client")
    for refused in (credentials(ca), credentials(ca, stranger)):
        error = await rpc_error(check_over(server.port, refused))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_wrong_server_name_or_an_unknown_ca_is_refused_by_the_client(start_service, tmp_path, ca):
    server = await start_service("auth", **tls_files(tmp_path, ca))
    error = await rpc_error(check_over(server.port, credentials(ca), ssl_target_name_override="other.example"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    error = await rpc_error(check_over(server.port, credentials(CertificateAuthority("another CA"))))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert await check_over(server.port, credentials(ca), ssl_target_name_override="localhost") == SERVING


async def test_a_replaced_certificate_is_served_to_new_connections_and_open_streams_go_on(
    start_service, tmp_path, ca, logs
):
    files = tls_files(tmp_path, ca, mutual=True)
    server = await start_service("auth", **files)
    client = ca.issue("client")
    first = await asyncio.to_thread(served_certificate, server.port, ca, client, tmp_path)
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials(ca, client)) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"))
        assert (await watch.read()).status == SERVING

        ca.issue("auth, rotated").write(tmp_path / "tls", "server")

        async def rotated() -> bool:
            served = await asyncio.to_thread(served_certificate, server.port, ca, client, tmp_path)
            return served.serial_number != first.serial_number

        await eventually_async(rotated, within=10)
        await server.set_ready(False)
        assert (await watch.read()).status == NOT_SERVING  # the stream opened before the rotation goes on
        assert await health_check(channel, "readiness") == NOT_SERVING
        watch.cancel()
    assert logs.events("tls.reloaded")


async def test_a_half_written_rotation_keeps_the_previous_certificate(start_service, tmp_path, ca, logs):
    files = tls_files(tmp_path, ca)
    server = await start_service("auth", **files)
    files["tls_cert_file"].write_bytes(ca.issue("auth, new").cert)  # its key is not there yet
    assert await check_over(server.port, credentials(ca)) == SERVING
    [failed] = logs.events("tls.reload_failed")
    assert "AUTH_TLS_KEY_FILE" in failed["error"]


# -- settings that stop start-up --------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"AUTH_TLS_CERT_FILE": "a.crt"}, "AUTH_TLS_KEY_FILE is required when AUTH_TLS_CERT_FILE is set"),
        ({"AUTH_TLS_KEY_FILE": "a.key"}, "AUTH_TLS_CERT_FILE is required when AUTH_TLS_KEY_FILE is set"),
        ({"AUTH_TLS_CLIENT_CA_FILE": "ca.crt"}, "AUTH_TLS_CLIENT_CA_FILE needs AUTH_TLS_CERT_FILE"),
    ],
)
def test_one_file_without_the_other_is_refused(given, message, monkeypatch):
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings(AuthSettings)


def _expired(ca: CertificateAuthority) -> Issued:
    return ca.issue("auth", valid_from=datetime.timedelta(days=-2), valid_for=datetime.timedelta(days=1))


def _not_yet(ca: CertificateAuthority) -> Issued:
    return ca.issue("auth", valid_from=datetime.timedelta(days=1))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing cert", r"AUTH_TLS_CERT_FILE: cannot read .*server\.crt"),
        ("missing key", r"AUTH_TLS_KEY_FILE: cannot read .*server\.key"),
        ("missing ca", r"AUTH_TLS_CLIENT_CA_FILE: cannot read .*ca\.crt"),
        ("not a certificate", "AUTH_TLS_CERT_FILE: .* holds no PEM certificate"),
        ("not a key", "AUTH_TLS_KEY_FILE: .* holds no unencrypted PEM private key"),
        ("ca not a certificate", "AUTH_TLS_CLIENT_CA_FILE: .* holds no PEM certificate"),
        ("key of another certificate", "AUTH_TLS_KEY_FILE: the key in .* does not match the certificate"),
        ("expired", "AUTH_TLS_CERT_FILE: the certificate in .* expired at"),
        ("not valid yet", "AUTH_TLS_CERT_FILE: the certificate in .* is not valid before"),
    ],
)
async def test_a_bad_file_stops_start_up_naming_its_variable(case, message, tmp_path, ca):
    files = tls_files(tmp_path, ca, mutual=True)
    cert, key, client_ca = files["tls_cert_file"], files["tls_key_file"], files["tls_client_ca_file"]
    if case == "missing cert":
        cert.unlink()
    elif case == "missing key":
        key.unlink()
    elif case == "missing ca":
        client_ca.unlink()
    elif case == "not a certificate":
        cert.write_bytes(b"hello\n")
    elif case == "not a key":
        key.write_bytes(ca.pem)
    elif case == "ca not a certificate":
        client_ca.write_bytes(b"")
    elif case == "key of another certificate":
        key.write_bytes(ca.issue("other").key)
    elif case == "expired":
        _expired(ca).write(tmp_path / "tls", "server")
    elif case == "not valid yet":
        _not_yet(ca).write(tmp_path / "tls", "server")
    with pytest.raises(SettingsError, match=message):
        await build_auth(auth_settings(tmp_path / "auth", **files))


# -- production refuses plaintext off loopback -----------------------------------------------


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        ({"GATEWAY_HOST": "0.0.0.0"}, True),  # noqa: S104
        ({"GATEWAY_HOST": "10.0.0.7"}, True),
        ({"GATEWAY_HOST": "gateway.internal"}, True),
        ({"GATEWAY_HOST": "0.0.0.0", "GATEWAY_ALLOW_PLAINTEXT": "true"}, False),  # noqa: S104
        ({"GATEWAY_HOST": "127.0.0.1"}, False),
        ({"GATEWAY_HOST": "::1"}, False),
        ({"GATEWAY_HOST": "localhost"}, False),
        ({"GATEWAY_HOST": "0.0.0.0", "GATEWAY_TLS_CERT_FILE": "a.crt", "GATEWAY_TLS_KEY_FILE": "a.key"}, False),  # noqa: S104
    ],
)
def test_production_refuses_plaintext_off_loopback_unless_allowed(given, refused, monkeypatch):
    monkeypatch.setenv("GATEWAY_ENV", "production")
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    if refused:
        with pytest.raises(
            SettingsError, match=r"plaintext is refused when GATEWAY_ENV=production .*GATEWAY_ALLOW_PLAINTEXT=true"
        ):
            load_settings(GatewaySettings)
    else:
        load_settings(GatewaySettings)


def test_development_serves_plaintext_anywhere(monkeypatch):
    monkeypatch.setenv("GATEWAY_HOST", "0.0.0.0")  # noqa: S104
    assert load_settings(GatewaySettings).plaintext_off_loopback


# -- HTTPS on the metrics port ----------------------------------------------------------------


def fetch(url: str, ca: CertificateAuthority | None = None) -> tuple[int, x509.Certificate | None]:
    context = ssl.create_default_context(cadata=ca.pem.decode()) if ca is not None else None
    with urllib.request.urlopen(url, timeout=5, context=context) as response:  # noqa: S310  (our own test URL)
        sock = response.fp.raw._sock  # the connection's socket, for the served certificate
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        return response.status, x509.load_der_x509_certificate(der) if der else None


async def test_the_metrics_port_serves_https_and_rereads_its_certificate(start_service, tmp_path, ca, logs):
    cert, key = ca.issue("metrics").write(tmp_path / "metrics", "metrics")
    server = await start_service("auth", metrics_tls_cert_file=cert, metrics_tls_key_file=key)
    url = f"https://localhost:{server.metrics_port}/metrics"
    status, first = await asyncio.to_thread(fetch, url, ca)
    assert status == 200
    with pytest.raises(http.client.RemoteDisconnected):  # plain HTTP gets no answer
        await asyncio.to_thread(fetch, f"http://localhost:{server.metrics_port}/metrics")
    ca.issue("metrics, rotated").write(tmp_path / "metrics", "metrics")

    async def rotated() -> bool:
        _, served = await asyncio.to_thread(fetch, url, ca)
        return served is not None and first is not None and served.serial_number != first.serial_number

    await eventually_async(rotated, within=10)
    assert logs.events("server.started")[0]["metrics_scheme"] == "https"


def test_metrics_tls_without_its_partner_is_refused(monkeypatch):
    monkeypatch.setenv("AUTH_METRICS_TLS_CERT_FILE", "m.crt")
    with pytest.raises(SettingsError, match="AUTH_METRICS_TLS_KEY_FILE is required when AUTH_METRICS_TLS_CERT_FILE"):
        load_settings(AuthSettings)


async def test_a_bad_metrics_key_stops_start_up_naming_its_variable(tmp_path, ca):
    cert, key = ca.issue("metrics").write(tmp_path / "metrics", "metrics")
    key.write_bytes(ca.issue("other").key)
    with pytest.raises(SettingsError, match=r"AUTH_METRICS_TLS_KEY_FILE: the key in .* does not match"):
        await build_auth(auth_settings(tmp_path / "auth", metrics_tls_cert_file=cert, metrics_tls_key_file=key))


@pytest.mark.parametrize(
    ("module", "env", "variable"),
    [
        (
            "inference",
            {"INFERENCE_TLS_CERT_FILE": "/nonexistent/tls.crt", "INFERENCE_TLS_KEY_FILE": "/nonexistent/tls.key"},
            "INFERENCE_TLS_CERT_FILE",
        ),
        ("gateway", {"GATEWAY_ENV": "production", "GATEWAY_HOST": "0.0.0.0"}, "GATEWAY_ALLOW_PLAINTEXT"),  # noqa: S104
    ],
)
def test_the_entry_point_exits_2_naming_the_variable(module, env, variable):
    done = subprocess.run(
        [sys.executable, "-m", f"services.{module}"],
        env={"PATH": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert variable in done.stderr
    assert "Traceback" not in done.stderr
