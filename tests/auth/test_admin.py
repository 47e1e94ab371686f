"""The audit log through ListAuditEvents (admin only), and what the service logs at start."""

from __future__ import annotations

import sqlite3

import grpc
from auth.v1 import auth_pb2 as pb

from tests.auth.conftest import PASSWORD, bearer
from tests.rpc import rpc_error

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


async def test_every_event_is_audited_with_ip_and_trace_id(auth):
    await auth.register("audrey")
    await rpc_error(auth.login("audrey", "the wrong password here"))
    await auth.login("audrey", metadata=(("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01"),))
    admin = await auth.admin_token()
    page = await auth.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(username="audrey"), metadata=bearer(admin), timeout=5
    )
    kinds = [pb.AuditEventType.Name(event.event_type) for event in page.events]
    assert kinds == ["AUDIT_EVENT_TYPE_REGISTERED", "AUDIT_EVENT_TYPE_LOGIN_FAILED", "AUDIT_EVENT_TYPE_LOGIN_SUCCEEDED"]
    failed, succeeded = page.events[1], page.events[2]
    assert failed.outcome == pb.AUDIT_OUTCOME_FAILURE
    assert failed.reason == "bad_password"
    assert succeeded.trace_id == TRACE_ID
    assert all(event.client_ip == "127.0.0.1" and event.user_id for event in page.events)


async def test_audit_pages_and_filters(auth, clock):
    for name in ("page.one", "page.two", "page.three"):
        await auth.register(name)
    admin = await auth.admin_token()
    seen = []
    token = ""
    while True:
        page = await auth.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=2, page_token=token, event_types=[pb.AUDIT_EVENT_TYPE_REGISTERED]),
            metadata=bearer(admin),
            timeout=5,
        )
        seen.extend(event.username for event in page.events)
        token = page.next_page_token
        if not token:
            break
    assert seen == ["admin", "page.one", "page.two", "page.three"]
    clock.advance(3600)
    await auth.register("page.later")
    admin = await auth.admin_token()
    from google.protobuf import timestamp_pb2

    since = timestamp_pb2.Timestamp()
    since.FromSeconds(int(clock.now - 60))
    later = await auth.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(start_time=since, event_types=[pb.AUDIT_EVENT_TYPE_REGISTERED]),
        metadata=bearer(admin),
        timeout=5,
    )
    assert [event.username for event in later.events] == ["page.later"]
    by_user = await auth.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(username="page.two"), metadata=bearer(admin), timeout=5
    )
    assert {event.username for event in by_user.events} == {"page.two"}


async def test_audit_needs_the_admin_role(auth):
    await auth.register("mere.user")
    token = (await auth.login("mere.user")).access_token
    denied = await rpc_error(auth.stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=bearer(token), timeout=5))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    anonymous = await rpc_error(auth.stub.ListAuditEvents(pb.ListAuditEventsRequest(), timeout=5))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_audit_queries(auth):
    admin = await auth.admin_token()
    for request in (
        pb.ListAuditEventsRequest(page_size=-1),
        pb.ListAuditEventsRequest(page_size=100000),
        pb.ListAuditEventsRequest(page_token="garbage!"),
        pb.ListAuditEventsRequest(event_types=[999]),
    ):
        error = await rpc_error(auth.stub.ListAuditEvents(request, metadata=bearer(admin), timeout=5))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request


async def test_audit_log_is_append_only(auth):
    import sqlite3

    import pytest

    await auth.register("immutable")
    with sqlite3.connect(auth.data_dir / "auth.db") as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit_events")


async def test_start_logs_the_hash_profile(start_auth, logs, tmp_path):
    await start_auth(hash_profile="production", data_dir=tmp_path / "prod")
    [line] = logs.events("auth.hash_profile")
    assert (line["profile"], line["memory_kib"], line["time_cost"], line["parallelism"]) == ("production", 19456, 2, 1)


async def test_an_account_and_its_registered_event_commit_together(auth):
    """If the audit event cannot be written, the account is not created either (one transaction)."""
    writer = sqlite3.connect(auth.data_dir / "auth.db")
    with writer:
        writer.execute(
            "CREATE TRIGGER refuse_registered BEFORE INSERT ON audit_events WHEN NEW.event_type = 'REGISTERED'"
            " BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
        )
    request = pb.RegisterRequest(username="ulla", email="ulla@example.com", password=PASSWORD)
    failed = await rpc_error(auth.stub.Register(request, timeout=10))
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert "audit refused" not in failed.details()  # the cause goes to the log only
    with writer:
        writer.execute("DROP TRIGGER refuse_registered")
    writer.close()
    # Nothing of the first attempt was kept: the same username and address register now, once.
    created = await auth.stub.Register(request, timeout=10)
    assert created.user_id
    events = auth.query("SELECT user_id FROM audit_events WHERE event_type = 'REGISTERED' AND username = 'ulla'")
    assert [row["user_id"] for row in events] == [created.user_id]
