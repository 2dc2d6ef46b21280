"""fade's wire protocol: the only module that builds or parses frames.

Every peer (client, worker, supervisor) talks to the broker through one DEALER
socket; the broker has one ROUTER socket. A message is a list of frames::

    [header, body...]          header = b"fd" + VERSION + COMMAND   (4 bytes)

except a batch (SUBMIT, TASK, DONE, RESULT), whose first frame also carries the
records and the small data: ``[header + u32 meta size + meta + inline, buffers...]``.

The ROUTER adds/strips the peer's identity frame; nothing here sees it.

    client                      broker                        worker
      | HELLO(role=client) ----> |  <---- HELLO(role=worker)    |
      | <------------- WELCOME   |   WELCOME ------------------>|
      |                          |  <---- READY(credits)        |
      | SUBMIT(tasks) ---------> | TASK(tasks) ---------------->|
      |                          |  <---- DONE(credits, results)|
      | <------ RESULT(results)  |                              |
      | <-> HEARTBEAT <------->  | <-------> HEARTBEAT <------> |

Task and result payloads are opaque frames to the broker: it forwards them
without unpickling or copying large buffers. Records that describe them travel
packed in the message's first frame, so a batch of many tasks costs one message,
and a lone small task one frame.
See docs/protocol.md for the full description.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import zmq

from fade.errors import ProtocolError

__all__ = [
    "BATCH_BYTES",
    "DEFAULT_ADDRESS",
    "ENVIRONMENTS_LIMIT",
    "HEAD_ROOM",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_LIVENESS",
    "KEY_SIZE",
    "LAST_STRICT_VERSION",
    "MAGIC",
    "MAX_BACKLOG",
    "MAX_CREDITS",
    "MAX_ERROR_TEXT",
    "MAX_HOLDING",
    "MAX_LABEL",
    "NO_SCOPE",
    "PAIR_ROLES",
    "PAIR_STATES",
    "SCOPE_SIZE",
    "SMALL_FRAME",
    "SUBMIT_NATIVE",
    "TAG_SIZE",
    "VERSION",
    "ClientHello",
    "CodeStatus",
    "Command",
    "DoneRecord",
    "Hello",
    "Message",
    "PairReport",
    "Payload",
    "ResultRecord",
    "Standby",
    "Status",
    "SubmitRecord",
    "TaskRecord",
    "VersionMismatch",
    "Welcome",
    "WorkerHello",
    "chunked",
    "decode_backlog",
    "decode_capacity",
    "decode_code",
    "decode_done",
    "decode_drain",
    "decode_environments",
    "decode_error",
    "decode_fetch",
    "decode_hello",
    "decode_obituary",
    "decode_pair",
    "decode_ready",
    "decode_refusal",
    "decode_result",
    "decode_standby",
    "decode_state",
    "decode_status",
    "decode_submit",
    "decode_task",
    "decode_welcome",
    "encode",
    "encode_backlog",
    "encode_capacity",
    "encode_code",
    "encode_done",
    "encode_environments",
    "encode_error",
    "encode_fetch",
    "encode_hello",
    "encode_obituary",
    "encode_pair",
    "encode_ready",
    "encode_refusal",
    "encode_result",
    "encode_standby",
    "encode_state",
    "encode_status",
    "encode_submit",
    "encode_task",
    "encode_welcome",
    "expiry",
    "frame_size",
    "key_tag",
    "largest_part",
    "pack_request",
    "parse",
    "platform_of",
    "python_of",
    "short_id",
    "speaks_fade",
    "task_key",
    "unpack_request",
]

MAGIC = b"fd"
#: 4: SUBMIT records carry flags (SUBMIT_NATIVE); HELLOs say platform and ABI; a task
#: payload names its installed-package environment; workers report ENVIRONMENTS;
#: TASK records carry the client's data scope (fade/data.py).
VERSION = 4
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

#: Seconds between heartbeats, in both directions.
HEARTBEAT_INTERVAL = 1.0
#: Heartbeats a peer may miss before it is presumed dead.
HEARTBEAT_LIVENESS = 3

#: A task key: the client's 8-byte tag (see ClientHello) and its 8-byte task id.
KEY_SIZE = 16
TAG_SIZE = 8
#: A TASK's scope: whose data cache entries it may use (fade/data.py, scope_of).
SCOPE_SIZE = 8
NO_SCOPE = bytes(SCOPE_SIZE)
#: The oldest protocol version that parses an ERROR in its own version only: a peer
#: of that version or older is answered in its own version, so that it logs why.
LAST_STRICT_VERSION = 2
#: Room a batch's first frame needs beyond its items' inline bytes: the header, the meta
#: size and one record per item (the longest record is far under this).
HEAD_ROOM = 512
#: ERROR reasons are cut to this many bytes: a refusal never costs more than it says.
MAX_ERROR_TEXT = 200

Frame = Union[bytes, zmq.Frame, memoryview]  # noqa: UP007 (a runtime alias on 3.10)


class VersionMismatch(ProtocolError):
    """A fade message of another protocol version: ``version`` is the sender's."""

    def __init__(self, version: int) -> None:
        super().__init__(f"protocol version {version} is not {VERSION}")
        self.version = version


