"""The versioned schema of each store dialect: ``<dialect>/NNNN_name.sql``, applied in order, each once.

A store records the versions it applied in ``schema_migrations``. A database whose highest version is
beyond what this code ships was migrated by newer code: :func:`check_not_newer` refuses it, since this
code would misread it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]

_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    script: str


class SchemaTooNew(Exception):
    """The database was migrated by newer code than this one."""


def migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """The dialect's migrations in version order; versions run 1, 2, 3... without gaps."""
    folder = resources.files(__package__).joinpath(dialect)
    found = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    if [migration.version for migration in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations are not numbered 1..{len(found)}: {[m.name for m in found]}")
    return tuple(found)


def check_not_newer(current: int, known: tuple[Migration, ...], where: str) -> None:
    """Refuse a schema at a version beyond ``known``'s last one."""
    latest = known[-1].version if known else 0
    if current > latest:
        raise SchemaTooNew(
            f"the auth database ({where}) has schema version {current}, newer than this code knows"
            f" ({latest}): it was migrated by a newer auth release; run that release (or newer) instead"
        )
