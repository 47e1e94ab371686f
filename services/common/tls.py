"""Transport security: certificates checked at start-up and re-read when their files change.

A server's certificate and key (``*_TLS_CERT_FILE``, ``*_TLS_KEY_FILE``) and the CA its clients'
certificates must chain to (``*_TLS_CLIENT_CA_FILE``, mutual TLS) are read and checked before the
server binds: a file that cannot be read, is not PEM, a key that does not match its certificate
or a certificate that has expired (or is not valid yet) is a :class:`SettingsError` naming the
variable, so start-up stops with one clear line.

gRPC asks for the server's certificate configuration on every new connection
(:func:`grpc.dynamic_ssl_server_credentials`); :class:`ServerCertificates` answers from a stat of
the files, and reads them again only when one changed (size, mtime or inode: Kubernetes swaps a
mounted Secret's symlink). A changed set that does not check out (a certificate written before its
key) is logged and the last good one served on, so a rotation never takes the port down. Open
connections keep the certificate they were made with; new ones get the new one.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.logs import fields
from services.common.settings import ServiceSettings, SettingsError, env_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PemFile:
    """A PEM file and the environment variable that names it (for error messages)."""

    path: Path
    variable: str

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as error:
            raise SettingsError(f"{self.variable}: cannot read {self.path}: {error.strerror}") from None

    def signature(self) -> tuple[int, int, int] | None:
        try:
            found = os.stat(self.path)  # follows symlinks: a Secret volume's ..data swap changes the inode
        except OSError:
            return None
        return (found.st_mtime_ns, found.st_size, found.st_ino)


def load_certificates(pem: bytes, source: PemFile) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SettingsError(f"{source.variable}: {source.path} holds no PEM certificate") from None
    return certificates


def check_key_pair(cert: PemFile, key: PemFile, now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """The PEM certificate chain and key, read and checked; :class:`SettingsError` naming the variable."""
    cert_pem, key_pem = cert.read(), key.read()
    leaf = load_certificates(cert_pem, cert)[0]
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise SettingsError(f"{key.variable}: {key.path} holds no unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private_key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise SettingsError(f"{key.variable}: the key in {key.path} does not match the certificate in {cert.path}")
    now = now or datetime.datetime.now(datetime.UTC)
    if now > leaf.not_valid_after_utc:
        raise SettingsError(f"{cert.variable}: the certificate in {cert.path} expired at {leaf.not_valid_after_utc}")
    if now < leaf.not_valid_before_utc:
        raise SettingsError(
            f"{cert.variable}: the certificate in {cert.path} is not valid before {leaf.not_valid_before_utc}"
        )
    return cert_pem, key_pem


def check_ca(ca: PemFile) -> bytes:
    pem = ca.read()
    load_certificates(pem, ca)
    return pem


class ServerCertificates:
    """A server's certificate, key and (optionally) client CA, served by gRPC and re-read when they change."""

    def __init__(self, cert: PemFile, key: PemFile, client_ca: PemFile | None):
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._seen = self._signature()
        self._configuration = self._load()  # SettingsError at start-up
        self.reloads = 0

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ServerCertificates | None:
        """The server's certificates, or None for a plaintext port."""
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        settings_cls = type(settings)
        client_ca = None
        if settings.tls_client_ca_file is not None:
            client_ca = PemFile(settings.tls_client_ca_file, env_name(settings_cls, "tls_client_ca_file"))
        return cls(
            PemFile(settings.tls_cert_file, env_name(settings_cls, "tls_cert_file")),
            PemFile(settings.tls_key_file, env_name(settings_cls, "tls_key_file")),
            client_ca,
        )

    @property
    def mutual(self) -> bool:
        return self._client_ca is not None

    def _files(self) -> tuple[PemFile, ...]:
        return (self._cert, self._key) if self._client_ca is None else (self._cert, self._key, self._client_ca)

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(pem.signature() for pem in self._files())

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_pem, key_pem = check_key_pair(self._cert, self._key)
        root = check_ca(self._client_ca) if self._client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=root)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration, self._fetch, require_client_authentication=self.mutual
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC for each new connection: a new configuration, or None to keep the current one."""
        try:
            with self._lock:
                signature = self._signature()
                if signature == self._seen:
                    return None
                self._seen = signature  # a bad set is reported once, not on every connection
                try:
                    configuration = self._load()
                except SettingsError as error:
                    log.warning("tls.reload_failed", extra=fields(error=str(error), kept="the previous certificate"))
                    return None
                self._configuration = configuration
                self.reloads += 1
                log.info("tls.reloaded", extra=fields(cert_file=str(self._cert.path)))
                return configuration
        except Exception:  # never let an exception cross into gRPC's handshake
            log.exception("tls.reload_failed")
            return None


class ClientCertificates:
    """What a channel to another service trusts (a CA) and, for mutual TLS, the certificate it presents.

    :meth:`poll` re-reads the files when one changed and returns new credentials, or None (unchanged, or a
    changed set that does not check out: logged, the previous one kept).
    """

    def __init__(self, ca: PemFile, cert: PemFile | None = None, key: PemFile | None = None):
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key")
        self._ca, self._cert, self._key = ca, cert, key
        self._lock = threading.Lock()
        self._seen = self._signature()
        self._credentials = self._load()  # SettingsError at start-up

    def _files(self) -> tuple[PemFile, ...]:
        return (self._ca,) if self._cert is None or self._key is None else (self._ca, self._cert, self._key)

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(pem.signature() for pem in self._files())

    def _load(self) -> grpc.ChannelCredentials:
        root = check_ca(self._ca)
        if self._cert is None or self._key is None:
            return grpc.ssl_channel_credentials(root)
        cert_pem, key_pem = check_key_pair(self._cert, self._key)
        return grpc.ssl_channel_credentials(root, key_pem, cert_pem)

    @property
    def credentials(self) -> grpc.ChannelCredentials:
        return self._credentials

    def poll(self) -> grpc.ChannelCredentials | None:
        with self._lock:
            signature = self._signature()
            if signature == self._seen:
                return None
            self._seen = signature
            try:
                self._credentials = self._load()
            except SettingsError as error:
                log.warning("tls.reload_failed", extra=fields(error=str(error), kept="the previous certificate"))
                return None
            log.info("tls.reloaded", extra=fields(ca_file=str(self._ca.path)))
            return self._credentials