def task_key(tag: bytes, task_id: int) -> bytes:
    """The key a task is known by between broker and workers: its client's tag and its id.
    Workers learn the tag, never the client's routing identity."""
    return tag + _U64.pack(task_id)


def key_tag(key: bytes) -> bytes:
    return key[:TAG_SIZE]


def short_id(identity: bytes) -> str:
    """How status tools and logs name a peer: 12 hex digits of a hash of its identity,
    which names it without revealing the identity (that would let another peer pose as it)."""
    return hashlib.blake2b(identity, digest_size=6).hexdigest()


def expiry(interval: float, liveness: int) -> float:
    """Seconds of silence after which a peer is presumed dead."""
    return interval * liveness


class Command(enum.IntEnum):
    """One-byte commands; the direction each travels is in its comment."""

    HELLO = 1  # client|worker -> broker: who I am (JSON)
    WELCOME = 2  # broker -> client|worker: broker id and settings (JSON)
    RESET = 3  # broker -> peer: "I do not know you", say HELLO again
    HEARTBEAT = 4  # both ways; broker -> client carries the capacity, client -> broker its backlog
    READY = 5  # worker -> broker: grant N more task credits
    SUBMIT = 6  # client -> broker: a batch of tasks
    TASK = 7  # broker -> worker: a batch of tasks
    DONE = 8  # worker -> broker: a batch of results, plus new credits
    RESULT = 9  # broker -> client: a batch of results
    DRAIN = 10  # worker -> broker: send me nothing more; broker answers DRAIN
    DISCONNECT = 11  # client|worker -> broker: I am leaving
    OBITUARY = 12  # supervisor -> broker: this worker process died (JSON)
    FETCH = 13  # worker -> broker -> client: send me this code (JSON request)
    CODE = 14  # client -> broker -> worker: the code asked for
    STATUS = 15  # any peer -> broker: describe the pool (no HELLO needed)
    STATE = 16  # broker -> asker: the pool's state (JSON)
    ERROR = 17  # broker -> peer: your message was refused, and why (UTF-8 text)
    TERMINATE = 18  # client -> broker: stop these tasks of mine, running or not (u64 ids)
    STOP = 19  # broker -> worker: stop these tasks you hold (task keys)
    NOTICE = 20  # broker -> client: something it should know about its tasks (JSON)
    ENVIRONMENTS = 21  # worker -> broker: the package environments it has (JSON)
    PAIR = 22  # broker -> its pair's other broker: my role, state and term (JSON)
    STANDBY = 23  # passive broker -> client|worker: I do not serve; go to the other (JSON)


class Status(enum.IntEnum):
    """How a task ended, in DONE and RESULT records."""

    OK = 0  # payload: the pickled return value
    RAISED = 1  # payload: the pickled (exception, traceback text, tracebacks.RemoteTrace)
    LOST = 2  # broker-made; payload: JSON about the lost worker
    RETURNED = 3  # worker hands the task back unrun; no payload
    REFUSED = 4  # broker-made; payload: JSON {"error": kind, "message": text}


class CodeStatus(enum.IntEnum):
    """How a FETCH was answered, in CODE."""

    OK = 0  # frames: what was asked for
    MISSING = 1  # the client does not have it; frame: a reason
    GONE = 2  # broker-made: the client is not connected


_HEADERS = {c: MAGIC + bytes((VERSION, c)) for c in Command}
_BATCHES = frozenset({Command.SUBMIT, Command.TASK, Command.DONE, Command.RESULT})
_COMMANDS = {h: c for c, h in _HEADERS.items()}

# task id, inline size, buffers, max attempts, timeout, priority, flags (SUBMIT_NATIVE),
# size of the resource spec
_SUBMIT = struct.Struct("<QIHHdhBH")
# key, inline size, buffers, timeout, data scope, size of the devices
_TASK = struct.Struct("<16sIHd8sH")
_DONE = struct.Struct("<16sBIH")  # key, status, inline size, buffers
_RESULT = struct.Struct("<QBIH")  # task id, status, inline size, buffers
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LONE_RESULT = struct.Struct("<IQBIH")  # a RESULT's capacity and its only record
_LONE_DONE = struct.Struct("<I16sBIH")  # a DONE's credits and its only record
_HEAD = 8  # a batch's first frame: the 4-byte header, then the u32 size of its meta
#: parse() copies a first frame up to this size whole: cheaper than slicing a view.
SMALL_FRAME = 64 * 1024


