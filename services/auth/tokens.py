"""Access tokens (EdDSA JWTs), the keys that sign them, and opaque tokens.

* :class:`KeyRing` holds the Ed25519 signing key and every public key still accepted, each
  named by its ``kid``: the RFC 7638 JWK thumbprint of the public key, so a key keeps its
  ``kid`` across restarts and hosts. Listing a retired key as a verification key keeps the
  tokens it signed valid until they expire (key rotation).
* :class:`TokenIssuer` issues and verifies short-lived access tokens. Verification pins the
  algorithm to EdDSA and picks the key by ``kid``, so ``alg: none`` and HS256 tokens keyed
  with a public key are refused. Every failure is an :class:`InvalidToken` whose ``reason``
  says why, for the log and the caller's ErrorInfo.
* :func:`new_opaque_token` and :func:`token_digest` make refresh and password-reset tokens:
  256 random bits handed to the user, of which only the SHA-256 digest is stored.

Errors::

    KeyConfigError (ValueError)   no usable signing key, or a key file that cannot be used
    InvalidToken (Exception)      an access token that must not be trusted; .reason says why
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.common.logs import fields

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
GENERATED_KEY_NAME = "signing_key.pem"
DEFAULT_LEEWAY_SECONDS = 5.0
MAX_TOKEN_LENGTH = 8192
"""Longer strings are refused before any parsing: our tokens are a few hundred bytes."""

InvalidTokenReason = Literal["malformed", "expired", "bad_signature", "unknown_key", "invalid_claims"]

_REQUIRED_CLAIMS = ["sub", "name", "roles", "sid", "iat", "nbf", "exp", "iss", "aud", "jti"]


class KeyConfigError(ValueError):
    """The signing or verification keys cannot be set up; the message names the setting."""


class InvalidToken(Exception):
    """An access token that must not be trusted.

    ``reason`` is one of ``malformed``, ``expired``, ``bad_signature`` (wrong key, tampered,
    or not signed with EdDSA at all), ``unknown_key`` (no accepted key has the token's
    ``kid``) and ``invalid_claims`` (wrong issuer or audience, missing or ill-typed claims,
    not valid yet).
    """

    def __init__(self, reason: InvalidTokenReason, detail: str = ""):
        super().__init__(f"invalid access token: {reason}" + (f" ({detail})" if detail else ""))
        self.reason: InvalidTokenReason = reason
        self.detail = detail


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwk_thumbprint(key: Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url without padding) of an Ed25519 public key."""
    # The required members of an OKP key, in lexicographic order, without whitespace (RFC 8037 A.3).
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(_raw_public_bytes(key))}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


class KeyRing:
    """The Ed25519 key that signs access tokens and the public keys that verify them, by ``kid``."""

    def __init__(self, signing_key: Ed25519PrivateKey, verification_keys: Iterable[Ed25519PublicKey] = ()):
        self._signing_key = signing_key
        self._kid = jwk_thumbprint(signing_key.public_key())
        self._verification: dict[str, Ed25519PublicKey] = {self._kid: signing_key.public_key()}
        for key in verification_keys:
            self._verification.setdefault(jwk_thumbprint(key), key)

    @classmethod
    def load(
        cls,
        *,
        signing_key_pem: str | None,
        signing_key_file: Path | None,
        verification_key_files: Sequence[Path],
        data_dir: Path,
        generate_if_missing: bool,
    ) -> KeyRing:
        """Load the keys named by the settings.

        The signing key comes from ``signing_key_pem``, else ``signing_key_file``, else (only
        when ``generate_if_missing``) ``data_dir/signing_key.pem``, generated with mode 0600 on
        first start and reused afterwards. Each verification key file holds a PEM public key
        or a PEM private key (its public half is used).
        """
        if signing_key_pem is not None and signing_key_pem.strip():
            signing_key = _private_key_from_pem(_unescape_pem(signing_key_pem).encode("utf-8"), "AUTH_SIGNING_KEY")
        elif signing_key_file is not None:
            source = f"AUTH_SIGNING_KEY_FILE ({signing_key_file})"
            signing_key = _private_key_from_pem(_read_key_file(signing_key_file, source), source)
        elif generate_if_missing:
            signing_key = _load_or_generate(data_dir / GENERATED_KEY_NAME)
        else:
            raise KeyConfigError(
                "no access-token signing key: set AUTH_SIGNING_KEY (an Ed25519 private key in PEM) "
                "or AUTH_SIGNING_KEY_FILE (the path of a file holding one)"
            )
        verification_keys = [_public_key_from_file(path) for path in verification_key_files]
        return cls(signing_key, verification_keys)

    @property
    def kid(self) -> str:
        """Key ID of the signing key, written in the header of every token it signs."""
        return self._kid

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return self._signing_key

    @property
    def kids(self) -> tuple[str, ...]:
        """Key IDs of every accepted verification key, the signing key's first."""
        return tuple(self._verification)

    def verification_key(self, kid: str) -> Ed25519PublicKey | None:
        """The accepted public key with this ``kid``, or None."""
        return self._verification.get(kid)

    def public_jwks(self) -> dict[str, list[dict[str, str]]]:
        """A JWKS document (RFC 7517) of the verification keys, for verification by other services."""
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": _b64url(_raw_public_bytes(key)),
                    "kid": kid,
                    "alg": ALGORITHM,
                    "use": "sig",
                }
                for kid, key in self._verification.items()
            ]
        }


