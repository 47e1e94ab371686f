"""Password hashing, legacy migration, the password policy and the hashing pool (real argon2, no mocks)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from services.auth.passwords import (
    DEVELOPMENT,
    PRODUCTION,
    HashPool,
    HashProfile,
    PasswordHasher,
    PasswordPolicy,
    load_common_passwords,
    normalize,
    resolve_profile,
)
from services.common.errors import InvalidArgument, ResourceExhausted

PASSWORD = "grüne Äpfel & blaue Birnen"
SALT = "s4lt!"
ARGON2ID = re.compile(r"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[^$]+\$[^$]+$")


def unsalted(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def salted(password: str, salt: str = SALT) -> str:
    return f"sha256${salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"


def argon2_params(stored: str) -> tuple[int, int, int]:
    match = ARGON2ID.match(stored)
    assert match, stored
    memory, time_cost, parallelism = (int(value) for value in match.groups())
    return memory, time_cost, parallelism


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(DEVELOPMENT)


# -- profiles ------------------------------------------------------------------------------------


def test_profiles() -> None:
    assert (PRODUCTION.memory_kib, PRODUCTION.time_cost, PRODUCTION.parallelism) == (19456, 2, 1)
    assert resolve_profile("production") == PRODUCTION
    assert resolve_profile("development") == DEVELOPMENT
    tuned = resolve_profile("production", memory_kib=65536, time_cost=3, parallelism=2)
    assert tuned == HashProfile("production", memory_kib=65536, time_cost=3, parallelism=2)
    assert resolve_profile("development", time_cost=2) == HashProfile("development", 8, 2, 1)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("fast", {}), ("development", {"memory_kib": 8, "parallelism": 2}), ("production", {"time_cost": 0})],
)
def test_bad_profiles_are_refused(name: str, overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"profile|argon2"):
        resolve_profile(name, **overrides)


# -- hashing -------------------------------------------------------------------------------------


def test_new_hashes_are_argon2id_with_the_profile_cost() -> None:
    profile = HashProfile("custom", memory_kib=64, time_cost=2, parallelism=2)
    hasher = PasswordHasher(profile)
    stored = hasher.hash(PASSWORD)
    assert argon2_params(stored) == (64, 2, 2)
    assert hasher.scheme(stored) == "argon2"
    assert hasher.profile == profile
    assert hasher.hash(PASSWORD) != stored  # salted


def test_verify(hasher: PasswordHasher) -> None:
    stored = hasher.hash(PASSWORD)
    assert hasher.verify_and_update(PASSWORD, stored) == (True, None)
    assert hasher.verify_and_update(PASSWORD + "!", stored) == (False, None)
    assert hasher.verify_and_update("", stored) == (False, None)


def test_a_hash_of_another_cost_is_replaced() -> None:
    development = PasswordHasher(DEVELOPMENT).hash(PASSWORD)
    ok, new_hash = PasswordHasher(PRODUCTION).verify_and_update(PASSWORD, development)
    assert ok
    assert new_hash is not None
    assert argon2_params(new_hash) == (19456, 2, 1)


@pytest.mark.parametrize(
    "other", [HashProfile("t", 8, 2, 1), HashProfile("p", 16, 1, 2), HashProfile("m", 16, 1, 1)], ids=lambda p: p.name
)
def test_every_argon2_parameter_counts_for_the_update(hasher: PasswordHasher, other: HashProfile) -> None:
    stored = PasswordHasher(other).hash(PASSWORD)
    ok, new_hash = hasher.verify_and_update(PASSWORD, stored)
    assert ok
    assert new_hash is not None
    assert argon2_params(new_hash) == (8, 1, 1)
    assert PasswordHasher(other).verify_and_update(PASSWORD + "x", stored) == (False, None)


@pytest.mark.parametrize(
    ("stored", "scheme"),
    [
        (unsalted(PASSWORD), "sha256"),
        (unsalted(PASSWORD).upper(), "sha256"),
        (salted(PASSWORD), "sha256_salted"),
        (salted(PASSWORD, salt=""), "sha256_salted"),
    ],
    ids=["unsalted", "unsalted-uppercase", "salted", "salted-empty-salt"],
)
def test_legacy_hashes_verify_and_migrate(hasher: PasswordHasher, stored: str, scheme: str) -> None:
    assert hasher.scheme(stored) == scheme
    ok, new_hash = hasher.verify_and_update(PASSWORD, stored)
    assert ok
    assert new_hash is not None
    assert argon2_params(new_hash) == (8, 1, 1)
    assert hasher.verify_and_update(PASSWORD, new_hash) == (True, None)
    assert hasher.verify_and_update("not " + PASSWORD, stored) == (False, None)


@pytest.mark.parametrize(
    ("legacy", "prefix"),
    [
        (unsalted(PASSWORD), "$sha256-argon2$$$argon2id$"),
        (unsalted(PASSWORD).upper(), "$sha256-argon2$$$argon2id$"),
        (salted(PASSWORD), f"$sha256-argon2${SALT}$$argon2id$"),
    ],
    ids=["unsalted", "unsalted-uppercase", "salted"],
)
def test_wrapped_legacy_hashes(hasher: PasswordHasher, legacy: str, prefix: str) -> None:
    wrapped = hasher.wrap_legacy(legacy)
    assert wrapped is not None
    assert wrapped.startswith(prefix)
    assert argon2_params(wrapped.removeprefix(prefix[: -len("$argon2id$")])) == (8, 1, 1)
    assert legacy.lower() not in wrapped.lower()  # no fast hash left at rest
    assert hasher.scheme(wrapped) == "argon2_sha256_wrapped"
    assert hasher.wrap_legacy(wrapped) is None

    assert hasher.verify_and_update(PASSWORD + " ", wrapped) == (False, None)
    ok, new_hash = hasher.verify_and_update(PASSWORD, wrapped)
    assert ok
    assert new_hash is not None
    assert argon2_params(new_hash) == (8, 1, 1)
    assert hasher.verify_and_update(PASSWORD, new_hash) == (True, None)


def test_a_wrap_verifies_under_another_profile(hasher: PasswordHasher) -> None:
    wrapped = PasswordHasher(HashProfile("other", 16, 2, 1)).wrap_legacy(salted(PASSWORD))
    assert wrapped is not None
    ok, new_hash = hasher.verify_and_update(PASSWORD, wrapped)
    assert ok
    assert new_hash is not None
    assert argon2_params(new_hash) == (8, 1, 1)


def test_wrap_legacy_leaves_other_hashes_alone(hasher: PasswordHasher) -> None:
    assert hasher.wrap_legacy(hasher.hash(PASSWORD)) is None
    assert hasher.wrap_legacy("not a hash") is None
    assert hasher.wrap_legacy("sha256$salt-without-digest") is None


@pytest.mark.parametrize(
    "stored",
    ["", "!", "not a hash", "abc123", "$argon2id$v=19$garbage", "sha256$salt$xyz", "$sha256-argon2$$$argon2i$x"],
)
def test_unknown_or_malformed_hashes_fail(hasher: PasswordHasher, stored: str) -> None:
    assert hasher.verify_and_update(PASSWORD, stored) == (False, None)


def test_schemes(hasher: PasswordHasher) -> None:
    assert hasher.scheme(hasher.hash(PASSWORD)) == "argon2"
    assert hasher.scheme(unsalted(PASSWORD)) == "sha256"
    assert hasher.scheme(salted(PASSWORD)) == "sha256_salted"
    assert hasher.scheme("f" * 63) == "unknown"
    assert hasher.scheme("") == "unknown"


def test_an_oversized_password_fails_without_error(hasher: PasswordHasher) -> None:
    stored = hasher.hash(PASSWORD)
    assert hasher.verify_and_update("x" * 1024 * 1024, stored) == (False, None)


def test_dummy_verify(hasher: PasswordHasher) -> None:
    hasher.dummy_verify()
    hasher.dummy_verify()


def test_login_normalises_like_the_policy(hasher: PasswordHasher) -> None:
    composed, decomposed = "caf\u00e9 au lait, s'il vous pla\u00eet", "cafe\u0301 au lait, s'il vous plai\u0302t"
    stored = hasher.hash(PasswordPolicy().check(decomposed))
    assert hasher.verify_and_update(normalize(composed), stored) == (True, None)


# -- policy --------------------------------------------------------------------------------------


def refused(policy: PasswordPolicy, password: str, *, username: str = "", field: str = "password") -> str:
    """The violation's description; checks it names the field and never repeats the password."""
    with pytest.raises(InvalidArgument) as info:
        policy.check(password, username=username, field=field)
    error = info.value
    assert len(error.violations) == 1
    violation_field, description = error.violations[0]
    assert violation_field == field
    if password:
        for text in (error.message, description, str(error)):
            assert password not in text
            assert password.casefold() not in text.casefold()
    return description


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        ("short pw", "at least 12 characters"),
        ("x" * 11, "at least 12 characters"),
        ("qwertyuiop" * 12 + "zxcvbnm!!", "at most 128 characters"),
        ("", "required"),
        ("correct horse\x00battery", "control characters"),
        ("correct horse\tbattery", "control characters"),
        ("correct horse battery\n", "control characters"),
        ("password1234", "too common"),
        ("PassWord1234", "too common"),
        ("qwertyuiopasdfgh", "too common"),
        ("\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44\uff11\uff12\uff13\uff14", "too common"),  # full width
        ("correct horse \ud800 battery", "valid Unicode"),
    ],
    ids=[
        "short",
        "11-chars",
        "129-chars",
        "empty",
        "nul",
        "tab",
        "newline",
        "common",
        "common-mixed-case",
        "common-keyboard-walk",
        "common-full-width",
        "lone-surrogate",
    ],
)
def test_policy_refusals(password: str, expected: str) -> None:
    assert expected in refused(PasswordPolicy(), password)