# The per-task records below are not frozen: a frozen dataclass's __init__ costs three
# times as much, several times per task. Nothing changes them once built.


@dataclass(slots=True)
class Payload:
    """A task's or result's data: small parts packed ``inline``, large buffers apart.

    In a batch, every payload's inline bytes travel together in one frame and
    each large buffer (a numpy array's memory) in a frame of its own, never copied.
    """

    inline: bytes
    buffers: tuple[Frame, ...] = ()


@dataclass(slots=True)
class Message:
    """A parsed envelope: the command, the frames after the header, and the protocol
    version of its sender (not ours only for an ERROR from a broker of another version)."""

    command: Command
    body: list[Frame]
    version: int = VERSION


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
#: A client's backlog is reported up to this count (the most a u32 holds).
MAX_BACKLOG = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Welcome:
    """The broker's answer to HELLO."""

    broker_id: str
    heartbeat_interval: float
    heartbeat_liveness: int
    capacity: int
    max_message_size: int = 0  # the broker's frame size limit; 0: not announced


#: A SUBMIT flag: the task needs compiled packages of the client's, so only a worker of
#: the client's platform and ABI may run it (fade/packages.py).
SUBMIT_NATIVE = 1


@dataclass(slots=True)
class SubmitRecord:
    """One task as a client submits it (the payload frames follow separately)."""

    task_id: int
    max_attempts: int  # 0: the broker's default
    timeout: float  # seconds; 0: none
    priority: int = 0  # higher runs first among this client's tasks (-32768..32767)
    #: The resources it needs, as canonical JSON ({"gpu": 1}); empty: none.
    resources: bytes = b""
    flags: int = 0  # SUBMIT_NATIVE


@dataclass(slots=True)
class TaskRecord:
    """One task as the broker hands it to a worker."""

    key: bytes
    timeout: float
    #: The devices it was given, as JSON: indices among its host's, per resource
    #: ({"gpu": [1]}: the worker sets CUDA_VISIBLE_DEVICES); empty: none.
    devices: bytes = b""
    scope: bytes = NO_SCOPE  # set by the broker: the client's data scope


@dataclass(slots=True)
class DoneRecord:
    """One result as a worker returns it."""

    key: bytes
    status: Status


@dataclass(slots=True)
class ResultRecord:
    """One result as the broker returns it to the client."""

    task_id: int
    status: Status


# -- envelope ---------------------------------------------------------------


def encode(command: Command, *body: Frame) -> list[Frame]:
    """Frames for a message with no structured body (RESET, DRAIN, ...)."""
    return [_HEADERS[command], *body]


def speaks_fade(header: Frame) -> bool:
    """True when a frame starts like a fade header (any version): its sender can read ERROR."""
    return _head(header, 2) == MAGIC


def parse(frames: Sequence[Frame]) -> Message:
    """Check the envelope and split off the command. Raises ProtocolError.

    A batch's body starts with its whole first frame (the decoders skip the header);
    any other command's header frame must be the header alone.
    """
    if not frames:
        raise ProtocolError("empty message")
    first = frames[0]
    if isinstance(first, zmq.Frame) and len(first) <= SMALL_FRAME:
        first = first.bytes  # copied once, for the header check and the decoder
    head = _head(first, 5)  # a fifth byte means "more": never copy a huge frame here
    command = _COMMANDS.get(head[:4])
    if command is None:
        if len(head) >= 4 and head[:2] == MAGIC:
            if head[3] == Command.ERROR and len(head) == 4:
                # Any version's ERROR is read: it is how a broker of another version
                # says so, and its body (one UTF-8 frame) is the same in every version.
                return Message(Command.ERROR, list(frames[1:]), version=head[2])
            if head[2] != VERSION:
                raise VersionMismatch(head[2])
            raise ProtocolError(f"unknown command {head[3]}")
        raise ProtocolError(f"unknown header {head[:8]!r}")
    if command in _BATCHES:
        return Message(command, [first, *frames[1:]])
    if len(head) > 4:
        raise ProtocolError(f"{command.name} has data in its header frame")
    return Message(command, list(frames[1:]))


# -- HELLO / WELCOME / OBITUARY (rare: JSON is fine) --------------------------


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
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad WELCOME: {exc}") from None


def encode_obituary(identity: bytes, info: dict[str, Any]) -> list[Frame]:
    return [_HEADERS[Command.OBITUARY], identity, _json(info)]


def decode_obituary(body: Sequence[Frame]) -> tuple[bytes, dict[str, Any]]:
    if len(body) != 2:
        raise ProtocolError(f"OBITUARY needs 2 frames, got {len(body)}")
    return _bytes(body[0]), _unjson(body[1:], "OBITUARY")


# -- ENVIRONMENTS: what a worker has of installed packages (fade/environments.py) --------

