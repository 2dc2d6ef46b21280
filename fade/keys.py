"""``fade-keys``: make, authorise and revoke the CurveZMQ keys of a fade pool.

::

    fade-keys init DIR                           the broker's pair, DIR/clients/, DIR/workers/
    fade-keys add client alice --dir DIR         ./alice.key   (give it to alice)
    fade-keys add worker rack1 --dir DIR         ./rack1.key   (copy it to the worker hosts)
    fade-keys revoke alice --dir DIR             alice can no longer connect
    fade-keys list --dir DIR

    fade-broker tcp://0.0.0.0:5555 --keys DIR
    fade-worker tcp://head:5555 --keys rack1.key          (or FADE_KEYS=rack1.key)
    fade.Executor("tcp://head:5555", keys="alice.key")    (or FADE_KEYS=alice.key)

A running broker picks up additions and revocations within a heartbeat
interval; a revoked peer's open connection is dropped then too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fade import security
from fade._version import __version__
from fade.errors import SecurityError

__all__ = ["main"]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fade-keys", description="Make, authorise and revoke the keys of a fade pool."
    )
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create the broker's key pair in DIR")
    init.add_argument("dir", metavar="DIR")

    add = commands.add_parser("add", help="make a client's or worker's key file, authorised")
    add.add_argument("role", choices=security.ROLES)
    add.add_argument("name", help="who holds it: a user, a host, a group of workers")
    add.add_argument("--dir", default=".", help="the broker's key folder (default: .)")
    add.add_argument("--out", "-o", default=None, help="where to write it (default ./NAME.key)")

    revoke = commands.add_parser("revoke", help="stop accepting NAME's key")
    revoke.add_argument("name")
    revoke.add_argument("--dir", default=".", help="the broker's key folder (default: .)")

    listing = commands.add_parser("list", help="show the authorised keys")
    listing.add_argument("--dir", default=".", help="the broker's key folder (default: .)")
    return parser.parse_args(argv)


def _init(args: argparse.Namespace) -> None:
    keys = security.create_key_dir(args.dir)
    print(f"created the broker's key pair in {keys.directory} (keep it on the broker's host)")
    print("next:")
    print(f"  fade-keys add client NAME --dir {args.dir}    one per user or program")
    print(f"  fade-keys add worker NAME --dir {args.dir}    one per worker host or group")
    print(f"  fade-broker tcp://0.0.0.0:5555 --keys {args.dir}")


def _add(args: argparse.Namespace) -> None:
    path = security.add_peer(args.dir, args.role, args.name, args.out)
    print(f"wrote {path}: the SECRET {args.role} key of {args.name!r}, authorised in {args.dir}")
    if args.role == "client":
        print(f'use: fade.Executor("tcp://HOST:PORT", keys="{path}")  or  FADE_KEYS={path}')
    else:
        print(f"use: fade-worker tcp://HOST:PORT --keys {path}  or  FADE_KEYS={path}")


def _revoke(args: argparse.Namespace) -> int:
    removed = security.revoke_peer(args.dir, args.name)
    if not removed:
        print(f"fade-keys: no authorised key named {args.name!r} in {args.dir}", file=sys.stderr)
        return 1
    for path in removed:
        print(f"revoked {args.name!r} (removed {path}); a running broker drops it within seconds")
    return 0


def _list(args: argparse.Namespace) -> None:
    security.load_broker_keys(args.dir)  # a clear error if DIR is not a key folder
    peers = security.list_peers(args.dir)
    if not peers:
        print(f"no keys authorised in {args.dir}")
    width = max((len(name) for _, name, _ in peers), default=0)
    for role, name, key in peers:
        print(f"{role:<6}  {name:<{width}}  {key}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fade-keys``."""
    args = _parse_args(argv)
    try:
        if args.command == "init":
            _init(args)
        elif args.command == "add":
            _add(args)
        elif args.command == "revoke":
            return _revoke(args)
        else:
            _list(args)
    except (SecurityError, OSError) as exc:
        print(f"fade-keys: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
