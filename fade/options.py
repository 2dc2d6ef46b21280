"""A worker's settings, one record shared by the command line, the supervisor and the
embedded pool; and the command line of one supervised worker process.

::

    fade-worker ARGS --parse--> WorkerOptions --> Supervisor --child_argv--> worker process
    fade.Executor() ----------> WorkerOptions --> Supervisor (a thread)  --> worker process
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fade import protocol as p
from fade._env import default_address
from fade._version import __version__
from fade.keyfiles import KEYS_ENV
from fade.sockets import DEFAULT_MAX_MESSAGE_SIZE, parse_size

__all__ = ["WorkerOptions", "child_argv", "parse_worker_args"]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Everything a worker process (and its supervisor) is told."""

    address: str = p.DEFAULT_ADDRESS
    processes: int = 1
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS
    prefetch: int | None = None  # tasks held beyond the running one; None: adapt
    code_cache: str | None = None
    keys: str | None = None  # the key file's path
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    log_level: str = "INFO"
    clients: tuple[str, ...] | None = None  # serve only these client key names
    fast_paths: bool | None = None  # None: $FADE_FAST_PATHS decides
    parent_pid: int | None = None  # end when this process is gone
    child: bool = False
    identity: bytes | None = None

    def with_keys(self, path: str | None) -> WorkerOptions:
        return replace(self, keys=path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fade-worker", description="Run fade worker processes connected to a broker."
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=default_address(),
        help="the broker's ZeroMQ endpoint, or a broker pair's two, comma-separated "
        "(default %(default)s; FADE_ADDRESS sets it)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes to keep running on this host (default %(default)s)",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=p.HEARTBEAT_INTERVAL)
    parser.add_argument("--heartbeat-liveness", type=int, default=p.HEARTBEAT_LIVENESS)
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="tasks to hold beyond the running one (default: adapt to task duration)",
    )
    parser.add_argument(
        "--code-cache",
        default=None,
        help="where shipped code is cached on this host (default: $FADE_CODE_CACHE or "
        "~/.cache/fade/code)",
    )
    parser.add_argument(
        "--keys",
        metavar="FILE",
        default=None,
        help=f"this worker's key file (fade-keys add worker NAME); default ${KEYS_ENV}",
    )
    parser.add_argument(
        "--serve-clients",
        metavar="NAMES",
        default=None,
        help="serve only the clients whose keys have these names (comma-separated; "
        "with --keys on the broker): a pool of workers for one trust domain",
    )
    parser.add_argument(
        "--max-message-size",
        type=parse_size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        metavar="BYTES",
        help="largest frame sent or accepted, e.g. 64M or 2G (default 1G)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--identity", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-fast-paths", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_worker_args(argv: Sequence[str] | None) -> WorkerOptions:
    """The command line of ``fade-worker``, parsed and checked."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.heartbeat_interval <= 0 or args.heartbeat_liveness < 1:
        parser.error("--heartbeat-interval must be > 0 and --heartbeat-liveness >= 1")
    clients = None
    if args.serve_clients is not None:
        clients = tuple(name.strip() for name in args.serve_clients.split(",") if name.strip())
        if not clients:
            parser.error("--serve-clients needs at least one key name")
    return WorkerOptions(
        address=args.address,
        processes=args.processes,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_liveness=args.heartbeat_liveness,
        prefetch=args.prefetch,
        code_cache=args.code_cache,
        keys=args.keys,
        max_message_size=args.max_message_size,
        log_level=args.log_level,
        clients=clients,
        fast_paths=False if args.no_fast_paths else None,
        parent_pid=args.parent_pid,
        child=args.child,
        identity=bytes.fromhex(args.identity) if args.identity else None,
    )


def child_argv(options: WorkerOptions, identity: bytes, parent_pid: int) -> list[str]:
    """The command line of one supervised worker process."""
    argv = [
        sys.executable,
        "-m",
        "fade.worker",
        options.address,
        "--child",
        "--identity",
        identity.hex(),
        "--parent-pid",
        str(parent_pid),
        "--heartbeat-interval",
        str(options.heartbeat_interval),
        "--heartbeat-liveness",
        str(options.heartbeat_liveness),
        "--log-level",
        options.log_level,
        "--max-message-size",
        str(options.max_message_size),
    ]
    if options.keys is not None:
        argv += ["--keys", options.keys]
    if options.prefetch is not None:
        argv += ["--prefetch", str(options.prefetch)]
    if options.code_cache is not None:
        argv += ["--code-cache", options.code_cache]
    if options.clients is not None:
        argv += ["--serve-clients", ",".join(options.clients)]
    if options.fast_paths is False:
        argv.append("--no-fast-paths")
    return argv
