"""The wire format as data: round trips and rejections, no sockets involved."""

from __future__ import annotations

import struct

import pytest

from fade import protocol as p
from fade.errors import ProtocolError

pytestmark = pytest.mark.timeout(10)


def batch(command: p.Command, meta: bytes, inline: bytes = b"") -> bytes:
    """A batch's first frame, built by hand: header, meta size, meta, inline bytes."""
    header = p.MAGIC + bytes((p.VERSION, command))
    return header + struct.pack("<I", len(meta)) + meta + inline


def test_submit_round_trip() -> None:
    tasks = [
        (p.SubmitRecord(1, 3, 0.0), p.Payload(b"small")),
        (p.SubmitRecord(2**64 - 1, 0, 1.5), p.Payload(b"", (b"buffer", b"another"))),
        (p.SubmitRecord(7, 1, 0.0, p.SUBMIT_NATIVE), p.Payload(b"x" * 300, (b"b",))),
    ]
    frames = p.encode_submit(tasks)
    assert len(frames) == 1 + 3  # one frame with header, meta and all inline bytes; buffers
    message = p.parse(frames)
    assert message.command is p.Command.SUBMIT
    assert p.decode_submit(message.body) == tasks


KEY = p.task_key(b"T" * p.TAG_SIZE, 42)


def test_task_done_result_round_trips() -> None:
    key = KEY
    task = [(p.TaskRecord(key, 2.5), p.Payload(b"x", (b"big",)))]
    assert p.decode_task(p.parse(p.encode_task(task)).body) == task
    done = [
        (p.DoneRecord(key, p.Status.RAISED), p.Payload(b"e")),
        (p.DoneRecord(key, p.Status.RETURNED), p.Payload(b"")),
    ]
    assert p.decode_done(p.parse(p.encode_done(7, done)).body) == (7, done)
    result = [(p.ResultRecord(5, p.Status.OK), p.Payload(b"v", (b"w",)))]
    assert p.decode_result(p.parse(p.encode_result(9, result)).body) == (9, result)


WORKER_HELLO = p.WorkerHello(
    host="h", pid=1, version="0", python="3.11.7", implementation="cpython", credits=2
)
CLIENT_HELLO = p.ClientHello(
    host="h", pid=2, version="0", python="3.12.1", implementation="cpython", tag=b"t" * 8
)


