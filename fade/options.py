"""A worker's settings, one record shared by the command line, the supervisor and the
embedded pool; and the command line of one supervised worker process.

::

    fade-worker ARGS --parse--> WorkerOptions --> Supervisor --child_argv--> worker process
    fade.Executor() ----------> WorkerOptions --> Supervisor (a thread)  --> worker process
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

# Only light modules: the embedded pool makes WorkerOptions and starts its workers
# before the client imports ZeroMQ (fade/launch.py).
from fade import defaults as d
from fade._env import default_address
from fade._version import __version__
from fade.defaults import argument_type, parse_message_size, parse_seconds, parse_size
from fade.resources import parse_resources

__all__ = ["WorkerOptions", "child_argv", "parse_worker_args"]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Everything a worker process (and its supervisor) is told."""

    address: str = d.DEFAULT_ADDRESS
    processes: int = 1
    heartbeat_interval: float = d.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = d.HEARTBEAT_LIVENESS
    prefetch: int | None = None  # tasks held beyond the running one; None: adapt
    code_cache: str | None = None
    package_cache_size: int = d.PACKAGE_CACHE_SIZE  # bytes of shipped packages kept
    data_cache: int = d.DATA_CACHE_SIZE  # bytes of task data this host keeps
    data_cache_dir: str | None = None
    keys: str | None = None  # the key file's path
    max_message_size: int = d.DEFAULT_MAX_MESSAGE_SIZE
    log_level: str = "INFO"
    clients: tuple[str, ...] | None = None  # serve only these client key names
    fast_paths: bool | None = None  # None: $FADE_FAST_PATHS decides
    #: What the host has for tasks that ask (fade/resources.py); None: detect.
    resources: dict[str, float] | None = None
    pool: str = ""  # the id the worker processes of one supervisor share
    label: str = ""  # what started it (fade-status shows it; scalers match jobs by it)
    parent_pid: int | None = None  # end when this process is gone
    child: bool = False
    identity: bytes | None = None
    #: The embedded pool's socket folder: removed by a worker that outlives the pool.
    remove_dir: str | None = None

    def with_keys(self, path: str | None) -> WorkerOptions:
        return replace(self, keys=path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fade-worker", description="Run fade worker processes connected to a broker."
    )
    _connection_arguments(parser)
    _cache_arguments(parser)
    _serving_arguments(parser)
    _other_arguments(parser)
    return parser


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker, the processes and their heartbeats and prefetch."""
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
    parser.add_argument(
        "--heartbeat-interval",
        type=argument_type(parse_seconds),
        default=d.HEARTBEAT_INTERVAL,
    )
    parser.add_argument("--heartbeat-liveness", type=int, default=d.HEARTBEAT_LIVENESS)
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="tasks to hold beyond the running one (default: adapt to task duration)",
    )


def _cache_arguments(parser: argparse.ArgumentParser) -> None:
    """This host's caches: shipped code, packages, task data."""
    parser.add_argument(
        "--code-cache",
        default=None,
        help="where shipped code is cached on this host (default: $FADE_CODE_CACHE or "
        "~/.cache/fade/code)",
    )
    parser.add_argument(
        "--package-cache-size",
        type=argument_type(parse_size),
        default=d.PACKAGE_CACHE_SIZE,
        metavar="BYTES",
        help="the most bytes of installed packages shipped from clients that this host keeps "
        "in its cache, e.g. 500M or 20G (default 8G); the least recently used go first",
    )
    parser.add_argument(
        "--data-cache",
        type=argument_type(_cache_size),
        default=d.DATA_CACHE_SIZE,
        metavar="BYTES",
        help="the most task data (large arguments sent by content) this host keeps, e.g. "
        "500M or 4G (default 4G; 0: keep nothing, fetch for each task)",
    )
    parser.add_argument(
        "--data-cache-dir",
        metavar="DIR",
        default=None,
        help="where task data is cached on this host (default: $FADE_DATA_CACHE or "
        "~/.cache/fade/data)",
    )


