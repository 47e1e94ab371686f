"""The maintenance commands of ``python -m services.auth`` (create-user, import-users, wrap-legacy, copy-store)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.auth import validation
from services.auth.app import SERVICE, open_core
from services.auth.backends import backend_for, configured_backend
from services.auth.core import ROLE_ADMIN, ROLE_USER, AuthCore
from services.auth.settings import AuthSettings
from services.auth.store import TABLES, Store, StoreUnavailable, User, UserExists
from services.common.errors import ServiceError
from services.common.logs import configure_logging
from services.common.settings import SettingsError, load_settings

NEW_PASSWORD_ENV = "AUTH_NEW_USER_PASSWORD"  # noqa: S105  (the name of a variable, not a password)
KNOWN_ROLES = frozenset({ROLE_USER, ROLE_ADMIN})


def _say(text: str) -> None:
    print(text)  # noqa: T201


async def _create_user(core: AuthCore, args: argparse.Namespace) -> int:
    password = os.environ.get(NEW_PASSWORD_ENV) or getpass.getpass("password: ")
    violations = validation.Violations()
    name = validation.username(args.username, violations)
    address = validation.email(args.email, violations)
    if violations:
        raise SettingsError("; ".join(f"{field}: {text}" for field, text in violations.pairs()))
    secret = core.check_password(password, username=name)
    roles = (ROLE_USER, ROLE_ADMIN) if args.admin else (ROLE_USER,)
    user = await core.create_user(name, address, secret, roles=roles, reason="cli")
    _say(f"created {user.username} ({user.id}) roles={','.join(user.roles)}")
    return 0


async def _import_users(core: AuthCore, path: Path) -> int:
    imported = skipped = 0
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        problem = ""
        try:
            record = json.loads(line)
            violations = validation.Violations()
            name = validation.username(str(record.get("username", "")), violations)
            address = validation.email(str(record.get("email", "")), violations)
            roles = tuple(record.get("roles") or [ROLE_USER])
            password_hash = str(record.get("hash", ""))
            if violations:
                problem = "; ".join(f"{field} {text}" for field, text in violations.pairs())
            elif not set(roles) <= KNOWN_ROLES:
                problem = f"unknown roles {sorted(set(roles) - KNOWN_ROLES)}"
            elif core.hash_scheme(password_hash) == "unknown":
                problem = "hash is in no known format"
            else:
                await core.import_user(
                    User(
                        id=str(uuid.uuid4()),
                        username=name,
                        email=address,
                        password_hash=password_hash,
                        hash_scheme=core.hash_scheme(password_hash),
                        roles=roles,
                        created_at=0.0,
                    )
                )
                imported += 1
                continue
        except json.JSONDecodeError:
            problem = "not JSON"
        except UserExists:
            problem = "username or e-mail already registered"
        skipped += 1
        print(f"line {number}: skipped: {problem}", file=sys.stderr)  # noqa: T201
    _say(f"imported {imported}, skipped {skipped}")
    return 0 if skipped == 0 else 1


async def _copy_store(settings: AuthSettings, target_url: str, *, into_non_empty: bool) -> int:
    """Copy every row of the configured store into ``target_url``'s (migrated first); verified counts."""
    source, target = configured_backend(settings), backend_for(target_url, settings)
    if source.where == target.where:
        raise SettingsError("copy-store: the target is the configured store itself")
    opened: list[Store] = []
    try:
        for backend in (source, target):
            try:
                await backend.store.open()
            except StoreUnavailable:
                raise SettingsError(f"copy-store: cannot open {backend.where}") from None
            opened.append(backend.store)
        before = await target.store.count_rows()
        if any(before.values()) and not into_non_empty:
            raise SettingsError(
                f"copy-store: {target.where} is not empty ({_counts(before)}); --into-non-empty adds the rows it"
                " lacks and keeps the rest"
            )
        rows = await source.store.dump()
        added = await target.store.load(rows)
        after = await target.store.count_rows()
    finally:
        for store in opened:
            await store.close()
    _say(f"copied {source.where} -> {target.where}")
    short = []
    for table in TABLES:
        expected = len(rows[table]) if not any(before.values()) else before[table] + added[table]
        ok = after[table] == expected and after[table] >= len(rows[table])
        _say(
            f"  {table:<15} source {len(rows[table]):>8}  copied {added[table]:>8}  target {after[table]:>8}  {'ok' if ok else 'MISMATCH'}"
        )
        if not ok:
            short.append(table)
    if short:
        print(f"{SERVICE}: copy-store: row counts do not match for {', '.join(short)}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{table} {count}" for table, count in counts.items() if count)


async def _main(args: argparse.Namespace) -> int:
    settings = load_settings(AuthSettings)
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    if args.command == "copy-store":
        return await _copy_store(settings, args.to, into_non_empty=args.into_non_empty)
    runtime = await open_core(settings, CollectorRegistry())
    try:
        if args.command == "create-user":
            return await _create_user(runtime.core, args)
        if args.command == "import-users":
            return await _import_users(runtime.core, Path(args.file))
        wrapped = await runtime.core.wrap_legacy_hashes()
        _say(f"wrapped {wrapped} legacy hashes in argon2id")
        return 0
    finally:
        await runtime.close()


def run_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except SettingsError as error:
        print(f"{SERVICE}: {error}", file=sys.stderr)  # noqa: T201
        return 2
    except ServiceError as error:
        details = getattr(error, "violations", [])
        extra = "; ".join(f"{field}: {text}" for field, text in details)
        print(f"{SERVICE}: {error.message}{': ' + extra if extra else ''}", file=sys.stderr)  # noqa: T201
        return 1
