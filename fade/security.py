"""Who may talk to a broker, and as what: CurveZMQ keys, their files, and the broker's checks.

::

    fade-keys init DIR          DIR/broker.key, broker.key_secret, clients/, workers/
    fade-keys add client alice  alice.key (alice's pair + broker public key + role)
                                + DIR/clients/alice.key (alice's public key: authorised)
    fade-keys revoke alice      removes DIR/clients/alice.key

    client / worker                         broker
      DEALER  curve_serverkey = broker   --> ROUTER  curve_server, ZAP domain "fade"
      (own key pair from its key file)         |  handshake: ZapHandler asks the KeyRing
                                               |  (clients/ + workers/, re-read on change);
                                               |  User-Id = the peer's public key
                                               v
                                    every message: Guard.check(User-Id, identity, command)
                                    (key still authorised? identity bound to the key?
                                     command allowed for the key's role?)

* The handshake proves a peer holds an authorised secret key, and the peer
  proves the broker holds the broker's secret key (a rogue broker cannot talk
  to it). Every frame after it is encrypted and authenticated.
* A peer's role comes from the folder its public key is in, never from what it
  says, and it is looked up again for every message: a revoked key's open
  connection stops being served at once.
* A peer's routing identity carries a tag derived from its public key, so one
  key holder cannot act under another peer's identity.
* The key files themselves are read and written by ``fade.keyfiles``.
* ZAP runs in the broker's own poll loop (``ZapHandler.socket`` is polled with
  the ROUTER): no thread. pyzmq's ``Authenticator.handle_zap_message`` is a
  coroutine meant for an event loop, so the few lines of RFC 27 are done here.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from fade import launch
from fade import protocol as p
from fade._logutil import RateLimitedLog
from fade.errors import InsecureAddressError, ProtocolError, SecurityError
from fade.keyfiles import (
    KEYS_ENV,
    ROLES,
    TAG_SIZE,
    BrokerKeys,
    KeySource,
    PeerKeys,
    add_peer,
    create_key_dir,
    key_tag,
    list_peers,
    load_broker_keys,
    load_peer_keys,
    read_public_key,
    resolve_peer_keys,
    revoke_peer,
)
from fade.sockets import ZAP_DOMAIN, has_input, is_local_address

# The key files live in fade.keyfiles; they are re-exported here so that
# ``fade.security`` is the one name to import for everything about keys.
__all__ = [
    "KEYS_ENV",
    "PERMITTED",
    "ROLES",
    "TAG_SIZE",
    "BrokerKeys",
    "Gate",
    "Guard",
    "HandshakeWatch",
    "KeyRing",
    "KeySource",
    "Peer",
    "PeerKeys",
    "Refused",
    "ReplyLimiter",
    "ZapHandler",
    "add_peer",
    "check_address",
    "create_key_dir",
    "is_local_address",
    "key_tag",
    "list_peers",
    "load_broker_keys",
    "load_peer_keys",
    "peer_identity",
    "resolve_peer_keys",
    "revoke_peer",
]

log = logging.getLogger("fade.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq asks whoever binds it
#: A folder changed this recently is re-read at every check: its mtime may be too
#: coarse to show a second change within the same tick.
RACY_SECONDS = 2.0
#: Seconds between re-reads of the key folders prompted by handshakes with unknown keys.
LOOKUP_REFRESH = 0.1

#: What each role may send the broker. A command missing here is refused when
#: keys are on: new commands must be added deliberately.
PERMITTED: dict[str, frozenset[p.Command]] = {
    "client": frozenset(
        {
            p.Command.HELLO,
            p.Command.HEARTBEAT,
            p.Command.SUBMIT,
            p.Command.TERMINATE,  # stops its own tasks: they are looked up under its tag
            p.Command.DISCONNECT,
            p.Command.CODE,  # answers to the workers' FETCH (code shipping)
            p.Command.STATUS,
        }
    ),
    "worker": frozenset(
        {
            p.Command.HELLO,
            p.Command.HEARTBEAT,
            p.Command.READY,
            p.Command.DONE,
            p.Command.DRAIN,
            p.Command.DISCONNECT,
            p.Command.OBITUARY,  # sent by the supervisor, which holds its workers' key
            p.Command.ALIVE,  # the supervisor's, too
            p.Command.FETCH,  # asks a task's client for its code
            p.Command.ENVIRONMENTS,  # what it has of installed packages, for fade-status
            p.Command.STATUS,
        }
    ),
    # The other broker of a pair (fade/pairlink.py), which holds the broker key pair.
    "broker": frozenset({p.Command.PAIR, p.Command.STATUS}),
}


# -- peers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """An authorised public key: its role comes from the folder it was found in."""

    role: str
    name: str
    tag: bytes


def peer_identity(prefix: bytes, keys: PeerKeys | None) -> bytes:
    """A routing identity: role byte, key tag (with keys), then 15 random bytes. The
    broker never shows it to another peer: it is what would let one pose as another."""
    return launch.peer_identity(prefix, b"" if keys is None else keys.tag)


# -- addresses ------------------------------------------------------------------------------


def check_address(address: str, keys: object, insecure: bool) -> None:
    """Refuse to serve a network address without keys, unless told ``insecure``."""
    if keys is None and not insecure and not is_local_address(address):
        raise InsecureAddressError(
            f"refusing to listen on {address} without keys: anyone who can reach it could "
            "run any code on every worker. Create keys with `fade-keys init DIR` (then "
            "`fade-keys add client NAME --dir DIR` and `fade-keys add worker NAME --dir DIR`) "
            "and start with --keys DIR; or bind a loopback address; or pass --insecure on "
            "a network where everyone is trusted."
        )


# -- the broker's side ------------------------------------------------------------------------


class KeyRing:
    """The authorised public keys in ``DIR/clients`` and ``DIR/workers``, kept current.

    :meth:`refresh` costs two ``stat`` calls unless a folder changed; then the
    folder is read again and the keys no longer there are remembered as revoked
    until :meth:`take_revoked` collects them.
    """

    def __init__(self, directory: Path, pair: bytes | None = None) -> None:
        self.directory = directory
        # A pair's brokers link up with the broker key pair itself (fade/pairlink.py):
        # that public key is admitted too, as the role "broker".
        self._pair = pair
        self.peers: dict[str, Peer] = {}  # Z85 public key (the ZAP User-Id) -> peer
        self._stamp: object = None
        self._racy = True
        self._revoked: list[Peer] = []
        self._looked = 0.0
        self._bad_files = RateLimitedLog(log)
        self.refresh()

    def lookup(self, key: str) -> Peer | None:
        """The peer with this key; an unknown key triggers a check for new files, at most
        every LOOKUP_REFRESH seconds, so a flood of unknown keys cannot keep us reading."""
        peer = self.peers.get(key)
        now = time.monotonic()
        if peer is None and now - self._looked >= LOOKUP_REFRESH:
            self._looked = now
            self.refresh()
            peer = self.peers.get(key)
        return peer

    def refresh(self) -> None:
        stamp = tuple(self._folder_stamp(role) for role in ROLES)
        if stamp == self._stamp and not self._racy:
            return
        # File times are wall-clock times, so this compares with the wall clock.
        now = time.time()
        self._racy = any(s is not None and now - s[0] / 1e9 < RACY_SECONDS for s in stamp)
        self._stamp = stamp
        peers = self._load()
        gone = [peer for key, peer in self.peers.items() if peers.get(key) != peer]
        added = len(set(peers) - set(self.peers))
        if gone or added:
            log.info(
                "keys: %d clients and %d workers authorised (%d added, %d revoked)",
                sum(1 for x in peers.values() if x.role == "client"),
                sum(1 for x in peers.values() if x.role == "worker"),
                added,
                len(gone),
            )
        self._revoked += gone
        self.peers = peers

    def take_revoked(self) -> list[Peer]:
        revoked, self._revoked = self._revoked, []
        return revoked

    def _folder_stamp(self, role: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.directory / f"{role}s")
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def _load(self) -> dict[str, Peer]:
        peers: dict[str, Peer] = {}
        clashes: set[str] = set()
        for role in ROLES:
            for path in self._key_files(role):
                try:
                    public = read_public_key(path)
                except SecurityError as exc:
                    self._bad_files.warning("ignoring %s: %s", path, exc)
                    continue
                key = public.decode()
                if key in peers:
                    clashes.add(key)
                peers[key] = Peer(role, path.stem, key_tag(public))
        for key in clashes:
            # One key in two roles (or twice): trust neither rather than guess.
            self._bad_files.warning("key of %r is authorised twice; refusing it", peers[key].name)
            del peers[key]
        if self._pair is not None:
            peers[self._pair.decode()] = Peer("broker", "pair", key_tag(self._pair))
        return peers

    def _key_files(self, role: str) -> Iterable[Path]:
        try:
            return sorted(Path(self.directory, f"{role}s").glob("*.key"))
        except OSError:
            return []


class ZapHandler:
    """Answers libzmq's ZAP requests (RFC 27) for the broker: only authorised keys get in.

    The broker polls :attr:`socket` in its own loop and calls :meth:`handle`,
    which never blocks. The User-Id it grants is the peer's Z85 public key, which
    the :class:`Guard` looks up again for every message.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keyring: KeyRing) -> None:
        self.keyring = keyring
        self.socket: zmq.Socket[bytes] = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise SecurityError(
                f"cannot start the authenticator ({exc}): another in this ZeroMQ context?"
            ) from None
        self._refused = RateLimitedLog(log)

    def handle(self) -> None:
        for _ in range(1000):
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.socket.send_multipart(self._answer(request))

    def close(self) -> None:
        self.socket.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        request_id = request[1] if len(request) > 1 else b""
        if len(request) < 6 or request[0] != b"1.0":
            return _zap_reply(request_id, b"400", b"bad ZAP request")
        domain, address, mechanism, credentials = request[2], request[3], request[5], request[6:]
        if domain != ZAP_DOMAIN or mechanism != b"CURVE" or len(credentials) != 1:
            return _zap_reply(request_id, b"400", b"CURVE keys required")
        if len(credentials[0]) != 32:
            return _zap_reply(request_id, b"400", b"bad CURVE key")
        key = z85.encode(credentials[0]).decode()
        peer = self.keyring.lookup(key)
        if peer is None:
            self._refused.warning(
                "refused a connection from %s: its key %s is not authorised",
                address.decode(errors="replace"),
                key,
            )
            return _zap_reply(request_id, b"400", b"key not authorised")
        log.debug("%s %r connected from %s", peer.role, peer.name, address.decode("ascii"))
        return _zap_reply(request_id, b"200", b"OK", key.encode())