def _unescape_pem(text: str) -> str:
    # A PEM squeezed into one environment variable line often has literal "\n" sequences.
    return text.replace("\\n", "\n") if "\n" not in text.strip() else text


def _read_key_file(path: Path, source: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise KeyConfigError(f"{source}: cannot read the key file: {error.strerror or error}") from error


def _private_key_from_pem(data: bytes, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyConfigError(f"{source}: not an unencrypted PEM private key ({type(error).__name__})") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyConfigError(f"{source}: the key must be Ed25519, not {type(key).__name__}")
    return key


def _public_key_from_file(path: Path) -> Ed25519PublicKey:
    source = f"AUTH_VERIFICATION_KEY_FILES ({path})"
    data = _read_key_file(path, source)
    if b"PRIVATE KEY-----" in data:
        return _private_key_from_pem(data, source).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise KeyConfigError(f"{source}: not a PEM public or private key ({type(error).__name__})") from error
    if not isinstance(key, Ed25519PublicKey):
        raise KeyConfigError(f"{source}: the key must be Ed25519, not {type(key).__name__}")
    return key


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _load_or_generate(path: Path) -> Ed25519PrivateKey:
    """The key stored at ``path``, generated there (mode 0600) if there is none yet."""
    source = f"generated signing key ({path})"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise KeyConfigError(f"{source}: cannot read the key file: {error.strerror or error}") from error
    else:
        return _private_key_from_pem(data, source)

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Write a complete file under a private name, then link it into place: a process
        # starting at the same moment sees either no key or a whole one, and one key wins.
        staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            with open(staging, "xb", opener=_owner_only) as file:
                file.write(pem)
                file.flush()
                os.fsync(file.fileno())
            os.link(staging, path)
        except FileExistsError:
            return _private_key_from_pem(path.read_bytes(), source)
        finally:
            staging.unlink(missing_ok=True)
    except OSError as error:
        raise KeyConfigError(f"{source}: cannot store the key: {error.strerror or error}") from error
    log.warning(
        "auth.signing_key_generated",
        extra=fields(path=str(path), kid=jwk_thumbprint(key.public_key())),
    )
    return key


@dataclass(frozen=True)
class AccessClaims:
    """What a verified access token says."""

    user_id: str
    username: str
    roles: tuple[str, ...]
    session_id: str
    issued_at: float
    expires_at: float
    token_id: str


class TokenIssuer:
    """Issues and verifies EdDSA access tokens signed by a :class:`KeyRing`."""

    def __init__(
        self,
        keyring: KeyRing,
        *,
        issuer: str,
        audience: str,
        access_ttl_seconds: int,
        leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
    ):
        if access_ttl_seconds <= 0:
            raise ValueError("access_ttl_seconds must be positive")
        self._keyring = keyring
        self._issuer = issuer
        self._audience = audience
        self._ttl = access_ttl_seconds
        self._leeway = leeway_seconds

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    @property
    def access_ttl_seconds(self) -> int:
        return self._ttl

    def issue(
        self,
        *,
        user_id: str,
        username: str,
        roles: Sequence[str],
        session_id: str,
        now: float | None = None,
    ) -> tuple[str, AccessClaims]:
        """A signed access token and the claims it carries. ``now`` (epoch seconds) is for tests."""
        if isinstance(roles, str):
            raise TypeError("roles must be a sequence of role names, not a string")
        issued_at = math.floor(time.time() if now is None else now)
        claims = AccessClaims(
            user_id=user_id,
            username=username,
            roles=tuple(roles),
            session_id=session_id,
            issued_at=float(issued_at),
            expires_at=float(issued_at + self._ttl),
            token_id=secrets.token_urlsafe(16),
        )
        payload: dict[str, Any] = {
            "sub": claims.user_id,
            "name": claims.username,
            "roles": list(claims.roles),
            "sid": claims.session_id,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + self._ttl,
            "iss": self._issuer,
            "aud": self._audience,
            "jti": claims.token_id,
        }
        token = jwt.encode(payload, self._keyring.signing_key, algorithm=ALGORITHM, headers={"kid": self._keyring.kid})
        return token, claims

    def verify(self, token: str, *, now: float | None = None) -> AccessClaims:
        """The claims of a valid token, else :class:`InvalidToken`. ``now`` (epoch seconds) is for tests."""
        current = time.time() if now is None else now
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("malformed", "empty or oversized")
        if not _canonical(token):
            raise InvalidToken("malformed", "not in canonical compact form")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken("malformed", "unreadable header") from error
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("bad_signature", "not signed with EdDSA")
        kid = header.get("kid")
        key = self._keyring.verification_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("unknown_key", "no accepted key has this kid")
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                # PyJWT checks the time claims against the clock (with the leeway); a test's `now` is
                # checked below instead, by the same rules.
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_exp": now is None,
                    "verify_nbf": now is None,
                    "verify_iat": now is None,
                    "strict_aud": True,
                },
                leeway=self._leeway,
            )
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError) as error:
            raise InvalidToken("bad_signature") from error
        except jwt.ExpiredSignatureError as error:
            raise InvalidToken("expired") from error
        except jwt.DecodeError as error:
            raise InvalidToken("malformed", "unreadable payload") from error
        except jwt.PyJWTError as error:
            raise InvalidToken("invalid_claims", str(error)) from error
        return self._claims(payload, current)

    def _claims(self, payload: dict[str, Any], now: float) -> AccessClaims:
        times: dict[str, float] = {}
        for name in ("iat", "nbf", "exp"):
            value = payload[name]
            try:  # a JSON number may be any size: 1e400 is inf, 10**400 does not fit a float
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise TypeError(name)
                times[name] = float(value)
            except (TypeError, OverflowError):
                raise InvalidToken("invalid_claims", f"{name} is not a usable time") from None
            if not math.isfinite(times[name]) or abs(times[name]) > _LATEST_TIME:
                raise InvalidToken("invalid_claims", f"{name} is not a usable time")
        if now >= times["exp"] + self._leeway:
            raise InvalidToken("expired")
        if times["nbf"] > now + self._leeway or times["iat"] > now + self._leeway:
            raise InvalidToken("invalid_claims", "not valid yet")
        strings = {name: payload[name] for name in ("sub", "name", "sid", "jti")}
        for name, value in strings.items():
            if not isinstance(value, str) or not value:
                raise InvalidToken("invalid_claims", f"{name} is not a non-empty string")
        roles = payload["roles"]
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise InvalidToken("invalid_claims", "roles is not a list of strings")
        return AccessClaims(
            user_id=strings["sub"],
            username=strings["name"],
            roles=tuple(roles),
            session_id=strings["sid"],
            issued_at=float(times["iat"]),
            expires_at=float(times["exp"]),
            token_id=strings["jti"],
        )


_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: any later "time" is not one


def _canonical(token: str) -> bool:
    """Three unpadded base64url segments, each exactly as re-encoding its bytes gives it back.

    Base64 decoders accept padding and ignore stray low bits, so one token has many spellings;
    only the one this service writes is accepted."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(part) for part in parts):
        return False
    try:
        return all(_b64url(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) == part for part in parts)
    except ValueError:
        return False


def new_opaque_token() -> str:
    """A fresh opaque token: 32 random bytes, URL-safe base64 without padding (43 characters)."""
    return _b64url(secrets.token_bytes(32))


def token_digest(token: str) -> str:
    """SHA-256 (hex) of an opaque token, the only form stored.

    The tokens carry 256 random bits, so a fast unsalted hash is enough: nothing can be
    guessed, and the digest is a stable lookup key.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


__all__ = [
    "AccessClaims",
    "InvalidToken",
    "InvalidTokenReason",
    "KeyConfigError",
    "KeyRing",
    "TokenIssuer",
    "jwk_thumbprint",
    "new_opaque_token",
    "token_digest",
]
