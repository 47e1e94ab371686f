"""Settings of the auth service (environment prefix ``AUTH_``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import limits
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AUTH_")

    port: int = Field(default=50052, ge=0, le=65535, description="gRPC port (0 picks a free port).")
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="Prometheus /metrics HTTP port.")

    data_dir: Path = Field(
        default=Path("data/auth"), description="Directory of the default SQLite database, generated keys and outbox."
    )

    # Storage
    database_url: SecretStr | None = Field(
        default=None,
        description="The store: `sqlite:///<path>` (relative; `sqlite:////<absolute path>`; default"
        " `<AUTH_DATA_DIR>/auth.db`) or `postgresql://user:password@host:port/db?sslmode=...` (any libpq URL), shared"
        " by every replica. Never logged with its password.",
    )
    database_pool_min_size: int = Field(default=1, ge=0, le=100, description="PostgreSQL connections kept open.")
    database_pool_max_size: int = Field(default=10, ge=1, le=1000, description="Most PostgreSQL connections open.")
    database_connect_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How long opening a PostgreSQL connection (and the store at start) may take.",
    )
    database_pool_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How long a request waits for a free PostgreSQL connection (or SQLite's write lock) before it is"
        " answered UNAVAILABLE.",
    )
    database_retry_after_seconds: float = Field(
        default=1.0, ge=0, le=300, description="The RetryInfo delay of a `STORE_UNAVAILABLE` answer."
    )
    database_check_interval_seconds: float = Field(
        default=2.0, gt=0, le=300, description="How often readiness asks the store whether it answers."
    )

    # Password hashing
    hash_profile: Literal["production", "development"] = Field(
        default="production", description="argon2id cost: `production` (OWASP minimum or more) or cheap `development`."
    )
    hash_memory_kib: int | None = Field(default=None, ge=8, description="Override argon2id memory cost (KiB).")
    hash_time_cost: int | None = Field(default=None, ge=1, description="Override argon2id iterations.")
    hash_parallelism: int | None = Field(default=None, ge=1, description="Override argon2id lanes.")
    hash_workers: int = Field(default=2, ge=1, le=64, description="Threads hashing passwords concurrently.")
    hash_queue_limit: int = Field(
        default=64, ge=0, description="Hash jobs that may wait for a thread; more are shed with RESOURCE_EXHAUSTED."
    )
    password_min_length: int = Field(default=12, ge=8, le=128, description="Shortest password accepted.")

    # Tokens
    access_token_ttl_seconds: int = Field(default=900, ge=30, description="Lifetime of an access token (JWT).")
    refresh_token_ttl_seconds: int = Field(default=30 * 86400, ge=60, description="Lifetime of a session.")
    signing_key: SecretStr | None = Field(default=None, description="Ed25519 private key (PEM) signing access tokens.")
    signing_key_file: Path | None = Field(default=None, description="File holding the signing key (PEM).")
    verification_key_files: list[Path] = Field(
        default_factory=list, description="Extra public keys (PEM, JSON list of paths) still accepted, for rotation."
    )
    token_issuer: str = Field(default="ml-platform-auth", min_length=1, description="`iss` of access tokens.")
    token_audience: str = Field(default="ml-platform", min_length=1, description="`aud` of access tokens.")

    # Abuse protection
    login_rate_per_ip: str = Field(default="30/minute", description="Login attempts allowed per client IP.")
    login_rate_per_account: str = Field(default="10/minute", description="Login attempts allowed per username.")
    rate_limit_storage_uri: str = Field(
        default="memory://",
        description="Where login attempts are counted: `memory://` (this process) or `redis://host:6379/N` (also"
        " `rediss://`, `redis+unix://`), shared by every replica.",
    )
    rate_limit_key_prefix: str = Field(
        default="ml-platform-auth", min_length=1, description="Prefix of the limits' keys in Redis."
    )
    rate_limit_storage_timeout_seconds: float = Field(
        default=0.5,
        gt=0,
        le=30,
        description="How long a login waits for Redis before it counts the attempt in this process instead.",
    )
    rate_limit_storage_retry_seconds: float = Field(
        default=5.0, gt=0, le=3600, description="While Redis fails, how often it is tried again."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Peer IPs (JSON list) whose x-forwarded-for is believed (the gateway)."
    )
    lockout_threshold: int = Field(default=5, ge=1, le=100, description="Failed logins that lock an account.")
    lockout_base_seconds: float = Field(default=60.0, gt=0, description="First lockout; doubles with each lockout.")
    lockout_max_seconds: float = Field(default=3600.0, gt=0, description="Longest lockout.")

    # Password reset and its delivery
    reset_token_ttl_seconds: int = Field(default=1800, ge=60, description="Lifetime of a password-reset token.")
    smtp_host: str | None = Field(
        default=None, description="SMTP server for reset mails; unset = outbox file (refused in production)."
    )
    smtp_port: int = Field(default=587, ge=1, le=65535, description="SMTP port.")
    smtp_username: str | None = Field(default=None, description="SMTP login.")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password.")
    smtp_starttls: bool = Field(default=True, description="Upgrade the SMTP connection with STARTTLS.")
    smtp_sender: str = Field(default="no-reply@ml-platform.local", description="From address of reset mails.")

    reserved_usernames: str = Field(
        default="admin,administrator,root,superuser,system,sysadmin,support,security,postmaster,hostmaster,"
        "webmaster,abuse,noreply,no-reply,operator,service,auth,gateway,inference,ml-platform",
        description="Comma-separated usernames that Register refuses (compared after normalisation); the"
        " operator's create-user and the bootstrap administrator may still use them.",
    )

    # First administrator
    bootstrap_admin_username: str | None = Field(default=None, description="Admin account created at start.")
    bootstrap_admin_password: SecretStr | None = Field(default=None, description="Its password.")
    bootstrap_admin_email: str = Field(default="admin@ml-platform.local", description="Its e-mail address.")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(DATABASE_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(DATABASE_SCHEMES)}")  # never echo the value
        return value

    @field_validator("login_rate_per_ip", "login_rate_per_account")
    @classmethod
    def _rate(cls, value: str) -> str:
        limits.parse(value)  # ValueError for anything but e.g. "10/minute"
        return value

    @model_validator(mode="after")
    def _production_rules(self) -> AuthSettings:
        if self.env == "production" and self.hash_profile == "development":
            raise ValueError("AUTH_HASH_PROFILE=development is refused when AUTH_ENV=production")
        if self.env == "production" and not self.smtp_host:
            # The outbox file holds reset tokens in plaintext: a development aid only.
            raise ValueError("AUTH_SMTP_HOST is required when AUTH_ENV=production (the outbox file is refused)")
        return self
