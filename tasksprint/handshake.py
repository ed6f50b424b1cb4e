"""The mutual challenge-response that opens every connection, with no I/O.

Theory of operation
-------------------
Before any other frame, both ends of a connection prove that they hold the
key of the role they claim:

1. each end sends :class:`Hello` with 32 fresh random bytes (its nonce), its
   role and its identity;
2. the initiator (the end that opened the TCP connection) sends
   :class:`Proof`; the responder checks it and only then sends its own
   :class:`Proof`, which the initiator checks.

Keys (:func:`role_keys`).  Replicas hold the *cluster secret*; from it come
two keys, the replica key and the client key (HMAC-SHA256 of the secret and
a label).  Worker clients and the command line hold a *client credential*
(:func:`client_credential`): the client key alone, so they cannot derive
the replica key.  A connection between two ends that both claim the role
``replica`` is proved with the replica key; every other connection with the
client key.  A process without the replica key cannot claim that role, so a
worker machine's credential never makes it a replica.

A proof is HMAC-SHA256, under the connection's key, over the whole
transcript: a context string, the prover's side, then both Hellos
(initiator's first: role, identity, nonce each) -- :func:`proof_mac` gives
the exact bytes.  The other end's fresh nonce stops replay; the side byte
stops reflection; both identities in the MAC stop a relay (a proof made for
a connection to replica 1 does not check out at replica 2).  The responder
speaks second so that a peer without the key never sees a MAC made with it.
The handshake authenticates the two ends; it does not encrypt or protect
later frames against an attacker who can rewrite traffic, so clusters on
untrusted networks use TLS (``--tls-cert``) or a tunnel.

Handshake frames are parsed by fixed-shape parsers (:func:`parse_frame`),
byte by byte, never by the general CBOR decoder: before authentication a
peer can send nothing but these two shapes.

:class:`Handshake` is one end's side of the exchange as a state machine: it
is given each handshake frame the peer sent and answers with the frames to
send back, or raises :class:`AuthError`.  The nonce is given to it, so a
transcript can be replayed exactly; :func:`tasksprint.wire.handshake` drives
it over a connection with fresh random nonces.  Frames of the handshake are
taken with the small cap :data:`HANDSHAKE_MAX_FRAME`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import attrs

from tasksprint import codec
from tasksprint.codec import BadMessage

__all__ = [
    "CLIENT_CREDENTIAL_PREFIX",
    "REPLICA_ROLE",
    "RoleKeys",
    "client_credential",
    "parse_frame",
    "role_keys",
    "HANDSHAKE_CONTEXT",
    "HANDSHAKE_MAX_FRAME",
    "HANDSHAKE_TIMEOUT_DEFAULT",
    "NONCE_SIZE",
    "AuthError",
    "Handshake",
    "Hello",
    "Proof",
    "Side",
    "check_secret",
    "proof_mac",
]

#: Largest frame body (bytes) accepted before the peer is authenticated.  A
#: Hello or Proof is well under 2 KiB; the small cap keeps an unauthenticated
#: peer from making us buffer a large frame.
HANDSHAKE_MAX_FRAME = 4096

#: Seconds a connection may spend in the handshake before it is dropped.
HANDSHAKE_TIMEOUT_DEFAULT = 5.0

#: Length in bytes of each end's handshake nonce.
NONCE_SIZE = 32

#: First bytes of every HMAC input; the version suffix changes if the
#: handshake ever does, so proofs of two versions can never be confused.
HANDSHAKE_CONTEXT = b"tasksprint-handshake-v2"

#: The role whose connections to each other need the replica key.
REPLICA_ROLE = "replica"

#: First bytes of a client credential file: the client key follows, in hex.
CLIENT_CREDENTIAL_PREFIX = b"tasksprint-client-key-v1:"

_MAC_SIZE = hashlib.sha256().digest_size
_ROLE_MAX_CHARS = 64
_IDENT_MAX_CHARS = 256


class AuthError(BadMessage):
    """The handshake failed: the peer did not prove it knows the cluster secret."""


def check_secret(secret: Any) -> None:
    """Raise TypeError unless ``secret`` is bytes, ValueError if it is empty."""
    if not isinstance(secret, bytes):
        raise TypeError(
            f"secret must be bytes, got {type(secret).__name__}; read the secret file with load_secret(path)"
        )
    if not secret:
        raise ValueError("secret is empty; read the cluster secret file with load_secret(path)")


@attrs.frozen
class RoleKeys:
    """The keys a process holds: the replica key (replicas only) and the client key."""

    replica: bytes | None = attrs.field(repr=False)
    client: bytes = attrs.field(repr=False)

    def for_connection(self, initiator_role: str, responder_role: str) -> bytes | None:
        """The key proving a connection between these roles (None: this process does not hold it)."""
        if initiator_role == REPLICA_ROLE and responder_role == REPLICA_ROLE:
            return self.replica
        return self.client


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"tasksprint-role-key-v1:" + label, hashlib.sha256).digest()


def role_keys(secret: bytes) -> RoleKeys:
    """The keys a secret file's bytes give: a cluster secret gives both, a client credential the client key.

    Raises ValueError for a client credential that is not 64 hex digits
    after its prefix, TypeError/ValueError as :func:`check_secret`.
    """
    check_secret(secret)
    if secret.startswith(CLIENT_CREDENTIAL_PREFIX):
        body = secret[len(CLIENT_CREDENTIAL_PREFIX) :].strip()
        try:
            key = bytes.fromhex(body.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) != _MAC_SIZE:
            raise ValueError(f"a client credential is {CLIENT_CREDENTIAL_PREFIX.decode()} and 64 hex digits")
        return RoleKeys(None, key)
    return RoleKeys(_derive(secret, b"replica"), _derive(secret, b"client"))


def client_credential(secret: bytes) -> bytes:
    """The client credential of a cluster secret: what worker machines and users hold (one line)."""
    return CLIENT_CREDENTIAL_PREFIX + role_keys(secret).client.hex().encode() + b"\n"


# --------------------------------------------------------------------------
# Messages


def _bytes_of_length(size: int) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attr.name} must be bytes, got {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{attr.name} must be {size} bytes, got {len(value)}")

    return check


def _text(min_chars: int, max_chars: int) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attr.name} must be a str, got {type(value).__name__}")
        if not min_chars <= len(value) <= max_chars:
            raise ValueError(f"{attr.name} must have {min_chars} to {max_chars} characters, got {len(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate cannot be sent as CBOR text; refuse it here
            # rather than fail later inside encode().
            raise ValueError(f"{attr.name} is not valid Unicode text") from None

    return check


@codec.register
@attrs.frozen(kw_only=True)
class Hello:
    """First frame from each end: a fresh nonce and who the sender says it is.

    ``role`` names the kind of process (``"replica"``, ``"client"``, ...);
    ``ident`` names this particular one.  Both are claims until the sender's
    :class:`Proof` checks out.
    """

    nonce: bytes = attrs.field(validator=_bytes_of_length(NONCE_SIZE))
    role: str = attrs.field(validator=_text(1, _ROLE_MAX_CHARS))
    ident: str = attrs.field(validator=_text(0, _IDENT_MAX_CHARS))


@codec.register
@attrs.frozen(kw_only=True)
class Proof:
    """Second frame from each end: the HMAC computed by :func:`proof_mac`."""

    mac: bytes = attrs.field(validator=_bytes_of_length(_MAC_SIZE))


class Side(enum.Enum):
    """Which end of a connection a proof comes from; part of the HMAC input."""

    INITIATOR = 1  # opened the TCP connection
    RESPONDER = 2  # accepted it

    @property
    def other(self) -> Side:
        return Side.RESPONDER if self is Side.INITIATOR else Side.INITIATOR


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def proof_mac(key: bytes, side: Side, initiator: Hello, responder: Hello) -> bytes:
    """Compute the handshake proof of the end on ``side`` of the connection these two Hellos opened.

    Takes the connection's key (:meth:`RoleKeys.for_connection`), the
    prover's side, and the initiator's and the responder's Hello.  Returns
    the 32-byte HMAC-SHA256 of::

        HANDSHAKE_CONTEXT || side (1 byte: 1 initiator, 2 responder)
        || len(role_i) (2 bytes BE) || role_i (UTF-8)
        || len(ident_i) (2 bytes BE) || ident_i (UTF-8) || nonce_i (32 bytes)
        || len(role_r) (2 bytes BE) || role_r (UTF-8)
        || len(ident_r) (2 bytes BE) || ident_r (UTF-8) || nonce_r (32 bytes)

    Role and identity are length-prefixed so that no two different
    transcripts give the same input.
    """
    data = b"".join(
        (
            HANDSHAKE_CONTEXT,
            side.value.to_bytes(1, "big"),
            _length_prefixed(initiator.role),
            _length_prefixed(initiator.ident),
            initiator.nonce,
            _length_prefixed(responder.role),
            _length_prefixed(responder.ident),
            responder.nonce,
        )
    )
    return hmac.new(key, data, hashlib.sha256).digest()


# --------------------------------------------------------------------------
# Fixed-shape parsing of the two handshake frames


class _Reader:
    """Reads a handshake frame's canonical CBOR, one expected item at a time."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def expect(self, prefix: bytes, what: str) -> None:
        if self.data[self.pos : self.pos + len(prefix)] != prefix:
            raise BadMessage(f"handshake frame: expected {what} at byte {self.pos}")
        self.pos += len(prefix)

    def _length(self, major: int, what: str) -> int:
        if self.pos >= len(self.data):
            raise BadMessage(f"handshake frame: {what} missing")
        first = self.data[self.pos]
        if first >> 5 != major:
            raise BadMessage(f"handshake frame: expected {what} at byte {self.pos}")
        info = first & 0x1F
        self.pos += 1
        if info < 24:
            return info
        size = {24: 1, 25: 2}.get(info)
        if size is None or self.pos + size > len(self.data):
            raise BadMessage(f"handshake frame: {what} has a bad length")
        n = int.from_bytes(self.data[self.pos : self.pos + size], "big")
        self.pos += size
        return n

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise BadMessage(f"handshake frame: {what} cut short")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte_string(self, what: str) -> bytes:
        return self._take(self._length(2, what), what)

    def text(self, what: str) -> str:
        raw = self._take(self._length(3, what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage(f"handshake frame: {what} is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise BadMessage(f"handshake frame: {len(self.data) - self.pos} bytes after its end")


# Tag 60041 (OBJECT_TAG, two bytes), then the array header and the class name.
_TAG = b"\xd9" + codec.OBJECT_TAG.to_bytes(2, "big")
_HELLO_HEAD = _TAG + b"\x84\x65Hello"
_PROOF_HEAD = _TAG + b"\x82\x65Proof"


def parse_frame(body: bytes) -> Hello | Proof:
    """A handshake frame's body as the Hello or Proof it must be; BadMessage for anything else.

    Only the exact encodings this module sends are accepted (canonical
    CBOR of ``Hello(nonce, role, ident)`` or ``Proof(mac)``), read byte by
    byte: nothing an unauthenticated peer sends reaches the general decoder.
    """
    r = _Reader(body)
    if body.startswith(_HELLO_HEAD):
        r.expect(_HELLO_HEAD, "Hello")
        nonce = r.byte_string("nonce")
        role = r.text("role")
        ident = r.text("ident")
        r.end()
        try:
            return Hello(nonce=nonce, role=role, ident=ident)
        except (TypeError, ValueError) as exc:
            raise BadMessage(f"invalid Hello: {exc}") from None
    if body.startswith(_PROOF_HEAD):
        r.expect(_PROOF_HEAD, "Proof")
        mac = r.byte_string("mac")
        r.end()
        try:
            return Proof(mac=mac)
        except (TypeError, ValueError) as exc:
            raise BadMessage(f"invalid Proof: {exc}") from None
    raise BadMessage("handshake frame: expected a Hello or a Proof")


# --------------------------------------------------------------------------
# One end's state machine


class _Step(enum.Enum):
    AWAIT_HELLO = enum.auto()
    AWAIT_PROOF = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


@attrs.define(eq=False)
class Handshake:
    """One end of the challenge-response, fed the peer's frames one at a time.

    Usage: send :attr:`hello` first; then give every frame the peer sends to
    :meth:`receive` and send what it returns, until :attr:`peer` is set.  If
    the peer closes the connection before that, raise :meth:`closed_error`.

    Takes the secret file's bytes (a cluster secret or a client credential,
    see :func:`role_keys`), this end's role, identity and side, its nonce
    (:data:`NONCE_SIZE` fresh random bytes; never reuse one) and, for an
    initiator that knows whom it calls, the role and identity the responder
    must claim.  Raises TypeError or ValueError for a bad secret, role,
    identity or nonce, and ValueError for the replica role without the
    cluster secret.
    """

    _keys: RoleKeys = attrs.field(repr=False)
    _side: Side = attrs.field(validator=attrs.validators.instance_of(Side))
    #: This end's first frame, to be sent before anything is received.
    hello: Hello
    _expect: tuple[str, str | None] | None = None
    _step: _Step = attrs.field(default=_Step.AWAIT_HELLO, init=False)
    _peer_hello: Hello | None = attrs.field(default=None, init=False)
    _peer: Hello | None = attrs.field(default=None, init=False)

    @classmethod
    def open(
        cls,
        *,
        secret: bytes,
        role: str,
        ident: str,
        side: Side,
        nonce: bytes,
        expect: tuple[str, str | None] | None = None,
    ) -> Handshake:
        """A handshake not yet started, for this end (see the class for the arguments)."""
        keys = role_keys(secret)
        if role == REPLICA_ROLE and keys.replica is None:
            raise ValueError("a client credential cannot act as a replica: replicas need the cluster secret file")
        return cls(keys, side, Hello(nonce=nonce, role=role, ident=ident), expect)

    @property
    def peer(self) -> Hello | None:
        """The peer's Hello once its proof checked out, else None."""
        return self._peer

    @property
    def done(self) -> bool:
        """Whether the peer is authenticated and this end has sent everything it must."""
        return self._step is _Step.DONE

    def receive(self, msg: Any) -> list[Proof]:
        """Take the peer's next handshake frame; return the frames to send now, in order.

        Raises AuthError if the frame is not the expected one or its proof is
        wrong; the handshake has then failed for good.  RuntimeError if the
        handshake is over.
        """
        match self._step:
            case _Step.AWAIT_HELLO:
                return self._on_hello(msg)
            case _Step.AWAIT_PROOF:
                return self._on_proof(msg)
            case _:
                raise RuntimeError(f"the handshake is over ({self._step.name.lower()}); it takes no more frames")

    def closed_error(self) -> AuthError:
        """The error that the peer closing the connection now amounts to."""
        peer = self._peer_hello
        if peer is None:
            return AuthError("peer closed the connection before its Hello; is it a TaskSprint process?")
        if self._side is Side.INITIATOR:
            return AuthError(
                f"{peer.role} {peer.ident!r} closed the connection after our proof: it refused it, "
                "so this end does not hold the key of the role it claims (cluster secret or client credential)"
            )
        return AuthError(f"{peer.role} {peer.ident!r} closed the connection before sending its proof")

    def _fail(self, error: str) -> AuthError:
        self._step = _Step.FAILED
        return AuthError(error)

    def _hellos(self, peer: Hello) -> tuple[Hello, Hello]:
        """(initiator's Hello, responder's Hello)."""
        return (self.hello, peer) if self._side is Side.INITIATOR else (peer, self.hello)

    def _key(self, peer: Hello) -> bytes | None:
        initiator, responder = self._hellos(peer)
        return self._keys.for_connection(initiator.role, responder.role)

    def _own_proof(self, key: bytes, peer: Hello) -> Proof:
        return Proof(mac=proof_mac(key, self._side, *self._hellos(peer)))

    def _on_hello(self, msg: Any) -> list[Proof]:
        if not isinstance(msg, Hello):
            raise self._fail(f"expected Hello as the first frame, got {type(msg).__name__}")
        if hmac.compare_digest(msg.nonce, self.hello.nonce):
            # Only a peer replaying our own Hello can produce this.
            raise self._fail("peer sent back our own nonce")
        if self._expect is not None:
            role, ident = self._expect
            if msg.role != role or (ident is not None and msg.ident != ident):
                want = f"{role} {ident!r}" if ident is not None else role
                raise self._fail(f"expected {want} at this address, it says it is {msg.role} {msg.ident!r}")
        key = self._key(msg)
        if key is None:
            # A responder holding only the client key, asked to prove the replica key.
            raise self._fail(f"{msg.role} {msg.ident!r} claims the replica role; this end cannot check that")
        self._peer_hello = msg
        self._step = _Step.AWAIT_PROOF
        # The initiator proves itself first; the responder waits for that proof.
        return [self._own_proof(key, msg)] if self._side is Side.INITIATOR else []

    def _on_proof(self, msg: Any) -> list[Proof]:
        peer = self._peer_hello
        assert peer is not None
        if not isinstance(msg, Proof):
            raise self._fail(f"expected Proof from {peer.role} {peer.ident!r}, got {type(msg).__name__}")
        key = self._key(peer)
        assert key is not None  # checked at its Hello
        expected = proof_mac(key, self._side.other, *self._hellos(peer))
        if not hmac.compare_digest(msg.mac, expected):
            which = "replica key (cluster secret)" if key == self._keys.replica else "client key"
            raise self._fail(f"{peer.role} {peer.ident!r} sent a wrong proof: it does not hold the {which}")
        self._step = _Step.DONE
        self._peer = peer
        return [] if self._side is Side.INITIATOR else [self._own_proof(key, peer)]