#: An ENVIRONMENTS body is at most this many bytes; longer lists are cut by the worker.
ENVIRONMENTS_LIMIT = 64 * 1024
_ENV_TEXT = 200  # the longest string in it


def encode_environments(report: dict[str, Any]) -> list[Frame]:
    """ENVIRONMENTS: one JSON object, ``{"environments": [{"id", "packages", "where",
    "tasks"}...], "cache": {"distributions": [[name, version, bytes]...], "bytes",
    "limit"}}`` (see docs/protocol.md)."""
    return [_HEADERS[Command.ENVIRONMENTS], _json(report)]


def decode_environments(body: Sequence[Frame]) -> dict[str, Any]:
    """A checked ENVIRONMENTS report, rebuilt from its known keys only."""
    if len(body) == 1 and frame_size(body[0]) > ENVIRONMENTS_LIMIT:
        raise ProtocolError(f"ENVIRONMENTS is over {ENVIRONMENTS_LIMIT} bytes")
    data = _unjson(body, "ENVIRONMENTS")
    try:
        environments = [
            {
                "id": _text(env["id"]),
                "packages": [_text(p) for p in _items(env["packages"], 256)],
                "where": _text(env["where"]),
                "tasks": _count(env["tasks"]),
            }
            for env in _items(data.get("environments", []), 64)
        ]
        cache = data.get("cache", {})
        if not isinstance(cache, dict):
            raise TypeError("cache")
        cached = [
            [_text(name), _text(version), _count(size)]
            for name, version, size in _items(cache.get("distributions", []), 512)
        ]
        totals = {k: _count(cache.get(k, 0)) for k in ("bytes", "limit")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed ENVIRONMENTS ({exc})") from None
    return {"environments": environments, "cache": {"distributions": cached, **totals}}


def _items(value: object, most: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise TypeError(f"a list of at most {most} items expected")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > _ENV_TEXT:
        raise TypeError(f"a string of at most {_ENV_TEXT} characters expected")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("a count expected")
    return value


# -- STATUS / STATE (operators' tools; see fade/status.py) -------------------------


def encode_status() -> list[Frame]:
    """STATUS: no body. Any peer may ask, without HELLO; the broker answers STATE."""
    return [_HEADERS[Command.STATUS]]


def decode_status(body: Sequence[Frame]) -> None:
    if body:
        raise ProtocolError("STATUS carries no body")


def encode_state(state: dict[str, Any]) -> list[Frame]:
    """STATE: one JSON object, the broker's :meth:`~fade.broker.Broker.snapshot`."""
    return [_HEADERS[Command.STATE], _json(state)]


def decode_state(body: Sequence[Frame]) -> dict[str, Any]:
    data = _unjson(body, "STATE")
    for name, kind in (("broker_id", str), ("workers", list), ("tasks_done", int)):
        if not isinstance(data.get(name), kind):
            raise ProtocolError(f"STATE lacks {name!r} or it is not a {kind.__name__}")
    return data


# -- a broker pair: PAIR between the brokers, STANDBY to peers (see fade/pair.py) ----------

#: The roles a pair's brokers are started in, and the states they report.
PAIR_ROLES = ("primary", "backup")
PAIR_STATES = ("starting", "active", "passive", "alone")


@dataclass(frozen=True, slots=True)
class PairReport:
    """What a broker of a pair tells the other, every interval and at each change."""

    role: str  # one of PAIR_ROLES
    state: str  # one of PAIR_STATES
    term: int  # the takeover its last active claim came from: the higher claim wins
    incarnation: str  # random for each broker process: tells a restarted broker apart
    number: int  # counts this incarnation's reports
    #: (incarnation, number) of the last report heard from the other broker; None: none yet.
    ack: tuple[str, int] | None = None
    workers: int = 0  # worker processes registered here (an active broker has some)


def encode_pair(report: PairReport) -> list[Frame]:
    fields: dict[str, Any] = {
        "role": report.role,
        "state": report.state,
        "term": report.term,
        "incarnation": report.incarnation,
        "number": report.number,
        "workers": report.workers,
    }
    if report.ack is not None:
        fields["ack"] = list(report.ack)
    return [_HEADERS[Command.PAIR], _json(fields)]


def decode_pair(body: Sequence[Frame]) -> PairReport:
    data = _unjson(body, "PAIR")
    role, state = data.get("role"), data.get("state")
    if role not in PAIR_ROLES or state not in PAIR_STATES:
        raise ProtocolError(f"PAIR with unknown role {role!r} or state {state!r}")
    incarnation = data.get("incarnation")
    if not isinstance(incarnation, str):
        raise ProtocolError("PAIR needs an incarnation (text)")
    ack = data.get("ack")
    if ack is not None:
        if not (isinstance(ack, list) and len(ack) == 2 and isinstance(ack[0], str)):
            raise ProtocolError("PAIR field 'ack' must be [incarnation, number]")
        ack = (ack[0][:64], _pair_count(ack[1], "ack"))
    term, number = _pair_count(data.get("term"), "term"), _pair_count(data.get("number"), "number")
    workers = _pair_count(data.get("workers", 0), "workers")
    return PairReport(role, state, term, incarnation[:64], number, ack, workers)


@dataclass(frozen=True, slots=True)
class Standby:
    """A passive broker's answer to a client or worker: it serves no one."""

    state: str  # one of PAIR_STATES (never "active")
    #: Seconds after which to say HELLO here again: this broker expects to take over
    #: by then (a voter came before it lost the other); 0: go to the other broker.
    retry: float = 0.0


def encode_standby(standby: Standby) -> list[Frame]:
    return [_HEADERS[Command.STANDBY], _json({"state": standby.state, "retry": standby.retry})]


def decode_standby(body: Sequence[Frame]) -> Standby:
    data = _unjson(body, "STANDBY")
    state, retry = data.get("state"), data.get("retry", 0.0)
    if state not in PAIR_STATES or isinstance(retry, bool) or not isinstance(retry, int | float):
        raise ProtocolError("STANDBY needs a pair state and a retry time")
    # A broker that asks for more than a minute is wrong; never wait on its word alone.
    return Standby(state, min(max(float(retry), 0.0), 60.0))


def _pair_count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise ProtocolError(f"PAIR field {name!r} must be a count")
    return value


# -- small numeric bodies -------------------------------------------------------


def encode_ready(credits: int) -> list[Frame]:
    return [_HEADERS[Command.READY], _U32.pack(credits)]


def decode_ready(body: Sequence[Frame]) -> int:
    return _one_u32(body, "READY")


def encode_capacity(command: Command, capacity: int) -> list[Frame]:
    """HEARTBEAT from broker to client, telling the pool's current capacity."""
    return [_HEADERS[command], _U32.pack(capacity)]


def decode_capacity(body: Sequence[Frame]) -> int | None:
    """The capacity carried by a broker HEARTBEAT, or None when it carries none."""
    if not body:
        return None
    return _one_u32(body, "HEARTBEAT")


def encode_backlog(backlog: int) -> list[Frame]:
    """HEARTBEAT from client to broker, telling how many tasks it holds back for want of
    room at the broker (cut to MAX_BACKLOG). A broker of before this field ignores it."""
    return [_HEADERS[Command.HEARTBEAT], _U32.pack(min(max(backlog, 0), MAX_BACKLOG))]


def decode_backlog(body: Sequence[Frame]) -> int | None:
    """The backlog carried by a client HEARTBEAT, or None when it carries none."""
    if not body:
        return None
    return _one_u32(body, "HEARTBEAT")


def decode_drain(body: Sequence[Frame]) -> None:
    if body:
        raise ProtocolError("DRAIN carries no body")


def encode_error(reason: str, version: int = VERSION) -> list[Frame]:
    """ERROR: why the broker refused a message; cut to MAX_ERROR_TEXT bytes. Its header
    carries ``version``: ours, so that a peer of another version learns which we speak."""
    text = reason.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
    return [MAGIC + bytes((version, Command.ERROR)), text]


def decode_error(body: Sequence[Frame]) -> str:
    if len(body) != 1:
        raise ProtocolError(f"ERROR needs 1 body frame, got {len(body)}")
    return _bytes(body[0])[:MAX_ERROR_TEXT].decode("utf-8", "replace")


def decode_refusal(payload: Payload) -> tuple[str, str]:
    """A REFUSED result's (kind, message); kinds are listed in docs/protocol.md."""
    try:
        data = json.loads(payload.inline)
        return str(data["error"]), str(data["message"])
    except (ValueError, KeyError, TypeError):
        return "unknown", "the broker refused the task"


def encode_refusal(kind: str, message: str) -> Payload:
    return Payload(_json({"error": kind, "message": message}))


# -- stopping tasks: TERMINATE, STOP; and NOTICE ----------------------------------------


def encode_terminate(task_ids: Sequence[int]) -> list[Frame]:
    """TERMINATE: the client's ids of tasks to stop, queued or running (u64 each)."""
    return [_HEADERS[Command.TERMINATE], b"".join(_U64.pack(i) for i in task_ids)]


def decode_terminate(body: Sequence[Frame]) -> list[int]:
    raw = _one_frame(body, "TERMINATE")
    if len(raw) % _U64.size:
        raise ProtocolError("TERMINATE body is not a whole number of u64 ids")
    return [i for (i,) in _U64.iter_unpack(raw)]


def encode_stop(keys: Sequence[bytes]) -> list[Frame]:
    """STOP: keys of tasks the worker holds that it must stop (running) or drop (not yet)."""
    return [_HEADERS[Command.STOP], b"".join(keys)]


def decode_stop(body: Sequence[Frame]) -> list[bytes]:
    raw = _one_frame(body, "STOP")
    if len(raw) % KEY_SIZE:
        raise ProtocolError("STOP body is not a whole number of task keys")
    return [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]


def encode_notice(message: str, task_ids: Sequence[int]) -> list[Frame]:
    """NOTICE: a warning about some of the client's tasks (they wait for resources no
    connected worker has, say); the client logs it."""
    return [_HEADERS[Command.NOTICE], _json({"message": message, "tasks": list(task_ids)})]


def decode_notice(body: Sequence[Frame]) -> tuple[str, list[int]]:
    data = _unjson(body, "NOTICE")
    message, tasks = data.get("message"), data.get("tasks", [])
    if not isinstance(message, str) or not isinstance(tasks, list):
        raise ProtocolError("NOTICE needs a message and a list of task ids")
    return message[: MAX_ERROR_TEXT * 5], [t for t in tasks if isinstance(t, int)]


# -- code shipping: FETCH and CODE, relayed by the broker -------------------------


def encode_fetch(ref: bytes, request_id: int, request: Frame) -> list[Frame]:
    """FETCH: [header, ref, request id, request]. From a worker, ``ref`` is the key of the
    task whose code it needs; from the broker to a client, a broker-made relay number."""
    return [_HEADERS[Command.FETCH], ref, _U32.pack(request_id), request]


def decode_fetch(body: Sequence[Frame]) -> tuple[bytes, int, Frame]:
    if len(body) != 3:
        raise ProtocolError(f"FETCH needs 3 frames, got {len(body)}")
    return _ref(body[0], "FETCH"), _one_u32(body[1:2], "FETCH"), body[2]


def pack_request(request: dict[str, Any]) -> bytes:
    return _json(request)


def unpack_request(frame: Frame) -> dict[str, Any]:
    return _unjson([frame], "FETCH request")


def encode_code(
    ref: bytes, request_id: int, status: CodeStatus, frames: Sequence[Frame]
) -> list[Frame]:
    """CODE: [header, ref, request id, status, frames...]; ``ref`` as in the FETCH answered."""
    return [_HEADERS[Command.CODE], ref, _U32.pack(request_id), bytes((status,)), *frames]


def decode_code(body: Sequence[Frame]) -> tuple[bytes, int, CodeStatus, list[Frame]]:
    if len(body) < 3:
        raise ProtocolError(f"CODE needs at least 3 frames, got {len(body)}")
    status = _bytes(body[2])
    if len(status) != 1 or status[0] not in CodeStatus._value2member_map_:
        raise ProtocolError("CODE has a bad status")
    return _ref(body[0], "CODE"), _one_u32(body[1:2], "CODE"), CodeStatus(status[0]), list(body[3:])


# -- task batches -----------------------------------------------------------------
#
# SUBMIT, TASK, DONE and RESULT share one layout:
#     [header + u32 meta size + meta + inline, buffer frames...]
# meta packs one record per item (with the sizes of its inline part and its
# buffer count); inline is every item's inline bytes, concatenated. So a lone
# small task is one frame, and so is a batch of a thousand: every frame costs a
# send and a receive on every hop.


#: A batch's first frame stays under this size (and under every peer's frame limit,
#: which applies to that one frame, not to each item in it).
BATCH_BYTES = 8 * 2**20

T = TypeVar("T")


def chunked(
    items: Sequence[tuple[T, Payload]], limit: int = BATCH_BYTES
) -> list[list[tuple[T, Payload]]]:
    """Split items into batches whose first frame stays within ``limit`` bytes (an item
    larger than that travels alone)."""
    if len(items) == 1:  # a lone task or result: most messages
        return [list(items)]
    batches: list[list[tuple[T, Payload]]] = [[]]
    size = 0
    for item in items:
        inline = len(item[1].inline) + HEAD_ROOM
        if batches[-1] and size + inline > limit:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += inline
    return batches if batches[0] else []


def largest_part(payload: Payload) -> int:
    """The largest frame a message that carries ``payload`` alone has: its inline bytes
    travel in the first frame (with at most HEAD_ROOM more), each buffer in its own."""
    head = len(payload.inline) + HEAD_ROOM
    if not payload.buffers:
        return head
    return max(head, *(frame_size(buffer) for buffer in payload.buffers))


def _batch(command: Command, meta: bytes, payloads: Sequence[Payload]) -> list[Frame]:
    head = [_HEADERS[command], _U32.pack(len(meta)), meta]
    head.extend(payload.inline for payload in payloads)
    frames: list[Frame] = [b"".join(head)]
    for payload in payloads:
        frames.extend(payload.buffers)
    return frames


def encode_submit(tasks: Sequence[tuple[SubmitRecord, Payload]]) -> list[Frame]:
    meta = b"".join(
        _SUBMIT.pack(
            r.task_id,
            len(pl.inline),
            len(pl.buffers),
            r.max_attempts,
            r.timeout,
            r.priority,
            r.flags,
            len(r.resources),
        )
        + r.resources
        for r, pl in tasks
    )
    return _batch(Command.SUBMIT, meta, [pl for _, pl in tasks])


def decode_submit(body: Sequence[Frame]) -> list[tuple[SubmitRecord, Payload]]:
    meta, inline = _meta(body, "SUBMIT", 1)
    if len(meta) == _SUBMIT.size:  # a lone task, with no resource spec: most messages
        task_id, size, nbuf, attempts, timeout, priority, flags, _ = _SUBMIT.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "SUBMIT")
        return [(SubmitRecord(task_id, attempts, timeout, priority, flags=flags), payload)]
    records, sizes = [], []
    for (task_id, size, nbuf, attempts, timeout, priority, flags), spec in _tailed(
        meta, _SUBMIT, "SUBMIT"
    ):
        records.append(SubmitRecord(task_id, attempts, timeout, priority, spec, flags))
        sizes.append((size, nbuf))
    return list(zip(records, _split_payloads(inline, body[1:], sizes, "SUBMIT")))


def encode_task(tasks: Sequence[tuple[TaskRecord, Payload]]) -> list[Frame]:
    meta = b"".join(
        _TASK.pack(r.key, len(pl.inline), len(pl.buffers), r.timeout, r.scope, len(r.devices))
        + r.devices
        for r, pl in tasks
    )
    return _batch(Command.TASK, meta, [pl for _, pl in tasks])


def decode_task(body: Sequence[Frame]) -> list[tuple[TaskRecord, Payload]]:
    meta, inline = _meta(body, "TASK", 1)
    if len(meta) == _TASK.size:  # a lone task with no devices
        key, size, nbuf, timeout, scope, _ = _TASK.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "TASK")
        return [(TaskRecord(key, timeout, b"", scope), payload)]
    records, sizes = [], []
    for (key, size, nbuf, timeout, scope), devices in _tailed(meta, _TASK, "TASK"):
        records.append(TaskRecord(key, timeout, devices, scope))
        sizes.append((size, nbuf))
    return list(zip(records, _split_payloads(inline, body[1:], sizes, "TASK")))