def _serving_arguments(parser: argparse.ArgumentParser) -> None:
    """Whom and what the workers serve: keys, clients, resources, label, sizes."""
    parser.add_argument(
        "--keys",
        metavar="FILE",
        default=None,
        help=f"this worker's key file (fade-keys add worker NAME); default ${d.KEYS_ENV}",
    )
    parser.add_argument(
        "--serve-clients",
        metavar="NAMES",
        default=None,
        help="serve only the clients whose keys have these names (comma-separated; "
        "with --keys on the broker): a pool of workers for one trust domain",
    )
    parser.add_argument(
        "--resources",
        metavar="SPEC",
        default=None,
        help="what this host has for tasks that ask, e.g. gpu=2,mem=64G,licence=1 "
        "(default: detected CPUs, memory, and GPUs from CUDA_VISIBLE_DEVICES or nvidia-smi; "
        "'' for none)",
    )
    parser.add_argument(
        "--label",
        default="",
        help="what started these workers, shown by fade-status and matched by fade-scale "
        "(e.g. slurm:1234; the Slurm recipe sets it)",
    )
    parser.add_argument(
        "--max-message-size",
        type=argument_type(parse_message_size),
        default=d.DEFAULT_MAX_MESSAGE_SIZE,
        metavar="BYTES",
        help="largest frame sent or accepted, e.g. 64M or 2G (default 1G)",
    )


def _other_arguments(parser: argparse.ArgumentParser) -> None:
    """Logging, the version, and the options a supervisor gives its children."""
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--identity", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-fast-paths", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pool", default="", help=argparse.SUPPRESS)
    parser.add_argument("--remove-dir", default=None, help=argparse.SUPPRESS)


def _cache_size(text: str) -> int:
    """A size as ``parse_size`` takes it, or 0."""
    return 0 if text.strip() == "0" else parse_size(text)


def parse_worker_args(argv: Sequence[str] | None) -> WorkerOptions:
    """The command line of ``fade-worker``, parsed and checked."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.heartbeat_liveness < 1:  # the interval: parse_seconds
        parser.error("--heartbeat-liveness must be at least 1")
    if args.prefetch is not None and args.prefetch < 0:
        parser.error("--prefetch must be at least 0 (a worker holding -1 asks for nothing)")
    resources = None
    if args.resources is not None:
        try:
            resources = parse_resources(args.resources)
        except ValueError as exc:
            parser.error(f"--resources: {exc}")
    from fade.link import check_address  # ZeroMQ: not before the embedded pool starts
    from fade.protocol import MAX_LABEL

    try:
        check_address(args.address)  # ZeroMQ would retry a malformed one for ever
    except ValueError as exc:
        parser.error(str(exc))

    if len(args.label) > MAX_LABEL:
        parser.error(f"--label must be at most {MAX_LABEL} characters")
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
        package_cache_size=args.package_cache_size,
        data_cache=args.data_cache,
        data_cache_dir=args.data_cache_dir,
        keys=args.keys,
        max_message_size=args.max_message_size,
        log_level=args.log_level,
        clients=clients,
        fast_paths=False if args.no_fast_paths else None,
        resources=resources,
        pool=args.pool,
        remove_dir=args.remove_dir,
        label=args.label,
        parent_pid=args.parent_pid,
        child=args.child,
        identity=bytes.fromhex(args.identity) if args.identity else None,
    )


#: How a supervised worker process starts: with its supervisor's ``sys.path`` (the
#: argument after this code, in JSON), then ``fade.worker``'s main. The embedded pool's
#: supervisor is the client: its workers import what the client imports, as
#: ProcessPoolExecutor's do, also with ship_code="off" (a module beside the script).
#: ``python -m`` put the current folder first instead, so a user's module named like
#: one of Python's own (a ``platform.py``, which ZeroMQ imports) shadowed it when the
#: client ran from another folder, and every worker died at start-up.
WORKER_BOOT = (
    "import json, sys\n"
    "sys.path[:] = json.loads(sys.argv.pop(1))\n"
    "from fade.worker import main\n"
    "sys.exit(main())\n"
)


def child_argv(options: WorkerOptions, identity: bytes, parent_pid: int) -> list[str]:
    """The command line of one supervised worker process."""
    argv = [
        sys.executable,
        "-c",
        WORKER_BOOT,
        json.dumps(sys.path),
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
        "--package-cache-size",
        str(options.package_cache_size),
        "--data-cache",
        str(options.data_cache),
    ]
    if options.keys is not None:
        argv += ["--keys", options.keys]
    if options.prefetch is not None:
        argv += ["--prefetch", str(options.prefetch)]
    if options.code_cache is not None:
        argv += ["--code-cache", options.code_cache]
    if options.data_cache_dir is not None:
        argv += ["--data-cache-dir", options.data_cache_dir]
    if options.clients is not None:
        argv += ["--serve-clients", ",".join(options.clients)]
    if options.fast_paths is False:
        argv.append("--no-fast-paths")
    if options.remove_dir is not None:
        argv += ["--remove-dir", options.remove_dir]
    if options.label:
        argv += ["--label", options.label]
    if options.resources is not None:
        spec = ",".join(f"{name}={amount:.17g}" for name, amount in options.resources.items())
        argv += ["--resources", spec, "--pool", options.pool]
    return argv
