"""Password hashing, the password policy and the thread pool that hashes off the event loop.

Stored hash formats (``scheme`` name on the left)::

    argon2                 $argon2id$v=19$m=19456,t=2,p=1$<salt>$<digest>    every new hash (PHC string)
    sha256                 <64 hex digits>                                    legacy, unsalted
    sha256_salted          sha256$<salt>$<64 hex digits>                      legacy, salted
    argon2_sha256_wrapped  $sha256-argon2$<salt>$<argon2id PHC string>        legacy hash wrapped at rest

The legacy formats come from the old system: ``sha256`` is ``sha256(password).hexdigest()``
(either case), ``sha256_salted`` is ``sha256(salt + password).hexdigest()`` (UTF-8).

The wrapped format is ours. So that no fast hash stays at rest, ``PasswordHasher.wrap_legacy``
replaces a legacy hash, without knowing the password, by::

    "$sha256-argon2$" + salt + "$" + argon2id(legacy hex digest)

``salt`` is the legacy salt (empty for the unsalted form: ``sha256(password)`` is
``sha256("" + password)``), so an unsalted wrap reads ``$sha256-argon2$$$argon2id$v=19$...``.
The inner PHC string starts with ``$``; the first ``$`` after the salt separates the two (a legacy
salt never holds ``$``). Verifying computes the legacy hex digest (lower case) of the password with
that salt and argon2-verifies it against the inner hash.

The legacy and wrapped schemes are passlib handlers registered as *deprecated* in a
``CryptContext`` whose default is argon2id with the profile's cost, so ``verify_and_update``
migrates silently: a successful verification of a legacy or wrapped hash, or of an argon2 hash
whose type or cost differs from the current profile, returns a fresh argon2id hash to store.

Passwords are normalised with NFKC (``normalize``) before hashing and before verifying, so a
password set in one Unicode form verifies when typed in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib.resources
import logging
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple

import passlib.utils.handlers as uh  # type: ignore[import-untyped]
from passlib import exc as passlib_exc
from passlib.context import CryptContext  # type: ignore[import-untyped]
from passlib.hash import argon2  # type: ignore[import-untyped]
from passlib.utils import to_unicode

from services.auth import reasons
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.logs import fields

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

SCHEME_ARGON2 = "argon2"
SCHEME_SHA256 = "sha256"
SCHEME_SHA256_SALTED = "sha256_salted"
SCHEME_WRAPPED = "argon2_sha256_wrapped"
SCHEME_UNKNOWN = "unknown"

_LEGACY_SCHEMES = (SCHEME_SHA256, SCHEME_SHA256_SALTED)
#: Characters a legacy salt may hold: printable ASCII except the ``$`` separator.
_SALT_CHARS = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != "$")


# -- cost profiles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HashProfile:
    """argon2id cost parameters."""

    name: str
    memory_kib: int
    time_cost: int
    parallelism: int

    def __post_init__(self) -> None:
        if self.parallelism < 1 or self.time_cost < 1:
            raise ValueError("argon2 time cost and parallelism must be at least 1")
        if self.memory_kib < 8 * self.parallelism:
            raise ValueError("argon2 memory must be at least 8 KiB per lane (8 * parallelism)")


#: OWASP's argon2id minimum (Password Storage Cheat Sheet): 19 MiB, 2 iterations, 1 lane.
PRODUCTION = HashProfile("production", memory_kib=19456, time_cost=2, parallelism=1)
#: The cheapest parameters argon2 accepts: for tests and local development only.
DEVELOPMENT = HashProfile("development", memory_kib=8, time_cost=1, parallelism=1)

_PROFILES = {profile.name: profile for profile in (PRODUCTION, DEVELOPMENT)}


def resolve_profile(
    name: str, *, memory_kib: int | None = None, time_cost: int | None = None, parallelism: int | None = None
) -> HashProfile:
    """The named profile with any explicit override applied; ValueError for an unknown name or bad cost."""
    try:
        profile = _PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown hash profile {name!r} (expected one of {sorted(_PROFILES)})") from None
    return dataclasses.replace(
        profile,
        memory_kib=profile.memory_kib if memory_kib is None else memory_kib,
        time_cost=profile.time_cost if time_cost is None else time_cost,
        parallelism=profile.parallelism if parallelism is None else parallelism,
    )


# -- passlib handlers of the legacy and wrapped schemes -----------------------------------------


def _legacy_hex(salt: str, secret: str | bytes) -> str:
    """The old system's digest: ``sha256((salt + password).encode()).hexdigest()``."""
    data = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hashlib.sha256(salt.encode("utf-8") + data).hexdigest()


