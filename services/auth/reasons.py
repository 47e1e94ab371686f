"""What the auth service's errors say: the ``google.rpc.ErrorInfo`` reason of every error it answers with.

Every error auth raises names its cause with one of the constants below (:data:`ALL` lists them, and
docs/errors.md documents each; a test keeps the two equal), so a client can tell a too-short password
from a malformed e-mail address without parsing the message. The ErrorInfo domain is ``auth``.

An INVALID_ARGUMENT also carries a ``google.rpc.BadRequest`` with every field violation the request
has; when there are several, the reason is that of the first one found (fields are checked in the
order of the request message, e.g. username, then email, then password).
"""

# ruff: noqa: S105  (names like PASSWORD_TOO_SHORT are ErrorInfo reasons, not passwords)

from __future__ import annotations

# --- INVALID_ARGUMENT: fields of any request ------------------------------------------------------
FIELD_REQUIRED = "FIELD_REQUIRED"
"""A required field is empty (username, email, password, current_password, new_password, a token)."""
FIELD_TOO_LONG = "FIELD_TOO_LONG"
"""A username longer than 64 characters or an e-mail address longer than 254."""
USERNAME_INVALID = "USERNAME_INVALID"
"""A username that is not 3-64 of a-z, 0-9, '.', '_', '-' starting and ending with a letter or digit (after NFKC
and lower-casing)."""
USERNAME_RESERVED = "USERNAME_RESERVED"
"""Register: the username is on ``AUTH_RESERVED_USERNAMES``."""
EMAIL_INVALID = "EMAIL_INVALID"
"""An e-mail address not of the form name@example.com (no quotes, comments or IP literals)."""
TOKEN_MALFORMED = "TOKEN_MALFORMED"
"""A refresh or reset token that is not printable ASCII without spaces, or is longer than 4096 characters."""

# --- INVALID_ARGUMENT: passwords ------------------------------------------------------------------
PASSWORD_TOO_SHORT = "PASSWORD_TOO_SHORT"
"""A new password shorter than ``AUTH_PASSWORD_MIN_LENGTH`` characters (after NFKC)."""
PASSWORD_TOO_LONG = "PASSWORD_TOO_LONG"
"""A password longer than 128 characters, or than 512 UTF-8 bytes after NFKC (checked before any hashing)."""
PASSWORD_INVALID_CHARACTERS = "PASSWORD_INVALID_CHARACTERS"
"""A password with control characters (or, from the command line, lone surrogates)."""
PASSWORD_TOO_COMMON = "PASSWORD_TOO_COMMON"
"""A new password on the bundled list of common passwords (compared case-insensitively)."""
PASSWORD_CONTAINS_USERNAME = "PASSWORD_CONTAINS_USERNAME"
"""A new password that contains the username (case-insensitively, usernames of 3 or more characters)."""
WRONG_CURRENT_PASSWORD = "WRONG_CURRENT_PASSWORD"
"""ChangePassword: ``current_password`` is not the account's password."""
RESET_TOKEN_INVALID = "RESET_TOKEN_INVALID"
"""ResetPassword: the token is unknown, used, replaced by a newer one, or expired."""

# --- INVALID_ARGUMENT: ListAuditEvents ------------------------------------------------------------
PAGE_SIZE_OUT_OF_RANGE = "PAGE_SIZE_OUT_OF_RANGE"
"""``page_size`` is negative or above 500."""
PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"
"""``page_token`` is not a token from a previous page."""
UNKNOWN_EVENT_TYPE = "UNKNOWN_EVENT_TYPE"
"""``event_types`` holds a value that is not an AuditEventType (or is UNSPECIFIED)."""

