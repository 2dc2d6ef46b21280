"""Task keys, data scopes and peers' short ids: how tasks and peers are named.

A task key is its client's 8-byte tag and the client's 8-byte task id: workers learn the
tag, never the client's routing identity. A TASK also carries its client's data scope.
Logs and status tools name a peer by short_id, a hash. TASK and DONE records, a
worker's HELLO (the tasks it holds) and STOP all use these sizes, so they live apart
from each of them.
"""

from __future__ import annotations

import hashlib

from fade.protocol.frames import _U64

__all__ = [
    "KEY_SIZE",
    "NO_SCOPE",
    "SCOPE_SIZE",
    "TAG_SIZE",
    "key_tag",
    "short_id",
    "task_key",
]

#: A task key: the client's 8-byte tag (see ClientHello) and its 8-byte task id.
KEY_SIZE = 16
TAG_SIZE = 8
#: A TASK's scope: whose data cache entries it may use (fade/data.py, scope_of).
SCOPE_SIZE = 8
NO_SCOPE = bytes(SCOPE_SIZE)


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
