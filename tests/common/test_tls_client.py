"""A TLS channel to another service (create_channel with ClientCertificates): its certificate re-read when the
files change, later calls on a new connection with it, a stream opened before going on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from services.common.client import create_channel
from services.common.metrics import ClientMetricsInterceptor
from services.common.settings import SettingsError
from services.common.tls import ClientCertificates, PemFile
from tests.certs import CertificateAuthority
from tests.inference.conftest import eventually_async


def _peer_name(context: grpc.aio.ServicerContext) -> bytes:
    return context.auth_context()["x509_common_name"][0]


async def _who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _peer_name(context)


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield _peer_name(context) + b" " + request


@pytest.fixture
async def peer_server(tmp_path: Path) -> AsyncIterator[tuple[int, CertificateAuthority]]:
    """A mutual-TLS server that answers with the common name of the client's certificate."""
    ca = CertificateAuthority()
    issued = ca.issue("server")
    server = grpc.aio.server()
    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(_who),
        "Echo": grpc.stream_stream_rpc_method_handler(_echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Peer", handlers),))
    credentials = grpc.ssl_server_credentials([(issued.key, issued.cert)], ca.pem, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield port, ca
    await server.stop(1)


def files(tmp_path: Path, ca: CertificateAuthority) -> ClientCertificates:
    cert, key = ca.issue("client-1").write(tmp_path / "client", "client")
    return ClientCertificates(
        PemFile(ca.write(tmp_path / "client" / "ca.crt"), "CA"), PemFile(cert, "CERT"), PemFile(key, "KEY")
    )


async def test_a_rotated_client_certificate_is_used_for_later_calls(peer_server, tmp_path):
    port, ca = peer_server
    channel = create_channel(
        f"127.0.0.1:{port}",
        max_message_bytes=1 << 20,
        tracer_provider=TracerProvider(),
        client_metrics=ClientMetricsInterceptor(CollectorRegistry()),
        tls=files(tmp_path, ca),
        tls_server_name="localhost",
    )
    who = channel.unary_unary("/test.Peer/Who")
    echo = channel.stream_stream("/test.Peer/Echo")
    try:
        assert await who(b"", timeout=5) == b"client-1"
        stream = echo()
        await stream.write(b"before")
        assert await stream.read() == b"client-1 before"

        ca.issue("client-2").write(tmp_path / "client", "client")

        async def rotated() -> bool:
            return await who(b"", timeout=5) == b"client-2"

        await eventually_async(rotated, within=10)
        await stream.write(b"after")
        assert await stream.read() == b"client-1 after"  # the stream opened before the rotation goes on
        await stream.done_writing()
    finally:
        await channel.close(1)


def test_bad_client_files_name_their_variable(tmp_path):
    ca = CertificateAuthority()
    cert, key = ca.issue("client").write(tmp_path, "client")
    key.write_bytes(ca.issue("other").key)
    with pytest.raises(SettingsError, match=r"KEY: the key in .* does not match"):
        ClientCertificates(PemFile(ca.write(tmp_path / "ca.crt"), "CA"), PemFile(cert, "CERT"), PemFile(key, "KEY"))
    with pytest.raises(SettingsError, match="CA: cannot read"):
        ClientCertificates(PemFile(tmp_path / "missing.crt", "CA"))
