"""The ``fade-broker`` command line: options, logging, the HTTP endpoint, signals.

::

    fade-broker ADDRESS [--keys DIR] [--http HOST:PORT ...] --> Broker(...).bind()
    fade-broker ADDRESS --peer OTHER (--primary | --backup)  --> one broker of a pair
        SIGINT/SIGTERM --> Broker.stop()         --http --> fade.web.StatusServer (a thread)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import zmq

from fade import protocol as p
from fade._env import default_address
from fade._logutil import OneLineFormatter
from fade._version import __version__
from fade.broker import INSECURE_WARNING_PERIOD, PUBLISH_INTERVAL, Broker
from fade.defaults import argument_type, parse_message_size, parse_seconds, parse_size
from fade.errors import SecurityError
from fade.link import check_address
from fade.scheduler import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_CLIENT_BYTES, DEFAULT_MAX_CLIENT_TASKS
from fade.sockets import DEFAULT_MAX_MESSAGE_SIZE, check_endpoint

if TYPE_CHECKING:
    from fade.web import StatusServer

__all__ = ["run"]

log = logging.getLogger("fade.broker")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fade-broker", description="Run a fade broker that clients and workers connect to."
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=default_address(),
        help="ZeroMQ endpoint to bind (default %(default)s; FADE_ADDRESS sets it)",
    )
    _add_pool_options(parser)
    _add_http_options(parser)
    _add_security_options(parser)
    _add_pair_options(parser)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    # The embedded pool's private socket folder: removed when the broker ends.
    parser.add_argument("--remove-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--insecure-warning-period",
        type=float,
        default=INSECURE_WARNING_PERIOD,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _add_pool_options(parser: argparse.ArgumentParser) -> None:
    """Timing, re-runs, and each client's share and limits."""
    parser.add_argument(
        "--heartbeat-interval",
        type=argument_type(parse_seconds),
        default=p.HEARTBEAT_INTERVAL,
    )
    parser.add_argument("--heartbeat-liveness", type=int, default=p.HEARTBEAT_LIVENESS)
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="worker losses a task may suffer before it fails (default %(default)s)",
    )
    parser.add_argument(
        "--weight",
        metavar="KEY=WEIGHT",
        action="append",
        type=_weight,
        default=[],
        help="give the clients of a key this share of the pool, relative to the default 1 "
        "(repeat for more keys; with --keys); e.g. --weight alice=2",
    )
    parser.add_argument(
        "--max-client-tasks",
        type=int,
        default=DEFAULT_MAX_CLIENT_TASKS,
        metavar="N",
        help="tasks one client may hold at the broker (default %(default)s); more are refused",
    )
    parser.add_argument(
        "--max-client-bytes",
        type=argument_type(parse_size),
        default=DEFAULT_MAX_CLIENT_BYTES,
        metavar="BYTES",
        help="bytes of task data one client may hold at the broker (default 2G)",
    )


def _add_http_options(parser: argparse.ArgumentParser) -> None:
    """The dashboard, /status and /metrics (fade/web.py)."""
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=None,
        help="serve a live dashboard, /status (JSON) and /metrics (Prometheus) on this "
        "address; off by default",
    )
    parser.add_argument(
        "--http-public",
        action="store_true",
        help="allow --http on a host other machines can reach (--keys does not imply it: "
        "keys cover the broker's ZeroMQ port, not HTTP)",
    )
    parser.add_argument(
        "--http-allow-host",
        metavar="NAME",
        action="append",
        default=[],
        help="also answer HTTP requests addressed to this host name, as behind a proxy "
        "(repeat for more; '*' answers any name and turns off the DNS-rebinding check)",
    )
    parser.add_argument(
        "--http-token-file",
        metavar="FILE",
        default=None,
        help="a file holding a secret token of 16 or more characters: requests that send "
        "'Authorization: Bearer TOKEN' also see each worker and client (host, pid, short "
        "id); without it the HTTP endpoint shows aggregate numbers only",
    )


def _add_security_options(parser: argparse.ArgumentParser) -> None:
    """Who may connect, and how large a frame may be."""
    parser.add_argument(
        "--keys",
        metavar="DIR",
        default=None,
        help="accept only the CurveZMQ keys authorised in DIR (made by `fade-keys init DIR`)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve a network address without keys (anyone reaching it can run code)",
    )
    parser.add_argument(
        "--max-message-size",
        type=argument_type(parse_message_size),
        default=DEFAULT_MAX_MESSAGE_SIZE,
        metavar="BYTES",
        help="largest frame accepted, e.g. 64M or 2G (default 1G); a peer sending more "
        "is disconnected",
    )