def _zap_reply(request_id: bytes, status: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
    return [b"1.0", request_id, status, text, user, b""]


class Refused(ProtocolError):
    """A message the sender's key does not allow; ``revoked``: its key is no longer authorised."""

    def __init__(self, reason: str, *, revoked: bool = False) -> None:
        super().__init__(reason)
        self.revoked = revoked


class Guard:
    """The per-message check of a broker with keys: who sent this, and may they?"""

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    def check(self, first: zmq.Frame, identity: bytes, message: p.Message) -> Peer:
        """The sender's peer record; raises :class:`Refused` if the message is not allowed."""
        try:
            user = first.get("User-Id")
        except zmq.ZMQError:
            raise Refused("this connection has no CURVE key") from None
        peer = self.keyring.peers.get(str(user))
        if peer is None:
            raise Refused("this key is not authorised (it may have been revoked)", revoked=True)
        if identity[1 : 1 + TAG_SIZE] != peer.tag:
            raise Refused("this routing identity does not belong to this key")
        command = message.command
        if command not in PERMITTED[peer.role]:
            raise Refused(f"a {peer.role} key may not send {command.name}")
        if command is p.Command.HELLO:
            said = p.decode_hello(message.body).role
            if said != peer.role:
                raise Refused(f"a {peer.role} key may not say HELLO as a {said}")
        elif command is p.Command.OBITUARY:
            dead, _ = p.decode_obituary(message.body)
            if dead[1 : 1 + TAG_SIZE] != peer.tag:
                raise Refused("a supervisor may only report deaths of workers with its own key")
        elif command is p.Command.ALIVE and any(
            w[1 : 1 + TAG_SIZE] != peer.tag for w in p.decode_alive(message.body)
        ):
            raise Refused("a supervisor may only vouch for workers with its own key")
        return peer


class ReplyLimiter:
    """Answers to bad or unknown input (RESET, ERROR): one per peer per ``period``, and at
    most ``limit`` peers per period, so a peer that sends junk and never reads cannot make
    the broker queue replies without bound."""

    def __init__(self, period: float, limit: int = 10_000) -> None:
        self._period = period
        self._limit = limit
        self._recent: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def allow(self, identity: bytes) -> bool:
        now = time.monotonic()
        recent = self._recent
        cutoff = now - self._period
        while recent:
            first, when = next(iter(recent.items()))
            if when > cutoff:
                break
            del recent[first]
        if identity in recent or len(recent) >= self._limit:
            return False
        recent[identity] = now
        return True


# -- the peers' side --------------------------------------------------------------------------


class HandshakeWatch:
    """Explains, in the log, why a peer's connection to the broker keeps failing.

    Without it a client with a wrong or revoked key would wait in silence: the
    broker refuses the handshake, and ZeroMQ just retries.
    """

    _EVENTS = (
        zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )

    def __init__(self, sock: zmq.Socket[bytes], logger: logging.Logger, keys: PeerKeys | None):
        self._sock = sock
        self._monitor = sock.get_monitor_socket(self._EVENTS)
        self._log = RateLimitedLog(logger, burst=3, period=30.0)
        self._keys = keys
        #: What went wrong in the last failed handshake, in words; None: none failed.
        self.last_problem: str | None = None

    @property
    def monitor(self) -> zmq.Socket[bytes]:
        """The socket the failures arrive on, for a caller that polls it."""
        return self._monitor

    def check(self) -> None:
        """Log what went wrong since the last call; never blocks."""
        for reason in self.failures():
            self._log.warning("cannot connect to the broker: %s", reason)

    def failures(self) -> list[str]:
        """Why each handshake since the last call failed, in words; never blocks."""
        reasons = []
        # Asking EVENTS first: a recv that raises zmq.Again costs more, on every pass.
        while has_input(self._monitor):
            frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            if len(frames) == 2 and len(frames[0]) == 6:
                event = int.from_bytes(frames[0][:2], "little")
                value = int.from_bytes(frames[0][2:], "little")
                reasons.append(self._explain(event, value))
        if reasons:
            self.last_problem = reasons[-1]
        return reasons

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)

    def _explain(self, event: int, value: int) -> str:
        keys = self._keys
        who = f"{keys.role} key {keys.name!r} ({keys.path})" if keys else "no keys"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return f"it refused our {who}: not authorised there, or revoked (fade-keys add)"
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                if keys is None:
                    return f"it requires keys; pass keys= or --keys, or set {KEYS_ENV}"
                return "it does not use keys, but we do"
            return f"handshake protocol error {value:#x} with {who}"
        # Which side gave up first is a race, so a mismatch can also end up here.
        if keys is None:
            return f"the handshake failed: it probably requires keys (keys=, --keys, {KEYS_ENV})"
        return (
            f"the encrypted handshake failed with {who}: the broker public key in the "
            "key file may not be this broker's, or the broker does not use keys"
        )


