"""Assembles the auth service from its settings: the core (also used by the CLI) and the server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from auth.v1 import auth_pb2, auth_pb2_grpc
from prometheus_client import CollectorRegistry

from services.auth import validation
from services.auth.backends import Backend, configured_backend
from services.auth.core import AuthConfig, AuthCore
from services.auth.metrics import AuthMetrics
from services.auth.migrations import SchemaTooNew
from services.auth.notifier import build_notifier
from services.auth.passwords import HashPool, PasswordHasher, PasswordPolicy, resolve_profile
from services.auth.ratelimit import LoginLimiter
from services.auth.servicer import AuthServicer, ClientIdentity
from services.auth.settings import AuthSettings
from services.auth.store import LockoutPolicy, Store, StoreUnavailable
from services.auth.tokens import KeyConfigError, KeyRing, TokenIssuer
from services.common.errors import InvalidArgument
from services.common.logs import fields
from services.common.server import GrpcServer
from services.common.settings import SettingsError

SERVICE = "auth"

log = logging.getLogger(__name__)


@dataclass
class AuthRuntime:
    """The core and what must be closed after it, in order."""

    core: AuthCore
    store: Store
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for closer in self.closers:
            await closer()


async def open_core(
    settings: AuthSettings, registry: CollectorRegistry, clock: Callable[[], float] = time.time
) -> AuthRuntime:
    """Open storage, keys and hashing, and build the core. Raises SettingsError for bad config."""
    backend = configured_backend(settings)
    metrics = AuthMetrics(registry)
    if backend.shared and settings.signing_key is None and settings.signing_key_file is None:
        # A key generated here would be this replica's alone: the others would refuse its tokens.
        raise SettingsError(
            "a shared store (AUTH_DATABASE_URL=postgresql://...) needs the signing key every replica shares:"
            " set AUTH_SIGNING_KEY or AUTH_SIGNING_KEY_FILE (an Ed25519 private key in PEM)"
        )
    try:
        keyring = KeyRing.load(
            signing_key_pem=settings.signing_key.get_secret_value() if settings.signing_key else None,
            signing_key_file=settings.signing_key_file,
            verification_key_files=settings.verification_key_files,
            data_dir=settings.data_dir,
            generate_if_missing=settings.env != "production",
        )
        limiter = LoginLimiter(
            per_ip=settings.login_rate_per_ip,
            per_account=settings.login_rate_per_account,
            storage_uri=settings.rate_limit_storage_uri,
            key_prefix=settings.rate_limit_key_prefix,
            timeout_seconds=settings.rate_limit_storage_timeout_seconds,
            retry_seconds=settings.rate_limit_storage_retry_seconds,
            on_shared_change=lambda shared: metrics.rate_limit_shared.set(1 if shared else 0),
            on_storage_error=metrics.rate_limit_storage_errors.inc,
        )
        metrics.rate_limit_shared.set(1 if limiter.shared else 0)
    except KeyConfigError as error:
        raise SettingsError(str(error)) from None
    except ValueError as error:  # the limits library refuses the storage URI
        raise SettingsError(f"AUTH_RATE_LIMIT_STORAGE_URI: {error}") from None
    profile = resolve_profile(
        settings.hash_profile,
        memory_kib=settings.hash_memory_kib,
        time_cost=settings.hash_time_cost,
        parallelism=settings.hash_parallelism,
    )
    log.info(
        "auth.hash_profile",
        extra=fields(
            profile=profile.name,
            algorithm="argon2id",
            memory_kib=profile.memory_kib,
            time_cost=profile.time_cost,
            parallelism=profile.parallelism,
            env=settings.env,
        ),
    )
    log.info("auth.signing_key", extra=fields(kid=keyring.kid))
    store = await _open_store(backend)
    pool = HashPool(settings.hash_workers, settings.hash_queue_limit, observe=metrics.hash_seconds.observe)
    core = AuthCore(
        store=store,
        hasher=PasswordHasher(profile),
        policy=PasswordPolicy(min_length=settings.password_min_length),
        pool=pool,
        issuer=TokenIssuer(
            keyring,
            issuer=settings.token_issuer,
            audience=settings.token_audience,
            access_ttl_seconds=settings.access_token_ttl_seconds,
        ),
        limiter=limiter,
        notifier=build_notifier(settings),
        metrics=metrics,
        config=AuthConfig(
            access_ttl_seconds=settings.access_token_ttl_seconds,
            refresh_ttl_seconds=settings.refresh_token_ttl_seconds,
            reset_ttl_seconds=settings.reset_token_ttl_seconds,
            reserved_usernames=frozenset(
                validation.normalise_username(name) for name in settings.reserved_usernames.split(",") if name.strip()
            ),
            lockout=LockoutPolicy(
                threshold=settings.lockout_threshold,
                base_seconds=settings.lockout_base_seconds,
                max_seconds=settings.lockout_max_seconds,
            ),
        ),
        clock=clock,
    )
    runtime = AuthRuntime(core, store, [core.close, pool.close, limiter.close, store.close])
    try:
        if settings.bootstrap_admin_username and settings.bootstrap_admin_password:
            created = await core.ensure_admin(
                settings.bootstrap_admin_username,
                settings.bootstrap_admin_email,
                settings.bootstrap_admin_password.get_secret_value(),
            )
            log.info("auth.bootstrap_admin", extra=fields(username=settings.bootstrap_admin_username, created=created))
        await core.refresh_hash_gauge()
    except InvalidArgument as error:
        await runtime.close()
        problems = "; ".join(f"{name}: {text}" for name, text in error.violations)
        raise SettingsError(f"invalid bootstrap administrator: {problems}") from None
    except BaseException:
        await runtime.close()
        raise
    return runtime


async def _open_store(backend: Backend) -> Store:
    try:
        await backend.store.open()
    except SchemaTooNew as error:
        raise SettingsError(str(error)) from None
    except StoreUnavailable:
        raise SettingsError(f"AUTH_DATABASE_URL: cannot open the store at {backend.where}") from None
    log.info("auth.store", extra=fields(store=backend.where, shared=backend.shared))
    return backend.store


def watch_store(server: GrpcServer, store: Store, interval: float) -> Callable[[], Awaitable[None]]:
    """A job that keeps readiness equal to whether the store answers (the store recovers by itself)."""

    async def watch() -> None:
        answering = True
        while True:
            await asyncio.sleep(interval)
            try:
                await store.ping()
            except StoreUnavailable:
                now = False
            else:
                now = True
            if now != answering:
                answering = now
                log.warning("auth.store_readiness", extra=fields(answering=now))
                await server.set_ready(now)

    return watch


async def build_server(settings: AuthSettings, clock: Callable[[], float] = time.time) -> GrpcServer:
    server = GrpcServer(settings, SERVICE)
    runtime = await open_core(settings, server.registry, clock)
    server.on_close(runtime.close)
    server.after_start(watch_store(server, runtime.store, settings.database_check_interval_seconds))
    server.add_service(
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
        auth_pb2_grpc.add_AuthServiceServicer_to_server,
        AuthServicer(runtime.core, ClientIdentity(settings.trusted_proxies)),
    )
    return server
