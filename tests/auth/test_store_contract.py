"""One contract for every Store: each test runs against SQLite and PostgreSQL alike.

``replicas()`` opens another store on the same data (SQLite: another connection and thread on the same
file; PostgreSQL: another pool on the same database), as a second process or replica would; the
concurrency cases spread real parallel calls over two of them. Behaviour is checked through the Store
interface only; the raw database is touched only to arrange what no store method may do (a newer schema,
a change to the audit log) and to see that the database itself refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from services.auth.backends import backend_for, sqlite_path
from services.auth.migrations import SchemaTooNew, migrations
from services.auth.settings import AuthSettings
from services.auth.store import (
    AuditEvent,
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

POLICY = LockoutPolicy(threshold=5, base_seconds=60, max_seconds=3600)
NOW = 1_800_000_000.0


@dataclass
class Backend:
    dialect: str
    url: str
    opened: list[Store]

    async def replica(self) -> Store:
        store = backend_for(self.url, AuthSettings(database_pool_min_size=4, database_pool_max_size=4)).store
        await store.open()
        self.opened.append(store)
        return store

    def execute(self, statement: str) -> None:
        """Run raw SQL on the database (arranging only), outside any store."""
        if self.dialect == "sqlite":
            with contextlib.closing(sqlite3.connect(sqlite_path(self.url))) as db, db:
                db.execute(statement)
        else:
            with psycopg.connect(self.url, autocommit=True) as db:
                db.execute(statement.encode())


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    url = f"sqlite:///{tmp_path / 'auth.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    backend = Backend(request.param, url, [])
    yield backend
    for store in backend.opened:
        await store.close()


@pytest.fixture
async def two(backend: Backend) -> tuple[Store, Store]:
    return await backend.replica(), await backend.replica()


def user(name: str, email: str | None = None) -> User:
    return User(str(uuid.uuid4()), name, email or f"{name}@example.com", "$argon2id$h", "argon2id", ("user",), NOW)


def event(event_type: str, username: str = "", **fields: str) -> AuditEvent:
    return AuditEvent(event_type=event_type, occurred_at=NOW, outcome="success", username=username, **fields)


async def session_of(store: Store, account: User, digest: str = "r1") -> Session:
    session = Session(str(uuid.uuid4()), account.id, NOW, NOW + 3600)
    await store.create_session(session, RefreshToken(digest, session.id, NOW, NOW + 3600))
    return session


def spread(stores: tuple[Store, Store], n: int) -> list[Store]:
    return [stores[i % 2] for i in range(n)]


class Refused(Exception):
    """Raised by an audit builder: the transaction it is called in must leave nothing."""


def refuse(_: object) -> list[AuditEvent]:
    raise Refused


async def events(store: Store, *types: str) -> list[AuditEvent]:
    return await store.list_audit(AuditQuery(page_size=500, event_types=types))


# -- registration ----------------------------------------------------------------------------------


async def test_a_user_reads_back_by_name_id_and_address(two):
    a, b = two
    account = user("ada")
    event_id = await a.create_user(account, event("REGISTERED", "ada"))
    assert event_id > 0
    assert await b.get_user_by_username("ada") == account
    assert await b.get_user_by_id(account.id) == account
    assert await b.get_user_by_email("ada@example.com") == account
    assert await b.list_users() == [account]
    assert await b.count_hash_schemes() == {"argon2id": 1}


async def test_concurrent_registrations_of_one_name_make_one_account(two):
    attempts = [
        store.create_user(user("zoe", f"zoe{i}@example.com"), event("REGISTERED", "zoe"))
        for i, store in enumerate(spread(two, 12))
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert sum(isinstance(result, int) for result in results) == 1
    assert all(isinstance(result, UserExists) for result in results if not isinstance(result, int))
    assert [account.username for account in await two[0].list_users()] == ["zoe"]
    assert len(await events(two[1], "REGISTERED")) == 1  # the losers' events rolled back with their inserts


async def test_concurrent_registrations_of_one_address_make_one_account(two):
    attempts = [store.create_user(user(f"name{i}", "same@example.com")) for i, store in enumerate(spread(two, 12))]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert sum(isinstance(result, int) for result in results) == 1
    assert len(await two[1].list_users()) == 1


# -- failed logins and lockout ---------------------------------------------------------------------


async def test_parallel_failures_lock_at_exactly_the_threshold(two):
    def audit(state: LockState) -> list[AuditEvent]:
        kinds = ["ACCOUNT_LOCKED"] if state.just_locked else []
        return [event(kind, "eve", reason=str(state.failed_count)) for kind in [*kinds, "LOGIN_FAILED"]]

    written = await asyncio.gather(
        *(store.record_login_failure("eve", NOW, POLICY, audit) for store in spread(two, 50))
    )
    states = [result.value for result in written]
    assert sorted(state.failed_count for state in states if not state.locked(NOW) or state.just_locked) == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert sum(state.just_locked for state in states) == 1
    lock = await two[1].get_lock("eve")
    assert (lock.failed_count, lock.lockouts, lock.locked_until) == (5, 1, NOW + 60)
    assert len(await events(two[0], "ACCOUNT_LOCKED")) == 1
    assert len(await events(two[0], "LOGIN_FAILED")) == 50


async def test_an_expired_lock_counts_afresh_and_doubles_the_next(two):
    a, b = two
    for _ in range(POLICY.threshold):
        await a.record_login_failure("ivo", NOW, POLICY)
    later = NOW + 61
    assert (await b.record_login_failure("ivo", later, POLICY)).value.failed_count == 1
    for _ in range(POLICY.threshold - 1):
        state = (await b.record_login_failure("ivo", later, POLICY)).value
    assert (state.just_locked, state.locked_until, state.lockouts) == (True, later + 120, 2)


async def test_clearing_failures_forgets_them(two):
    a, b = two
    await a.record_login_failure("una", NOW, POLICY)
    await b.clear_login_failures("una", event("ACCOUNT_UNLOCKED", "una"))
    assert await a.get_lock("una") == LockState()
    assert len(await events(a, "ACCOUNT_UNLOCKED")) == 1


async def test_a_refused_event_leaves_no_failure_counted(two):
    a, b = two
    with pytest.raises(Refused):
        await a.record_login_failure("kim", NOW, POLICY, refuse)
    assert (await b.get_lock("kim")).failed_count == 0


# -- sessions and refresh tokens -------------------------------------------------------------------


async def test_two_concurrent_refreshes_rotate_once_and_end_the_family(two):
    a, b = two
    account = user("rae")
    await a.create_user(account)
    session = await session_of(a, account)
    rotations = await asyncio.gather(
        a.rotate_refresh_token("r1", RefreshToken("ra", "", NOW, NOW + 3600), NOW),
        b.rotate_refresh_token("r1", RefreshToken("rb", "", NOW, NOW + 3600), NOW),
    )
    assert sorted(r.value.outcome.value for r in rotations) == ["reused", "rotated"]
    ended = await b.get_session(session.id)
    assert ended is not None
    assert ended.revoked_reason == "refresh_reuse"
    winner = next(r for r in rotations if r.value.outcome is RotationOutcome.ROTATED)
    assert winner.value.user == account


async def test_a_rotation_is_audited_with_what_it_found(two):
    a, b = two
    account = user("ole")
    await a.create_user(account)
    await session_of(a, account)

    def audit(rotation: Rotation) -> list[AuditEvent]:
        return [event("TOKEN_REFRESHED", rotation.user.username if rotation.user else "")]

    written = await b.rotate_refresh_token("r1", RefreshToken("r2", "", NOW, NOW + 3600), NOW, audit)
    assert [e.username for e in written.events] == ["ole"]
    assert written.events[0].id > 0
    unknown = await a.rotate_refresh_token("nope", RefreshToken("r3", "", NOW, NOW + 3600), NOW)
    assert unknown.value.outcome is RotationOutcome.UNKNOWN
    expired = await a.rotate_refresh_token("r2", RefreshToken("r4", "", NOW, NOW + 9999), NOW + 7200)
    assert expired.value.outcome is RotationOutcome.INACTIVE


async def test_one_of_concurrent_revocations_revokes(two):
    a, b = two
    account = user("lev")
    await a.create_user(account)
    session = await session_of(a, account)
    results = await asyncio.gather(
        *(store.revoke_session(session.id, "logout", NOW, event("LOGGED_OUT")) for store in spread(two, 6))
    )
    assert sum(result.value for result in results) == 1
    assert len(await events(b, "LOGGED_OUT")) == 1


# -- passwords -------------------------------------------------------------------------------------


async def test_a_password_change_and_its_revocations_commit_together(two):
    a, b = two
    account = user("max")
    await a.create_user(account)
    kept, other = await session_of(a, account, "k"), await session_of(b, account, "o")
    with pytest.raises(Refused):
        await a.change_password(account.id, "$new", "argon2id", NOW, keep_session=kept.id, audit=refuse)
    assert (await b.get_user_by_id(account.id)).password_hash == account.password_hash
    assert (await b.get_session(other.id)).active(NOW)

    written = await b.change_password(
        account.id,
        "$new",
        "argon2id",
        NOW,
        keep_session=kept.id,
        audit=lambda n: [event("PASSWORD_CHANGED", reason=str(n))],
    )
    assert written.value == 1
    assert written.events[0].reason == "1"
    assert (await a.get_user_by_id(account.id)).password_hash == "$new"
    assert not (await a.get_session(other.id)).active(NOW)
    assert (await a.get_session(kept.id)).active(NOW)


async def test_a_compare_and_set_hash_change_wins_once(two):
    a, _ = two
    account = user("pia")
    await a.create_user(account)
    results = await asyncio.gather(
        *(
            store.set_password_hash(account.id, f"$v{i}", "argon2id", expected=account.password_hash)
            for i, store in enumerate(spread(two, 6))
        )
    )
    assert sum(result.value for result in results) == 1


# -- password reset --------------------------------------------------------------------------------


async def test_a_reset_token_is_used_once_under_concurrency(two):
    a, b = two
    account = user("ida")
    await a.create_user(account)
    await a.record_login_failure("ida", NOW, POLICY)
    session = await session_of(a, account)
    await a.create_reset_token(ResetToken("t1", account.id, NOW, NOW + 600), event("PASSWORD_RESET_REQUESTED"))
    assert await b.find_reset_token("t1", NOW) == ResetToken("t1", account.id, NOW, NOW + 600)
    results = await asyncio.gather(
        *(
            store.complete_reset("t1", f"$r{i}", "argon2id", NOW, lambda n: [event("PASSWORD_RESET_COMPLETED")])
            for i, store in enumerate(spread(two, 8))
        )
    )
    assert [result.value for result in results].count(account.id) == 1
    assert [result.value for result in results].count(None) == 7
    assert await b.find_reset_token("t1", NOW) is None
    assert not (await b.get_session(session.id)).active(NOW)
    assert (await b.get_lock("ida")).failed_count == 0
    assert len(await events(a, "PASSWORD_RESET_COMPLETED")) == 1


async def test_a_refused_reset_event_leaves_the_token_usable(two):
    a, b = two
    account = user("jon")
    await a.create_user(account)
    await a.create_reset_token(ResetToken("t2", account.id, NOW, NOW + 600))
    with pytest.raises(Refused):
        await a.complete_reset("t2", "$new", "argon2id", NOW, refuse)
    assert await b.find_reset_token("t2", NOW) is not None
    assert (await b.get_user_by_id(account.id)).password_hash == account.password_hash


async def test_concurrent_reset_requests_leave_one_live_token(two):
    a, b = two
    account = user("noa")
    await a.create_user(account)
    digests = [f"d{i}" for i in range(6)]
    await asyncio.gather(
        *(
            store.create_reset_token(ResetToken(digest, account.id, NOW, NOW + 600))
            for digest, store in zip(digests, spread(two, 6), strict=True)
        )
    )
    live = [digest for digest in digests if await b.find_reset_token(digest, NOW)]
    assert len(live) == 1
    assert await a.find_reset_token("d0", NOW + 601) is None or live == ["d0"]


# -- audit -----------------------------------------------------------------------------------------


async def test_the_audit_log_pages_and_filters(two):
    a, b = two
    for i in range(5):
        await (a if i % 2 else b).append_audit(event("LOGIN_FAILED", f"u{i % 2}", user_id=f"id{i % 2}"))
    first = await a.list_audit(AuditQuery(page_size=2))
    rest = await b.list_audit(AuditQuery(page_size=10, after_id=first[-1].id))
    assert len(first) == 2
    assert len(rest) == 3
    assert [e.username for e in await a.list_audit(AuditQuery(page_size=10, username="u1"))] == ["u1", "u1"]
    assert len(await a.list_audit(AuditQuery(page_size=10, user_id="id0"))) == 3
    assert await a.list_audit(AuditQuery(page_size=10, start_time=NOW + 1)) == []
    assert len(await a.list_audit(AuditQuery(page_size=10, end_time=NOW + 1, event_types=("LOGIN_FAILED",)))) == 5
    assert first[0].details == {}
    assert first[0].occurred_at == NOW


async def test_the_database_refuses_changes_to_the_audit_log(backend):
    store = await backend.replica()
    await store.append_audit(event("LOGIN_FAILED", "x"))
    refused = sqlite3.DatabaseError if backend.dialect == "sqlite" else psycopg.DatabaseError
    for statement in ("UPDATE audit_events SET reason = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(refused, match="append-only"):
            backend.execute(statement)
    if backend.dialect == "postgresql":
        with pytest.raises(refused, match="append-only"):
            backend.execute("TRUNCATE audit_events")
    assert len(await events(store, "LOGIN_FAILED")) == 1


# -- schema ----------------------------------------------------------------------------------------


async def test_replicas_opening_at_once_migrate_once(backend):
    stores = await asyncio.gather(*(backend.replica() for _ in range(4)))
    dialect = "sqlite" if backend.dialect == "sqlite" else "postgresql"
    for store in stores:
        assert await store.schema_version() == len(migrations(dialect))  # type: ignore[attr-defined]


async def test_a_schema_newer_than_the_code_is_refused(backend):
    store = await backend.replica()
    await store.close()
    backend.opened.remove(store)
    backend.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)")
    with pytest.raises(SchemaTooNew, match="schema version 999"):
        await backend.replica()


async def test_a_taken_name_is_user_exists_and_the_store_stays_usable(backend):
    store = await backend.replica()
    await store.create_user(user("abe"))
    with pytest.raises(UserExists):
        await store.create_user(user("abe", "other@example.com"))
    assert await store.get_user_by_username("nobody") is None
