"""Password-reset delivery through a real local SMTP server (aiosmtpd) and the outbox file."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import socket
import stat
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope
from pydantic import SecretStr

from services.auth.notifier import DeliveryError, OutboxNotifier, SmtpNotifier, build_notifier
from services.auth.settings import AuthSettings
from services.auth.tokens import new_opaque_token
from tests.auth.conftest import REFUSED, Collector

SENDER = "no-reply@ml-platform.test"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def smtp_notifier(port: int) -> SmtpNotifier:
    return SmtpNotifier("127.0.0.1", port, SENDER, None, None, starttls=False, timeout=5.0)


def parse(envelope: Envelope) -> EmailMessage:
    assert isinstance(envelope.content, bytes)
    message = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def test_smtp_delivers_the_reset_mail(
    smtp_server: tuple[Collector, int], caplog: pytest.LogCaptureFixture
) -> None:
    collector, port = smtp_server
    token = new_opaque_token()
    caplog.set_level(logging.DEBUG, logger="services")

    await smtp_notifier(port).send_password_reset(
        email="alice@example.com", username="alice", token=token, expires_in_seconds=1800
    )

    [envelope] = collector.envelopes
    assert envelope.mail_from == SENDER
    assert envelope.rcpt_tos == ["alice@example.com"]
    message = parse(envelope)
    assert message["To"] == "alice@example.com"
    assert message["From"] == SENDER
    assert message["Subject"] == "Reset your password"
    assert message["Message-ID"].endswith("@ml-platform.test>")
    assert message.get_content_type() == "text/plain"
    body = message.get_content()
    assert token in body
    assert "alice" in body
    assert "30 minutes" in body
    ours = [record for record in caplog.records if record.name.startswith("services.")]
    assert [record.getMessage() for record in ours] == ["notifier.sent"]
    assert all(token not in repr(vars(record)) for record in ours)


async def test_smtp_refused_recipient_is_a_delivery_error(smtp_server: tuple[Collector, int]) -> None:
    collector, port = smtp_server
    token = new_opaque_token()

    with pytest.raises(DeliveryError) as caught:
        await smtp_notifier(port).send_password_reset(email=REFUSED, username="x", token=token, expires_in_seconds=60)

    assert token not in str(caught.value)
    assert collector.envelopes == []


async def test_smtp_to_a_closed_port_is_a_delivery_error(closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    token = new_opaque_token()
    caplog.set_level(logging.DEBUG, logger="services")

    with pytest.raises(DeliveryError) as caught:
        await smtp_notifier(closed_port).send_password_reset(
            email="alice@example.com", username="alice", token=token, expires_in_seconds=1800
        )

    assert token not in str(caught.value)
    assert token not in repr(caught.value)
    assert f"127.0.0.1:{closed_port}" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    ours = [record for record in caplog.records if record.name.startswith("services.")]
    assert [record.getMessage() for record in ours] == ["notifier.failed"]
    assert all(token not in repr(vars(record)) for record in ours)


async def test_header_injection_is_a_delivery_error(smtp_server: tuple[Collector, int]) -> None:
    collector, port = smtp_server

    with pytest.raises(DeliveryError):
        await smtp_notifier(port).send_password_reset(
            email="alice@example.com\r\nBcc: eve@example.com", username="alice", token="t", expires_in_seconds=60
        )

    assert collector.envelopes == []


async def test_outbox_writes_a_private_json_line(tmp_path: Path) -> None:
    path = tmp_path / "data" / "auth" / "outbox.jsonl"
    token = new_opaque_token()

    await OutboxNotifier(path).send_password_reset(
        email="alice@example.com", username="alice", token=token, expires_in_seconds=3600
    )

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [line] = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert record.keys() == {"ts", "to", "subject", "body"}
    assert record["to"] == "alice@example.com"
    assert record["subject"] == "Reset your password"
    assert token in record["body"]
    assert "1 hour" in record["body"]
    assert record["ts"].endswith("+00:00")


async def test_outbox_concurrent_sends_produce_intact_lines(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    notifier = OutboxNotifier(path)
    tokens = [new_opaque_token() for _ in range(50)]

    await asyncio.gather(
        *(
            notifier.send_password_reset(
                email=f"user{index}@example.com", username=f"user{index}", token=token, expires_in_seconds=600
            )
            for index, token in enumerate(tokens)
        )
    )

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 50
    records = [json.loads(line) for line in lines]
    delivered = {record["to"]: record["body"] for record in records}
    assert len(delivered) == 50
    for index, token in enumerate(tokens):
        assert token in delivered[f"user{index}@example.com"]


def test_build_notifier_picks_smtp_when_a_host_is_set(tmp_path: Path) -> None:
    smtp = build_notifier(
        AuthSettings(data_dir=tmp_path, smtp_host="mail.example.com", smtp_password=SecretStr("secret"))
    )
    outbox = build_notifier(AuthSettings(data_dir=tmp_path))

    assert isinstance(smtp, SmtpNotifier)
    assert isinstance(outbox, OutboxNotifier)
    assert outbox.path == tmp_path / "outbox.jsonl"


async def test_built_smtp_notifier_delivers(smtp_server: tuple[Collector, int], tmp_path: Path) -> None:
    collector, port = smtp_server
    settings = AuthSettings(
        data_dir=tmp_path, smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=False, smtp_sender=SENDER
    )

    await build_notifier(settings).send_password_reset(
        email="bob@example.com", username="bob", token="tok", expires_in_seconds=90
    )

    [envelope] = collector.envelopes
    assert envelope.rcpt_tos == ["bob@example.com"]
    assert "90 seconds" in parse(envelope).get_content()