class _LegacySha256(uh.StaticHandler):  # type: ignore[misc]
    """Legacy unsalted SHA-256: 64 hex digits, either case."""

    name = SCHEME_SHA256
    checksum_size = 64
    checksum_chars = uh.LOWER_HEX_CHARS
    _hash_regex = re.compile(r"\A[0-9a-fA-F]{64}\Z")

    @classmethod
    def _norm_hash(cls, hash: str) -> str:
        return hash.lower()

    def _calc_checksum(self, secret: str | bytes) -> str:
        return _legacy_hex("", secret)


class _LegacySaltedSha256(uh.HasSalt, uh.GenericHandler):  # type: ignore[misc]
    """Legacy salted SHA-256: ``sha256$<salt>$<hex>``, hex = sha256(salt + password)."""

    name = SCHEME_SHA256_SALTED
    ident = "sha256$"
    setting_kwds = ("salt", "salt_size")
    checksum_size = 64
    checksum_chars = uh.LOWER_HEX_CHARS
    salt_chars = _SALT_CHARS
    default_salt_size = 16

    @classmethod
    def from_string(cls, hash: str | bytes) -> _LegacySaltedSha256:
        salt, checksum = uh.parse_mc2(hash, cls.ident, handler=cls)
        return cls(salt=salt, checksum=checksum.lower() if checksum else None)

    def to_string(self) -> str:
        return str(uh.render_mc2(self.ident, self.salt, self.checksum))

    def _calc_checksum(self, secret: str | bytes) -> str:
        return _legacy_hex(self.salt, secret)


class _WrappedLegacy(uh.GenericHandler):  # type: ignore[misc]
    """``$sha256-argon2$<salt>$<argon2id PHC string>``: argon2id over a legacy hex digest.

    ``checksum`` holds the inner argon2id hash. ``inner`` is the argon2id handler that new wraps
    use; ``with_inner`` binds it to a profile.
    """

    name = SCHEME_WRAPPED
    ident = "$sha256-argon2$"
    setting_kwds = ()
    inner: Any = argon2.using(type="ID")

    def __init__(self, salt: str = "", **kwds: Any) -> None:
        super().__init__(**kwds)
        self.salt = salt

    @classmethod
    def with_inner(cls, inner: Any) -> type[_WrappedLegacy]:
        return type(cls.__name__, (cls,), {"inner": inner, "__module__": cls.__module__})

    @classmethod
    def from_string(cls, hash: str | bytes, **context: Any) -> _WrappedLegacy:
        text = to_unicode(hash, "ascii", "hash")
        if not text.startswith(cls.ident):
            raise passlib_exc.InvalidHashError(cls)
        salt, separator, inner = text[len(cls.ident) :].partition("$")
        if not separator or not inner.startswith("$argon2id$") or any(c not in _SALT_CHARS for c in salt):
            raise passlib_exc.MalformedHashError(cls)
        return cls(salt=salt, checksum=inner, **context)

    def to_string(self) -> str:
        return f"{self.ident}{self.salt}${self.checksum}"

    @classmethod
    def wrap(cls, salt: str, hexdigest: str) -> str:
        """The wrapped form of a legacy digest made with ``salt``."""
        return cls(salt=salt, checksum=cls.inner.hash(hexdigest.lower())).to_string()

    @classmethod
    def hash(cls, secret: str | bytes, **kwds: Any) -> str:
        # passlib's API; PasswordHasher never makes new hashes in this deprecated scheme.
        uh.validate_secret(secret)
        return cls.wrap("", _legacy_hex("", secret))

    @classmethod
    def verify(cls, secret: str | bytes, hash: str | bytes, **context: Any) -> bool:
        uh.validate_secret(secret)
        parsed = cls.from_string(hash)
        return bool(cls.inner.verify(_legacy_hex(parsed.salt, secret), parsed.checksum))


# -- hashing ------------------------------------------------------------------------------------