def encode_done(credits: int, results: Sequence[tuple[DoneRecord, Payload]]) -> list[Frame]:
    """DONE: meta is the credits granted, then one record per result."""
    meta = _U32.pack(credits) + b"".join(
        _DONE.pack(r.key, r.status, len(pl.inline), len(pl.buffers)) for r, pl in results
    )
    return _batch(Command.DONE, meta, [pl for _, pl in results])


def decode_done(body: Sequence[Frame]) -> tuple[int, list[tuple[DoneRecord, Payload]]]:
    meta, inline = _meta(body, "DONE", 1)
    if len(meta) == _LONE_DONE.size:  # a lone result
        credits, key, status, size, nbuf = _LONE_DONE.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "DONE")
        return credits, [(DoneRecord(key, _status(status)), payload)]
    if len(meta) < _U32.size or (len(meta) - _U32.size) % _DONE.size:
        raise ProtocolError("DONE meta has a partial record")
    (credits,) = _U32.unpack_from(meta)
    records, sizes = [], []
    for key, status, size, nbuf in _DONE.iter_unpack(meta[_U32.size :]):
        records.append(DoneRecord(key, _status(status)))
        sizes.append((size, nbuf))
    return credits, list(zip(records, _split_payloads(inline, body[1:], sizes, "DONE")))


