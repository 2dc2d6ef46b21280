"""fade's key files: a broker's key folder, and one file per client or worker.

::

    DIR/broker.key          the broker's public key (shareable)
    DIR/broker.key_secret   the broker's key pair (mode 0600; never leaves the broker host)
    DIR/clients/NAME.key    public keys of authorised clients   (a key is authorised while
    DIR/workers/NAME.key    public keys of authorised workers    its file is in the folder)
    NAME.key                a client's or worker's own file (mode 0600): its key pair, the
                            broker's public key, its role and name

All are ZeroMQ certificate files (pyzmq's ``zmq.auth.load_certificate`` reads
them). Files the broker reads are written under a temporary name and renamed, so
it never sees half a file; nothing here overwrites a secret.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import zmq
from zmq.utils import z85

from fade import defaults
from fade.errors import SecurityError

__all__ = [
    "KEYS_ENV",
    "ROLES",
    "TAG_SIZE",
    "BrokerKeys",
    "KeySource",
    "PeerKeys",
    "add_peer",
    "create_key_dir",
    "key_tag",
    "list_peers",
    "load_broker_keys",
    "load_peer_keys",
    "read_public_key",
    "resolve_peer_keys",
    "revoke_peer",
]

log = logging.getLogger("fade.keys")

#: Clients and workers read their key file from here when given none.
KEYS_ENV = defaults.KEYS_ENV
ROLES = ("client", "worker")
#: Bytes of a routing identity (after its role byte) that name the peer's key.
TAG_SIZE = 8

#: What ``keys=`` accepts: a key file's path, or keys already loaded.
KeySource = Union[str, "os.PathLike[str]", "PeerKeys"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_BROKER_PUBLIC = "broker.key"
_BROKER_SECRET = "broker.key_secret"


# -- key records ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """A client's or worker's key file: its own pair, the broker's public key, its role."""

    role: str
    name: str
    public: bytes  # Z85, 40 bytes
    secret: bytes = field(repr=False)
    broker: bytes  # the broker's public key, Z85
    path: str = ""  # where it was read from, so child processes can read it too

    @property
    def tag(self) -> bytes:
        return key_tag(self.public)


@dataclass(frozen=True, slots=True)
class BrokerKeys:
    """The broker's pair and the folder whose subfolders list the authorised public keys."""

    directory: Path
    public: bytes
    secret: bytes = field(repr=False)


def key_tag(public: bytes) -> bytes:
    """The part of a routing identity that binds it to a public key."""
    return hashlib.blake2b(public, digest_size=TAG_SIZE).digest()


# -- key files --------------------------------------------------------------------------


def create_key_dir(directory: str | os.PathLike[str]) -> BrokerKeys:
    """Create the broker's key pair and empty ``clients/`` and ``workers/`` folders."""
    root = Path(directory)
    if (root / _BROKER_SECRET).exists():
        raise SecurityError(f"{root} already holds a broker key; use another folder")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for role in ROLES:
        (root / f"{role}s").mkdir(mode=0o700, exist_ok=True)
    public, secret = zmq.curve_keypair()
    _write_key_file(
        root / _BROKER_PUBLIC,
        ["fade: the broker's PUBLIC key. Every client and worker key file holds a copy."],
        {"fade-role": "broker"},
        {"public-key": public},
        mode=0o644,
    )
    _write_key_file(
        root / _BROKER_SECRET,
        [
            "fade: the broker's SECRET key. Whoever holds it can pose as this broker",
            "and run code on every client and worker. Never copy it off this host.",
        ],
        {"fade-role": "broker"},
        {"public-key": public, "secret-key": secret},
        mode=0o600,
    )
    return BrokerKeys(root, public, secret)


