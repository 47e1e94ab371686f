"""The PostgreSQL implementation of :class:`~services.auth.store.Store`, shared by any number of replicas.

psycopg 3 over libpq (so every libpq URL form, ``sslmode`` and the ``PG*`` variables work), with a
psycopg_pool connection pool that checks a connection before lending it (a connection the server ended
is replaced, not handed out). Every method is one transaction at READ COMMITTED; a read-modify-write
takes the row locks it depends on first (``SELECT ... FOR UPDATE``, or an ``UPDATE ... WHERE`` that
re-checks its condition after waiting), so concurrent callers on any replica serialise on the row:

- a failed login locks its ``login_failures`` row (inserted empty if new) before counting;
- a refresh locks its token's row, then its session's: of two concurrent uses one rotates, the other
  finds the token rotated (reuse) and revokes the session;
- a reset marks its token used with ``UPDATE ... WHERE used_at IS NULL RETURNING``: one caller wins;
- a new reset token locks its user's row, so two requests cannot leave two live tokens;
- registration relies on the UNIQUE constraints: exactly one of concurrent inserts wins.

The audit events of a change are inserted in the change's transaction. The schema comes from
``migrations/postgresql/NNNN_*.sql``, applied at open in one transaction under an advisory lock, so that
replicas starting together migrate once; a schema newer than this code is refused.

Failures of the database (connection refused or lost, no free connection in time, a deadlock or
serialization failure, a server shutting down) raise :class:`StoreUnavailable`; the log names the
error's class and SQLSTATE and the server by host, port and database only, never the password.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import AsyncCursor, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb

from services.auth.migrations import check_not_newer, migrations
from services.auth.store import (
    TABLES,
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
    Rows,
    Session,
    StoreUnavailable,
    User,
    UserExists,
)
from services.common.logs import fields

T = TypeVar("T")
Cursor = AsyncCursor[DictRow]
log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x61757468  # pg_advisory_xact_lock key of schema migrations ("auth")


def describe(url: str) -> str:
    """``postgresql://user@host:port/db`` for logs and messages: the URL without its password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def _user(row: DictRow | None) -> User | None:
    if row is None:
        return None
    return User(
        id=row["id"],
        username=row["username"],
        email=row["email"],
        password_hash=row["password_hash"],
        hash_scheme=row["hash_scheme"],
        roles=tuple(row["roles"]),
        created_at=row["created_at"],
    )


def _session(row: DictRow | None) -> Session | None:
    if row is None:
        return None
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        revoked_reason=row["revoked_reason"],
    )


def _lock(row: DictRow | None) -> LockState:
    if row is None:
        return LockState()
    return LockState(failed_count=row["failed_count"], locked_until=row["locked_until"], lockouts=row["lockouts"])