def encode_result(capacity: int, results: Sequence[tuple[ResultRecord, Payload]]) -> list[Frame]:
    """RESULT: meta is the pool's capacity, then one record per result."""
    meta = _U32.pack(capacity) + b"".join(
        _RESULT.pack(r.task_id, r.status, len(pl.inline), len(pl.buffers)) for r, pl in results
    )
    return _batch(Command.RESULT, meta, [pl for _, pl in results])


def decode_result(body: Sequence[Frame]) -> tuple[int, list[tuple[ResultRecord, Payload]]]:
    meta, inline = _meta(body, "RESULT", 1)
    if len(meta) == _LONE_RESULT.size:
        capacity, task_id, status, size, nbuf = _LONE_RESULT.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "RESULT")
        return capacity, [(ResultRecord(task_id, _status(status)), payload)]
    if len(meta) < _U32.size or (len(meta) - _U32.size) % _RESULT.size:
        raise ProtocolError("RESULT meta has a partial record")
    (capacity,) = _U32.unpack_from(meta)
    records, sizes = [], []
    for task_id, status, size, nbuf in _RESULT.iter_unpack(meta[_U32.size :]):
        records.append(ResultRecord(task_id, _status(status)))
        sizes.append((size, nbuf))
    return capacity, list(zip(records, _split_payloads(inline, body[1:], sizes, "RESULT")))


