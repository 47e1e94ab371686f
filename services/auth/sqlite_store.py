"""The SQLite implementation of :class:`~services.auth.store.Store`.

One connection, used from one dedicated thread, so that the event loop never blocks on disk. Every
method that writes runs in one ``BEGIN IMMEDIATE`` transaction: it takes the database's write lock
before its first read, so a read-modify-write (the lockout counter, refresh rotation, reset-token use)
is atomic against any other connection too (another store on the same file, another process such as
the CLI), not only thanks to the single thread. The audit events of a change are inserted in the
change's transaction (:func:`_append`). WAL mode lets readers (backups, the operator's sqlite3 shell)
work beside it. The schema is versioned: ``migrations/sqlite/NNNN_*.sql`` are applied in order at open,
each once, and a database migrated by newer code is refused. Parameterised queries only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

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
log = logging.getLogger(__name__)

# Errors that say the database cannot do the work now (locked by another writer past the busy timeout,
# disk full or failing), not that the statement is wrong.
_UNAVAILABLE = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN"})


def _user(row: sqlite3.Row | None) -> User | None:
    if row is None:
        return None
    return User(
        id=row["id"],
        username=row["username"],
        email=row["email"],
        password_hash=row["password_hash"],
        hash_scheme=row["hash_scheme"],
        roles=tuple(json.loads(row["roles"])),
        created_at=row["created_at"],
    )


def _session(row: sqlite3.Row | None) -> Session | None:
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


def _lock(row: sqlite3.Row | None, *, just_locked: bool = False) -> LockState:
    if row is None:
        return LockState()
    return LockState(
        failed_count=row["failed_count"],
        locked_until=row["locked_until"],
        lockouts=row["lockouts"],
        just_locked=just_locked,
    )


class SqliteStore:
    """Auth storage in one SQLite file (WAL)."""

    def __init__(self, path: Path, *, busy_timeout_seconds: float = 5.0, retry_after_seconds: float = 1.0):
        self._path = path
        self._busy_timeout_ms = int(busy_timeout_seconds * 1000)
        self._retry_after = retry_after_seconds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auth-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run ``fn`` on the database thread: in one write transaction, or (``write=False``) as plain reads."""

        def transaction() -> T:
            db = self._db
            if db is None:
                raise RuntimeError("the store is not open")
            if not write:
                return fn(db)
            db.execute("BEGIN IMMEDIATE")  # the write lock first: no other writer between our read and write
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, transaction)
        except sqlite3.OperationalError as error:
            if _errorname(error) not in _UNAVAILABLE:
                raise
            log.warning("auth.store_unavailable", extra=fields(store="sqlite", error=_errorname(error)))
            raise StoreUnavailable(self._retry_after) from None

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        def connect() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: _run opens and ends each transaction itself.
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms:d}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            try:
                self._migrate(db, str(self._path))
            except BaseException:
                db.close()
                raise
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._executor, connect)

    @staticmethod
    def _migrate(db: sqlite3.Connection, where: str) -> None:
        """Apply the missing migrations, all in one write transaction (two processes opening the same new file
        at once: the second waits for the first, then finds nothing left to do)."""
        known = migrations("sqlite")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
            current = int(db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
            check_not_newer(current, known, where)
            for migration in known[current:]:
                for statement in _statements(migration.script):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, strftime('%s','now'))",
                    (migration.version,),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone(), write=False)

    async def schema_version(self) -> int:
        return await self._run(
            lambda db: int(db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]), write=False
        )

    async def close(self) -> None:
        def disconnect() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, disconnect)
        self._executor.shutdown(wait=True)

    # -- users ----------------------------------------------------------------------------

    async def create_user(self, user: User, audit: AuditEvent | None = None) -> int:
        def insert(db: sqlite3.Connection) -> int:
            try:
                db.execute(
                    "INSERT INTO users (id, username, email, password_hash, hash_scheme, roles, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        user.id,
                        user.username,
                        user.email,
                        user.password_hash,
                        user.hash_scheme,
                        json.dumps(list(user.roles)),
                        user.created_at,
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise UserExists(str(error)) from None
            return _insert_audit(db, audit) if audit is not None else 0

        return await self._run(insert)

    async def get_user_by_username(self, username: str) -> User | None:
        return await self._run(
            lambda db: _user(db.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()), write=False
        )

    async def get_user_by_id(self, user_id: str) -> User | None:
        return await self._run(
            lambda db: _user(db.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()), write=False
        )

    async def get_user_by_email(self, email: str) -> User | None:
        return await self._run(
            lambda db: _user(db.execute("SELECT * FROM users WHERE email = ?", (email,)).fetchone()), write=False
        )

    async def list_users(self) -> list[User]:
        def select(db: sqlite3.Connection) -> list[User]:
            return [user for row in db.execute("SELECT * FROM users ORDER BY created_at") if (user := _user(row))]

        return await self._run(select, write=False)

    async def set_password_hash(
        self,
        user_id: str,
        password_hash: str,
        scheme: str,
        *,
        expected: str | None = None,
        audit: AuditEvent | None = None,
    ) -> Audited[bool]:
        def update(db: sqlite3.Connection) -> Audited[bool]:
            if expected is None:
                cursor = db.execute(
                    "UPDATE users SET password_hash = ?, hash_scheme = ? WHERE id = ?", (password_hash, scheme, user_id)
                )
            else:
                cursor = db.execute(
                    "UPDATE users SET password_hash = ?, hash_scheme = ? WHERE id = ? AND password_hash = ?",
                    (password_hash, scheme, user_id, expected),
                )
            if cursor.rowcount != 1:
                return Audited(False)
            return Audited(True, _append(db, [audit]))

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
        def change(db: sqlite3.Connection) -> Audited[int]:
            db.execute(
                "UPDATE users SET password_hash = ?, hash_scheme = ? WHERE id = ?", (password_hash, scheme, user_id)
            )
            revoked = _revoke_user_sessions(db, user_id, "password_changed", now, keep=keep_session)
            return Audited(revoked, _append(db, audit(revoked) if audit else []))

        return await self._run(change)

    async def count_hash_schemes(self) -> dict[str, int]:
        def count(db: sqlite3.Connection) -> dict[str, int]:
            return {
                row[0]: row[1] for row in db.execute("SELECT hash_scheme, COUNT(*) FROM users GROUP BY hash_scheme")
            }

        return await self._run(count, write=False)

    # -- lockout --------------------------------------------------------------------------

    async def get_lock(self, username: str) -> LockState:
        return await self._run(
            lambda db: _lock(db.execute("SELECT * FROM login_failures WHERE username = ?", (username,)).fetchone()),
            write=False,
        )

    async def record_login_failure(
        self, username: str, now: float, policy: LockoutPolicy, audit: AuditOf[LockState] | None = None
    ) -> Audited[LockState]:
        def record(db: sqlite3.Connection) -> Audited[LockState]:
            state = _count_failure(db, username, now, policy)
            return Audited(state, _append(db, audit(state) if audit else []))

        return await self._run(record)

    async def clear_login_failures(self, username: str, audit: AuditEvent | None = None) -> Audited[None]:
        def clear(db: sqlite3.Connection) -> Audited[None]:
            db.execute("DELETE FROM login_failures WHERE username = ?", (username,))
            return Audited(None, _append(db, [audit]))

        return await self._run(clear)

    # -- sessions -------------------------------------------------------------------------

    async def create_session(
        self, session: Session, refresh: RefreshToken, *, clear_failures_of: str = "", audit: AuditEvent | None = None
    ) -> Audited[None]:
        def insert(db: sqlite3.Connection) -> Audited[None]:
            db.execute(
                "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (session.id, session.user_id, session.created_at, session.expires_at),
            )
            _insert_refresh(db, refresh)
            if clear_failures_of:
                db.execute("DELETE FROM login_failures WHERE username = ?", (clear_failures_of,))
            return Audited(None, _append(db, [audit]))

        return await self._run(insert)

    async def get_session(self, session_id: str) -> Session | None:
        return await self._run(
            lambda db: _session(db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()),
            write=False,
        )

    async def revoke_session(
        self, session_id: str, reason: str, now: float, audit: AuditEvent | None = None
    ) -> Audited[bool]:
        def revoke(db: sqlite3.Connection) -> Audited[bool]:
            cursor = db.execute(
                "UPDATE sessions SET revoked_at = ?, revoked_reason = ? WHERE id = ? AND revoked_at IS NULL",
                (now, reason, session_id),
            )
            if cursor.rowcount != 1:
                return Audited(False)
            return Audited(True, _append(db, [audit]))

        return await self._run(revoke)

    async def rotate_refresh_token(
        self, digest: str, new: RefreshToken, now: float, audit: AuditOf[Rotation] | None = None
    ) -> Audited[Rotation]:
        def rotate(db: sqlite3.Connection) -> Audited[Rotation]:
            rotation = _rotate(db, digest, new, now)
            return Audited(rotation, _append(db, audit(rotation) if audit else []))

        return await self._run(rotate)

    # -- password reset -------------------------------------------------------------------

    async def create_reset_token(self, token: ResetToken, audit: AuditEvent | None = None) -> int:
        def insert(db: sqlite3.Connection) -> int:
            db.execute(
                "UPDATE reset_tokens SET invalidated_at = ?"
                " WHERE user_id = ? AND used_at IS NULL AND invalidated_at IS NULL",
                (token.created_at, token.user_id),
            )
            db.execute(
                "INSERT INTO reset_tokens (digest, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (token.digest, token.user_id, token.created_at, token.expires_at),
            )
            return _insert_audit(db, audit) if audit is not None else 0

        return await self._run(insert)

    async def find_reset_token(self, digest: str, now: float) -> ResetToken | None:
        def select(db: sqlite3.Connection) -> ResetToken | None:
            row = db.execute(
                "SELECT * FROM reset_tokens WHERE digest = ? AND used_at IS NULL AND invalidated_at IS NULL"
                " AND expires_at > ?",
                (digest, now),
            ).fetchone()
            if row is None:
                return None
            return ResetToken(row["digest"], row["user_id"], row["created_at"], row["expires_at"])

        return await self._run(select, write=False)

    async def complete_reset(
        self, digest: str, password_hash: str, scheme: str, now: float, audit: AuditOf[int] | None = None
    ) -> Audited[str | None]:
        def complete(db: sqlite3.Connection) -> Audited[str | None]:
            row = db.execute(
                "UPDATE reset_tokens SET used_at = ? WHERE digest = ? AND used_at IS NULL"
                " AND invalidated_at IS NULL AND expires_at > ? RETURNING user_id",
                (now, digest, now),
            ).fetchone()
            if row is None:
                return Audited(None)
            user_id = str(row["user_id"])
            db.execute(
                "UPDATE users SET password_hash = ?, hash_scheme = ? WHERE id = ?", (password_hash, scheme, user_id)
            )
            revoked = _revoke_user_sessions(db, user_id, "password_reset", now)
            db.execute(
                "DELETE FROM login_failures WHERE username = (SELECT username FROM users WHERE id = ?)", (user_id,)
            )
            return Audited(user_id, _append(db, audit(revoked) if audit else []))

        return await self._run(complete)

    # -- audit ----------------------------------------------------------------------------

    async def append_audit(self, event: AuditEvent) -> int:
        return await self._run(lambda db: _insert_audit(db, event))

    async def list_audit(self, query: AuditQuery) -> list[AuditEvent]:
        clauses = ["id > ?"]
        params: list[Any] = [query.after_id]
        if query.user_id:
            clauses.append("user_id = ?")
            params.append(query.user_id)
        if query.username:
            clauses.append("username = ?")
            params.append(query.username)
        if query.event_types:
            clauses.append(f"event_type IN ({', '.join('?' for _ in query.event_types)})")
            params.extend(query.event_types)
        if query.start_time is not None:
            clauses.append("occurred_at >= ?")
            params.append(query.start_time)
        if query.end_time is not None:
            clauses.append("occurred_at < ?")
            params.append(query.end_time)
        sql = f"SELECT * FROM audit_events WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?"  # noqa: S608  (fixed clauses, values bound)
        params.append(query.page_size)

        def select(db: sqlite3.Connection) -> list[AuditEvent]:
            return [
                AuditEvent(
                    id=row["id"],
                    event_type=row["event_type"],
                    occurred_at=row["occurred_at"],
                    outcome=row["outcome"],
                    user_id=row["user_id"],
                    username=row["username"],
                    client_ip=row["client_ip"],
                    trace_id=row["trace_id"],
                    reason=row["reason"],
                    details=json.loads(row["details"]),
                )
                for row in db.execute(sql, params)
            ]

        return await self._run(select, write=False)

    # -- copy-store -----------------------------------------------------------------------

    async def count_rows(self) -> dict[str, int]:
        def count(db: sqlite3.Connection) -> dict[str, int]:
            return {table: int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]) for table in TABLES}  # noqa: S608  (fixed names)

        return await self._run(count)

    async def dump(self) -> Rows:
        def select(db: sqlite3.Connection) -> Rows:
            return {
                table: [_row_out(columns, row) for row in db.execute(f"SELECT {', '.join(columns)} FROM {table}")]  # noqa: S608  (fixed names)
                for table, columns in TABLES.items()
            }

        return await self._run(select)  # a write transaction: one consistent snapshot

    async def load(self, rows: Rows) -> dict[str, int]:
        def insert(db: sqlite3.Connection) -> dict[str, int]:
            added: dict[str, int] = {}
            for table, columns in TABLES.items():
                statement = (
                    f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"  # noqa: S608  (fixed names)
                )
                before = db.total_changes
                db.executemany(statement, [_row_in(columns, row) for row in rows.get(table, [])])
                added[table] = db.total_changes - before
            return added

        return await self._run(insert)