def test_a_megabyte_is_refused_as_too_long() -> None:
    assert "at most 128 characters" in refused(PasswordPolicy(), "a" * (1024 * 1024))


def test_nfkc_expansion_is_capped_in_bytes() -> None:
    # U+FDFA expands to 18 characters (33 UTF-8 bytes) under NFKC.
    assert "at most 128 characters" in refused(PasswordPolicy(), "\ufdfa" * 20)


def test_the_violation_names_the_field() -> None:
    assert "at least" in refused(PasswordPolicy(), "short", field="new_password")


@pytest.mark.parametrize("username", ["alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45"])
def test_a_password_containing_the_username_is_refused(username: str) -> None:
    assert "username" in refused(PasswordPolicy(), "my name is Alice, not Bob", username=username)


def test_short_usernames_are_not_matched() -> None:
    assert PasswordPolicy().check("always look on the bright side", username="al") == "always look on the bright side"


@pytest.mark.parametrize(
    "password",
    [
        "correct horse battery staple 42",
        "x" * 128,
        "\U0001f431\U0001f436\U0001f42d\U0001f439\U0001f430\U0001f98a\U0001f43b\U0001f43c\U0001f428\U0001f42f\U0001f981\U0001f42e",
        "\u043c\u043e\u0439 \u043a\u043e\u0442 \u043b\u044e\u0431\u0438\u0442 \u043c\u043e\u043b\u043e\u043a\u043e",
        "\u6211\u7684\u5bc6\u7801\u662f\u957f\u57ce\u4e0a\u7684\u4e00\u5757\u7816\u5934",
        "\U0001f469\u200d\U0001f4bb writes code all night",
    ],
    ids=["ascii", "max-length", "emoji", "cyrillic", "chinese", "emoji-zwj"],
)
def test_policy_accepts(password: str) -> None:
    assert PasswordPolicy().check(password, username="bob") == normalize(password)


