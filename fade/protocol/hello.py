"""HELLO and WELCOME: who a peer is, and the broker's answer (rare: JSON is fine).

A client or worker says HELLO on every (re)connection, the broker answers WELCOME.
Every field a peer may leave out has a default and unknown ones are ignored (a newer
peer may say more); every field read is checked. A worker's resource table is checked
here, and so is a task's resource request (a SUBMIT record's spec): both are the same
JSON table. Apart from the batches because they are JSON, rare, and grow with what
peers say about themselves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from fade.errors import ProtocolError
from fade.protocol.envelope import _HEADERS, Command
from fade.protocol.frames import Frame, _json, _unjson
from fade.protocol.keys import KEY_SIZE, TAG_SIZE

__all__ = [
    "MAX_CREDITS",
    "MAX_HOLDING",
    "MAX_LABEL",
    "ClientHello",
    "Hello",
    "Welcome",
    "WorkerHello",
    "decode_hello",
    "decode_resources",
    "decode_welcome",
    "encode_hello",
    "encode_resources",
    "encode_welcome",
    "platform_of",
    "python_of",
]


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client says about itself when it (re)connects."""

    host: str
    pid: int
    version: str  # fade's
    python: str  # "3.11.7"
    implementation: str  # "cpython"
    tag: bytes  # TAG_SIZE random bytes: the first half of this client's task keys
    max_message_size: int = 0  # the largest frame it accepts; 0: not said
    platform: str = ""  # sysconfig.get_platform(): "linux-x86_64"
    abi: str = ""  # the SOABI of its compiled extensions: "cpython-311-x86_64-linux-gnu"
    #: Seconds the broker this client left had been silent when it left it for this one
    #: (a pair's failover); 0: it left none for silence.
    left_silent: float = 0.0
    role: str = "client"


@dataclass(frozen=True, slots=True)
class WorkerHello:
    """What a worker process says about itself when it (re)connects."""

    host: str
    pid: int
    version: str
    python: str
    implementation: str
    credits: int  # tasks it asks for now
    holding: tuple[bytes, ...] = ()  # keys of the tasks it still owes an answer for
    max_message_size: int = 0
    #: Key names of the only clients whose tasks it takes; None: any client's.
    clients: tuple[str, ...] | None = None
    #: What its host has for tasks that ask (``{"gpu": 2, "mem": 6.4e10}``), shared by the
    #: worker processes of one ``pool`` (their supervisor).
    resources: dict[str, float] | None = None
    pool: str = ""
    platform: str = ""
    abi: str = ""
    #: What started it, for people and scalers (``slurm:1234`` for a Slurm job's workers);
    #: at most MAX_LABEL characters.
    label: str = ""
    left_silent: float = 0.0  # as ClientHello's
    role: str = "worker"


Hello = Union[ClientHello, WorkerHello]  # noqa: UP007 (a runtime alias on 3.10)

#: A worker may not grant itself more than this many outstanding tasks.
MAX_CREDITS = 4096
#: A repeated HELLO lists at most this many held tasks (credits bound what a worker holds).
MAX_HOLDING = MAX_CREDITS + 1
#: A worker's label is at most this many characters.
MAX_LABEL = 200


@dataclass(frozen=True, slots=True)
class Welcome:
    """The broker's answer to HELLO."""

    broker_id: str
    heartbeat_interval: float
    heartbeat_liveness: int
    capacity: int
    max_message_size: int = 0  # the broker's frame size limit; 0: not announced
    max_client_tasks: int = 0  # the broker's quota of tasks per client; 0: not announced


def encode_hello(hello: Hello) -> list[Frame]:
    fields: dict[str, Any] = {
        "role": hello.role,
        "host": hello.host,
        "pid": hello.pid,
        "version": hello.version,
        "python": hello.python,
        "implementation": hello.implementation,
        "max_message_size": hello.max_message_size,
        "platform": hello.platform,
        "abi": hello.abi,
    }
    if hello.left_silent:
        fields["left_silent"] = hello.left_silent
    if isinstance(hello, ClientHello):
        fields["tag"] = hello.tag.hex()
    else:
        fields["credits"] = hello.credits
        fields["holding"] = [key.hex() for key in hello.holding]
        if hello.clients is not None:
            fields["clients"] = list(hello.clients)
        if hello.resources:
            fields["resources"] = hello.resources
            fields["pool"] = hello.pool
        if hello.label:
            fields["label"] = hello.label
    return [_HEADERS[Command.HELLO], _json(fields)]


