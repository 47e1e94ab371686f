"""Delivery of password-reset tokens to the account owner.

:class:`SmtpNotifier` mails them; :class:`OutboxNotifier` appends them to a JSON-lines file
that an operator reads (development, or deployments without mail). :func:`build_notifier`
picks one from the settings. Both do their blocking I/O in a worker thread.

The token is the secret the mail exists to carry: it goes into the message body and nowhere
else (not in logs, not in error messages).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import smtplib
import ssl
import threading
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Protocol

from services.auth.settings import AuthSettings
from services.common.logs import fields

log = logging.getLogger(__name__)

RESET_SUBJECT = "Reset your password"


class DeliveryError(Exception):
    """A message could not be delivered. The message never contains the token."""


class Notifier(Protocol):
    async def send_password_reset(self, *, email: str, username: str, token: str, expires_in_seconds: int) -> None:
        """Deliver a password-reset token to ``email``; :class:`DeliveryError` if that fails."""
        ...


def _duration(seconds: int) -> str:
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def reset_body(*, username: str, token: str, expires_in_seconds: int) -> str:
    """Plain-text body of the password-reset message."""
    return (
        f"Hello {username},\n"
        "\n"
        "A password reset was requested for your ML platform account.\n"
        "Your password-reset token is:\n"
        "\n"
        f"    {token}\n"
        "\n"
        f"It can be used once and expires in {_duration(expires_in_seconds)}.\n"
        "If you did not ask for a reset, ignore this message: your password stays unchanged.\n"
    )


class SmtpNotifier:
    """Sends password-reset mails through an SMTP server (STARTTLS when ``starttls``)."""

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        username: str | None,
        password: str | None,
        starttls: bool,
        timeout: float = 10.0,
    ):
        self._host = host
        self._port = port
        self._sender = sender
        self._username = username
        self._password = password
        self._starttls = starttls
        self._timeout = timeout

    async def send_password_reset(self, *, email: str, username: str, token: str, expires_in_seconds: int) -> None:
        body = reset_body(username=username, token=token, expires_in_seconds=expires_in_seconds)
        try:
            message = self._message(email, body)
        except ValueError as error:  # a header with a line break, for one
            raise DeliveryError(f"cannot address a password-reset mail to {email!r}") from error
        try:
            await asyncio.to_thread(self._send, message)
        except (smtplib.SMTPException, OSError) as error:
            log.warning(
                "notifier.failed",
                extra=fields(
                    transport="smtp", to=email, server=f"{self._host}:{self._port}", error=type(error).__name__
                ),
            )
            raise DeliveryError(
                f"password-reset mail to {email} not delivered via {self._host}:{self._port}: {type(error).__name__}"
            ) from error
        log.info("notifier.sent", extra=fields(transport="smtp", to=email, kind="password_reset"))

    def _message(self, recipient: str, body: str) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = recipient
        message["Subject"] = RESET_SUBJECT
        message["Date"] = formatdate(usegmt=True)
        domain = self._sender.rpartition("@")[2] or None
        message["Message-ID"] = make_msgid(domain=domain)
        message.set_content(body)
        return message

    def _send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self._host, self._port, timeout=self._timeout) as smtp:
            if self._starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self._username is not None:
                smtp.login(self._username, self._password or "")
            smtp.send_message(message)


class OutboxNotifier:
    """Appends each message as one JSON line ``{"ts", "to", "subject", "body"}`` to a 0600 file."""

    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    async def send_password_reset(self, *, email: str, username: str, token: str, expires_in_seconds: int) -> None:
        record = {
            "ts": dt.datetime.now(tz=dt.UTC).isoformat(timespec="milliseconds"),
            "to": email,
            "subject": RESET_SUBJECT,
            "body": reset_body(username=username, token=token, expires_in_seconds=expires_in_seconds),
        }
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as error:
            log.warning("notifier.failed", extra=fields(transport="outbox", to=email, error=type(error).__name__))
            raise DeliveryError(f"cannot write the outbox file {self._path}: {error.strerror or error}") from error
        log.info("notifier.sent", extra=fields(transport="outbox", to=email, kind="password_reset"))

    def _append(self, line: bytes) -> None:
        with self._lock:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)


def build_notifier(settings: AuthSettings) -> Notifier:
    """SMTP when ``AUTH_SMTP_HOST`` is set, else the outbox file ``<data_dir>/outbox.jsonl``."""
    if settings.smtp_host:
        return SmtpNotifier(
            settings.smtp_host,
            settings.smtp_port,
            settings.smtp_sender,
            settings.smtp_username,
            settings.smtp_password.get_secret_value() if settings.smtp_password is not None else None,
            settings.smtp_starttls,
        )
    return OutboxNotifier(settings.data_dir / "outbox.jsonl")


__all__ = [
    "DeliveryError",
    "Notifier",
    "OutboxNotifier",
    "SmtpNotifier",
    "build_notifier",
    "reset_body",
]
