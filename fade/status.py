"""``fade-status``: the pool at a glance, from any machine that reaches the broker.

::

    fade-status --(DEALER)-- STATUS --> broker
                <----------- STATE (JSON: Broker.snapshot()) --

The question needs no HELLO and leaves no trace at the broker. :func:`query`
returns the state as a dict; :func:`query_each` asks both brokers of a pair
(``tcp://a:5555,tcp://b:5555``) at once, and :func:`format_pair` shows both,
which one is active, and the active one's pool; :func:`format_status` turns it into the aligned
text the command prints, every string a peer supplied (host names, say) escaped
by :func:`fade._logutil.printable` so that it cannot move the cursor or clear
the screen. The keys of the state are listed in docs/operating.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import zmq

from fade import protocol as p
from fade import security
from fade._env import default_address
from fade._logutil import printable
from fade._version import __version__
from fade.defaults import argument_type, parse_seconds
from fade.errors import BrokerUnreachableError, FadeError, ProtocolError, SecurityError
from fade.link import check_address
from fade.sockets import connect_dealer

__all__ = ["format_pair", "format_status", "main", "peer_id", "query", "query_each"]

log = logging.getLogger("fade.status")

DEFAULT_TIMEOUT = 5.0


def query(
    address: str, timeout: float = DEFAULT_TIMEOUT, keys: str | None = None
) -> dict[str, Any]:
    """Ask the broker at ``address`` for its state (with ``keys``, a client or worker key
    file, or $FADE_KEYS, for a broker that uses keys).

    Raises BrokerUnreachableError if no answer comes within ``timeout`` seconds,
    or at once if the encrypted handshake fails (saying why: the broker requires
    keys, refused ours, or is not the broker of our key file), ProtocolError if
    the answer is not a STATE, and ``zmq.ZMQError`` for an address ZeroMQ cannot
    parse.
    """
    path = keys or os.environ.get(security.KEYS_ENV)
    peer_keys = security.load_peer_keys(path) if path else None
    identity = security.peer_identity(b"S", peer_keys)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = connect_dealer(context, address, identity=identity, keys=peer_keys)
        watch = security.HandshakeWatch(sock, log, peer_keys)
        try:
            return _ask(sock, watch, address, timeout)
        finally:
            watch.close()
    finally:
        # destroy, not term: it also closes a socket whose connect() failed.
        context.destroy(linger=0)


Answer = tuple[str, "dict[str, Any] | FadeError"]


def query_each(
    address: str, timeout: float = DEFAULT_TIMEOUT, keys: str | None = None
) -> list[Answer]:
    """Ask every broker of a comma-separated ``address`` (a pair) at once: (address, its
    state, or the FadeError that says why it did not answer) for each, in order.
    Raises SecurityError for an unreadable key file, ``zmq.ZMQError`` for a bad address."""
    addresses = address.split(",")
    with cf.ThreadPoolExecutor(len(addresses)) as pool:
        futures = [pool.submit(query, one, timeout, keys) for one in addresses]
        answers: list[Answer] = []
        for one, future in zip(addresses, futures):
            try:
                answers.append((one, future.result()))
            except (BrokerUnreachableError, ProtocolError) as exc:
                answers.append((one, exc))
    return answers


def _ask(
    sock: zmq.Socket[bytes], watch: security.HandshakeWatch, address: str, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    sock.send_multipart(p.encode_status(), zmq.NOBLOCK)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(watch.monitor, zmq.POLLIN)
    while True:
        left = deadline - time.monotonic()
        ready = dict(poller.poll(int(left * 1000))) if left > 0 else {}
        if not ready:
            raise BrokerUnreachableError(
                f"no answer from a fade broker at {address} within {timeout:g}s "
                "(is it running, and is that its address?)"
            )
        # A one-off question: the first failed handshake is the answer (a client
        # keeps retrying, since a key may be authorised later; this is not one).
        failures = watch.failures() if watch.monitor in ready else []
        if failures:
            raise BrokerUnreachableError(
                f"the broker at {address} did not let us in: {failures[0]}"
            )
        if sock in ready:
            message = p.parse(sock.recv_multipart())
            if message.command is p.Command.STATE:
                return p.decode_state(message.body)
        # Anything else (a HEARTBEAT, say) is not the answer: keep waiting.


def peer_id(entry: dict[str, Any] | Any) -> str:
    """How a worker or client of a state is named to people: its ``id``, the short id
    the broker's log uses too (:func:`fade.protocol.short_id`); "-" if it has none."""
    given = entry.get("id")
    return printable(given, limit=16) if isinstance(given, str) else "-"