# -- helpers --------------------------------------------------------------------


def _bytes(frame: Frame) -> bytes:
    if isinstance(frame, zmq.Frame):  # what a socket gives: tested first
        return frame.bytes
    if isinstance(frame, bytes):
        return frame
    return bytes(frame)


def frame_size(frame: Frame) -> int:
    """Bytes in a frame (bytes, memoryview or zmq.Frame), without copying it."""
    if isinstance(frame, zmq.Frame):
        return frame.buffer.nbytes
    return memoryview(frame).nbytes


def _head(frame: Frame, size: int) -> bytes:
    """The first ``size`` bytes of a frame, without copying the rest."""
    if isinstance(frame, zmq.Frame):
        return bytes(frame.buffer[:size])
    if isinstance(frame, bytes):
        return frame[:size]
    return bytes(frame[:size])


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _unjson(body: Sequence[Frame], what: str) -> dict[str, Any]:
    if len(body) != 1:
        raise ProtocolError(f"{what} needs 1 body frame, got {len(body)}")
    try:
        data = json.loads(_bytes(body[0]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what} body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} body is not a JSON object")
    return data


def _one_frame(body: Sequence[Frame], what: str) -> bytes:
    if len(body) != 1:
        raise ProtocolError(f"{what} needs 1 body frame, got {len(body)}")
    return _bytes(body[0])


