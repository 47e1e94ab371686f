"""`make certs` (python -m services.devcerts): a CA and certificates that the services accept and serve mutual TLS
with, and tls.env naming real settings."""

from __future__ import annotations

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.settings import env_name
from services.common.tls import PemFile, check_key_pair
from services.devcerts import SERVICES, main
from tests.conftest import SERVICES as SETTINGS


def test_every_certificate_chains_to_the_ca_and_matches_its_key(tmp_path):
    assert main(["--out", str(tmp_path), "--days", "2"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    for name in (*SERVICES, "client"):
        check_key_pair(PemFile(tmp_path / f"{name}.crt", "CERT"), PemFile(tmp_path / f"{name}.key", "KEY"))
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
    assert (tmp_path / "client.key").stat().st_mode & 0o077 == 0


def test_tls_env_names_real_settings_and_existing_files(tmp_path):
    main(["--out", str(tmp_path)])
    known = {env_name(cls, field) for cls, _ in SETTINGS.values() for field in cls.model_fields}
    lines = [line for line in (tmp_path / "tls.env").read_text().splitlines() if not line.startswith("#")]
    for line in lines:
        name, _, value = line.partition("=")
        assert name in known, name
        assert (tmp_path / value.rsplit("/", 1)[1]).exists()


async def test_a_service_serves_mutual_tls_with_them(tmp_path, start_service):
    main(["--out", str(tmp_path / "certs")])
    certs = tmp_path / "certs"
    server = await start_service(
        "auth",
        tls_cert_file=certs / "auth.crt",
        tls_key_file=certs / "auth.key",
        tls_client_ca_file=certs / "ca.crt",
    )
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(), (certs / "client.key").read_bytes(), (certs / "client.crt").read_bytes()
    )
    async with grpc.aio.secure_channel(f"localhost:{server.port}", credentials) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
