"""What the auth core keeps, and the interface of the storage that keeps it.

The core talks to :class:`Store` only; :mod:`services.auth.sqlite_store` implements it on SQLite
(the embedded default) and :mod:`services.auth.postgres_store` on PostgreSQL (shared by any number of
replicas). Every read-modify-write is one transaction that holds under concurrent callers in other
threads, processes and replicas: the lockout counter, refresh-token rotation, a password change or
reset with the revocation of sessions, reset-token use and registration of a unique name.
tests/auth/test_store_contract.py holds both backends to the same behaviour.

A store that cannot do its work (unreachable, out of connections, a transaction the database ended)
raises :class:`StoreUnavailable`, an UNAVAILABLE with RetryInfo: nothing was changed, and the caller
may retry.

A change and the audit event that records it commit together: each method that changes state takes
its ``audit`` event(s) and appends them in the same transaction, so a crash or a refused audit insert
leaves neither. When the event depends on what the transaction found (how many sessions a password
change revoked, whether a failure locked the account, which session a reused refresh token belonged
to), ``audit`` is an :data:`AuditOf` callable: the store calls it inside the transaction with that
outcome and appends the events it returns. Such a callable only builds events (no I/O, no clock or
context reads: the core captures those first), so any backend can call it mid-transaction. Methods
that append events return :class:`Audited`: their result, and the events with the ids they got.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeAlias, TypeVar

from services.auth import reasons
from services.common.errors import Unavailable

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class User:
    id: str
    username: str  # normalised (lower case)
    email: str  # normalised (lower case)
    password_hash: str
    hash_scheme: str
    roles: tuple[str, ...]
    created_at: float


@dataclass(frozen=True, slots=True)
class LockState:
    """The failed-login record of a username (known or not)."""

    failed_count: int = 0
    locked_until: float | None = None
    lockouts: int = 0
    just_locked: bool = False  # this failure locked the account

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and self.locked_until > now


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    threshold: int
    base_seconds: float
    max_seconds: float

    def duration(self, previous_lockouts: int) -> float:
        return float(min(self.base_seconds * (2 ** min(previous_lockouts, 32)), self.max_seconds))

    def after_failure(self, state: LockState, now: float) -> LockState | None:
        """The state one more failed login leaves, or None while ``state`` is locked (a parallel failure
        locked it first: nothing is counted past a lock). Stores call this under the row's write lock."""
        if state.locked(now):
            return None
        failed = 1 if state.locked_until is not None else state.failed_count + 1  # an expired lock counts afresh
        if failed < self.threshold:
            return LockState(failed, None, state.lockouts)
        return LockState(failed, now + self.duration(state.lockouts), state.lockouts + 1, just_locked=True)


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    user_id: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    revoked_reason: str = ""

    def active(self, now: float) -> bool:
        return self.revoked_at is None and self.expires_at > now


@dataclass(frozen=True, slots=True)
class RefreshToken:
    digest: str
    session_id: str
    created_at: float
    expires_at: float


class RotationOutcome(enum.Enum):
    ROTATED = "rotated"
    REUSED = "reused"  # already rotated once: the session family is revoked
    UNKNOWN = "unknown"
    INACTIVE = "inactive"  # expired, or its session is revoked or expired


@dataclass(frozen=True, slots=True)
class Rotation:
    outcome: RotationOutcome
    session: Session | None = None
    user: User | None = None  # the session's account, when ROTATED


@dataclass(frozen=True, slots=True)
class ResetToken:
    digest: str
    user_id: str
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event_type: str  # the AuditEventType name without prefix, e.g. "LOGIN_FAILED"
    occurred_at: float
    outcome: str  # "success" | "failure"
    user_id: str = ""
    username: str = ""
    client_ip: str = ""
    trace_id: str = ""
    reason: str = ""
    details: dict[str, str] = field(default_factory=dict)
    id: int = 0  # assigned by the store


@dataclass(frozen=True, slots=True)
class AuditQuery:
    page_size: int
    after_id: int = 0
    user_id: str = ""
    username: str = ""
    event_types: tuple[str, ...] = ()
    start_time: float | None = None
    end_time: float | None = None


AuditOf: TypeAlias = Callable[[T], Sequence[AuditEvent]]
"""Builds, from what a transaction found (``T``), the audit events to append in it (none: empty)."""


@dataclass(frozen=True, slots=True)
class Audited(Generic[T]):
    """What a change returned, and the audit events appended in its transaction (``id`` set)."""

    value: T
    events: tuple[AuditEvent, ...] = ()


TABLES: dict[str, tuple[str, ...]] = {
    "users": ("id", "username", "email", "password_hash", "hash_scheme", "roles", "created_at"),
    "login_failures": ("username", "failed_count", "locked_until", "lockouts"),
    "sessions": ("id", "user_id", "created_at", "expires_at", "revoked_at", "revoked_reason"),
    "refresh_tokens": ("digest", "session_id", "created_at", "expires_at", "rotated_at"),
    "reset_tokens": ("digest", "user_id", "created_at", "expires_at", "used_at", "invalidated_at"),
    "audit_events": (
        "id",
        "event_type",
        "occurred_at",
        "outcome",
        "user_id",
        "username",
        "client_ip",
        "trace_id",
        "reason",
        "details",
    ),
}
"""Every table a store keeps and its columns, in the order foreign keys need (copy-store)."""

