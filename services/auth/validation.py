"""Checks of the identity fields callers send (usernames, e-mail addresses, tokens).

Each check returns the normalised value or appends a (field, description) violation; the
caller raises one InvalidArgument with every violation found. Descriptions never echo the
value: it may be a password typed into the wrong field.
"""

from __future__ import annotations

import re
import unicodedata

USERNAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]{1,62}[a-z0-9])")
# A practical subset of RFC 5321 addresses: no quotes, comments or IP literals.
EMAIL_RE = re.compile(
    r"[a-z0-9!#$%&*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&*+/=?^_`{|}~-]+)*@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}"
)
TOKEN_MAX_LENGTH = 4096
EMAIL_MAX_LENGTH = 254

Violations = list[tuple[str, str]]


def _has_control(value: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in value)


def normalise_username(value: str) -> str:
    """The form usernames are compared in (NFKC, lower case, surrounding space dropped)."""
    return unicodedata.normalize("NFKC", value.strip()).lower()


def username(value: str, violations: Violations, field: str = "username") -> str:
    """NFKC-normalised, lower-case; 3-64 of a-z 0-9 . _ - starting and ending alphanumeric."""
    if not value:
        violations.append((field, "must not be empty"))
        return ""
    if len(value) > 64:
        violations.append((field, "must be at most 64 characters"))
        return ""
    normalised = unicodedata.normalize("NFKC", value).lower()
    if not USERNAME_RE.fullmatch(normalised):
        violations.append(
            (field, "must be 3-64 characters of a-z, 0-9, '.', '_' or '-', starting and ending with a letter or digit")
        )
        return ""
    return normalised


def email(value: str, violations: Violations, field: str = "email") -> str:
    if not value:
        violations.append((field, "must not be empty"))
        return ""
    if len(value) > EMAIL_MAX_LENGTH:
        violations.append((field, f"must be at most {EMAIL_MAX_LENGTH} characters"))
        return ""
    normalised = unicodedata.normalize("NFKC", value).strip().lower()
    if _has_control(normalised) or not EMAIL_RE.fullmatch(normalised):
        violations.append((field, "must be an e-mail address like name@example.com"))
        return ""
    return normalised


def token(value: str, violations: Violations, field: str) -> str:
    """An opaque or JWT token: printable ASCII, bounded."""
    if not value:
        violations.append((field, "must not be empty"))
        return ""
    if len(value) > TOKEN_MAX_LENGTH or not value.isascii() or not value.isprintable() or " " in value:
        violations.append((field, "is not a well-formed token"))
        return ""
    return value


def login_password(value: str, violations: Violations, field: str = "password", max_length: int = 128) -> None:
    """A password presented for verification: bounded before any hashing, no control characters."""
    if not value:
        violations.append((field, "must not be empty"))
    elif len(value) > max_length:
        violations.append((field, f"must be at most {max_length} characters"))
    elif _has_control(value):
        violations.append((field, "must not contain control characters"))