class PostgresStore:
    """Auth storage in a PostgreSQL database, through a connection pool."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout_seconds: float = 5.0,
        pool_timeout_seconds: float = 5.0,
        retry_after_seconds: float = 1.0,
    ):
        self._where = describe(url)
        self._retry_after = retry_after_seconds
        self._connect_timeout = connect_timeout_seconds
        self._pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout_seconds,
            kwargs={"row_factory": dict_row, "connect_timeout": max(2, round(connect_timeout_seconds))},
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            open=False,
            name="auth",
        )

    @property
    def where(self) -> str:
        return self._where

    async def _run(self, fn: Callable[[Cursor], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction on a pooled connection."""
        try:
            async with (
                self._pool.connection() as connection,
                connection.transaction(),
                connection.cursor(row_factory=dict_row) as cursor,
            ):
                return await fn(cursor)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as error:
            raise self._unavailable(error) from None

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        sqlstate = getattr(error, "sqlstate", None) or ""
        log.warning(
            "auth.store_unavailable",
            extra=fields(store=self._where, error=type(error).__name__, sqlstate=sqlstate),
        )
        return StoreUnavailable(self._retry_after)

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=self._connect_timeout)
        except psycopg_pool.PoolTimeout:
            await self._pool.close()
            raise self._unavailable(psycopg_pool.PoolTimeout()) from None
        try:
            await self._run(self._migrate)
        except BaseException:
            await self._pool.close()
            raise

    async def _migrate(self, cursor: Cursor) -> None:
        await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION)"
        )
        await cursor.execute("SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations")
        current = int((await _one(cursor))["version"])
        known = migrations("postgresql")
        check_not_newer(current, known, self._where)
        for migration in known[current:]:
            await cursor.execute(migration.script.encode("utf-8"))  # several statements: no parameters
            await cursor.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, extract(epoch FROM now()))",
                (migration.version,),
            )
            log.info("auth.schema_migrated", extra=fields(store=self._where, version=migration.version))

    async def schema_version(self) -> int:
        async def select(cursor: Cursor) -> int:
            await cursor.execute("SELECT MAX(version) AS version FROM schema_migrations")
            return int((await _one(cursor))["version"])

        return await self._run(select)

    async def ping(self) -> None:
        async def select(cursor: Cursor) -> None:
            await cursor.execute("SELECT 1")

        await self._run(select)

    async def close(self) -> None:
        await self._pool.close()

    # -- users ----------------------------------------------------------------------------

    async def create_user(self, user: User, audit: AuditEvent | None = None) -> int:
        async def insert(cursor: Cursor) -> int:
            try:
                async with cursor.connection.transaction():  # a savepoint: the refusal leaves the transaction usable
                    await cursor.execute(
                        "INSERT INTO users (id, username, email, password_hash, hash_scheme, roles, created_at)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        (
                            user.id,
                            user.username,
                            user.email,
                            user.password_hash,
                            user.hash_scheme,
                            Jsonb(list(user.roles)),
                            user.created_at,
                        ),
                    )
            except psycopg.errors.UniqueViolation as error:
                raise UserExists(error.diag.constraint_name or "unique") from None
            return await _insert_audit(cursor, audit) if audit is not None else 0

        return await self._run(insert)

    async def _select_user(self, column: str, value: str) -> User | None:
        async def select(cursor: Cursor) -> User | None:
            await cursor.execute(sql.SQL("SELECT * FROM users WHERE {} = %s").format(sql.Identifier(column)), (value,))
            return _user(await cursor.fetchone())

        return await self._run(select)

    async def get_user_by_username(self, username: str) -> User | None:
        return await self._select_user("username", username)

    async def get_user_by_id(self, user_id: str) -> User | None:
        return await self._select_user("id", user_id)

    async def get_user_by_email(self, email: str) -> User | None:
        return await self._select_user("email", email)

    async def list_users(self) -> list[User]:
        async def select(cursor: Cursor) -> list[User]:
            await cursor.execute("SELECT * FROM users ORDER BY created_at, id")
            return [user for row in await cursor.fetchall() if (user := _user(row))]

        return await self._run(select)

    async def set_password_hash(
        self,
        user_id: str,
        password_hash: str,
        scheme: str,
        *,
        expected: str | None = None,
        audit: AuditEvent | None = None,
    ) -> Audited[bool]:
        async def update(cursor: Cursor) -> Audited[bool]:
            if expected is None:
                await cursor.execute(
                    "UPDATE users SET password_hash = %s, hash_scheme = %s WHERE id = %s",
                    (password_hash, scheme, user_id),
                )
            else:
                await cursor.execute(
                    "UPDATE users SET password_hash = %s, hash_scheme = %s WHERE id = %s AND password_hash = %s",
                    (password_hash, scheme, user_id, expected),
                )
            if cursor.rowcount != 1:
                return Audited(False)
            return Audited(True, await _append(cursor, [audit]))

        return await self._run(update)

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
        async def change(cursor: Cursor) -> Audited[int]:
            await cursor.execute(
                "UPDATE users SET password_hash = %s, hash_scheme = %s WHERE id = %s", (password_hash, scheme, user_id)
            )
            revoked = await _revoke_user_sessions(cursor, user_id, "password_changed", now, keep=keep_session)
            return Audited(revoked, await _append(cursor, audit(revoked) if audit else []))

        return await self._run(change)

    async def count_hash_schemes(self) -> dict[str, int]:
        async def count(cursor: Cursor) -> dict[str, int]:
            await cursor.execute("SELECT hash_scheme, COUNT(*) AS n FROM users GROUP BY hash_scheme")
            return {row["hash_scheme"]: int(row["n"]) for row in await cursor.fetchall()}

        return await self._run(count)

    # -- lockout --------------------------------------------------------------------------

    async def get_lock(self, username: str) -> LockState:
        async def select(cursor: Cursor) -> LockState:
            await cursor.execute("SELECT * FROM login_failures WHERE username = %s", (username,))
            return _lock(await cursor.fetchone())

        return await self._run(select)

    async def record_login_failure(
        self, username: str, now: float, policy: LockoutPolicy, audit: AuditOf[LockState] | None = None
    ) -> Audited[LockState]:
        async def record(cursor: Cursor) -> Audited[LockState]:
            # The row exists (empty if new) and is ours until commit: parallel failures count one after another.
            await cursor.execute(
                "INSERT INTO login_failures (username) VALUES (%s) ON CONFLICT (username) DO NOTHING", (username,)
            )
            await cursor.execute("SELECT * FROM login_failures WHERE username = %s FOR UPDATE", (username,))
            state = _lock(await cursor.fetchone())
            after = policy.after_failure(state, now)
            if after is None:
                after = state  # already locked: a parallel attempt got there first; do not count past it
            else:
                await cursor.execute(
                    "UPDATE login_failures SET failed_count = %s, locked_until = %s, lockouts = %s WHERE username = %s",
                    (after.failed_count, after.locked_until, after.lockouts, username),
                )
            return Audited(after, await _append(cursor, audit(after) if audit else []))

        return await self._run(record)

    async def clear_login_failures(self, username: str, audit: AuditEvent | None = None) -> Audited[None]:
        async def clear(cursor: Cursor) -> Audited[None]:
            await cursor.execute("DELETE FROM login_failures WHERE username = %s", (username,))
            return Audited(None, await _append(cursor, [audit]))

        return await self._run(clear)

    # -- sessions -------------------------------------------------------------------------

    async def create_session(
        self, session: Session, refresh: RefreshToken, *, clear_failures_of: str = "", audit: AuditEvent | None = None
    ) -> Audited[None]:
        async def insert(cursor: Cursor) -> Audited[None]:
            await cursor.execute(
                "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES (%s, %s, %s, %s)",
                (session.id, session.user_id, session.created_at, session.expires_at),
            )
            await _insert_refresh(cursor, refresh)
            if clear_failures_of:
                await cursor.execute("DELETE FROM login_failures WHERE username = %s", (clear_failures_of,))
            return Audited(None, await _append(cursor, [audit]))

        return await self._run(insert)

    async def get_session(self, session_id: str) -> Session | None:
        async def select(cursor: Cursor) -> Session | None:
            await cursor.execute("SELECT * FROM sessions WHERE id = %s", (session_id,))
            return _session(await cursor.fetchone())

        return await self._run(select)

    async def revoke_session(
        self, session_id: str, reason: str, now: float, audit: AuditEvent | None = None
    ) -> Audited[bool]:
        async def revoke(cursor: Cursor) -> Audited[bool]:
            await cursor.execute(
                "UPDATE sessions SET revoked_at = %s, revoked_reason = %s WHERE id = %s AND revoked_at IS NULL",
                (now, reason, session_id),
            )
            if cursor.rowcount != 1:
                return Audited(False)
            return Audited(True, await _append(cursor, [audit]))

        return await self._run(revoke)

    async def rotate_refresh_token(
        self, digest: str, new: RefreshToken, now: float, audit: AuditOf[Rotation] | None = None
    ) -> Audited[Rotation]:
        async def rotate(cursor: Cursor) -> Audited[Rotation]:
            rotation = await _rotate(cursor, digest, new, now)
            return Audited(rotation, await _append(cursor, audit(rotation) if audit else []))

        return await self._run(rotate)

    # -- password reset -------------------------------------------------------------------

    async def create_reset_token(self, token: ResetToken, audit: AuditEvent | None = None) -> int:
        async def insert(cursor: Cursor) -> int:
            # The user's row lock: two requests at once cannot both find no live token and leave two.
            await cursor.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (token.user_id,))
            await cursor.execute(
                "UPDATE reset_tokens SET invalidated_at = %s"
                " WHERE user_id = %s AND used_at IS NULL AND invalidated_at IS NULL",
                (token.created_at, token.user_id),
            )
            await cursor.execute(
                "INSERT INTO reset_tokens (digest, user_id, created_at, expires_at) VALUES (%s, %s, %s, %s)",
                (token.digest, token.user_id, token.created_at, token.expires_at),
            )
            return await _insert_audit(cursor, audit) if audit is not None else 0

        return await self._run(insert)

    async def find_reset_token(self, digest: str, now: float) -> ResetToken | None:
        async def select(cursor: Cursor) -> ResetToken | None:
            await cursor.execute(
                "SELECT * FROM reset_tokens WHERE digest = %s AND used_at IS NULL AND invalidated_at IS NULL"
                " AND expires_at > %s",
                (digest, now),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            return ResetToken(row["digest"], row["user_id"], row["created_at"], row["expires_at"])

        return await self._run(select)

    async def complete_reset(
        self, digest: str, password_hash: str, scheme: str, now: float, audit: AuditOf[int] | None = None
    ) -> Audited[str | None]:
        async def complete(cursor: Cursor) -> Audited[str | None]:
            # A parallel use waits on the row, then finds used_at set: it updates nothing and gets None.
            await cursor.execute(
                "UPDATE reset_tokens SET used_at = %s WHERE digest = %s AND used_at IS NULL"
                " AND invalidated_at IS NULL AND expires_at > %s RETURNING user_id",
                (now, digest, now),
            )
            row = await cursor.fetchone()
            if row is None:
                return Audited(None)
            user_id = str(row["user_id"])
            await cursor.execute(
                "UPDATE users SET password_hash = %s, hash_scheme = %s WHERE id = %s RETURNING username",
                (password_hash, scheme, user_id),
            )
            username = (await _one(cursor))["username"]
            revoked = await _revoke_user_sessions(cursor, user_id, "password_reset", now)
            await cursor.execute("DELETE FROM login_failures WHERE username = %s", (username,))
            return Audited(user_id, await _append(cursor, audit(revoked) if audit else []))

        return await self._run(complete)

    # -- audit ----------------------------------------------------------------------------

    async def append_audit(self, event: AuditEvent) -> int:
        async def insert(cursor: Cursor) -> int:
            return await _insert_audit(cursor, event)

        return await self._run(insert)

    async def list_audit(self, query: AuditQuery) -> list[AuditEvent]:
        clauses = ["id > %s"]
        params: list[Any] = [query.after_id]
        if query.user_id:
            clauses.append("user_id = %s")
            params.append(query.user_id)
        if query.username:
            clauses.append("username = %s")
            params.append(query.username)
        if query.event_types:
            clauses.append("event_type = ANY(%s)")
            params.append(list(query.event_types))
        if query.start_time is not None:
            clauses.append("occurred_at >= %s")
            params.append(query.start_time)
        if query.end_time is not None:
            clauses.append("occurred_at < %s")
            params.append(query.end_time)
        statement = f"SELECT * FROM audit_events WHERE {' AND '.join(clauses)} ORDER BY id LIMIT %s"  # noqa: S608  (fixed clauses, values bound)
        params.append(query.page_size)

        async def select(cursor: Cursor) -> list[AuditEvent]:
            await cursor.execute(statement.encode("utf-8"), params)
            return [_audit_event(row) for row in await cursor.fetchall()]

        return await self._run(select)

    # -- copy-store -----------------------------------------------------------------------

    async def count_rows(self) -> dict[str, int]:
        async def count(cursor: Cursor) -> dict[str, int]:
            counts = {}
            for table in TABLES:
                await cursor.execute(sql.SQL("SELECT COUNT(*) AS n FROM {}").format(sql.Identifier(table)))
                counts[table] = int((await _one(cursor))["n"])
            return counts

        return await self._run(count)

    async def dump(self) -> Rows:
        async def select(cursor: Cursor) -> Rows:
            await cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot of every table
            rows: Rows = {}
            for table, columns in TABLES.items():
                await cursor.execute(
                    sql.SQL("SELECT {} FROM {}").format(
                        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table)
                    )
                )
                rows[table] = [tuple(row[name] for name in columns) for row in await cursor.fetchall()]
            return rows

        return await self._run(select)

    async def load(self, rows: Rows) -> dict[str, int]:
        async def insert(cursor: Cursor) -> dict[str, int]:
            added: dict[str, int] = {}
            for table, columns in TABLES.items():
                statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
                    sql.Identifier(table),
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.SQL(", ").join(sql.Placeholder() for _ in columns),
                )
                values = [
                    [
                        Jsonb(value) if name in ("roles", "details") else value
                        for name, value in zip(columns, row, strict=True)
                    ]
                    for row in rows.get(table, [])
                ]
                await cursor.executemany(statement, values)
                added[table] = max(0, cursor.rowcount) if values else 0
            # explicit ids leave the identity behind: new events must number after the copied ones
            await cursor.execute(
                "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), GREATEST(COALESCE(MAX(id), 0), 1),"
                " MAX(id) IS NOT NULL) FROM audit_events"
            )
            return added

        return await self._run(insert)


