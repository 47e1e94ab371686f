"""What the auth core keeps, and the interface of the storage that keeps it.

The core talks to :class:`Store` only; :mod:`services.auth.sqlite_store` implements it on
SQLite (the embedded default) and a PostgreSQL backend can implement it later. Every method
that changes more than one row is atomic: the lockout counter, refresh-token rotation and
reset-token use must hold under concurrent requests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


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


class UserExists(Exception):
    """The username or e-mail address is already registered."""


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # users
    async def create_user(self, user: User, audit: AuditEvent | None = None) -> int:
        """Store ``user`` and, in the same transaction, ``audit`` (its id, else 0). UserExists if taken."""
        ...

    async def get_user_by_username(self, username: str) -> User | None: ...
    async def get_user_by_id(self, user_id: str) -> User | None: ...
    async def get_user_by_email(self, email: str) -> User | None: ...
    async def list_users(self) -> list[User]: ...
    async def set_password_hash(
        self, user_id: str, password_hash: str, scheme: str, *, expected: str | None = None
    ) -> bool: ...
    async def count_hash_schemes(self) -> dict[str, int]: ...

    # failed logins and lockout (by normalised username, known or not)
    async def get_lock(self, username: str) -> LockState: ...
    async def record_login_failure(self, username: str, now: float, policy: LockoutPolicy) -> LockState: ...
    async def clear_login_failures(self, username: str) -> None: ...

    # sessions and refresh tokens
    async def create_session(self, session: Session, refresh: RefreshToken) -> None: ...
    async def get_session(self, session_id: str) -> Session | None: ...
    async def revoke_session(self, session_id: str, reason: str, now: float) -> bool: ...
    async def revoke_user_sessions(self, user_id: str, reason: str, now: float, *, keep: str = "") -> int: ...
    async def rotate_refresh_token(self, digest: str, new: RefreshToken, now: float) -> Rotation: ...

    # password reset
    async def create_reset_token(self, token: ResetToken, audit: AuditEvent | None = None) -> int:
        """Store ``token`` (invalidating the user's earlier ones) and ``audit`` in one transaction."""
        ...

    async def find_reset_token(self, digest: str, now: float) -> ResetToken | None: ...
    async def complete_reset(self, digest: str, password_hash: str, scheme: str, now: float) -> str | None: ...

    # audit
    async def append_audit(self, event: AuditEvent) -> int: ...
    async def list_audit(self, query: AuditQuery) -> list[AuditEvent]: ...