def add_peer(
    directory: str | os.PathLike[str],
    role: str,
    name: str,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Create ``name``'s key file at ``out`` (default ``./NAME.key``) and authorise its key."""
    if role not in ROLES:
        raise SecurityError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not _NAME.fullmatch(name):
        raise SecurityError(f"bad name {name!r}: use letters, digits, '_', '.', '@', '-'")
    broker = load_broker_keys(directory)
    for other in ROLES:
        if _authorised_file(broker.directory, other, name).exists():
            raise SecurityError(f"{name!r} is already a {other}; revoke it first or pick a name")
    target = Path(out) if out is not None else Path(f"{name}.key")
    public, secret = zmq.curve_keypair()
    does = {
        "client": "can submit tasks to the pool, that is, run any code on its workers.",
        "worker": "can take tasks from the pool: it sees their code and data.",
    }[role]
    _write_key_file(
        target,
        [
            f"fade key file of the {role} {name!r}. SECRET: whoever holds it",
            does,
            f"Keep it private. Revoke it with: fade-keys revoke {name} --dir DIR",
        ],
        {"fade-role": role, "fade-name": name},
        {"public-key": public, "secret-key": secret, "broker-public-key": broker.public},
        mode=0o600,
        exclusive=True,
    )
    _write_key_file(
        _authorised_file(broker.directory, role, name),
        [f"fade: the {role} {name!r} is authorised while this file is here."],
        {"fade-role": role, "fade-name": name},
        {"public-key": public},
        mode=0o644,
    )
    return target


def revoke_peer(directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Remove ``name``'s authorisation; returns the files removed (none: unknown name)."""
    root = Path(directory)
    removed = []
    for role in ROLES:
        path = _authorised_file(root, role, name)
        if _NAME.fullmatch(name) and path.exists():
            path.unlink()
            removed.append(path)
    return removed


def list_peers(directory: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """(role, name, public key) of every authorised key, sorted."""
    out = []
    for role in ROLES:
        for path in sorted(Path(directory, f"{role}s").glob("*.key")):
            try:
                fields = _read_key_file(path)
                out.append((role, path.stem, fields["public-key"].decode()))
            except (OSError, KeyError, SecurityError) as exc:
                out.append((role, path.stem, f"(unreadable: {exc})"))
    return out


def load_broker_keys(directory: str | os.PathLike[str]) -> BrokerKeys:
    root = Path(directory)
    path = root / _BROKER_SECRET
    if not path.exists():
        raise SecurityError(f"no broker key in {root}: create one with `fade-keys init {root}`")
    fields = _read_key_file(path)
    _warn_if_others_can_read(path, "the broker")
    public, secret = _pair(fields, path)
    for role in ROLES:
        if not (root / f"{role}s").is_dir():
            raise SecurityError(f"{root / (role + 's')} is missing: recreate the key folder")
    return BrokerKeys(root, public, secret)


def load_peer_keys(path: str | os.PathLike[str], role: str | None = None) -> PeerKeys:
    """Read a client or worker key file; with ``role``, refuse one made for the other role."""
    fields = _read_key_file(Path(path))
    public, secret = _pair(fields, path)
    file_role = fields.get("fade-role", b"").decode()
    if file_role not in ROLES:
        raise SecurityError(f"{path} is not a client or worker key file (role {file_role!r})")
    if role is not None and file_role != role:
        raise SecurityError(
            f"{path} is a {file_role} key; a {role} needs a {role} key "
            f"(fade-keys add {role} NAME --dir DIR)"
        )
    broker = _z85_key(fields, "broker-public-key", path)
    name = fields.get("fade-name", b"?").decode()
    _warn_if_others_can_read(Path(path), f"{file_role} {name!r}")
    return PeerKeys(
        role=file_role,
        name=name,
        public=public,
        secret=secret,
        broker=broker,
        path=os.path.abspath(path),
    )


def resolve_peer_keys(keys: KeySource | None, role: str) -> PeerKeys | None:
    """The keys a client or worker uses: given, or from $FADE_KEYS, or none."""
    if isinstance(keys, PeerKeys):
        if keys.role != role:
            raise SecurityError(f"these are {keys.role} keys; a {role} needs {role} keys")
        return keys
    if keys is None:
        keys = os.environ.get(KEYS_ENV) or None
        if keys is None:
            return None
    return load_peer_keys(keys, role)


def _authorised_file(root: Path, role: str, name: str) -> Path:
    return root / f"{role}s" / f"{name}.key"


def _write_key_file(
    path: Path,
    comments: list[str],
    metadata: dict[str, str],
    curve: dict[str, bytes],
    *,
    mode: int,
    exclusive: bool = False,
) -> None:
    """Write a ZeroMQ certificate-style file (pyzmq's ``load_certificate`` reads it too).

    Readers never see a partial file: it is written under a temporary name and
    renamed (or, with ``exclusive``, created only if no file has that name).
    """
    lines = [f"#   {line}" for line in comments]
    lines.append(f"#   Created {datetime.datetime.now().isoformat(timespec='seconds')}")
    lines += ["", "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in metadata.items()]
    lines.append("curve")
    lines += [f'    {k} = "{v.decode()}"' for k, v in curve.items()]
    data = ("\n".join(lines) + "\n").encode()
    if exclusive:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise SecurityError(f"{path} exists; remove it or choose another --out") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _warn_if_others_can_read(path: Path, who: str) -> None:
    """A secret key that every user can read lets them act as its owner (``cp`` gives a
    copy the umask's 644); ssh refuses such keys, fade says so. A group may share one on
    purpose (the Kubernetes recipe mounts keys 0440 for the pod's fsGroup)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o004:
        log.warning(
            "%s can be read by other users (mode %o): whoever reads it can connect as %s; "
            "chmod 600 %s",
            path,
            mode,
            who,
            path,
        )


def _read_key_file(path: Path) -> dict[str, bytes]:
    """``name = "value"`` lines of a certificate file, whatever section they are in."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(raw) > 64 * 1024:
        raise SecurityError(f"{path} is too large to be a key file")
    fields: dict[str, bytes] = {}
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#") or b"=" not in line:
            continue
        name, value = line.split(b"=", 1)
        fields[name.strip().decode("ascii", "replace")] = value.strip(b" \t'\"")
    return fields


def _z85_key(fields: dict[str, bytes], name: str, path: object) -> bytes:
    value = fields.get(name)
    if value is None:
        raise SecurityError(f"{path} has no {name}")
    try:
        if len(value) != 40 or len(z85.decode(value)) != 32:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise SecurityError(f"{path}: {name} is not a 40-character Z85 key") from None
    return value


def _pair(fields: dict[str, bytes], path: object) -> tuple[bytes, bytes]:
    public = _z85_key(fields, "public-key", path)
    secret = _z85_key(fields, "secret-key", path)
    if zmq.curve_public(secret) != public:
        raise SecurityError(f"{path}: its public and secret keys do not belong together")
    return public, secret


def read_public_key(path: Path) -> bytes:
    """The Z85 public key of a certificate file; raises SecurityError."""
    return _z85_key(_read_key_file(path), "public-key", path)
