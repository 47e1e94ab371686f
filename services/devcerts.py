"""``python -m services.devcerts`` (``make certs``): a development CA and certificates, for TLS on one machine.

Writes into ``certs/`` (git-ignored; ``--out`` elsewhere), each file replaced:

    ca.crt, ca.key                      the development CA (trust ca.crt in clients)
    gateway.crt/.key, auth.crt/.key,    one per service, for localhost, 127.0.0.1 and ::1 (server and client
    inference.crt/.key                  use: the gateway presents gateway.crt to auth and inference)
    client.crt/.key                     a client certificate for grpcurl, tritonclient and scripts (mutual TLS)
    tls.env                             every service's TLS settings with mutual TLS, for ``set -a; . certs/tls.env``

Keys are ECDSA P-256, certificates valid for ``--days`` (default 30). Development only: the CA key sits beside
the certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("gateway", "auth", "inference")
NAMES = ("localhost",)
ADDRESSES = ("127.0.0.1", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    partial = path.with_name(path.name + ".new")
    partial.write_bytes(data)
    if private:
        partial.chmod(0o600)
    os.replace(partial, path)  # a running service never reads half a file


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ml-platform development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ml-platform development CA"))
        .issuer_name(_name("ml-platform development CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, days: int, *, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in (*NAMES, common_name)]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ADDRESSES]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(ca_key, hashes.SHA256())
    return cert, key


def env_file(out: Path) -> str:
    """Mutual TLS on every service and the gateway's upstream calls, from the files in ``out``."""
    ca = out / "ca.crt"
    lines = ["# Written by `make certs`: mutual TLS between everything on this machine. set -a; . certs/tls.env"]
    for service in SERVICES:
        prefix = service.upper()
        lines += [
            f"{prefix}_TLS_CERT_FILE={out / f'{service}.crt'}",
            f"{prefix}_TLS_KEY_FILE={out / f'{service}.key'}",
            f"{prefix}_TLS_CLIENT_CA_FILE={ca}",
        ]
    lines += [
        f"GATEWAY_UPSTREAM_TLS_CA_FILE={ca}",
        f"GATEWAY_UPSTREAM_TLS_CERT_FILE={out / 'gateway.crt'}",
        f"GATEWAY_UPSTREAM_TLS_KEY_FILE={out / 'gateway.key'}",
    ]
    return "\n".join(lines) + "\n"


def write_certificates(out: Path, days: int = 30) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca, ca_key = make_ca(days)
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "ca.key", _key_pem(ca_key), private=True)
    for name, server in (*((service, True) for service in SERVICES), ("client", False)):
        cert, key = issue(ca, ca_key, name, days, server=server)
        _write(out / f"{name}.key", _key_pem(key), private=True)
        _write(out / f"{name}.crt", cert.public_bytes(pem))
    _write(out / "tls.env", env_file(out.resolve()).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("certs"), help="folder to write into (default: certs)")
    parser.add_argument("--days", type=int, default=30, help="validity of every certificate (default: 30)")
    args = parser.parse_args(argv)
    write_certificates(args.out, args.days)
    print(f"wrote a development CA and certificates for {', '.join(SERVICES)} and a client to {args.out}/")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
