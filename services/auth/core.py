"""The auth core: accounts, sessions, password lifecycle, abuse protection and audit.

Plain Python: it takes domain values and a :class:`Caller`, raises the chassis' domain errors
and knows nothing of gRPC. Every security decision lives here:

- login checks the rate limits (per client IP, per account) before any hash is computed, then
  the lockout, then the password (an unknown username costs a dummy verify, so that both
  failures take the same time and give the same answer);
- legacy hashes migrate silently to argon2id on a successful login;
- refresh tokens rotate on every use; a rotated token used again revokes its whole session;
- reset tokens are single-use, expire, and only their digests are stored;
- each event is appended to the audit log and logged as a JSON line; an event that records a
  change (a password set, sessions revoked, a failure counted, a lock lifted) commits in the
  change's own transaction: the store method making the change takes the event, or an
  :data:`~services.auth.store.AuditOf` that builds it from what the transaction found.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn, TypeVar

from opentelemetry import trace

from services.auth import reasons, validation
from services.auth.metrics import AuthMetrics
from services.auth.notifier import Notifier
from services.auth.passwords import HashPool, PasswordHasher, PasswordPolicy, normalize
from services.auth.ratelimit import LoginLimiter
from services.auth.store import (
    Audited,
    AuditEvent,
    AuditOf,
    AuditQuery,
    LockoutPolicy,
    LockState,
    RefreshToken,
    ResetToken,
    Rotation,
    RotationOutcome,
    Session,
    Store,
    User,
    UserExists,
)
from services.auth.tokens import AccessClaims, InvalidToken, TokenIssuer, new_opaque_token, token_digest
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from services.common.logs import current_trace_ids, fields

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

T = TypeVar("T")

ROLE_USER = "user"
ROLE_ADMIN = "admin"
BAD_CREDENTIALS = "invalid username or password"
AUDIT_PAGE_MAX = 500
AUDIT_PAGE_DEFAULT = 100


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the client's IP (as trusted), and the bearer token if any."""

    client_ip: str = ""
    bearer: str = ""


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in_seconds: int
    refresh_expires_in_seconds: int


@dataclass(frozen=True, slots=True)
class AuthConfig:
    access_ttl_seconds: int
    refresh_ttl_seconds: int
    reset_ttl_seconds: int
    lockout: LockoutPolicy
    reserved_usernames: frozenset[str] = frozenset()