Rows: TypeAlias = dict[str, list[tuple[object, ...]]]
"""Rows per table of :data:`TABLES`, columns in its order; ``roles`` a list, ``details`` a dict, whatever the dialect."""


class UserExists(Exception):
    """The username or e-mail address is already registered."""


class StoreUnavailable(Unavailable):
    """The store could not do the work (unreachable, no free connection, the transaction was ended by the
    database); nothing was changed. The message is safe to show: it never holds the database's address."""

    reason = reasons.STORE_UNAVAILABLE

    def __init__(self, retry_after_seconds: float):
        super().__init__(
            "the account store is unavailable, retry later",
            reason=reasons.STORE_UNAVAILABLE,
            retry_after_seconds=retry_after_seconds,
        )


class Store(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema up to date (SchemaTooNew if it is beyond this code's)."""
        ...

    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Return if the store answers now, else raise StoreUnavailable (readiness)."""
        ...

    # users
    async def create_user(self, user: User, audit: AuditEvent | None = None) -> int:
        """Store ``user`` and, in the same transaction, ``audit`` (its id, else 0). UserExists if taken."""
        ...

    async def get_user_by_username(self, username: str) -> User | None: ...
    async def get_user_by_id(self, user_id: str) -> User | None: ...
    async def get_user_by_email(self, email: str) -> User | None: ...
    async def list_users(self) -> list[User]: ...
    async def set_password_hash(
        self,
        user_id: str,
        password_hash: str,
        scheme: str,
        *,
        expected: str | None = None,
        audit: AuditEvent | None = None,
    ) -> Audited[bool]:
        """Replace the hash (only while it is still ``expected``, if given); ``audit`` only if it was replaced."""
        ...

    async def change_password(
        self,
        user_id: str,
        password_hash: str,
        scheme: str,
        now: float,
        *,
        keep_session: str,
        audit: AuditOf[int] | None = None,
    ) -> Audited[int]:
        """Set the new hash and revoke the user's other active sessions (``password_changed``), with
        ``audit(sessions revoked)``, in one transaction; the number of sessions revoked."""
        ...

    async def count_hash_schemes(self) -> dict[str, int]: ...

    # failed logins and lockout (by normalised username, known or not)
    async def get_lock(self, username: str) -> LockState: ...
    async def record_login_failure(
        self, username: str, now: float, policy: LockoutPolicy, audit: AuditOf[LockState] | None = None
    ) -> Audited[LockState]:
        """Count a failure (locking at the threshold; not past a lock a parallel failure set) and append
        ``audit(the new state)``, in one transaction."""
        ...

    async def clear_login_failures(self, username: str, audit: AuditEvent | None = None) -> Audited[None]: ...

    # sessions and refresh tokens
    async def create_session(
        self, session: Session, refresh: RefreshToken, *, clear_failures_of: str = "", audit: AuditEvent | None = None
    ) -> Audited[None]:
        """Store the session and its first refresh token, forget ``clear_failures_of``'s failed logins and
        append ``audit``, in one transaction."""
        ...

    async def get_session(self, session_id: str) -> Session | None: ...
    async def revoke_session(
        self, session_id: str, reason: str, now: float, audit: AuditEvent | None = None
    ) -> Audited[bool]:
        """End the session if it is not yet revoked; ``audit`` only if this call revoked it."""
        ...

    async def rotate_refresh_token(
        self, digest: str, new: RefreshToken, now: float, audit: AuditOf[Rotation] | None = None
    ) -> Audited[Rotation]:
        """Rotate (or, for a token rotated before, revoke its session: ``refresh_reuse``) and append
        ``audit(the rotation)``, in one transaction."""
        ...

    # password reset
    async def create_reset_token(self, token: ResetToken, audit: AuditEvent | None = None) -> int:
        """Store ``token`` (invalidating the user's earlier ones) and ``audit`` in one transaction."""
        ...

    async def find_reset_token(self, digest: str, now: float) -> ResetToken | None: ...
    async def complete_reset(
        self, digest: str, password_hash: str, scheme: str, now: float, audit: AuditOf[int] | None = None
    ) -> Audited[str | None]:
        """Use the token, set the new hash, revoke every session of its user (``password_reset``), forget the
        user's failed logins and append ``audit(sessions revoked)``, all in one transaction. The user's id,
        or None (nothing written) if the token is unknown, used, invalidated or expired."""
        ...

    # audit
    async def append_audit(self, event: AuditEvent) -> int:
        """Append an event that records no change of its own (a refused request); its id."""
        ...

    async def list_audit(self, query: AuditQuery) -> list[AuditEvent]: ...

    # moving between stores (copy-store)
    async def count_rows(self) -> dict[str, int]: ...
    async def dump(self) -> Rows:
        """Every row of every table, read in one transaction."""
        ...

    async def load(self, rows: Rows) -> dict[str, int]:
        """Insert ``rows`` in one transaction, skipping rows whose key is already there; how many were new."""
        ...