# --- UNAUTHENTICATED ------------------------------------------------------------------------------
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
"""Login: unknown username, wrong password or locked account, one answer for all three (locked adds RetryInfo)."""
MISSING_TOKEN = "MISSING_TOKEN"
"""A call that needs ``authorization: Bearer <access token>`` came without one."""
INVALID_TOKEN = "INVALID_TOKEN"
"""The access token is malformed, expired, not signed by a known key or has wrong claims (ErrorInfo metadata
``cause``: ``malformed``, ``expired``, ``bad_signature``, ``unknown_key`` or ``invalid_claims``)."""
SESSION_REVOKED = "SESSION_REVOKED"
"""The access token is valid but its session has ended (logout, password change or reset, refresh reuse)."""
INVALID_REFRESH_TOKEN = "INVALID_REFRESH_TOKEN"
"""RefreshToken: the token is unknown, expired, rotated before (which ends its session) or its session ended."""

# --- PERMISSION_DENIED, NOT_FOUND, ALREADY_EXISTS, RESOURCE_EXHAUSTED -------------------------------
ADMIN_REQUIRED = "ADMIN_REQUIRED"
"""UnlockAccount, ListAuditEvents: the caller's token lacks the admin role."""
ACCOUNT_NOT_FOUND = "ACCOUNT_NOT_FOUND"
"""UnlockAccount: no account and no failed logins under that username."""
ALREADY_EXISTS = "ALREADY_EXISTS"
"""Register: the username or the e-mail address is already registered."""
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
"""Login: the per-IP or per-account login limit is reached; or any call that hashes a password (Register, Login,
ChangePassword, ResetPassword): every hash thread and queue slot is taken. RetryInfo says when to retry."""

# --- UNAVAILABLE ----------------------------------------------------------------------------------
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
"""Any call that reads or writes accounts, sessions or the audit log: the database cannot be reached, its
connections are all taken (``AUTH_DATABASE_POOL_TIMEOUT_SECONDS``) or it ended the transaction (a lost
connection, a deadlock); nothing was changed. RetryInfo says when to retry."""

ALL: tuple[str, ...] = (
    FIELD_REQUIRED,
    FIELD_TOO_LONG,
    USERNAME_INVALID,
    USERNAME_RESERVED,
    EMAIL_INVALID,
    TOKEN_MALFORMED,
    PASSWORD_TOO_SHORT,
    PASSWORD_TOO_LONG,
    PASSWORD_INVALID_CHARACTERS,
    PASSWORD_TOO_COMMON,
    PASSWORD_CONTAINS_USERNAME,
    WRONG_CURRENT_PASSWORD,
    RESET_TOKEN_INVALID,
    PAGE_SIZE_OUT_OF_RANGE,
    PAGE_TOKEN_INVALID,
    UNKNOWN_EVENT_TYPE,
    INVALID_CREDENTIALS,
    MISSING_TOKEN,
    INVALID_TOKEN,
    SESSION_REVOKED,
    INVALID_REFRESH_TOKEN,
    ADMIN_REQUIRED,
    ACCOUNT_NOT_FOUND,
    ALREADY_EXISTS,
    RESOURCE_EXHAUSTED,
    STORE_UNAVAILABLE,
)
"""Every reason above, INVALID_ARGUMENT ones first."""

__all__ = [
    "ACCOUNT_NOT_FOUND",
    "ADMIN_REQUIRED",
    "ALL",
    "ALREADY_EXISTS",
    "EMAIL_INVALID",
    "FIELD_REQUIRED",
    "FIELD_TOO_LONG",
    "INVALID_CREDENTIALS",
    "INVALID_REFRESH_TOKEN",
    "INVALID_TOKEN",
    "MISSING_TOKEN",
    "PAGE_SIZE_OUT_OF_RANGE",
    "PAGE_TOKEN_INVALID",
    "PASSWORD_CONTAINS_USERNAME",
    "PASSWORD_INVALID_CHARACTERS",
    "PASSWORD_TOO_COMMON",
    "PASSWORD_TOO_LONG",
    "PASSWORD_TOO_SHORT",
    "RESET_TOKEN_INVALID",
    "RESOURCE_EXHAUSTED",
    "SESSION_REVOKED",
    "STORE_UNAVAILABLE",
    "TOKEN_MALFORMED",
    "UNKNOWN_EVENT_TYPE",
    "USERNAME_INVALID",
    "USERNAME_RESERVED",
    "WRONG_CURRENT_PASSWORD",
]