# -- text output ---------------------------------------------------------------------


def format_status(state: dict[str, Any]) -> str:
    """The state as aligned text: a summary, then a table of workers and of clients."""
    workers = sorted(
        state.get("workers", []), key=lambda w: (str(w.get("host")), _number(w.get("pid")))
    )
    clients = state.get("clients", [])
    lines = [*_summary(state, workers, clients), ""]
    if workers:
        lines += _worker_table(workers)
        lines += _environments(workers)
    else:
        lines.append("no workers")
    if clients:
        lines += ["", *_client_table(clients)]
    return "\n".join(lines)


def _worker_table(workers: list[dict[str, Any]]) -> list[str]:
    # The LABEL column (what started a worker: a Slurm job, say) only where one has it.
    labelled = any(w.get("label") for w in workers)
    label = ["LABEL"] if labelled else []
    return _table(
        [
            "WORKER",
            "HOST",
            "PID",
            *label,
            "STATE",
            "RUNNING",
            "DONE",
            "LAST HEARD",
            "FREE/RESOURCES",
        ],
        [
            [
                peer_id(w),
                printable(w.get("host")),
                _cell(w.get("pid")),
                *([printable(w.get("label") or "-")] if labelled else []),
                printable(w.get("state")),
                _cell(w.get("running")),
                _cell(w.get("done")),
                f"{_number(w.get('last_heard')):.1f}s ago",
                _resources(w.get("free"), w.get("resources")),
            ]
            for w in workers
        ],
    )


def _client_table(clients: list[dict[str, Any]]) -> list[str]:
    return _table(
        ["CLIENT", "HOST", "PID", "KEY", "WEIGHT", "QUEUED", "RUNNING", "SHARE", "WAITING"],
        [
            [
                peer_id(c),
                printable(c.get("host")),
                _cell(c.get("pid")),
                printable(c.get("key") or "-"),
                _cell(c.get("weight")),
                _cell(c.get("queued")),
                _cell(c.get("running")),
                f"{_number(c.get('share')):.0%}",
                _cell(c.get("waiting_for_resources")),
            ]
            for c in clients
        ],
    )


def _environments(workers: list[dict[str, Any]]) -> list[str]:
    """Each worker's package environments (where their tasks run), and each host's cache
    of shipped distributions."""
    rows = []
    hosts: dict[str, dict[str, Any]] = {}
    for w in workers:
        for env in w.get("environments") or []:
            packages = [printable(name) for name in env.get("packages", [])]
            rows.append(
                [
                    peer_id(w),
                    printable(w.get("host")),
                    printable(env.get("id")),
                    printable(env.get("where")),
                    _cell(env.get("tasks")),
                    _listed(packages, 4),
                ]
            )
        cache = w.get("package_cache") or {}
        if cache.get("distributions"):
            host = hosts.setdefault(str(w.get("host")), {"dists": {}, "bytes": 0.0, "limit": 0.0})
            for name, version, _ in cache["distributions"]:
                host["dists"][f"{printable(name)} {printable(version)}"] = True
            host["bytes"] = max(host["bytes"], _number(cache.get("bytes")))
            host["limit"] = max(host["limit"], _number(cache.get("limit")))
    lines: list[str] = []
    if rows:
        header = ["WORKER", "HOST", "ENVIRONMENT", "RUNS", "TASKS", "PACKAGES"]
        lines += ["", *_table(header, rows)]
    if hosts:
        header = ["HOST", "CACHED", "SIZE", "LIMIT", "DISTRIBUTIONS"]
        table = [
            [
                printable(host),
                len(info["dists"]),
                f"{info['bytes'] / 2**20:.1f} MiB",
                f"{info['limit'] / 2**20:.0f} MiB",
                _listed(list(info["dists"]), 6),
            ]
            for host, info in sorted(hosts.items())
        ]
        lines += ["", *_table(header, table)]
    return lines


