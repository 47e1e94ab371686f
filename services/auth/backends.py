"""Which :class:`~services.auth.store.Store` a database URL names, and how it is described in logs.

``sqlite:///<path>`` (relative to the working directory; ``sqlite:////<absolute path>``) is the embedded
store of one process; ``postgresql://...`` (or ``postgres://``, any libpq URL) is shared by every replica
that names it. No URL: ``<AUTH_DATA_DIR>/auth.db``, as before there were URLs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.auth.postgres_store import PostgresStore, describe
from services.auth.settings import AuthSettings
from services.auth.sqlite_store import SqliteStore
from services.auth.store import Store

DATABASE_FILE = "auth.db"
SQLITE_PREFIX = "sqlite:///"


@dataclass(frozen=True, slots=True)
class Backend:
    store: Store
    shared: bool  # other processes (replicas) may use the same data
    where: str  # the URL without its password, for logs


def sqlite_path(url: str) -> Path:
    path = url.removeprefix(SQLITE_PREFIX).partition("?")[0]
    if not path:
        raise ValueError("sqlite:/// needs a file path, e.g. sqlite:///data/auth/auth.db")
    return Path(path)


def backend_for(url: str, settings: AuthSettings) -> Backend:
    """The store ``url`` names, built with the pool and timeout settings (not opened yet)."""
    if url.startswith(SQLITE_PREFIX):
        path = sqlite_path(url)
        store = SqliteStore(
            path,
            busy_timeout_seconds=settings.database_pool_timeout_seconds,
            retry_after_seconds=settings.database_retry_after_seconds,
        )
        return Backend(store, shared=False, where=f"{SQLITE_PREFIX}{path}")
    postgres = PostgresStore(
        url,
        min_size=settings.database_pool_min_size,
        max_size=settings.database_pool_max_size,
        connect_timeout_seconds=settings.database_connect_timeout_seconds,
        pool_timeout_seconds=settings.database_pool_timeout_seconds,
        retry_after_seconds=settings.database_retry_after_seconds,
    )
    return Backend(postgres, shared=True, where=describe(url))


def configured_url(settings: AuthSettings) -> str:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return f"{SQLITE_PREFIX}{settings.data_dir / DATABASE_FILE}"


def configured_backend(settings: AuthSettings) -> Backend:
    return backend_for(configured_url(settings), settings)