def test_policy_returns_the_nfkc_form() -> None:
    full_width = "\uff23\uff4f\uff52\uff52\uff45\uff43\uff54\uff28\uff4f\uff52\uff53\uff45\uff19"
    assert PasswordPolicy().check(full_width) == "CorrectHorse9"
    assert normalize("\ufb01le") == "file"


def test_policy_lengths_and_custom_list() -> None:
    policy = PasswordPolicy(min_length=8, max_length=16, common_passwords=frozenset({"Hunter22Hunter"}))
    assert policy.check("eight ch") == "eight ch"
    assert "at most 16" in refused(policy, "seventeen chars!!")
    assert "too common" in refused(policy, "hunter22hunter")
    assert policy.check("password1234") == "password1234"  # not in this policy's list
    with pytest.raises(ValueError, match="min_length"):
        PasswordPolicy(min_length=20, max_length=10)


def test_the_bundled_list() -> None:
    common = load_common_passwords()
    assert len(common) > 10_000
    assert {"password1234", "123456789012", "qwertyuiopasdfgh", "iloveyou1234", "passwordpassword"} <= common
    assert not any(entry.startswith("#") for entry in common)
    assert all(entry == entry.strip().casefold() for entry in common)


# -- pool ----------------------------------------------------------------------------------------