def _audit_event(row: DictRow) -> AuditEvent:
    return AuditEvent(
        id=int(row["id"]),
        event_type=row["event_type"],
        occurred_at=row["occurred_at"],
        outcome=row["outcome"],
        user_id=row["user_id"],
        username=row["username"],
        client_ip=row["client_ip"],
        trace_id=row["trace_id"],
        reason=row["reason"],
        details=dict(row["details"]),
    )


async def _one(cursor: Cursor) -> DictRow:
    row = await cursor.fetchone()
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


async def _rotate(cursor: Cursor, digest: str, new: RefreshToken, now: float) -> Rotation:
    """Rotate the refresh token ``digest`` into ``new``, or end its session if it was rotated before."""
    await cursor.execute("SELECT * FROM refresh_tokens WHERE digest = %s FOR UPDATE", (digest,))
    token = await cursor.fetchone()
    if token is None:
        return Rotation(RotationOutcome.UNKNOWN)
    await cursor.execute("SELECT * FROM sessions WHERE id = %s FOR UPDATE", (token["session_id"],))
    session = _session(await cursor.fetchone())
    if session is None:  # foreign keys make this impossible
        raise RuntimeError("refresh token without a session")
    if token["rotated_at"] is not None:
        # A rotated token came back: it was stolen or replayed. End the whole family.
        if session.revoked_at is None:
            await cursor.execute(
                "UPDATE sessions SET revoked_at = %s, revoked_reason = 'refresh_reuse' WHERE id = %s",
                (now, session.id),
            )
        return Rotation(RotationOutcome.REUSED, session)
    if token["expires_at"] <= now or not session.active(now):
        return Rotation(RotationOutcome.INACTIVE, session)
    await cursor.execute("SELECT * FROM users WHERE id = %s", (session.user_id,))
    user = _user(await cursor.fetchone())
    if user is None:  # foreign keys make this impossible
        raise RuntimeError("session without a user")
    await cursor.execute("UPDATE refresh_tokens SET rotated_at = %s WHERE digest = %s", (now, digest))
    await _insert_refresh(cursor, RefreshToken(new.digest, session.id, new.created_at, new.expires_at))
    return Rotation(RotationOutcome.ROTATED, session, user)