def _add_pair_options(parser: argparse.ArgumentParser) -> None:
    """One broker of a pair (fade/pair.py)."""
    parser.add_argument(
        "--peer",
        metavar="ADDRESS",
        default=None,
        help="run as one broker of a pair with the broker at ADDRESS (its ZeroMQ endpoint): "
        "one serves, the other takes over if it fails; clients and workers are given both "
        "addresses, comma-separated. Needs --primary or --backup",
    )
    role = parser.add_mutually_exclusive_group()
    role.add_argument(
        "--primary",
        action="store_true",
        help="with --peer: this broker serves when both start together, and settles ties",
    )
    role.add_argument(
        "--backup", action="store_true", help="with --peer: this broker stands by at first"
    )


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot check by itself; exits with a usage error."""
    if not args.http and (args.http_public or args.http_allow_host or args.http_token_file):
        parser.error("--http-public, --http-allow-host and --http-token-file need --http")
    if "," in args.address:
        parser.error(
            "a broker binds one address; run the other broker of a pair with its own, "
            "and name each other with --peer"
        )
    try:
        check_endpoint(args.address, binding=True)
    except ValueError as exc:
        parser.error(str(exc))
    if args.heartbeat_liveness < 1:
        parser.error("--heartbeat-liveness must be at least 1")
    if args.peer is not None and not (args.primary or args.backup):
        parser.error("--peer needs --primary (on one broker) or --backup (on the other)")
    if args.peer is None and (args.primary or args.backup):
        parser.error("--primary and --backup are for a pair: give the other broker's --peer")
    if args.peer is not None:
        try:
            check_address(args.peer)
        except ValueError as exc:
            parser.error(f"--peer: {exc}")
        if "," in args.peer:
            parser.error("--peer takes the one other broker's address")


def _weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = 0.0
    if not sep or not name or weight <= 0:
        raise argparse.ArgumentTypeError(f"expected KEY=WEIGHT with a positive weight: {text!r}")
    return name, weight


def _raise_open_file_limit() -> None:
    """Every connected peer costs the broker a file descriptor: allow as many as the
    system does, since the common default of 1024 would cap a pool at ~1000 workers."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
        except (ValueError, OSError):
            pass


def run(argv: Sequence[str] | None = None) -> int:
    """The ``fade-broker`` command: parse, bind, serve until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    _raise_open_file_limit()
    handler = logging.StreamHandler()
    # One line per record, whatever text a peer managed to get into a message.
    handler.setFormatter(
        OneLineFormatter(
            f"%(asctime)s fade-broker[{os.getpid()}@{socket.gethostname()}] "
            "%(levelname)s %(message)s"
        )
    )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    broker: Broker | None = None
    try:
        broker = Broker(
            args.address,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_liveness=args.heartbeat_liveness,
            max_attempts=args.max_attempts,
            parent_pid=args.parent_pid,
            keys=args.keys,
            insecure=args.insecure,
            max_message_size=args.max_message_size,
            insecure_warning_period=args.insecure_warning_period,
            weights=dict(args.weight),
            max_client_tasks=args.max_client_tasks,
            max_client_bytes=args.max_client_bytes,
            peer=args.peer,
            backup=args.backup,
        )
        broker.bind()
        web = _start_http(broker, args) if args.http else None
    except (ValueError, OSError, zmq.ZMQError, SecurityError) as exc:
        print(f"fade-broker: {exc}", file=sys.stderr)
        if broker is not None:
            broker.close()
        return 2
    running = broker
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: running.stop())
    try:
        running.run()
    finally:
        if web is not None:
            web.stop()
        if args.remove_dir is not None:
            shutil.rmtree(args.remove_dir, ignore_errors=True)
    log.info("fade-broker stopped")
    return 0


def _start_http(broker: Broker, args: argparse.Namespace) -> StatusServer:
    """Serve the broker's published snapshots over HTTP from a daemon thread.

    Raises ValueError or OSError with a message for the operator.
    """
    from fade.web import StatusServer, check_host, parse_address, read_token

    host, port = parse_address(args.http)
    # Reachable from other machines only when the operator says so: keys protect
    # the ZeroMQ port, not this one.
    check_host(host, public=args.http_public)
    token = read_token(args.http_token_file) if args.http_token_file else None
    broker.publish_interval = PUBLISH_INTERVAL
    broker.published = broker.snapshot()
    try:
        server = StatusServer(
            host, port, lambda: broker.published, allow_hosts=args.http_allow_host, token=token
        )
    except OSError as exc:
        raise OSError(
            f"cannot serve HTTP on {args.http} (the --http address, not the broker's "
            f"{broker.address}): {exc.strerror or exc}"
        ) from None
    url = server.start()
    log.info(
        "dashboard at %s (JSON at %sstatus, Prometheus at %smetrics); per-peer detail %s",
        url,
        url,
        url,
        f"for the token in {args.http_token_file}" if token else "off (no --http-token-file)",
    )
    return server
