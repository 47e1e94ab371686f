"""The auth service's own Prometheus metrics (beside the chassis' gRPC metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HASH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.login_attempts = Counter(
            "auth_login_attempts_total",
            "Login attempts by outcome (success, failure, locked, rate_limited).",
            ["outcome"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "auth_rate_limited_total",
            "Login attempts refused by a rate limit, by scope (ip, account).",
            ["scope"],
            registry=registry,
        )
        self.rate_limit_shared = Gauge(
            "auth_rate_limit_shared",
            "1 while login limits are counted in the shared storage (Redis), 0 while this replica counts alone.",
            registry=registry,
        )
        self.rate_limit_storage_errors = Counter(
            "auth_rate_limit_storage_errors_total",
            "Login-limit checks the shared storage did not answer (counted in this process instead).",
            registry=registry,
        )
        self.lockouts = Counter(
            "auth_lockouts_total", "Accounts locked after repeated failed logins.", registry=registry
        )
        self.hash_seconds = Histogram(
            "auth_hash_seconds",
            "Time to hash or verify one password (thread-pool run time).",
            buckets=HASH_BUCKETS,
            registry=registry,
        )
        self.hash_rejected = Counter(
            "auth_hash_rejected_total",
            "Hash or verify jobs shed because the hashing pool and its queue were full (RESOURCE_EXHAUSTED).",
            registry=registry,
        )
        self.password_hashes = Gauge(
            "auth_password_hashes",
            "Stored password hashes by scheme (legacy ones should reach zero).",
            ["scheme"],
            registry=registry,
        )
        self.known_schemes: set[str] = set()