@pytest.fixture
async def observed() -> AsyncIterator[tuple[HashPool, list[float]]]:
    durations: list[float] = []
    pool = HashPool(workers=2, queue_limit=1, observe=durations.append)
    yield pool, durations
    await pool.close()


async def test_the_pool_runs_jobs(observed: tuple[HashPool, list[float]], hasher: PasswordHasher) -> None:
    pool, durations = observed
    stored = await pool.run(hasher.hash, PASSWORD)
    assert await pool.run(hasher.verify_and_update, PASSWORD, stored) == (True, None)
    assert await pool.run(threading.get_ident) != threading.get_ident()
    assert len(durations) == 3
    assert all(duration >= 0 for duration in durations)
    assert pool.in_flight == 0


async def test_the_pool_passes_errors_on(observed: tuple[HashPool, list[float]]) -> None:
    pool, durations = observed

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await pool.run(fail)
    assert len(durations) == 1
    assert pool.in_flight == 0


async def settle(condition: Callable[[], bool], *, steps: int = 1000) -> None:
    """Let the loop run until ``condition()`` holds (a bounded number of loop turns, no sleeping)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_the_pool_sheds_beyond_workers_and_queue(observed: tuple[HashPool, list[float]]) -> None:
    pool, durations = observed
    gate = threading.Event()

    def blocked() -> str:
        gate.wait(timeout=30)
        return "done"

    try:
        jobs = [asyncio.create_task(pool.run(blocked)) for _ in range(3)]  # 2 workers + 1 queued
        await settle(lambda: pool.in_flight == 3)
        assert pool.queued == 1
        with pytest.raises(ResourceExhausted) as info:
            await pool.run(blocked)
        assert info.value.retry_after_seconds is not None
        assert info.value.retry_after_seconds > 0
        assert "saturated" in info.value.message
    finally:
        gate.set()
    assert await asyncio.gather(*jobs) == ["done"] * 3
    assert pool.in_flight == 0
    assert len(durations) == 3
    assert await pool.run(blocked) == "done"  # capacity is back


async def test_a_cancelled_waiting_job_frees_its_slot() -> None:
    pool = HashPool(workers=1, queue_limit=1)
    gate = threading.Event()

    def blocked() -> str:
        gate.wait(timeout=30)
        return "done"

    try:
        running = asyncio.create_task(pool.run(blocked))
        waiting = asyncio.create_task(pool.run(blocked))
        await settle(lambda: pool.in_flight == 2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle(lambda: pool.in_flight == 1)
        replacement = asyncio.create_task(pool.run(blocked))
        await settle(lambda: pool.in_flight == 2)
    finally:
        gate.set()
    assert await running == "done"
    assert await replacement == "done"
    await pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run(blocked)


def test_the_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="workers"):
        HashPool(workers=0, queue_limit=1)