async def _revoke_user_sessions(cursor: Cursor, user_id: str, reason: str, now: float, *, keep: str = "") -> int:
    """End every active session of ``user_id`` but ``keep``; how many."""
    await cursor.execute(
        "UPDATE sessions SET revoked_at = %s, revoked_reason = %s"
        " WHERE user_id = %s AND revoked_at IS NULL AND id != %s",
        (now, reason, user_id, keep),
    )
    return int(cursor.rowcount)


async def _insert_refresh(cursor: Cursor, token: RefreshToken) -> None:
    await cursor.execute(
        "INSERT INTO refresh_tokens (digest, session_id, created_at, expires_at) VALUES (%s, %s, %s, %s)",
        (token.digest, token.session_id, token.created_at, token.expires_at),
    )


async def _append(cursor: Cursor, events: Sequence[AuditEvent | None]) -> tuple[AuditEvent, ...]:
    """Append ``events`` (None: nothing) in the caller's transaction; each with the id it got."""
    return tuple([replace(event, id=await _insert_audit(cursor, event)) for event in events if event is not None])


async def _insert_audit(cursor: Cursor, event: AuditEvent) -> int:
    """Append ``event`` in the caller's transaction; its id."""
    await cursor.execute(
        "INSERT INTO audit_events (event_type, occurred_at, outcome, user_id, username, client_ip, trace_id,"
        " reason, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            event.event_type,
            event.occurred_at,
            event.outcome,
            event.user_id,
            event.username,
            event.client_ip,
            event.trace_id,
            event.reason,
            Jsonb(event.details),
        ),
    )
    return int((await _one(cursor))["id"])