class PasswordHasher:
    """argon2id for every new hash; verifies (and migrates) the legacy and wrapped schemes.

    Every method is CPU-bound: call them through ``HashPool.run``.
    """

    def __init__(self, profile: HashProfile) -> None:
        self._profile = profile
        self._argon2 = argon2.using(
            type="ID", memory_cost=profile.memory_kib, rounds=profile.time_cost, parallelism=profile.parallelism
        )
        self._wrapped = _WrappedLegacy.with_inner(self._argon2)
        self._context = CryptContext(
            schemes=[self._argon2, _LegacySha256, _LegacySaltedSha256, self._wrapped],
            default=SCHEME_ARGON2,
            deprecated=[*_LEGACY_SCHEMES, SCHEME_WRAPPED],
        )

    @property
    def profile(self) -> HashProfile:
        return self._profile

    def hash(self, password: str) -> str:
        """A new argon2id hash of ``password`` (already checked and normalised by the policy)."""
        return str(self._context.hash(password))

    def verify_and_update(self, password: str, stored: str) -> tuple[bool, str | None]:
        """``(ok, new hash or None)``; the new hash replaces ``stored`` when it is legacy, wrapped or
        argon2 with another cost than the profile's. An unknown or malformed ``stored`` fails.

        A failure against a fast legacy hash, an over-long password or an unusable ``stored`` also
        runs ``dummy_verify``, so that these take about as long as a wrong password for an argon2 hash.
        """
        scheme = self.scheme(stored)
        if scheme == SCHEME_UNKNOWN:
            self.dummy_verify()
            return False, None
        try:
            ok, new_hash = self._context.verify_and_update(password, stored)
        except passlib_exc.PasswordSizeError:
            self.dummy_verify()
            return False, None
        except ValueError:
            log.warning("password.malformed_hash", extra=fields(scheme=scheme))
            self.dummy_verify()
            return False, None
        if not ok:
            if scheme in _LEGACY_SCHEMES:
                self.dummy_verify()
            return False, None
        return True, None if new_hash is None else str(new_hash)

    def dummy_verify(self) -> None:
        """Spend the time of one verification, for a username that does not exist."""
        self._context.dummy_verify()

    def scheme(self, stored: str) -> str:
        """One of ``argon2``, ``sha256``, ``sha256_salted``, ``argon2_sha256_wrapped``, ``unknown``."""
        name = self._context.identify(stored, required=False)
        return SCHEME_UNKNOWN if name is None else str(name)

    def wrap_legacy(self, stored: str) -> str | None:
        """The wrapped form of a legacy (either SHA-256 form) hash; None for anything else."""
        scheme = self.scheme(stored)
        if scheme == SCHEME_SHA256:
            return self._wrapped.wrap("", stored)
        if scheme == SCHEME_SHA256_SALTED:
            try:
                parsed = _LegacySaltedSha256.from_string(stored)
            except ValueError:
                return None
            if parsed.checksum is None:
                return None
            return self._wrapped.wrap(str(parsed.salt), str(parsed.checksum))
        return None


# -- policy -------------------------------------------------------------------------------------


def normalize(password: str) -> str:
    """NFKC, as the policy applies before hashing; login applies it before verifying."""
    return unicodedata.normalize("NFKC", password)


def _read_password_list(lines: Iterable[str]) -> frozenset[str]:
    entries = (line.strip() for line in lines)
    return frozenset(normalize(entry).casefold() for entry in entries if entry and not entry.startswith("#"))


@functools.cache
def load_common_passwords() -> frozenset[str]:
    """The bundled list (``common_passwords.txt``), case-folded; read once."""
    text = importlib.resources.files("services.auth").joinpath("common_passwords.txt").read_text("utf-8")
    return _read_password_list(text.splitlines())


