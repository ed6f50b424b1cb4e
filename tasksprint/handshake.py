"""The mutual challenge-response that opens every connection, with no I/O.

Theory of operation
-------------------
Before any other frame, both ends of a connection prove that they know the
cluster's shared secret:

1. each end sends :class:`Hello` with 32 fresh random bytes (its nonce), its
   role and its identity;
2. the initiator (the end that opened the TCP connection) sends
   :class:`Proof`; the responder checks it and only then sends its own
   :class:`Proof`, which the initiator checks.

A proof is HMAC-SHA256 over a context string, the prover's side of the
connection, its role and identity, the other end's nonce and its own nonce
(:func:`proof_mac` gives the exact bytes).  The other end's fresh nonce stops
replay; the side byte and the prover's own nonce stop reflection (a proof
taken from one end cannot be sent back to it or used on a second connection
to it).  The responder speaks second so that a peer without the secret never
sees a MAC made with it.  The handshake authenticates the two ends; it does
not encrypt or protect later frames against an attacker who can rewrite
traffic, so clusters on untrusted networks need a tunnel (VPN, WireGuard).

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
HANDSHAKE_CONTEXT = b"tasksprint-handshake-v1"

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


def proof_mac(secret: bytes, side: Side, role: str, ident: str, their_nonce: bytes, own_nonce: bytes) -> bytes:
    """Compute the handshake proof of the end on ``side``.

    Takes the cluster secret, the prover's side, role and identity, the other
    end's nonce and the prover's own nonce.  Returns the 32-byte
    HMAC-SHA256 of::

        HANDSHAKE_CONTEXT || side (1 byte: 1 initiator, 2 responder)
        || len(role) (2 bytes BE) || role (UTF-8)
        || len(ident) (2 bytes BE) || ident (UTF-8)
        || their_nonce (32 bytes) || own_nonce (32 bytes)

    Role and identity are length-prefixed so that no two different
    (role, ident) pairs give the same input.
    """
    data = b"".join(
        (
            HANDSHAKE_CONTEXT,
            side.value.to_bytes(1, "big"),
            _length_prefixed(role),
            _length_prefixed(ident),
            their_nonce,
            own_nonce,
        )
    )
    return hmac.new(secret, data, hashlib.sha256).digest()


# --------------------------------------------------------------------------
# One end's state machine


class _Step(enum.Enum):
    AWAIT_HELLO = enum.auto()
    AWAIT_PROOF = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


def _check_secret_field(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
    check_secret(value)


@attrs.define(eq=False)
class Handshake:
    """One end of the challenge-response, fed the peer's frames one at a time.

    Usage: send :attr:`hello` first; then give every frame the peer sends to
    :meth:`receive` and send what it returns, until :attr:`peer` is set.  If
    the peer closes the connection before that, raise :meth:`closed_error`.

    Takes the cluster secret, this end's role, identity and side, and its
    nonce (:data:`NONCE_SIZE` fresh random bytes; never reuse one).  Raises
    TypeError or ValueError for a bad secret, role, identity or nonce.
    """

    _secret: bytes = attrs.field(validator=_check_secret_field, repr=False)
    _side: Side = attrs.field(validator=attrs.validators.instance_of(Side))
    #: This end's first frame, to be sent before anything is received.
    hello: Hello
    _step: _Step = attrs.field(default=_Step.AWAIT_HELLO, init=False)
    _peer_hello: Hello | None = attrs.field(default=None, init=False)
    _peer: Hello | None = attrs.field(default=None, init=False)

    @classmethod
    def open(cls, *, secret: bytes, role: str, ident: str, side: Side, nonce: bytes) -> Handshake:
        """A handshake not yet started, for this end (see the class for the arguments)."""
        return cls(secret, side, Hello(nonce=nonce, role=role, ident=ident))

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
                "so the two ends do not share the cluster secret"
            )
        return AuthError(f"{peer.role} {peer.ident!r} closed the connection before sending its proof")

    def _fail(self, error: str) -> AuthError:
        self._step = _Step.FAILED
        return AuthError(error)

    def _own_proof(self, peer: Hello) -> Proof:
        own = self.hello
        return Proof(mac=proof_mac(self._secret, self._side, own.role, own.ident, peer.nonce, own.nonce))

    def _on_hello(self, msg: Any) -> list[Proof]:
        if not isinstance(msg, Hello):
            raise self._fail(f"expected Hello as the first frame, got {type(msg).__name__}")
        if hmac.compare_digest(msg.nonce, self.hello.nonce):
            # Only a peer replaying our own Hello can produce this.
            raise self._fail("peer sent back our own nonce")
        self._peer_hello = msg
        self._step = _Step.AWAIT_PROOF
        # The initiator proves itself first; the responder waits for that proof.
        return [self._own_proof(msg)] if self._side is Side.INITIATOR else []

    def _on_proof(self, msg: Any) -> list[Proof]:
        peer = self._peer_hello
        assert peer is not None
        if not isinstance(msg, Proof):
            raise self._fail(f"expected Proof from {peer.role} {peer.ident!r}, got {type(msg).__name__}")
        own = self.hello
        expected = proof_mac(self._secret, self._side.other, peer.role, peer.ident, own.nonce, peer.nonce)
        if not hmac.compare_digest(msg.mac, expected):
            raise self._fail(
                f"{peer.role} {peer.ident!r} sent a wrong proof: the two ends do not share the cluster secret"
            )
        self._step = _Step.DONE
        self._peer = peer
        return [] if self._side is Side.INITIATOR else [self._own_proof(peer)]