def _listed(items: list[str], most: int) -> str:
    more = f" +{len(items) - most}" if len(items) > most else ""
    return (", ".join(items[:most]) + more) or "-"


def format_pair(answers: list[Answer]) -> str:
    """Each broker of a pair, which one is active, then the active one's pool."""
    lines = []
    active = None
    for address, answer in answers:
        where = printable(address)
        if isinstance(answer, FadeError):
            lines.append(f"broker   {where}: no answer ({printable(str(answer), limit=300)})")
            continue
        pair = answer.get("pair")
        if not isinstance(pair, dict):
            lines.append(f"broker   {where}: serves alone (started without --peer)")
            active = active or answer
            continue
        lines.append(f"broker   {where}: {_pair_text(pair)}")
        if pair.get("active") is True and active is None:
            active = answer
    lines.append("")
    if active is None:
        lines.append("no broker of the pair is active: none serves clients and workers now")
    else:
        lines.append(format_status(active))
    return "\n".join(lines)


def _pair_text(pair: dict[str, Any]) -> str:
    text = {name: printable(pair.get(name)) for name in ("state", "role", "peer_state")}
    out = f"{text['state'].upper()} ({text['role']}, term {_cell(pair.get('term'))})"
    if pair.get("problem"):
        out += f"; PROBLEM: {printable(pair.get('problem'), limit=300)}"
    return out


def _summary(
    state: dict[str, Any], workers: list[dict[str, Any]], clients: list[dict[str, Any]]
) -> list[str]:
    states = {name: sum(w["state"] == name for w in workers) for name in ("busy", "idle")}
    draining = len(workers) - states["busy"] - states["idle"]
    text = {name: printable(state.get(name)) for name in ("version", "address", "host")}
    text["broker_id"] = printable(str(state.get("broker_id"))[:12])
    backlog = state.get("backlog")
    held = f", {_cell(backlog)} held back by clients" if backlog else ""
    pair = state.get("pair")
    pair_line = []
    if isinstance(pair, dict):
        heard = pair.get("peer_heard")
        pair_line = [
            f"pair     this broker {_pair_text(pair)}; the other at "
            f"{printable(pair.get('peer_address'))}: {printable(pair.get('peer_state'))}"
            + (f", heard {_number(heard):.1f}s ago" if heard is not None else "")
        ]
    return [
        f"fade {text['version']} broker {text['broker_id']} at {text['address']} "
        f"(pid {_cell(state.get('pid'))} on {text['host']}), "
        f"up {_duration(_number(state.get('uptime')))}",
        f"workers  {len(workers)} ({states['busy']} busy, {states['idle']} idle, "
        f"{draining} draining)   clients {len(clients)}",
        f"tasks    {state.get('queued')} queued, {state.get('running')} running, "
        f"{state.get('tasks_done')} done ({state.get('tasks_failed')} raised, "
        f"{state.get('tasks_lost')} lost){held}",
        f"rate     {state.get('rate', 0.0):.1f} tasks/s over the last minute",
        *pair_line,
    ]


