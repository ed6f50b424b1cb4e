"""This end of a connection: who it is, the secret it proves, its caps, limits and TLS.

An :class:`Endpoint` is one value for everything :func:`tasksprint.wire.connect`
and :func:`tasksprint.wire.serve` take besides the address: the cluster
secret, role and identity, the frame cap, the handshake timeout, the
:class:`Limits` a server enforces and the :class:`TLS` contexts (by default
what :func:`use_tls` set).  Every field is checked when the value is made.
No I/O here; :mod:`tasksprint.wire` offers these names too.
"""

from __future__ import annotations

import math
import os
import ssl
from typing import Any

import attrs

from tasksprint.credentials import SecretError
from tasksprint.framing import MAX_FRAME_DEFAULT, check_max_frame
from tasksprint.handshake import HANDSHAKE_TIMEOUT_DEFAULT, NONCE_SIZE, Handshake, Side, check_secret

__all__ = ["TLS", "Endpoint", "Limits", "use_tls"]


@attrs.frozen(kw_only=True)
class Limits:
    """What :func:`~tasksprint.wire.serve` allows at once, so no peer can exhaust a process.

    Each refusal closes the new connection at once and is logged
    (``connection_refused``, with the limit reached).  Defaults suit a
    replica or a worker client; docs/security.md lists them.
    """

    #: Connections open at once on one listening port (handshake or not).
    connections: int = 1024
    #: Connections open at once from one remote address.
    per_address: int = 256
    #: Connections in their handshake at once (unauthenticated peers).
    handshakes: int = 128
    #: Connections in their handshake at once from one remote address.
    handshakes_per_address: int = 32
    #: Seconds a served connection may receive nothing before it is closed
    #: (longer than the longest long-poll a client parks, 60 s).  One timer
    #: per listening port checks every quarter of it, so a connection closes
    #: between ``idle`` and 1.25 times ``idle`` after its last bytes.
    idle: float = 300.0

    def __attrs_post_init__(self) -> None:
        for name in ("connections", "per_address", "handshakes", "handshakes_per_address"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.idle, bool) or not isinstance(self.idle, (int, float)) or not 0 < self.idle < math.inf:
            raise ValueError(f"Limits.idle must be a positive number of seconds, got {self.idle!r}")


# --------------------------------------------------------------------------
# TLS


@attrs.frozen
class TLS:
    """Mutual TLS around every connection: this process's certificate, and the CA its peers' must chain to.

    Build it with :meth:`from_files`; :func:`use_tls` makes it the default of
    every :class:`Endpoint` made afterwards.  Both ends present a certificate
    signed by the CA; the initiator also checks that the responder's
    certificate names the host it dialed (a DNS name or an IP address in its
    subjectAltName).  The challenge-response runs inside the TLS session, so
    credentials still decide the role; TLS adds encryption and integrity.
    """

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def from_files(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]) -> TLS:
        """Contexts from PEM files; raises SecretError naming the file that cannot be used."""
        try:
            server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=os.fspath(ca))
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca))
        except (OSError, ssl.SSLError) as exc:
            raise SecretError(f"cannot use --tls-ca {ca}: {exc}") from None
        for context in (server, client):
            try:
                context.load_cert_chain(os.fspath(cert), os.fspath(key))
            except (OSError, ssl.SSLError) as exc:
                raise SecretError(f"cannot use --tls-cert {cert} with --tls-key {key}: {exc}") from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        server.verify_mode = ssl.CERT_REQUIRED  # mutual: a peer without a certificate of the CA is refused
        return cls(server, client)


_default_tls: TLS | None = None


def use_tls(tls: TLS | None) -> None:
    """Make ``tls`` the default of every :class:`Endpoint` created from now on in this process (None: plain TCP)."""
    global _default_tls
    _default_tls = tls


# --------------------------------------------------------------------------
# Endpoint


def _valid_secret(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
    check_secret(value)


def _valid_max_frame(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
    check_max_frame(value)


def _valid_seconds(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{attr.name} must be a positive number of seconds, got {value!r}")


@attrs.frozen(kw_only=True)
class Endpoint:
    """This end of the connections it opens (:func:`~tasksprint.wire.connect`) or accepts (``serve``).

    One value for everything both take besides the address, so a process
    that does both (a replica) describes itself once.

    Raises TypeError or ValueError at construction for a secret that is not
    non-empty bytes, an invalid role or identity (see
    :class:`~tasksprint.handshake.Hello`), a frame cap out of range or a
    timeout that is not a positive number of seconds.
    """

    #: The cluster secret this end proves it knows (:func:`~tasksprint.credentials.load_secret`).
    secret: bytes = attrs.field(validator=_valid_secret, repr=False)
    #: The kind of process this is (``"replica"``, ``"client"``, ...).
    role: str
    #: Which one of them this is.
    ident: str
    #: Largest frame body, in bytes, sent or accepted after the handshake.
    max_frame: int = attrs.field(default=MAX_FRAME_DEFAULT, validator=_valid_max_frame)
    #: Seconds to open and authenticate a connection: the TCP connect and
    #: the handshake for :func:`~tasksprint.wire.connect`, the handshake for :func:`~tasksprint.wire.serve`.
    timeout: float = attrs.field(default=HANDSHAKE_TIMEOUT_DEFAULT, validator=_valid_seconds)
    #: What :func:`~tasksprint.wire.serve` allows at once (connections, handshakes, idle time).
    limits: Limits = attrs.field(factory=Limits, validator=attrs.validators.instance_of(Limits))
    #: Mutual TLS around every connection, or None (default: what :func:`use_tls` set).
    tls: TLS | None = attrs.field(factory=lambda: _default_tls)

    def __attrs_post_init__(self) -> None:
        # Secret, role and identity checked now, by the handshake they will
        # open (a client credential cannot be a replica), not per connection.
        Handshake.open(
            secret=self.secret, role=self.role, ident=self.ident, side=Side.INITIATOR, nonce=bytes(NONCE_SIZE)
        )