def decode_hello(body: Sequence[Frame]) -> Hello:
    """A checked HELLO; every field a peer may leave out has a default, unknown ones are
    ignored (a newer peer may say more)."""
    data = _unjson(body, "HELLO")
    role = data.get("role")
    common = {
        "host": _field(data, "host", str, "?"),
        "pid": _field(data, "pid", int, 0),
        "version": _field(data, "version", str, "?"),
        "python": _field(data, "python", str, "?"),
        "implementation": _field(data, "implementation", str, "?"),
        "max_message_size": _field(data, "max_message_size", int, 0),
        "platform": _field(data, "platform", str, ""),
        "abi": _field(data, "abi", str, ""),
        "left_silent": _seconds(data, "left_silent"),
    }
    if role == "client":
        tag = _hex_field(data, "tag", TAG_SIZE)
        return ClientHello(tag=tag, **common)
    if role == "worker":
        credits = _field(data, "credits", int, 1)
        if not 0 <= credits <= MAX_CREDITS:
            raise ProtocolError(f"HELLO field 'credits' must be in 0..{MAX_CREDITS}")
        holding = data.get("holding", [])
        if not isinstance(holding, list) or len(holding) > MAX_HOLDING:
            raise ProtocolError("HELLO field 'holding' must be a list of task keys")
        clients = data.get("clients")
        if clients is not None and (
            not isinstance(clients, list) or not all(isinstance(c, str) for c in clients)
        ):
            raise ProtocolError("HELLO field 'clients' must be a list of key names")
        label = _field(data, "label", str, "")
        if len(label) > MAX_LABEL:
            raise ProtocolError(f"HELLO field 'label' must be at most {MAX_LABEL} characters")
        return WorkerHello(
            credits=credits,
            holding=tuple(_hex(key, KEY_SIZE, "holding") for key in holding),
            clients=None if clients is None else tuple(clients),
            resources=_resources(data.get("resources")),
            pool=_field(data, "pool", str, ""),
            label=label,
            **common,
        )
    raise ProtocolError(f"HELLO with unknown role {role!r}")


def _resources(value: object) -> dict[str, float] | None:
    """A checked resource table: names to non-negative amounts."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 64:
        raise ProtocolError("resources must be an object of at most 64 names")
    table = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ProtocolError("a resource name must be a short string")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ProtocolError(f"resource {name!r} needs a non-negative amount")
        table[name] = float(amount)
    return table


def encode_resources(resources: dict[str, float]) -> bytes:
    """The canonical form of a resource request (sorted keys, no spaces): equal requests
    are equal bytes, which the broker groups by."""
    return json.dumps(resources, separators=(",", ":"), sort_keys=True).encode()


def decode_resources(spec: bytes) -> dict[str, float] | None:
    """A task's resource request from its SUBMIT record (None for none)."""
    if not spec:
        return None
    try:
        return _resources(json.loads(spec))
    except ValueError:
        raise ProtocolError("a resource spec is not JSON") from None


def _seconds(data: dict[str, Any], name: str) -> float:
    value = data.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise ProtocolError(f"HELLO field {name!r} must be a number of seconds")
    return float(value)


def python_of(hello: Hello) -> str:
    """The Python a task pickled by this peer needs: implementation and minor version."""
    return f"{hello.implementation} {'.'.join(hello.python.split('.')[:2])}"


def platform_of(hello: Hello) -> tuple[str, str]:
    """What compiled packages built by or for this peer need: its platform and ABI."""
    return hello.platform, hello.abi


def encode_welcome(welcome: Welcome) -> list[Frame]:
    return [
        _HEADERS[Command.WELCOME],
        _json(
            {
                "broker_id": welcome.broker_id,
                "heartbeat_interval": welcome.heartbeat_interval,
                "heartbeat_liveness": welcome.heartbeat_liveness,
                "capacity": welcome.capacity,
                "max_message_size": welcome.max_message_size,
                "max_client_tasks": welcome.max_client_tasks,
            }
        ),
    ]


def decode_welcome(body: Sequence[Frame]) -> Welcome:
    data = _unjson(body, "WELCOME")
    try:
        return Welcome(
            broker_id=str(data["broker_id"]),
            heartbeat_interval=float(data["heartbeat_interval"]),
            heartbeat_liveness=int(data["heartbeat_liveness"]),
            capacity=int(data["capacity"]),
            max_message_size=int(data.get("max_message_size", 0)),
            max_client_tasks=int(data.get("max_client_tasks", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad WELCOME: {exc}") from None


def _field(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = data.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"HELLO field {name!r} must be a {kind.__name__}")
    return value


def _hex(text: object, size: int, name: str) -> bytes:
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ProtocolError(f"HELLO field {name!r} must hold {size}-byte hex values")
    return raw


def _hex_field(data: dict[str, Any], name: str, size: int) -> bytes:
    return _hex(data.get(name), size, name)