def _resources(free: object, totals: object) -> str:
    """``gpu=1/2 mem=60G/64G``: what is free of what the worker's host has."""
    if not isinstance(totals, dict) or not totals:
        return "-"
    free = free if isinstance(free, dict) else {}
    parts = []
    for name, total in sorted(totals.items()):
        have = free.get(name, total)
        parts.append(f"{printable(name, limit=16)}={_amount(have)}/{_amount(total)}")
    return " ".join(parts)


def _amount(value: object) -> str:
    number = _number(value)
    for unit, size in (("T", 2**40), ("G", 2**30), ("M", 2**20)):
        if number >= size:
            return f"{number / size:.0f}{unit}"
    return f"{number:g}"


def _cell(value: object) -> object:
    """A number as it is (the table right-aligns it); anything else escaped."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    return printable(value)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Left-align text columns, right-align numeric ones."""
    cells = [header, *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(header))]
    out = []
    for row in cells:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric)
        ]
        out.append("  ".join(parts).rstrip())
    return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s"


# -- command line ---------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fade-status", description="Show what a fade pool is doing."
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=default_address(),
        help="the broker's ZeroMQ endpoint, or a pair's two, comma-separated (default "
        "%(default)s; FADE_ADDRESS sets it)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw state as JSON")
    parser.add_argument(
        "--keys",
        metavar="FILE",
        default=None,
        help=f"a client or worker key file, for a broker with keys (default ${security.KEYS_ENV})",
    )
    parser.add_argument(
        "--timeout",
        type=argument_type(parse_seconds),
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the broker's answer (default %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    args = parser.parse_args(argv)
    try:
        check_address(args.address)
    except ValueError as exc:
        parser.error(str(exc))
    return args


#: The exit status of a command ended by SIGPIPE, as a shell reports it.
EXIT_BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fade-status``: 0 if the broker answered, 1 if not, 2 on bad usage;
    141 (as for a tool ended by SIGPIPE) if whoever read its output left early."""
    args = _parse_args(argv)
    if "," in args.address:
        return _main_pair(args)
    try:
        state = query(args.address, args.timeout, keys=args.keys)
    except BrokerUnreachableError as exc:
        return _fail(str(exc), 1)
    except ProtocolError as exc:
        return _fail(f"the answer from {args.address} is not fade's: {exc}", 1)
    except zmq.ZMQError as exc:
        return _fail(f"cannot connect to {args.address!r}: {exc}", 2)
    except SecurityError as exc:
        return _fail(str(exc), 2)
    text = json.dumps(state, indent=2, sort_keys=True) if args.json else format_status(state)
    return _print(text)


def _main_pair(args: argparse.Namespace) -> int:
    """A pair: 0 if one of its brokers is active, 1 if none answered or none is active."""
    try:
        answers = query_each(args.address, args.timeout, keys=args.keys)
    except zmq.ZMQError as exc:
        return _fail(f"cannot connect to {args.address!r}: {exc}", 2)
    except SecurityError as exc:
        return _fail(str(exc), 2)
    if args.json:
        brokers = [
            {"queried": address, "error": str(answer)}
            if isinstance(answer, FadeError)
            else {"queried": address, **answer}
            for address, answer in answers
        ]
        text = json.dumps({"brokers": brokers}, indent=2, sort_keys=True)
    else:
        text = format_pair(answers)
    code = _print(text)
    serving = any(_serves(answer) for _, answer in answers)
    return code or (0 if serving else 1)


def _serves(answer: dict[str, Any] | FadeError) -> bool:
    if isinstance(answer, FadeError):
        return False
    pair = answer.get("pair")
    return pair.get("active") is True if isinstance(pair, dict) else True


def _print(text: str) -> int:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # `fade-status | head -3`: the reader has what it wanted. Exit quietly, and
        # point stdout at /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return 0


def _fail(message: str, code: int) -> int:
    # The message may quote what a broker (or an impostor) sent: escape it.
    print(f"fade-status: {printable(message, limit=2000)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
