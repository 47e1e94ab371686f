"""Checks of the identity fields callers send (usernames, e-mail addresses, tokens).

Each check returns the normalised value or adds a violation (field, description and ErrorInfo
reason from :mod:`services.auth.reasons`) to a :class:`Violations`; the caller raises one
InvalidArgument with every violation found (:meth:`Violations.raise_if_any`). Descriptions never
echo the value: it may be a password typed into the wrong field.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from services.auth import reasons
from services.common.errors import InvalidArgument

USERNAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]{1,62}[a-z0-9])")
# A practical subset of RFC 5321 addresses: no quotes, comments or IP literals.
EMAIL_RE = re.compile(
    r"[a-z0-9!#$%&*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&*+/=?^_`{|}~-]+)*@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}"
)
TOKEN_MAX_LENGTH = 4096
EMAIL_MAX_LENGTH = 254


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    description: str
    reason: str  # a constant of services.auth.reasons


class Violations:
    """The violations found in one request, in the order they were found."""

    def __init__(self) -> None:
        self.found: list[Violation] = []

    def __bool__(self) -> bool:
        return bool(self.found)

    def add(self, field: str, description: str, reason: str) -> None:
        self.found.append(Violation(field, description, reason))

    def add_refusal(self, error: InvalidArgument) -> None:
        """Take over the violations of an InvalidArgument raised by another check (the password policy)."""
        for field, description in error.violations:
            self.add(field, description, error.reason)

    def pairs(self) -> list[tuple[str, str]]:
        """(field, description) of each violation, as google.rpc.BadRequest lists them."""
        return [(violation.field, violation.description) for violation in self.found]

    def raise_if_any(self, message: str) -> None:
        """Raise one InvalidArgument with every violation; its reason is the first violation's."""
        if self.found:
            raise InvalidArgument(message, self.pairs(), reason=self.found[0].reason)


def _has_control(value: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in value)


def normalise_username(value: str) -> str:
    """The form usernames are compared in (NFKC, lower case, surrounding space dropped)."""
    return unicodedata.normalize("NFKC", value.strip()).lower()


def username(value: str, violations: Violations, field: str = "username") -> str:
    """NFKC-normalised, lower-case; 3-64 of a-z 0-9 . _ - starting and ending alphanumeric."""
    if not value:
        violations.add(field, "must not be empty", reasons.FIELD_REQUIRED)
        return ""
    if len(value) > 64:
        violations.add(field, "must be at most 64 characters", reasons.FIELD_TOO_LONG)
        return ""
    normalised = unicodedata.normalize("NFKC", value).lower()
    if not USERNAME_RE.fullmatch(normalised):
        violations.add(
            field,
            "must be 3-64 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit",
            reasons.USERNAME_INVALID,
        )
        return ""
    return normalised


def email(value: str, violations: Violations, field: str = "email") -> str:
    if not value:
        violations.add(field, "must not be empty", reasons.FIELD_REQUIRED)
        return ""
    if len(value) > EMAIL_MAX_LENGTH:
        violations.add(field, f"must be at most {EMAIL_MAX_LENGTH} characters", reasons.FIELD_TOO_LONG)
        return ""
    normalised = unicodedata.normalize("NFKC", value).strip().lower()
    if _has_control(normalised) or not EMAIL_RE.fullmatch(normalised):
        violations.add(field, "must be an e-mail address like name@example.com", reasons.EMAIL_INVALID)
        return ""
    return normalised


def token(value: str, violations: Violations, field: str) -> str:
    """An opaque or JWT token: printable ASCII, bounded."""
    if not value:
        violations.add(field, "must not be empty", reasons.FIELD_REQUIRED)
        return ""
    if len(value) > TOKEN_MAX_LENGTH or not value.isascii() or not value.isprintable() or " " in value:
        violations.add(field, "is not a well-formed token", reasons.TOKEN_MALFORMED)
        return ""
    return value


def login_password(value: str, violations: Violations, field: str = "password", max_length: int = 128) -> None:
    """A password presented for verification: bounded before any hashing, no control characters."""
    if not value:
        violations.add(field, "must not be empty", reasons.FIELD_REQUIRED)
    elif len(value) > max_length:
        violations.add(field, f"must be at most {max_length} characters", reasons.PASSWORD_TOO_LONG)
    elif _has_control(value):
        violations.add(field, "must not contain control characters", reasons.PASSWORD_INVALID_CHARACTERS)