# -- the broker's gate ----------------------------------------------------------------------


class Gate:
    """Everything a broker does about security, in one place: the keys it accepts (ZAP
    handshakes and the per-message :class:`Guard`), or none (loopback, or ``insecure``
    with a repeated warning); and, once per interval, keys revoked since.

    Without keys :meth:`check` lets every message through and names no key.
    """

    def __init__(
        self,
        address: str,
        keys: str | os.PathLike[str] | None,
        insecure: bool,
        *,
        interval: float,
        warning_period: float,
        pair: bool = False,
    ) -> None:
        # Checked before anything is bound: a refused broker never listens.
        check_address(address, keys, insecure)
        self.address = address
        self.keys = load_broker_keys(keys) if keys is not None else None
        self._insecure = insecure and keys is None and not is_local_address(address)
        self._pair = pair
        self._interval = interval
        self._warning_period = warning_period
        self._warning_due = 0.0
        self._checked = 0.0
        self.zap: ZapHandler | None = None
        self._guard: Guard | None = None

    def open(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        """Start the authenticator (before the ROUTER binds: it must answer the first
        handshake)."""
        if self.keys is not None:
            keyring = KeyRing(self.keys.directory, self.keys.public if self._pair else None)
            self.zap = ZapHandler(context, keyring)
            self._guard = Guard(keyring)
            log.info("CURVE keys on: accepting the keys authorised in %s", self.keys.directory)

    def close(self) -> None:
        if self.zap is not None:
            self.zap.close()
            self.zap = None

    def check(self, first: zmq.Frame, identity: bytes, message: p.Message) -> Peer | None:
        """The sender's key (None without keys); raises Refused if it may not send this."""
        if self._guard is None:
            return None
        return self._guard.check(first, identity, message)

    def revoked(self, now: float) -> dict[bytes, Peer]:
        """Once per interval: re-read the key folders; the tags of keys revoked since."""
        if self._guard is None or now - self._checked < self._interval:
            return {}
        self._checked = now
        keyring = self._guard.keyring
        keyring.refresh()
        return {peer.tag: peer for peer in keyring.take_revoked()}

    def warn_if_insecure(self, now: float) -> None:
        if self._insecure and now >= self._warning_due:
            self._warning_due = now + self._warning_period
            log.warning(
                "INSECURE: serving %s without keys: anyone who can reach it can run any "
                "code on every worker (fade-keys init DIR, then --keys DIR)",
                self.address,
            )