class PasswordPolicy:
    """NIST SP 800-63B 3.1.1.2: length bounds and a blocklist, no composition rules.

    ``check`` refuses, in this order: more than ``max_length`` characters (before any other work, so
    a 1 MiB string costs nothing), empty, then on the NFKC form: more than ``4 * max_length`` UTF-8
    bytes (NFKC can expand a character into many), fewer than ``min_length`` characters, control
    characters (Unicode category Cc) or lone surrogates, a common password (case-insensitive), and a
    password that contains the username (case-insensitive, usernames of 3+ characters).
    Messages never repeat the password.
    """

    def __init__(
        self, min_length: int = 12, max_length: int = 128, common_passwords: frozenset[str] | None = None
    ) -> None:
        if not 1 <= min_length <= max_length:
            raise ValueError("password lengths must satisfy 1 <= min_length <= max_length")
        self.min_length = min_length
        self.max_length = max_length
        self.max_bytes = 4 * max_length
        self._common = load_common_passwords() if common_passwords is None else _read_password_list(common_passwords)

    def check(self, password: str, *, username: str = "", field: str = "password") -> str:
        """The NFKC-normalised password to hash; InvalidArgument with a violation on ``field`` if refused."""

        def refuse(description: str, reason: str) -> InvalidArgument:
            return InvalidArgument(description, violations=[(field, description)], reason=reason)

        too_long = f"password must be at most {self.max_length} characters"
        if len(password) > self.max_length:
            raise refuse(too_long, reasons.PASSWORD_TOO_LONG)
        if not password:
            raise refuse("password is required", reasons.FIELD_REQUIRED)
        normalised = normalize(password)
        if len(normalised.encode("utf-8", "surrogatepass")) > self.max_bytes:
            raise refuse(too_long, reasons.PASSWORD_TOO_LONG)
        if len(normalised) < self.min_length:
            raise refuse(f"password must be at least {self.min_length} characters", reasons.PASSWORD_TOO_SHORT)
        categories = {unicodedata.category(char) for char in normalised}
        if "Cc" in categories:
            raise refuse("password must not contain control characters", reasons.PASSWORD_INVALID_CHARACTERS)
        if "Cs" in categories:
            raise refuse("password must be valid Unicode text", reasons.PASSWORD_INVALID_CHARACTERS)
        folded = normalised.casefold()
        if folded in self._common:
            raise refuse("password is too common; choose a longer or less predictable one", reasons.PASSWORD_TOO_COMMON)
        name = normalize(username).casefold()
        if len(name) >= 3 and name in folded:
            raise refuse("password must not contain the username", reasons.PASSWORD_CONTAINS_USERNAME)
        return normalised


# -- thread pool ----------------------------------------------------------------------------------

#: Suggested client back-off when shedding: a full queue of production-cost jobs drains in about a second.
RETRY_AFTER_SECONDS = 1.0


class HashPool:
    """Runs hash/verify calls in ``workers`` threads (argon2-cffi releases the GIL), off the event loop.

    At most ``workers`` jobs run and ``queue_limit`` more wait; ``run`` sheds anything beyond with
    ResourceExhausted instead of queuing, so a login flood cannot grow memory without bound. A job
    counts until its thread is done with it, even when its caller was cancelled meanwhile.
    ``observe`` gets each job's run time in seconds; it is called from the worker thread, so it must
    be thread-safe (prometheus_client metrics are). Use the pool from one event loop.
    """

    def __init__(self, workers: int, queue_limit: int, observe: Callable[[float], None] | None = None) -> None:
        if workers < 1 or queue_limit < 0:
            raise ValueError("HashPool needs workers >= 1 and queue_limit >= 0")
        self._workers = workers
        self._capacity = workers + queue_limit
        self._observe = observe
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="password-hash")
        self._in_flight = 0
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Jobs admitted and not finished: running plus waiting."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread."""
        return max(0, self._in_flight - self._workers)

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)`` in a worker thread; ResourceExhausted when every thread and queue slot is taken."""
        if self._closed:
            raise RuntimeError("HashPool is closed")
        if self._in_flight >= self._capacity:
            raise ResourceExhausted(
                "password hashing is saturated, retry shortly",
                reason=reasons.RESOURCE_EXHAUSTED,
                retry_after_seconds=RETRY_AFTER_SECONDS,
            )
        loop = asyncio.get_running_loop()
        job = self._executor.submit(self._timed, functools.partial(fn, *args))
        self._in_flight += 1
        job.add_done_callback(lambda _: self._finished_threadsafe(loop))
        return await asyncio.wrap_future(job)

    async def close(self) -> None:
        """Stop taking jobs, let the admitted ones finish, and stop the threads."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def _timed(self, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return call()
        finally:
            if self._observe is not None:
                self._observe(time.perf_counter() - start)

    def _finished_threadsafe(self, loop: asyncio.AbstractEventLoop) -> None:
        # Runs in the worker thread (or in the loop when the job was cancelled before it started).
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is counting any more
            loop.call_soon_threadsafe(self._finished)

    def _finished(self) -> None:
        self._in_flight -= 1


__all__ = [
    "DEVELOPMENT",
    "PRODUCTION",
    "RETRY_AFTER_SECONDS",
    "SCHEME_ARGON2",
    "SCHEME_SHA256",
    "SCHEME_SHA256_SALTED",
    "SCHEME_UNKNOWN",
    "SCHEME_WRAPPED",
    "HashPool",
    "HashProfile",
    "PasswordHasher",
    "PasswordPolicy",
    "load_common_passwords",
    "normalize",
    "resolve_profile",
]
