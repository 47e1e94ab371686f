"""``python -m services.auth``: run the auth service, or one of its maintenance commands.

python -m services.auth                       serve until SIGTERM/SIGINT
python -m services.auth create-user NAME --email ADDRESS [--admin]
                                              (password from AUTH_NEW_USER_PASSWORD, else prompted)
python -m services.auth import-users FILE     JSON lines: username, email, hash, roles
python -m services.auth wrap-legacy           argon2id-wrap every legacy SHA-256 hash at rest
python -m services.auth copy-store --to URL [--into-non-empty]
                                              copy every account, session, lock and audit event into URL's store
"""

from __future__ import annotations

import argparse
import sys

from services.auth.app import SERVICE, build_server
from services.auth.cli import run_command
from services.auth.settings import AuthSettings
from services.common.runner import run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.auth", description="The auth service.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve auth.v1.AuthService (the default)")
    create = commands.add_parser("create-user", help="create an account")
    create.add_argument("username")
    create.add_argument("--email", required=True)
    create.add_argument("--admin", action="store_true", help="give the account the admin role")
    load = commands.add_parser("import-users", help="import accounts (legacy hashes welcome) from JSON lines")
    load.add_argument("file")
    commands.add_parser("wrap-legacy", help="wrap every legacy SHA-256 hash at rest in argon2id")
    copy = commands.add_parser("copy-store", help="copy the configured store into another (e.g. SQLite -> PostgreSQL)")
    copy.add_argument("--to", required=True, help="the target's database URL (postgresql://... or sqlite:///...)")
    copy.add_argument(
        "--into-non-empty", action="store_true", help="copy into a store that has rows: add the missing ones"
    )
    args = parser.parse_args(argv)
    if args.command in (None, "serve"):
        return run(SERVICE, AuthSettings, build_server)
    return run_command(args)


sys.exit(main(sys.argv[1:]))
