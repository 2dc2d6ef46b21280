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
        (p.SubmitRecord(7, 1, 0.0), p.Payload(b"x" * 300, (b"b",))),
    ]
    frames = p.encode_submit(tasks)
    assert len(frames) == 1 + 3  # one frame with header, meta and all inline bytes; buffers
    message = p.parse(frames)
    assert message.command is p.Command.SUBMIT
    assert p.decode_submit(message.body) == tasks


def test_task_done_result_round_trips() -> None:
    key = b"C" * 16 + b"\x00" * 8
    task = [(p.TaskRecord(key, 2.5), p.Payload(b"x", (b"big",)))]
    assert p.decode_task(p.parse(p.encode_task(task)).body) == task
    done = [
        (p.DoneRecord(key, p.Status.RAISED), p.Payload(b"e")),
        (p.DoneRecord(key, p.Status.RETURNED), p.Payload(b"")),
    ]
    assert p.decode_done(p.parse(p.encode_done(7, done)).body) == (7, done)
    result = [(p.ResultRecord(5, p.Status.OK), p.Payload(b"v", (b"w",)))]
    assert p.decode_result(p.parse(p.encode_result(9, result)).body) == (9, result)


def test_hello_welcome_obituary_round_trip() -> None:
    hello = p.decode_hello(p.parse(p.encode_hello("worker", {"credits": 2})).body)
    assert hello == p.Hello("worker", {"credits": 2})
    welcome = p.Welcome("abc", 1.0, 3, 4)
    assert p.decode_welcome(p.parse(p.encode_welcome(welcome)).body) == welcome
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
        [b"fd\x02\x63"],  # an unknown command
        [b"fd\x02\x01{}"],  # data in a header frame that is not a batch's
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


def test_a_lone_small_task_is_one_frame() -> None:
    frames = p.encode_task([(p.TaskRecord(b"k", 0.0), p.Payload(b"data"))])
    assert len(frames) == 1
    assert p.decode_task(p.parse(frames).body) == [(p.TaskRecord(b"k", 0.0), p.Payload(b"data"))]


@pytest.mark.parametrize(
    ("decoder", "body"),
    [
        (p.decode_submit, []),
        (p.decode_submit, [batch(p.Command.SUBMIT, b"\x00" * 23)]),  # a partial record
        (p.decode_submit, [b"fd\x02\x06\x00"]),  # no room for the meta size
        (p.decode_submit, [b"fd\x02\x06\x05\x00\x00\x00ab"]),  # meta runs past the frame
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
        (
            p.decode_task,
            [batch(p.Command.TASK, b"\x01\x00\x00\x00\x00\x00" + b"\x00" * 8 + b"\x05abc", b"x")],
        ),
        (
            p.decode_task,
            [batch(p.Command.TASK, b"\x01\x00\x00\x00\x00\x00" + b"\x00" * 8 + b"\x00", b"x")],
        ),
        (p.decode_done, [batch(p.Command.DONE, b"\x00\x00")]),
        (
            p.decode_done,
            [batch(p.Command.DONE, b"\x00" * 4 + b"\x07\x00\x00\x00\x00\x00\x00\x01k")],
        ),
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