def test_hello_welcome_obituary_round_trip() -> None:
    for hello in (
        WORKER_HELLO,
        CLIENT_HELLO,
        p.WorkerHello(
            host="h",
            pid=1,
            version="0",
            python="3.11.7",
            implementation="cpython",
            credits=0,
            holding=(KEY,),
            max_message_size=99,
            clients=("alice",),
            platform="linux-aarch64",
            abi="cpython-311-aarch64-linux-gnu",
        ),
    ):
        assert p.decode_hello(p.parse(p.encode_hello(hello)).body) == hello
    assert p.python_of(CLIENT_HELLO) == "cpython 3.12"
    assert p.platform_of(CLIENT_HELLO) == ("", "")  # a peer that does not say
    welcome = p.Welcome("abc", 1.0, 3, 4)
    assert p.decode_welcome(p.parse(p.encode_welcome(welcome)).body) == welcome
    announced = p.Welcome("abc", 1.0, 3, 4, max_message_size=1 << 20, max_client_tasks=300)
    assert p.decode_welcome(p.parse(p.encode_welcome(announced)).body) == announced
    # A broker of before: no quota said.
    old = b'{"broker_id": "abc", "heartbeat_interval": 1.0, "heartbeat_liveness": 3, "capacity": 4}'
    assert p.decode_welcome([old]).max_client_tasks == 0
    assert p.decode_obituary(p.parse(p.encode_obituary(b"id", {"exitcode": 3})).body) == (
        b"id",
        {"exitcode": 3},
    )


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"xx\x02\x01"],
        [b"fd\x01\x01"],  # another version
        [b"fd" + bytes((p.VERSION, 0x63))],  # an unknown command
        [b"fd" + bytes((p.VERSION, 1)) + b"{}"],  # data in a header frame that is not a batch's
    ],
)
def test_bad_envelopes_are_protocol_errors(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        p.parse(frames)


def test_wrong_version_is_named() -> None:
    other = p.VERSION + 1
    with pytest.raises(ProtocolError, match=f"version {other} is not {p.VERSION}"):
        p.parse([p.MAGIC + bytes((other, p.Command.HELLO))])
    with pytest.raises(ProtocolError, match=f"version {other} is not {p.VERSION}"):
        p.parse([p.MAGIC + bytes((other, p.Command.SUBMIT)) + b"a batch's first frame"])


def test_an_error_of_any_version_is_read_with_that_version() -> None:
    """How a broker of another version says so: every version reads ERROR."""
    other = p.VERSION + 1
    message = p.parse(p.encode_error("speak 4", version=other))
    assert message.command is p.Command.ERROR and message.version == other
    assert p.decode_error(message.body) == "speak 4"
    with pytest.raises(p.VersionMismatch) as caught:
        p.parse([p.MAGIC + bytes((other, p.Command.HEARTBEAT))])
    assert caught.value.version == other


def test_short_ids_name_peers_without_revealing_them() -> None:
    identity = b"W" + bytes(range(15))
    short = p.short_id(identity)
    assert len(short) == 12 and short not in identity.hex()
    assert p.short_id(b"W" + bytes(range(14)) + b"x") != short  # same prefix, other id


@pytest.mark.parametrize(
    ("field", "value"),
    [("credits", -1), ("credits", 5000), ("credits", "2"), ("holding", ["zz"]),
     ("holding", "ab"), ("clients", [1]), ("pid", True), ("host", 3)],
)  # fmt: skip
def test_hello_fields_are_checked(field: str, value: object) -> None:
    import json

    data = {"role": "worker", "host": "h", "pid": 1, field: value}
    with pytest.raises(ProtocolError):
        p.decode_hello([json.dumps(data).encode()])


def test_a_client_hello_needs_its_tag() -> None:
    with pytest.raises(ProtocolError, match="tag"):
        p.decode_hello([b'{"role": "client", "tag": "00"}'])


def test_a_lone_small_task_is_one_frame() -> None:
    frames = p.encode_task([(p.TaskRecord(KEY, 0.0), p.Payload(b"data"))])
    assert len(frames) == 1
    assert p.decode_task(p.parse(frames).body) == [(p.TaskRecord(KEY, 0.0), p.Payload(b"data"))]


@pytest.mark.parametrize(
    ("decoder", "body"),
    [
        (p.decode_submit, []),
        (p.decode_submit, [batch(p.Command.SUBMIT, b"\x00" * 23)]),  # a partial record
        (p.decode_submit, [b"fd\x03\x06\x00"]),  # no room for the meta size
        (p.decode_submit, [b"fd\x03\x06\x05\x00\x00\x00ab"]),  # meta runs past the frame
        # Records that claim more or fewer inline bytes or buffers than the message has.
        (
            p.decode_submit,
            p.encode_submit([(p.SubmitRecord(1, 0, 0), p.Payload(b"ab", (b"c",)))])[:1],
        ),
        (
            p.decode_submit,
            [p.encode_submit([(p.SubmitRecord(1, 0, 0), p.Payload(b"ab"))])[0], b"a"],
        ),
        (p.decode_submit, [p.encode_submit([(p.SubmitRecord(1, 0, 0), p.Payload(b"ab"))])[0][:-1]]),
        # A TASK record claiming 5 inline bytes where there is 1; a partial record.
        (p.decode_task, [batch(p.Command.TASK, KEY + b"\x05\0\0\0\0\0" + b"\0" * 8, b"x")]),
        (p.decode_task, [batch(p.Command.TASK, KEY + b"\x01\0\0\0\0\0" + b"\0" * 7, b"x")]),
        (p.decode_done, [batch(p.Command.DONE, b"\x00\x00")]),
        (p.decode_done, [batch(p.Command.DONE, b"\x00" * 4 + KEY + b"\x07\0\0\0\0\0\0")]),
        (p.decode_result, [batch(p.Command.RESULT, b"\x00\x00\x00\x00\x01")]),
        (p.decode_hello, [b"{}"]),
        (p.decode_hello, [b"\xff"]),
        (p.decode_hello, [b"1", b"2"]),
        (p.decode_welcome, [b'{"broker_id": 1}']),
        (p.decode_ready, [b"\x00"]),
        (p.decode_obituary, [b"x"]),
        (p.decode_drain, [b"x"]),
    ],
)
def test_malformed_bodies_are_protocol_errors(decoder, body) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError):
        decoder(body)


def test_expiry_is_interval_times_liveness() -> None:
    assert p.expiry(0.5, 4) == 2.0


def test_environments_reports_are_checked_and_rebuilt() -> None:
    report = {
        "environments": [{"id": "ab" * 6, "packages": ["six 1.17.0"], "where": "here", "tasks": 3}],
        "cache": {"distributions": [["six", "1.17.0", 1234]], "bytes": 1234, "limit": 10},
    }
    message = p.parse(p.encode_environments(report))
    assert message.command is p.Command.ENVIRONMENTS
    assert p.decode_environments(message.body) == report
    extra = {**report, "surprise": 1}  # unknown keys are dropped
    assert p.decode_environments(p.parse(p.encode_environments(extra)).body) == report
    bad = [
        {"environments": [{"id": 1, "packages": [], "where": "", "tasks": 0}]},
        {"environments": [{"id": "x", "packages": ["p"] * 300, "where": "", "tasks": 0}]},
        {"environments": [{"id": "x", "packages": [], "where": "", "tasks": -1}]},
        {"cache": {"distributions": [["six", "1", True]]}},
        {"cache": []},
        {"environments": [{"id": "x" * 500, "packages": [], "where": "", "tasks": 0}]},
    ]
    for body in bad:
        with pytest.raises(ProtocolError):
            p.decode_environments(p.parse(p.encode_environments(body)).body)
    huge = p.encode_environments({"environments": [], "padding": "x" * p.ENVIRONMENTS_LIMIT})
    with pytest.raises(ProtocolError, match="over"):
        p.decode_environments(p.parse(huge).body)
