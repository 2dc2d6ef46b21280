"""fade's wire protocol: the only package that builds or parses frames.

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

The package is the protocol module, split by family of message; import it whole
(``from fade import protocol as p``, then ``p.encode_submit``), never a submodule::

    envelope   version, commands, the header: parse(), encode(), ERROR; heartbeat timing
    frames     Frame, and the helpers every codec shares
    keys       task keys, data scopes, peers' short ids
    batch      SUBMIT, TASK, DONE, RESULT: payloads and records (the hot path)
    hello      HELLO, WELCOME; resource tables
    control    READY, capacity and backlog, DRAIN, refusals, TERMINATE, STOP, NOTICE
    fetch      FETCH, CODE (code shipping)
    reports    OBITUARY, ALIVE, ENVIRONMENTS, STATUS, STATE
    pair       PAIR, STANDBY (a broker pair)
"""

from __future__ import annotations

from fade.protocol.batch import (
    BATCH_BYTES,
    HEAD_ROOM,
    SUBMIT_NATIVE,
    DoneRecord,
    Payload,
    ResultRecord,
    Status,
    SubmitRecord,
    TaskRecord,
    chunked,
    decode_done,
    decode_result,
    decode_submit,
    decode_task,
    encode_done,
    encode_result,
    encode_submit,
    encode_task,
    largest_part,
)
from fade.protocol.control import (
    MAX_BACKLOG,
    decode_backlog,
    decode_capacity,
    decode_drain,
    decode_notice,
    decode_ready,
    decode_refusal,
    decode_stop,
    decode_terminate,
    encode_backlog,
    encode_capacity,
    encode_notice,
    encode_ready,
    encode_refusal,
    encode_stop,
    encode_terminate,
)
from fade.protocol.envelope import (
    DEFAULT_ADDRESS,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    LAST_STRICT_VERSION,
    MAGIC,
    MAX_ERROR_TEXT,
    SMALL_FRAME,
    VERSION,
    Command,
    Message,
    VersionMismatch,
    decode_error,
    encode,
    encode_error,
    expiry,
    parse,
    speaks_fade,
)
from fade.protocol.fetch import (
    CodeStatus,
    decode_code,
    decode_fetch,
    encode_code,
    encode_fetch,
    pack_request,
    unpack_request,
)
from fade.protocol.frames import (
    Frame,
    frame_size,
)
from fade.protocol.hello import (
    MAX_CREDITS,
    MAX_HOLDING,
    MAX_LABEL,
    ClientHello,
    Hello,
    Welcome,
    WorkerHello,
    decode_hello,
    decode_resources,
    decode_welcome,
    encode_hello,
    encode_resources,
    encode_welcome,
    platform_of,
    python_of,
)
from fade.protocol.keys import (
    KEY_SIZE,
    NO_SCOPE,
    SCOPE_SIZE,
    TAG_SIZE,
    key_tag,
    short_id,
    task_key,
)
from fade.protocol.pair import (
    PAIR_ROLES,
    PAIR_STATES,
    PairReport,
    Standby,
    decode_pair,
    decode_standby,
    encode_pair,
    encode_standby,
)
from fade.protocol.reports import (
    ALIVE_LIMIT,
    ENVIRONMENTS_LIMIT,
    decode_alive,
    decode_environments,
    decode_obituary,
    decode_state,
    decode_status,
    encode_alive,
    encode_environments,
    encode_obituary,
    encode_state,
    encode_status,
)

__all__ = [
    "ALIVE_LIMIT",
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
    "Frame",
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
    "decode_alive",
    "decode_backlog",
    "decode_capacity",
    "decode_code",
    "decode_done",
    "decode_drain",
    "decode_environments",
    "decode_error",
    "decode_fetch",
    "decode_hello",
    "decode_notice",
    "decode_obituary",
    "decode_pair",
    "decode_ready",
    "decode_refusal",
    "decode_resources",
    "decode_result",
    "decode_standby",
    "decode_state",
    "decode_status",
    "decode_stop",
    "decode_submit",
    "decode_task",
    "decode_terminate",
    "decode_welcome",
    "encode",
    "encode_alive",
    "encode_backlog",
    "encode_capacity",
    "encode_code",
    "encode_done",
    "encode_environments",
    "encode_error",
    "encode_fetch",
    "encode_hello",
    "encode_notice",
    "encode_obituary",
    "encode_pair",
    "encode_ready",
    "encode_refusal",
    "encode_resources",
    "encode_result",
    "encode_standby",
    "encode_state",
    "encode_status",
    "encode_stop",
    "encode_submit",
    "encode_task",
    "encode_terminate",
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