_JSON_COLUMNS = frozenset({"roles", "details"})


def _row_out(columns: tuple[str, ...], row: sqlite3.Row) -> tuple[object, ...]:
    return tuple(json.loads(row[name]) if name in _JSON_COLUMNS else row[name] for name in columns)


def _row_in(columns: tuple[str, ...], row: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(
        json.dumps(value, sort_keys=True) if name in _JSON_COLUMNS else value
        for name, value in zip(columns, row, strict=True)
    )


def _count_failure(db: sqlite3.Connection, username: str, now: float, policy: LockoutPolicy) -> LockState:
    """Count one failed login of ``username`` (the write lock is held), locking it at the threshold; the new state."""
    state = _lock(db.execute("SELECT * FROM login_failures WHERE username = ?", (username,)).fetchone())
    after = policy.after_failure(state, now)
    if after is None:
        return state  # already locked: a parallel attempt got there first; do not count past it
    db.execute(
        "INSERT INTO login_failures (username, failed_count, locked_until, lockouts) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(username) DO UPDATE SET failed_count = excluded.failed_count,"
        " locked_until = excluded.locked_until, lockouts = excluded.lockouts",
        (username, after.failed_count, after.locked_until, after.lockouts),
    )
    return after


def _rotate(db: sqlite3.Connection, digest: str, new: RefreshToken, now: float) -> Rotation:
    """Rotate the refresh token ``digest`` into ``new``, or end its session if it was rotated before."""
    row = db.execute("SELECT * FROM refresh_tokens WHERE digest = ?", (digest,)).fetchone()
    if row is None:
        return Rotation(RotationOutcome.UNKNOWN)
    session = _session(db.execute("SELECT * FROM sessions WHERE id = ?", (row["session_id"],)).fetchone())
    if session is None:  # foreign keys make this impossible
        raise RuntimeError("refresh token without a session")
    if row["rotated_at"] is not None:
        # A rotated token came back: it was stolen or replayed. End the whole family.
        if session.revoked_at is None:
            db.execute(
                "UPDATE sessions SET revoked_at = ?, revoked_reason = 'refresh_reuse' WHERE id = ?",
                (now, session.id),
            )
        return Rotation(RotationOutcome.REUSED, session)
    if row["expires_at"] <= now or not session.active(now):
        return Rotation(RotationOutcome.INACTIVE, session)
    user = _user(db.execute("SELECT * FROM users WHERE id = ?", (session.user_id,)).fetchone())
    if user is None:  # foreign keys make this impossible
        raise RuntimeError("session without a user")
    db.execute("UPDATE refresh_tokens SET rotated_at = ? WHERE digest = ?", (now, digest))
    _insert_refresh(db, RefreshToken(new.digest, session.id, new.created_at, new.expires_at))
    return Rotation(RotationOutcome.ROTATED, session, user)


def _revoke_user_sessions(db: sqlite3.Connection, user_id: str, reason: str, now: float, *, keep: str = "") -> int:
    """End every active session of ``user_id`` but ``keep``; how many."""
    cursor = db.execute(
        "UPDATE sessions SET revoked_at = ?, revoked_reason = ? WHERE user_id = ? AND revoked_at IS NULL AND id != ?",
        (now, reason, user_id, keep),
    )
    return int(cursor.rowcount)


def _insert_refresh(db: sqlite3.Connection, token: RefreshToken) -> None:
    db.execute(
        "INSERT INTO refresh_tokens (digest, session_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
        (token.digest, token.session_id, token.created_at, token.expires_at),
    )


def _errorname(error: sqlite3.OperationalError) -> str:
    """The primary SQLite result code's name (SQLITE_IOERR for SQLITE_IOERR_WRITE, ...)."""
    return "_".join(getattr(error, "sqlite_errorname", "SQLITE_ERROR").split("_")[:2])


def _statements(script: str) -> list[str]:
    """Split a migration into statements (trigger bodies keep their inner semicolons)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def _append(db: sqlite3.Connection, events: Sequence[AuditEvent | None]) -> tuple[AuditEvent, ...]:
    """Append ``events`` (None: nothing) in the caller's transaction; each with the id it got."""
    return tuple(replace(event, id=_insert_audit(db, event)) for event in events if event is not None)


def _insert_audit(db: sqlite3.Connection, event: AuditEvent) -> int:
    """Append ``event`` in the caller's transaction; its id."""
    cursor = db.execute(
        "INSERT INTO audit_events (event_type, occurred_at, outcome, user_id, username, client_ip, trace_id,"
        " reason, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.event_type,
            event.occurred_at,
            event.outcome,
            event.user_id,
            event.username,
            event.client_ip,
            event.trace_id,
            event.reason,
            json.dumps(event.details, sort_keys=True),
        ),
    )
    return int(cursor.lastrowid or 0)
