"""Access tokens and keys with real Ed25519 keys: issuing, verification, rotation, and attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.auth.tokens import (
    AccessClaims,
    InvalidToken,
    KeyConfigError,
    KeyRing,
    TokenIssuer,
    jwk_thumbprint,
    new_opaque_token,
    token_digest,
)

ISSUER = "ml-platform-auth"
AUDIENCE = "ml-platform"
TTL = 900
NOW = 1_750_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load(tmp_path: Path, **overrides: object) -> KeyRing:
    arguments: dict[str, object] = {
        "signing_key_pem": None,
        "signing_key_file": None,
        "verification_key_files": [],
        "data_dir": tmp_path / "data",
        "generate_if_missing": False,
    }
    arguments.update(overrides)
    return KeyRing.load(**arguments)  # type: ignore[arg-type]


def make_issuer(keyring: KeyRing, *, issuer: str = ISSUER, audience: str = AUDIENCE) -> TokenIssuer:
    return TokenIssuer(keyring, issuer=issuer, audience=audience, access_ttl_seconds=TTL)


def issue(issuer: TokenIssuer, now: float = NOW) -> str:
    token, _ = issuer.issue(user_id="u-1", username="alice", roles=["user"], session_id="s-1", now=now)
    return token


def valid_payload(now: float = NOW) -> dict[str, object]:
    return {
        "sub": "u-1",
        "name": "alice",
        "roles": ["admin"],
        "sid": "s-1",
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + TTL,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "jti": "forged",
    }


def assemble(header: dict[str, object], payload: dict[str, object], signature: bytes = b"") -> tuple[str, bytes]:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(signature)}", signing_input.encode()


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing(Ed25519PrivateKey.generate())


@pytest.fixture
def issuer(keyring: KeyRing) -> TokenIssuer:
    return make_issuer(keyring)


def reason_of(issuer: TokenIssuer, token: str, now: float = NOW) -> str:
    with pytest.raises(InvalidToken) as caught:
        issuer.verify(token, now=now)
    return caught.value.reason


def test_issue_and_verify_round_trip(issuer: TokenIssuer, keyring: KeyRing) -> None:
    token, issued = issuer.issue(
        user_id="u-42", username="alice", roles=("user", "admin"), session_id="s-7", now=NOW + 0.75
    )

    verified = issuer.verify(token, now=NOW + 60)

    assert verified == issued
    assert verified == AccessClaims(
        user_id="u-42",
        username="alice",
        roles=("user", "admin"),
        session_id="s-7",
        issued_at=NOW,
        expires_at=NOW + TTL,
        token_id=issued.token_id,
    )
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == keyring.kid
    payload = json.loads(b64url_decode(token.split(".")[1]))
    assert payload == {
        "sub": "u-42",
        "name": "alice",
        "roles": ["user", "admin"],
        "sid": "s-7",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + TTL,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "jti": issued.token_id,
    }
    _, again = issuer.issue(user_id="u-42", username="alice", roles=(), session_id="s-7", now=NOW)
    assert again.token_id != issued.token_id


def test_verify_without_now_uses_the_clock(issuer: TokenIssuer) -> None:
    token, issued = issuer.issue(user_id="u-1", username="alice", roles=[], session_id="s-1")

    assert issuer.verify(token) == issued


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 8037, appendix A.3: the thumbprint of the example Ed25519 key.
    public = Ed25519PublicKey.from_public_bytes(b64url_decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"))
    private = Ed25519PrivateKey.from_private_bytes(b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"))

    assert jwk_thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert KeyRing(private).kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_kid_is_stable_across_loads_of_the_same_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(private_pem(key))

    first = load(tmp_path, signing_key_file=key_file)
    second = load(tmp_path, signing_key_file=key_file)
    from_env = load(tmp_path, signing_key_pem=private_pem(key).decode())
    from_one_line_env = load(tmp_path, signing_key_pem=private_pem(key).decode().replace("\n", "\\n"))

    assert first.kid == second.kid == from_env.kid == from_one_line_env.kid == jwk_thumbprint(key.public_key())
    assert make_issuer(second).verify(issue(make_issuer(first)), now=NOW).user_id == "u-1"


def test_signing_key_pem_wins_over_the_file(tmp_path: Path) -> None:
    from_env, from_file = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(private_pem(from_file))

    keyring = load(tmp_path, signing_key_pem=private_pem(from_env).decode(), signing_key_file=key_file)

    assert keyring.kid == jwk_thumbprint(from_env.public_key())


def test_key_is_generated_on_first_load_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"

    first = load(tmp_path, data_dir=data_dir, generate_if_missing=True)
    key_file = data_dir / "signing_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(path.name for path in data_dir.iterdir()) == ["signing_key.pem"]
    second = load(tmp_path, data_dir=data_dir, generate_if_missing=True)

    assert second.kid == first.kid
    assert make_issuer(second).verify(issue(make_issuer(first)), now=NOW).user_id == "u-1"


def test_concurrent_first_loads_agree_on_one_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    with ThreadPoolExecutor(max_workers=8) as pool:
        keyrings = list(pool.map(lambda _: load(tmp_path, data_dir=data_dir, generate_if_missing=True), range(16)))

    assert len({keyring.kid for keyring in keyrings}) == 1
    assert sorted(path.name for path in data_dir.iterdir()) == ["signing_key.pem"]


def test_no_key_and_no_generation_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError) as caught:
        load(tmp_path, signing_key_pem="  ", generate_if_missing=False)

    assert isinstance(caught.value, ValueError)
    assert "AUTH_SIGNING_KEY " in str(caught.value)
    assert "AUTH_SIGNING_KEY_FILE" in str(caught.value)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key", "not an unencrypted PEM private key"),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "must be Ed25519",
        ),
        (
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
            "not an unencrypted PEM private key",
        ),
    ],
    ids=["garbage", "ec-key", "encrypted"],
)
def test_unusable_signing_key_file_is_a_config_error(tmp_path: Path, content: bytes, message: str) -> None:
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(content)

    with pytest.raises(KeyConfigError, match=message) as caught:
        load(tmp_path, signing_key_file=key_file)

    assert "AUTH_SIGNING_KEY_FILE" in str(caught.value)


def test_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="AUTH_SIGNING_KEY_FILE"):
        load(tmp_path, signing_key_file=tmp_path / "absent.pem")
    with pytest.raises(KeyConfigError, match="AUTH_VERIFICATION_KEY_FILES"):
        load(tmp_path, generate_if_missing=True, verification_key_files=[tmp_path / "absent.pem"])


@pytest.mark.parametrize("listed_as", ["public", "private"])
def test_rotation_keeps_tokens_of_listed_old_keys(tmp_path: Path, listed_as: str) -> None:
    old_key = Ed25519PrivateKey.generate()
    old_token = issue(make_issuer(KeyRing(old_key)))
    old_file = tmp_path / "old.pem"
    old_file.write_bytes(public_pem(old_key) if listed_as == "public" else private_pem(old_key))

    rotated = load(tmp_path, generate_if_missing=True, verification_key_files=[old_file])
    not_listed = load(tmp_path, generate_if_missing=True)

    assert rotated.kid == not_listed.kid != jwk_thumbprint(old_key.public_key())
    assert make_issuer(rotated).verify(old_token, now=NOW).username == "alice"
    assert reason_of(make_issuer(not_listed), old_token) == "unknown_key"
    new_token = issue(make_issuer(rotated))
    assert jwt.get_unverified_header(new_token)["kid"] == rotated.kid
    assert rotated.kids == (rotated.kid, jwk_thumbprint(old_key.public_key()))


def test_public_jwks_verifies_tokens_elsewhere(tmp_path: Path, issuer: TokenIssuer, keyring: KeyRing) -> None:
    old_key = Ed25519PrivateKey.generate()
    rotated = KeyRing(keyring.signing_key, [old_key.public_key(), keyring.signing_key.public_key()])

    document = rotated.public_jwks()

    assert [entry["kid"] for entry in document["keys"]] == [keyring.kid, jwk_thumbprint(old_key.public_key())]
    for entry in document["keys"]:
        assert entry.keys() == {"kty", "crv", "x", "kid", "alg", "use"}
        assert (entry["kty"], entry["crv"], entry["alg"], entry["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
        assert "d" not in entry
    key_set = jwt.PyJWKSet.from_dict(json.loads(json.dumps(document)))
    token = issue(issuer, now=0)
    payload = jwt.decode(
        token,
        key=key_set[keyring.kid],
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False},
    )
    assert payload["sub"] == "u-1"


def test_expired_token(issuer: TokenIssuer) -> None:
    token = issue(issuer, now=NOW)

    assert issuer.verify(token, now=NOW + TTL + 4).user_id == "u-1"  # within the clock-skew leeway
    assert reason_of(issuer, token, now=NOW + TTL + 5) == "expired"
    assert reason_of(issuer, token, now=NOW + 86400) == "expired"


def test_token_from_the_future_is_refused(issuer: TokenIssuer) -> None:
    token = issue(issuer, now=NOW)

    assert issuer.verify(token, now=NOW - 4).user_id == "u-1"  # within the clock-skew leeway
    assert reason_of(issuer, token, now=NOW - 60) == "invalid_claims"


def test_tampered_payload_is_a_bad_signature(issuer: TokenIssuer) -> None:
    header, payload, signature = issue(issuer).split(".")
    claims = json.loads(b64url_decode(payload))
    claims["roles"] = ["admin"]
    tampered = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"

    assert reason_of(issuer, tampered) == "bad_signature"


def test_tampered_signature_is_a_bad_signature(issuer: TokenIssuer) -> None:
    header, payload, signature = issue(issuer).split(".")
    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01

    assert reason_of(issuer, f"{header}.{payload}.{b64url(bytes(raw))}") == "bad_signature"


def test_other_key_with_forged_kid_is_a_bad_signature(issuer: TokenIssuer, keyring: KeyRing) -> None:
    attacker = Ed25519PrivateKey.generate()
    forged = jwt.encode(valid_payload(), attacker, algorithm="EdDSA", headers={"kid": keyring.kid})

    assert reason_of(issuer, forged) == "bad_signature"


def test_other_key_with_its_own_kid_is_an_unknown_key(issuer: TokenIssuer) -> None:
    attacker = KeyRing(Ed25519PrivateKey.generate())

    assert reason_of(issuer, issue(make_issuer(attacker))) == "unknown_key"


def test_token_without_kid_is_an_unknown_key(issuer: TokenIssuer, keyring: KeyRing) -> None:
    token = jwt.encode(valid_payload(), keyring.signing_key, algorithm="EdDSA")

    assert reason_of(issuer, token) == "unknown_key"


def test_alg_none_is_refused(issuer: TokenIssuer, keyring: KeyRing) -> None:
    unsigned, _ = assemble({"alg": "none", "typ": "JWT", "kid": keyring.kid}, valid_payload())

    with pytest.raises(InvalidToken):
        issuer.verify(unsigned, now=NOW)
    for alg in ("None", "NONE", ""):
        variant, _ = assemble({"alg": alg, "kid": keyring.kid}, valid_payload())
        with pytest.raises(InvalidToken):
            issuer.verify(variant, now=NOW)


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.Raw], ids=["pem", "raw"])
def test_hs256_with_the_public_key_as_secret_is_refused(
    issuer: TokenIssuer, keyring: KeyRing, encoding: serialization.Encoding
) -> None:
    # The classic algorithm-confusion attack: HMAC keyed with the (public) verification key.
    public_format = (
        serialization.PublicFormat.SubjectPublicKeyInfo
        if encoding is serialization.Encoding.PEM
        else serialization.PublicFormat.Raw
    )
    secret = keyring.signing_key.public_key().public_bytes(encoding, public_format)
    _, signing_input = assemble({"alg": "HS256", "typ": "JWT", "kid": keyring.kid}, valid_payload())
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    forged = f"{signing_input.decode()}.{b64url(signature)}"

    with pytest.raises(InvalidToken):
        issuer.verify(forged, now=NOW)


@pytest.mark.parametrize(("field", "value"), [("issuer", "someone-else"), ("audience", "another-platform")])
def test_wrong_issuer_or_audience_is_invalid_claims(keyring: KeyRing, field: str, value: str) -> None:
    stranger = make_issuer(keyring, **{field: value})
    token = issue(stranger)

    assert reason_of(make_issuer(keyring), token) == "invalid_claims"


@pytest.mark.parametrize(
    "change",
    [
        {"aud": [AUDIENCE, "other"]},
        {"roles": "admin"},
        {"sub": 42},
        {"exp": "later"},
        {"sid": None},
        {"jti": ""},
    ],
    ids=["audience-list", "roles-string", "sub-number", "exp-string", "sid-missing", "jti-empty"],
)
def test_ill_formed_claims_are_invalid_claims(issuer: TokenIssuer, keyring: KeyRing, change: dict[str, object]) -> None:
    payload = valid_payload()
    payload.update(change)
    payload = {name: value for name, value in payload.items() if value is not None}
    token = jwt.encode(payload, keyring.signing_key, algorithm="EdDSA", headers={"kid": keyring.kid})

    assert reason_of(issuer, token) == "invalid_claims"


@pytest.mark.parametrize(
    "garbage",
    ["", "garbage", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.!!!.???", "x" * 10_000, "€.€.€"],
    ids=["empty", "word", "three-parts", "dots", "bad-base64", "huge", "non-ascii"],
)
def test_garbage_is_malformed(issuer: TokenIssuer, garbage: str) -> None:
    assert reason_of(issuer, garbage) == "malformed"


def test_signed_non_json_payload_is_malformed(issuer: TokenIssuer, keyring: KeyRing) -> None:
    token = jwt.api_jws.encode(b"not json", keyring.signing_key, algorithm="EdDSA", headers={"kid": keyring.kid})

    assert reason_of(issuer, token) == "malformed"


def test_opaque_tokens() -> None:
    tokens = {new_opaque_token() for _ in range(1000)}

    assert len(tokens) == 1000
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        assert len(b64url_decode(token)) == 32
    token = next(iter(tokens))
    digest = token_digest(token)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == token_digest(token) == hashlib.sha256(token.encode()).hexdigest()
    assert len({token_digest(token) for token in tokens}) == 1000


def signed(key: Ed25519PrivateKey, kid: str, payload: dict[str, object]) -> str:
    """A token signed with the real key, whatever its claims say."""
    token, signing_input = assemble({"alg": "EdDSA", "typ": "JWT", "kid": kid}, payload)
    return token + b64url(key.sign(signing_input))


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", [10**400, -(10**400), 1e308, 10**18], ids=["huge", "minus-huge", "1e308", "1e18"])
@pytest.mark.parametrize("clock", ["injected", "pyjwt"])
def test_absurd_time_claims_are_invalid_not_a_crash(claim: str, value: object, clock: str) -> None:
    key = Ed25519PrivateKey.generate()
    ring = KeyRing(key)
    issuer = make_issuer(ring)
    now = time.time() if clock == "pyjwt" else NOW
    token = signed(key, ring.kid, {**valid_payload(now), claim: value})
    with pytest.raises(InvalidToken) as caught:
        issuer.verify(token, now=None if clock == "pyjwt" else now)
    assert caught.value.reason in ("invalid_claims", "expired", "malformed")


def test_only_the_canonical_spelling_of_a_token_is_accepted(issuer: TokenIssuer) -> None:
    token = issue(issuer)
    assert issuer.verify(token, now=NOW).user_id == "u-1"
    header, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(signature[-1])  # 64 bytes in 86 characters: the last one has 4 unused low bits
    sibling = alphabet[(index & ~0xF) | ((index + 1) & 0xF)]
    assert b64url_decode(signature[:-1] + sibling) == b64url_decode(signature)
    for variant in (
        token + "==",
        token + "=",
        f"{header}=.{payload}.{signature}",
        f"{header}.{payload}.{signature[:-1]}{sibling}",  # same bytes, other trailing bits
        f" {token}",
        token.replace("-", "+").replace("_", "/"),
    ):
        if variant == token:
            continue
        assert reason_of(issuer, variant) == "malformed", variant
