"""The envelope: the version, the commands, and the header every message starts with.

    [header, body...]          header = b"fd" + VERSION + COMMAND   (4 bytes)

parse() checks a message's header and splits off its command; encode() builds a message
with no structured body. ERROR is here too: it is the one message that every version
reads, which is how a broker tells a peer of another version so. The heartbeat timing
every peer shares is part of the envelope's contract. Each command's body is built and
parsed in a sibling module (fade/protocol/batch.py, hello.py, ...).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from fade import defaults
from fade.errors import ProtocolError
from fade.protocol.frames import Frame, _bytes, _head

__all__ = [
    "DEFAULT_ADDRESS",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_LIVENESS",
    "LAST_STRICT_VERSION",
    "MAGIC",
    "MAX_ERROR_TEXT",
    "SMALL_FRAME",
    "VERSION",
    "Command",
    "Message",
    "VersionMismatch",
    "decode_error",
    "encode",
    "encode_error",
    "expiry",
    "parse",
    "speaks_fade",
]

MAGIC = b"fd"
#: 4: SUBMIT records carry flags (SUBMIT_NATIVE); HELLOs say platform and ABI; a task
#: payload names its installed-package environment; workers report ENVIRONMENTS;
#: TASK records carry the client's data scope (fade/data.py).
VERSION = 5
# The defaults a user can change live in fade/defaults.py (imported before ZeroMQ).
DEFAULT_ADDRESS = defaults.DEFAULT_ADDRESS
HEARTBEAT_INTERVAL = defaults.HEARTBEAT_INTERVAL
HEARTBEAT_LIVENESS = defaults.HEARTBEAT_LIVENESS

#: The oldest protocol version that parses an ERROR in its own version only: a peer
#: of that version or older is answered in its own version, so that it logs why.
LAST_STRICT_VERSION = 2
#: ERROR reasons are cut to this many bytes: a refusal never costs more than it says.
MAX_ERROR_TEXT = 200
#: parse() copies a first frame up to this size whole: cheaper than slicing a view.
SMALL_FRAME = 64 * 1024


class VersionMismatch(ProtocolError):
    """A fade message of another protocol version: ``version`` is the sender's."""

    def __init__(self, version: int) -> None:
        super().__init__(f"protocol version {version} is not {VERSION}")
        self.version = version


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
    ALIVE = 24  # supervisor -> broker: these worker processes of mine live and run (identities)


_HEADERS = {c: MAGIC + bytes((VERSION, c)) for c in Command}
_BATCHES = frozenset({Command.SUBMIT, Command.TASK, Command.DONE, Command.RESULT})
_COMMANDS = {h: c for c, h in _HEADERS.items()}


@dataclass(slots=True)
class Message:
    """A parsed envelope: the command, the frames after the header, and the protocol
    version of its sender (not ours only for an ERROR from a broker of another version)."""

    command: Command
    body: list[Frame]
    version: int = VERSION


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


def encode_error(reason: str, version: int = VERSION) -> list[Frame]:
    """ERROR: why the broker refused a message; cut to MAX_ERROR_TEXT bytes. Its header
    carries ``version``: ours, so that a peer of another version learns which we speak."""
    text = reason.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
    return [MAGIC + bytes((version, Command.ERROR)), text]


def decode_error(body: Sequence[Frame]) -> str:
    if len(body) != 1:
        raise ProtocolError(f"ERROR needs 1 body frame, got {len(body)}")
    return _bytes(body[0])[:MAX_ERROR_TEXT].decode("utf-8", "replace")