class AuthCore:
    def __init__(
        self,
        *,
        store: Store,
        hasher: PasswordHasher,
        policy: PasswordPolicy,
        pool: HashPool,
        issuer: TokenIssuer,
        limiter: LoginLimiter,
        notifier: Notifier,
        metrics: AuthMetrics,
        config: AuthConfig,
        clock: Callable[[], float] = time.time,
    ):
        self._store = store
        self._hasher = hasher
        self._policy = policy
        self._pool = pool
        self._issuer = issuer
        self._limiter = limiter
        self._notifier = notifier
        self._metrics = metrics
        self._config = config
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()

    async def _hash(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a hash or verify in the bounded pool, inside a span of its own."""
        with _tracer.start_as_current_span("password." + fn.__name__):
            try:
                return await self._pool.run(fn, *args)
            except ResourceExhausted:
                self._metrics.hash_rejected.inc()
                raise

    # -- accounts -------------------------------------------------------------------------

    async def register(self, caller: Caller, username: str, email: str, password: str) -> str:
        violations = validation.Violations()
        name = validation.username(username, violations)
        if name and name in self._config.reserved_usernames:
            violations.add("username", "is reserved; choose another", reasons.USERNAME_RESERVED)
        address = validation.email(email, violations)
        try:
            secret = self._policy.check(password, username=name or username)
        except InvalidArgument as error:
            violations.add_refusal(error)
            secret = ""
        violations.raise_if_any("the registration request is invalid")
        user = await self.create_user(name, address, secret, roles=(ROLE_USER,), caller=caller)
        return user.id

    async def create_user(
        self,
        username: str,
        email: str,
        password: str,
        *,
        roles: tuple[str, ...],
        caller: Caller | None = None,
        reason: str = "",
    ) -> User:
        """Create an account from already-validated values (also used by the CLI and bootstrap).

        The account and its REGISTERED audit event commit together."""
        password_hash = await self._hash(self._hasher.hash, password)
        user = User(
            id=str(uuid.uuid4()),
            username=username,
            email=email,
            password_hash=password_hash,
            hash_scheme=self._hasher.scheme(password_hash),
            roles=roles,
            created_at=self._clock(),
        )
        event = self._event(
            "REGISTERED", "success", caller or Caller(), user_id=user.id, username=username, reason=reason
        )
        try:
            event_id = await self._store.create_user(user, event)
        except UserExists:
            raise AlreadyExists(
                "that username or e-mail address is already registered", reason=reasons.ALREADY_EXISTS
            ) from None
        self._log_audit(event_id, event)
        await self.refresh_hash_gauge()
        return user

    def check_password(self, password: str, *, username: str) -> str:
        """The policy's verdict on a new password: the form to hash, or InvalidArgument."""
        return self._policy.check(password, username=username)

    def hash_scheme(self, password_hash: str) -> str:
        return self._hasher.scheme(password_hash)

    async def import_user(self, user: User) -> None:
        """Store an account with an existing hash (legacy ones migrate at the next login)."""
        await self._store.create_user(replace(user, created_at=user.created_at or self._clock()))
        await self.refresh_hash_gauge()

    async def ensure_admin(self, username: str, email: str, password: str) -> bool:
        """Create the bootstrap administrator unless the username exists; True if created."""
        violations = validation.Violations()
        name = validation.username(username, violations, "AUTH_BOOTSTRAP_ADMIN_USERNAME")
        address = validation.email(email, violations, "AUTH_BOOTSTRAP_ADMIN_EMAIL")
        violations.raise_if_any("bootstrap administrator settings are invalid")
        if await self._store.get_user_by_username(name) is not None:
            return False
        secret = self._policy.check(password, username=name, field="AUTH_BOOTSTRAP_ADMIN_PASSWORD")
        try:
            await self.create_user(name, address, secret, roles=(ROLE_USER, ROLE_ADMIN), reason="bootstrap_admin")
        except AlreadyExists:  # another replica starting at the same moment created it first
            return False
        return True

    # -- login and sessions ---------------------------------------------------------------

    async def login(self, caller: Caller, username: str, password: str) -> TokenPair:
        violations = validation.Violations()
        name = validation.username(username, violations)
        validation.login_password(password, violations)
        violations.raise_if_any("the login request is invalid")

        limited = await self._limiter.check(client_ip=caller.client_ip, account=name)
        if limited is not None:
            self._metrics.rate_limited.labels(limited.scope).inc()
            self._metrics.login_attempts.labels("rate_limited").inc()
            await self._audit("RATE_LIMITED", "failure", caller, username=name, reason=f"login_{limited.scope}_limit")
            raise ResourceExhausted(
                "too many login attempts, retry later",
                reason=reasons.RESOURCE_EXHAUSTED,
                retry_after_seconds=limited.retry_after_seconds,
            )

        now = self._clock()
        lock = await self._store.get_lock(name)
        if lock.locked(now):
            await self._login_refused(caller, name, lock.locked_until)

        user = await self._store.get_user_by_username(name)
        if user is None:
            await self._hash(self._hasher.dummy_verify)
            ok, new_hash = False, None
        else:
            ok, new_hash = await self._hash(self._hasher.verify_and_update, normalize(password), user.password_hash)

        now = self._clock()
        if not ok or user is None:
            user_id = user.id if user else ""
            failed = self._event("LOGIN_FAILED", "failure", caller, user_id=user_id, username=name)
            locked = self._event("ACCOUNT_LOCKED", "success", caller, user_id=user_id, username=name)

            def failure_events(lock: LockState) -> list[AuditEvent]:
                events = [replace(failed, reason=_failure_reason(user, lock, now))]
                if lock.just_locked:
                    seconds = f"{(lock.locked_until or now) - now:.0f}"
                    events.insert(0, replace(locked, details={"locked_seconds": seconds}))
                return events

            written = await self._store.record_login_failure(name, now, self._config.lockout, failure_events)
            self._log_audited(written)
            lock = written.value
            if lock.just_locked:
                self._metrics.lockouts.inc()
            self._refuse_login(_failure_reason(user, lock, now), lock.locked_until)

        # Parallel wrong attempts may have locked the account while this one was verifying.
        lock = await self._store.get_lock(name)
        if lock.locked(now):
            await self._login_refused(caller, name, lock.locked_until, user_id=user.id)
        if new_hash is not None:
            await self._migrate_hash(caller, user, new_hash)

        pair = await self._start_session(caller, user, now)
        self._metrics.login_attempts.labels("success").inc()
        return pair

    async def _login_refused(
        self, caller: Caller, username: str, locked_until: float | None, *, user_id: str = ""
    ) -> NoReturn:
        """Refuse a login to a locked account (the lock is not this attempt's doing: nothing is counted)."""
        await self._audit("LOGIN_FAILED", "failure", caller, user_id=user_id, username=username, reason="locked")
        self._refuse_login("locked", locked_until)

    def _refuse_login(self, reason: str, locked_until: float | None) -> NoReturn:
        self._metrics.login_attempts.labels("locked" if reason == "locked" else "failure").inc()
        retry = None
        if reason == "locked":
            retry = max(0.0, (locked_until or self._clock()) - self._clock())
        # One answer for unknown user, wrong password and lockout (plus RetryInfo when locked).
        raise Unauthenticated(BAD_CREDENTIALS, reason=reasons.INVALID_CREDENTIALS, retry_after_seconds=retry)

    async def _migrate_hash(self, caller: Caller, user: User, new_hash: str) -> None:
        old_scheme = user.hash_scheme
        scheme = self._hasher.scheme(new_hash)
        migrated = None
        if old_scheme != scheme:
            details = {"from": old_scheme, "to": scheme}
            migrated = self._event(
                "LEGACY_HASH_MIGRATED", "success", caller, user_id=user.id, username=user.username, details=details
            )
        written = await self._store.set_password_hash(
            user.id, new_hash, scheme, expected=user.password_hash, audit=migrated
        )
        self._log_audited(written)
        if written.value:
            await self.refresh_hash_gauge()

    async def _start_session(self, caller: Caller, user: User, now: float) -> TokenPair:
        """A new session; the account's failed logins are forgotten and LOGIN_SUCCEEDED is audited with it."""
        session = Session(
            id=str(uuid.uuid4()),
            user_id=user.id,
            created_at=now,
            expires_at=now + self._config.refresh_ttl_seconds,
        )
        refresh = new_opaque_token()
        succeeded = self._event("LOGIN_SUCCEEDED", "success", caller, user_id=user.id, username=user.username)
        written = await self._store.create_session(
            session,
            RefreshToken(token_digest(refresh), session.id, now, session.expires_at),
            clear_failures_of=user.username,
            audit=succeeded,
        )
        self._log_audited(written)
        return self._pair(user, session, refresh, now)

    def _pair(self, user: User, session: Session, refresh: str, now: float) -> TokenPair:
        access, claims = self._issuer.issue(
            user_id=user.id, username=user.username, roles=user.roles, session_id=session.id, now=now
        )
        return TokenPair(
            access_token=access,
            refresh_token=refresh,
            expires_in_seconds=max(0, math.ceil(claims.expires_at - now)),
            refresh_expires_in_seconds=max(0, math.ceil(session.expires_at - now)),
        )

    async def refresh(self, caller: Caller, refresh_token: str) -> TokenPair:
        violations = validation.Violations()
        validation.token(refresh_token, violations, "refresh_token")
        violations.raise_if_any("the refresh request is invalid")
        now = self._clock()
        new_refresh = new_opaque_token()
        reused = self._event("REFRESH_REUSE_DETECTED", "failure", caller)
        refreshed = self._event("TOKEN_REFRESHED", "success", caller)

        def rotation_events(rotation: Rotation) -> list[AuditEvent]:
            session, user = rotation.session, rotation.user
            if rotation.outcome is RotationOutcome.REUSED and session is not None:
                return [replace(reused, user_id=session.user_id, details={"session_id": session.id})]
            if rotation.outcome is RotationOutcome.ROTATED and user is not None:
                return [replace(refreshed, user_id=user.id, username=user.username)]
            return []

        written = await self._store.rotate_refresh_token(
            token_digest(refresh_token), RefreshToken(token_digest(new_refresh), "", now, 0.0), now, rotation_events
        )
        self._log_audited(written)
        session, user = written.value.session, written.value.user
        if written.value.outcome is not RotationOutcome.ROTATED or session is None or user is None:
            raise Unauthenticated(
                "the refresh token is invalid, expired or revoked", reason=reasons.INVALID_REFRESH_TOKEN
            )
        return self._pair(user, session, new_refresh, now)

    async def authenticate(self, access_token: str) -> AccessClaims:
        """The claims of a valid access token whose session is still active."""
        if not access_token:
            raise Unauthenticated("a bearer access token is required", reason=reasons.MISSING_TOKEN)
        violations = validation.Violations()
        validation.token(access_token, violations, "access_token")
        if violations:
            raise Unauthenticated("the access token is malformed", reason=reasons.INVALID_TOKEN)
        try:
            claims = self._issuer.verify(access_token, now=self._clock())
        except InvalidToken as error:
            raise Unauthenticated(
                "the access token is invalid or expired", reason=reasons.INVALID_TOKEN, metadata={"cause": error.reason}
            ) from None
        session = await self._store.get_session(claims.session_id)
        if session is None or not session.active(self._clock()):
            raise Unauthenticated("the session has ended", reason=reasons.SESSION_REVOKED)
        return claims

    async def require_admin(self, caller: Caller) -> AccessClaims:
        claims = await self.authenticate(caller.bearer)
        if ROLE_ADMIN not in claims.roles:
            raise PermissionDenied("this call needs the admin role", reason=reasons.ADMIN_REQUIRED)
        return claims

    async def logout(self, caller: Caller) -> None:
        claims = await self.authenticate(caller.bearer)
        logged_out = self._event(
            "LOGGED_OUT",
            "success",
            caller,
            user_id=claims.user_id,
            username=claims.username,
            details={"session_id": claims.session_id},
        )
        # A parallel logout of the same session may have ended it first: then this one changes and audits nothing.
        self._log_audited(await self._store.revoke_session(claims.session_id, "logout", self._clock(), logged_out))

    # -- passwords ------------------------------------------------------------------------

    async def change_password(self, caller: Caller, current_password: str, new_password: str) -> None:
        claims = await self.authenticate(caller.bearer)
        violations = validation.Violations()
        validation.login_password(current_password, violations, "current_password")
        try:
            secret = self._policy.check(new_password, username=claims.username, field="new_password")
        except InvalidArgument as error:
            violations.add_refusal(error)
            secret = ""
        violations.raise_if_any("the password change request is invalid")
        user = await self._store.get_user_by_id(claims.user_id)
        if user is None:
            raise Unauthenticated("the session has ended", reason=reasons.SESSION_REVOKED)
        ok, _ = await self._hash(self._hasher.verify_and_update, normalize(current_password), user.password_hash)
        if not ok:
            await self._audit(
                "PASSWORD_CHANGED",
                "failure",
                caller,
                user_id=user.id,
                username=user.username,
                reason="wrong_current_password",
            )
            raise InvalidArgument(
                "the current password is not correct",
                [("current_password", "does not match the account's password")],
                reason=reasons.WRONG_CURRENT_PASSWORD,
            )
        new_hash = await self._hash(self._hasher.hash, secret)
        changed = self._event("PASSWORD_CHANGED", "success", caller, user_id=user.id, username=user.username)
        written = await self._store.change_password(
            user.id,
            new_hash,
            self._hasher.scheme(new_hash),
            self._clock(),
            keep_session=claims.session_id,
            audit=_counting_revoked(changed),
        )
        self._log_audited(written)
        await self.refresh_hash_gauge()

    async def request_password_reset(self, caller: Caller, email: str) -> None:
        """Always succeeds for a well-formed address; a mail goes out only if it is registered."""
        violations = validation.Violations()
        address = validation.email(email, violations)
        violations.raise_if_any("the reset request is invalid")
        user = await self._store.get_user_by_email(address)
        event = self._event(
            "PASSWORD_RESET_REQUESTED",
            "success" if user else "failure",
            caller,
            user_id=user.id if user else "",
            username=user.username if user else "",
            reason="" if user else "unknown_email",
        )
        # Known or not, the answer waits for the same work, the one read above: the write (the token with its
        # event, or the event alone) and the mail go on in the background, so that the answer's timing does not
        # tell whether the address is registered (a token write costs twice an event's).
        task = asyncio.get_running_loop().create_task(self._record_reset(user, event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record_reset(self, user: User | None, event: AuditEvent) -> None:
        try:
            if user is None:
                self._log_audit(await self._store.append_audit(event), event)
                return
            token = new_opaque_token()
            now = self._clock()
            ttl = self._config.reset_ttl_seconds
            record = ResetToken(token_digest(token), user.id, now, now + ttl)
            self._log_audit(await self._store.create_reset_token(record, event), event)
        except Exception as error:  # the caller has its answer already: the log is the only place left
            log.warning("reset.request_failed", extra=fields(user_id=event.user_id, error=type(error).__name__))
            return
        await self._deliver_reset(user, token, ttl)

    async def _deliver_reset(self, user: User, token: str, ttl: int) -> None:
        try:
            await self._notifier.send_password_reset(
                email=user.email, username=user.username, token=token, expires_in_seconds=ttl
            )
        except Exception as error:
            log.warning("reset.delivery_failed", extra=fields(user_id=user.id, error=type(error).__name__))

    async def reset_password(self, caller: Caller, token: str, new_password: str) -> None:
        violations = validation.Violations()
        validation.token(token, violations, "token")
        violations.raise_if_any("the reset request is invalid")
        digest = token_digest(token)
        record = await self._store.find_reset_token(digest, self._clock())
        user = await self._store.get_user_by_id(record.user_id) if record else None
        if record is None or user is None:
            await self._audit("PASSWORD_RESET_COMPLETED", "failure", caller, reason="invalid_token")
            raise InvalidArgument(
                "the reset token is invalid, used or expired",
                [("token", "is invalid, used or expired")],
                reason=reasons.RESET_TOKEN_INVALID,
            )
        secret = self._policy.check(new_password, username=user.username, field="new_password")
        new_hash = await self._hash(self._hasher.hash, secret)
        completed = self._event("PASSWORD_RESET_COMPLETED", "success", caller, user_id=user.id, username=user.username)
        written = await self._store.complete_reset(
            digest, new_hash, self._hasher.scheme(new_hash), self._clock(), _counting_revoked(completed)
        )
        if written.value is None:  # a parallel reset used the token first
            raise InvalidArgument(
                "the reset token is invalid, used or expired",
                [("token", "is invalid, used or expired")],
                reason=reasons.RESET_TOKEN_INVALID,
            )
        self._log_audited(written)
        await self.refresh_hash_gauge()

    # -- administration -------------------------------------------------------------------

    async def unlock_account(self, caller: Caller, username: str) -> None:
        admin = await self.require_admin(caller)
        violations = validation.Violations()
        name = validation.username(username, violations)
        violations.raise_if_any("the unlock request is invalid")
        if await self._store.get_user_by_username(name) is None and not (await self._store.get_lock(name)).failed_count:
            raise NotFound("no such account", reason=reasons.ACCOUNT_NOT_FOUND)
        unlocked = self._event("ACCOUNT_UNLOCKED", "success", caller, username=name, details={"by": admin.username})
        self._log_audited(await self._store.clear_login_failures(name, unlocked))

    async def list_audit_events(self, caller: Caller, query: AuditQuery) -> list[AuditEvent]:
        await self.require_admin(caller)
        size = query.page_size or AUDIT_PAGE_DEFAULT
        if not 0 < size <= AUDIT_PAGE_MAX:
            raise InvalidArgument(
                "the audit query is invalid",
                [("page_size", f"must be between 1 and {AUDIT_PAGE_MAX}")],
                reason=reasons.PAGE_SIZE_OUT_OF_RANGE,
            )
        return await self._store.list_audit(replace(query, page_size=size))

    # -- maintenance ----------------------------------------------------------------------

    async def wrap_legacy_hashes(self) -> int:
        """Replace every legacy SHA-256 hash at rest by its argon2id wrap; returns how many."""
        wrapped = 0
        for user in await self._store.list_users():
            new_hash = await self._hash(self._hasher.wrap_legacy, user.password_hash)
            if new_hash is None:
                continue
            scheme = self._hasher.scheme(new_hash)
            if (await self._store.set_password_hash(user.id, new_hash, scheme, expected=user.password_hash)).value:
                wrapped += 1
        await self.refresh_hash_gauge()
        return wrapped

    async def refresh_hash_gauge(self) -> None:
        counts = await self._store.count_hash_schemes()
        for scheme in {*counts, *self._metrics.known_schemes}:
            self._metrics.password_hashes.labels(scheme).set(counts.get(scheme, 0))
        self._metrics.known_schemes.update(counts)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _audit(self, event_type: str, outcome: str, caller: Caller, **about: Any) -> None:
        """Append one audit event on its own, for a refusal that changes nothing (``about``: the keyword
        fields of :meth:`_event`). An event that records a change goes to the store with the change."""
        event = self._event(event_type, outcome, caller, **about)
        self._log_audit(await self._store.append_audit(event), event)

    def _event(
        self,
        event_type: str,
        outcome: str,
        caller: Caller,
        *,
        user_id: str = "",
        username: str = "",
        reason: str = "",
        details: dict[str, str] | None = None,
    ) -> AuditEvent:
        trace_id, _ = current_trace_ids()
        return AuditEvent(
            event_type=event_type,
            occurred_at=self._clock(),
            outcome=outcome,
            user_id=user_id,
            username=username,
            client_ip=caller.client_ip,
            trace_id=trace_id,
            reason=reason,
            details=details or {},
        )

    def _log_audited(self, written: Audited[Any]) -> None:
        for event in written.events:
            self._log_audit(event.id, event)

    @staticmethod
    def _log_audit(event_id: int, event: AuditEvent) -> None:
        log.info(
            "audit",
            extra=fields(
                audit_id=event_id,
                event_type=event.event_type,
                outcome=event.outcome,
                user_id=event.user_id,
                username=event.username,
                client_ip=event.client_ip,
                reason=event.reason,
                details=event.details,
            ),
        )


def _failure_reason(user: User | None, lock: LockState, now: float) -> str:
    """The audit reason of a failed login, given the lock state its failure left."""
    if lock.locked(now) and not lock.just_locked:
        return "locked"  # a parallel attempt locked the account first
    return "unknown_user" if user is None else "bad_password"


def _counting_revoked(event: AuditEvent) -> AuditOf[int]:
    """``event`` with the number of sessions the change revoked in its details."""
    return lambda revoked: [replace(event, details={**event.details, "sessions_revoked": str(revoked)})]