def _one_u32(body: Sequence[Frame], what: str) -> int:
    if len(body) != 1:
        raise ProtocolError(f"{what} needs 1 body frame, got {len(body)}")
    raw = _bytes(body[0])
    if len(raw) != _U32.size:
        raise ProtocolError(f"{what} body must be 4 bytes, got {len(raw)}")
    value: int = _U32.unpack(raw)[0]
    return value


def _meta(body: Sequence[Frame], what: str, record_size: int) -> tuple[bytes, bytes]:
    """A batch's records and its items' inline bytes, cut from its first frame."""
    if not body:
        raise ProtocolError(f"{what} has no frames")
    head = _bytes(body[0])
    if len(head) < _HEAD:
        raise ProtocolError(f"{what} has no meta size")
    end = _HEAD + _U32.unpack_from(head, 4)[0]
    if end > len(head):
        raise ProtocolError(f"{what} meta runs past its frame")
    meta = head[_HEAD:end]
    if record_size > 1 and len(meta) % record_size:
        raise ProtocolError(f"{what} meta has a partial record")
    return meta, head[end:]


def _tailed(meta: bytes, layout: struct.Struct, what: str) -> list[tuple[tuple[Any, ...], bytes]]:
    """Records of a fixed layout whose last field is the size of bytes that follow it."""
    out = []
    offset, end = 0, len(meta)
    while offset < end:
        if offset + layout.size > end:
            raise ProtocolError(f"{what} meta has a partial record")
        *fields, tail = layout.unpack_from(meta, offset)
        offset += layout.size
        if offset + tail > end:
            raise ProtocolError(f"{what} record runs past its meta")
        out.append((tuple(fields), meta[offset : offset + tail]))
        offset += tail
    return out


def _one_payload(
    inline: bytes, buffers: Sequence[Frame], size: int, nbuf: int, what: str
) -> Payload:
    if size != len(inline) or nbuf != len(buffers):
        raise ProtocolError(f"{what} sizes do not match its records")
    return Payload(inline, tuple(buffers))


def _split_payloads(
    inline: bytes, buffers: Sequence[Frame], sizes: Sequence[tuple[int, int]], what: str
) -> list[Payload]:
    """Cut the inline bytes and the buffer frames back into one payload per record,
    checking that the sizes and counts add up exactly."""
    if sum(size for size, _ in sizes) != len(inline) or sum(n for _, n in sizes) != len(buffers):
        raise ProtocolError(f"{what} sizes do not match its records")
    out = []
    offset = frame = 0
    for size, nbuf in sizes:
        out.append(Payload(inline[offset : offset + size], tuple(buffers[frame : frame + nbuf])))
        offset += size
        frame += nbuf
    return out


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


def _ref(frame: Frame, what: str) -> bytes:
    ref = _bytes(frame)
    if len(ref) not in (_U64.size, KEY_SIZE):
        raise ProtocolError(f"{what} has a bad reference ({len(ref)} bytes)")
    return ref


_STATUSES = {status.value: status for status in Status}  # faster than calling Status()


def _status(value: int) -> Status:
    status = _STATUSES.get(value)
    if status is None:
        raise ProtocolError(f"unknown status {value}")
    return status
