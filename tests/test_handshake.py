"""Tests of tasksprint.handshake: the proof's bytes and one end's state machine.

Everything here runs without sockets: two Handshake objects talk by handing
each other the frames they return, and an attacker is a test that hands one
of them something else.  docs/wire.md is the specification.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from tasksprint import codec
from tasksprint.handshake import (
    NONCE_SIZE,
    AuthError,
    Handshake,
    Hello,
    Proof,
    Side,
    proof_mac,
)

SECRET = b"test-cluster-secret"
NONCE_I = bytes(range(NONCE_SIZE))
NONCE_R = bytes(range(NONCE_SIZE, 2 * NONCE_SIZE))


def initiator(secret: bytes = SECRET, nonce: bytes = NONCE_I) -> Handshake:
    return Handshake.open(secret=secret, role="client", ident="c1", side=Side.INITIATOR, nonce=nonce)


def responder(secret: bytes = SECRET, nonce: bytes = NONCE_R) -> Handshake:
    return Handshake.open(secret=secret, role="replica", ident="r1", side=Side.RESPONDER, nonce=nonce)


def transcript(a: Handshake, b: Handshake) -> list[tuple[str, object]]:
    """Run the exchange between initiator ``a`` and responder ``b``; every frame, in order of sending."""
    sent: list[tuple[str, object]] = [("a", a.hello), ("b", b.hello)]
    a_inbox, b_inbox = [b.hello], [a.hello]
    while a_inbox or b_inbox:
        if b_inbox:
            for reply in b.receive(b_inbox.pop(0)):
                sent.append(("b", reply))
                a_inbox.append(reply)
        if a_inbox:
            for reply in a.receive(a_inbox.pop(0)):
                sent.append(("a", reply))
                b_inbox.append(reply)
    return sent


# --------------------------------------------------------------------------
# The proof


def test_proof_binds_side_role_ident_and_both_nonces():
    n1, n2 = b"\x01" * NONCE_SIZE, b"\x02" * NONCE_SIZE
    base = proof_mac(SECRET, Side.INITIATOR, "replica", "r1", n1, n2)
    assert len(base) == 32
    variants = [
        proof_mac(SECRET, Side.RESPONDER, "replica", "r1", n1, n2),
        proof_mac(SECRET, Side.INITIATOR, "client", "r1", n1, n2),
        proof_mac(SECRET, Side.INITIATOR, "replica", "r2", n1, n2),
        proof_mac(SECRET, Side.INITIATOR, "replica", "r1", n2, n1),
        proof_mac(SECRET, Side.INITIATOR, "replica", "r1", n1, n1),
        proof_mac(SECRET + b"x", Side.INITIATOR, "replica", "r1", n1, n2),
        # length prefixes keep the role/ident boundary unambiguous
        proof_mac(SECRET, Side.INITIATOR, "replicar", "1", n1, n2),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_proof_mac_matches_the_documented_layout_and_vectors():
    # Built by hand from docs/wire.md, independently of proof_mac.
    secret, ni, nr = b"example-secret", bytes(range(32)), bytes(range(32, 64))
    data = b"tasksprint-handshake-v1" + b"\x01" + b"\x00\x06client" + b"\x00\x02c1" + nr + ni
    mac_i = proof_mac(secret, Side.INITIATOR, "client", "c1", nr, ni)
    assert mac_i == hmac.new(secret, data, hashlib.sha256).digest()
    assert mac_i.hex() == "58f1e50738f43d4c96fc7b9e14142e6c9dc35b5cd05b214e67fa29481fd14f4f"
    mac_r = proof_mac(secret, Side.RESPONDER, "replica", "0", ni, nr)
    assert mac_r.hex() == "4ce09702d3f2ece4f3ac7045838e865e678ad56b4948393da0d645765e9b2a58"


def test_hello_and_proof_validate_their_fields():
    with pytest.raises(ValueError):
        Hello(nonce=b"short", role="r", ident="i")
    with pytest.raises(ValueError):
        Hello(nonce=bytes(NONCE_SIZE), role="", ident="i")
    with pytest.raises(TypeError):
        Hello(nonce=bytes(NONCE_SIZE), role=1, ident="i")
    with pytest.raises(ValueError):
        Hello(nonce=bytes(NONCE_SIZE), role="r", ident="\ud800")
    with pytest.raises(ValueError):
        Proof(mac=bytes(31))
    hello = Hello(nonce=bytes(NONCE_SIZE), role="r", ident="i")
    assert codec.decode_untrusted(codec.encode(hello)) == hello


# --------------------------------------------------------------------------
# The exchange


def test_transcript_is_hellos_then_the_initiators_proof_then_the_responders():
    a, b = initiator(), responder()
    sent = transcript(a, b)
    assert [(who, type(msg).__name__) for who, msg in sent] == [
        ("a", "Hello"),
        ("b", "Hello"),
        ("a", "Proof"),
        ("b", "Proof"),
    ]
    assert sent[2][1] == Proof(mac=proof_mac(SECRET, Side.INITIATOR, "client", "c1", NONCE_R, NONCE_I))
    assert sent[3][1] == Proof(mac=proof_mac(SECRET, Side.RESPONDER, "replica", "r1", NONCE_I, NONCE_R))
    assert a.done and b.done
    assert a.peer == b.hello and b.peer == a.hello


def test_responder_sends_nothing_until_the_initiator_proved_itself():
    b = responder()
    assert b.receive(initiator().hello) == []
    assert b.peer is None and not b.done


def test_responder_refuses_a_proof_made_with_another_secret():
    a, b = initiator(secret=b"another secret"), responder()
    b.receive(a.hello)
    (proof,) = a.receive(b.hello)
    with pytest.raises(AuthError, match="do not share the cluster secret"):
        b.receive(proof)
    assert b.peer is None and not b.done


def test_initiator_refuses_a_proof_made_with_another_secret():
    a, b = initiator(), responder(secret=b"another secret")
    b.receive(a.hello)
    (proof,) = a.receive(b.hello)
    (answer,) = b.receive(Proof(mac=proof_mac(b"another secret", Side.INITIATOR, "client", "c1", NONCE_R, NONCE_I)))
    with pytest.raises(AuthError, match="wrong proof"):
        a.receive(answer)
    assert a.peer is None


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda own_proof, peer_hello: own_proof, id="reflected"),
        pytest.param(
            lambda own_proof, peer_hello: Proof(
                mac=proof_mac(SECRET, Side.INITIATOR, peer_hello.role, peer_hello.ident, NONCE_I, peer_hello.nonce)
            ),
            id="wrong-side",
        ),
        pytest.param(lambda own_proof, peer_hello: Proof(mac=bytes(32)), id="zeros"),
    ],
)
def test_initiator_refuses_a_forged_proof(forge):
    a, b = initiator(), responder()
    (own_proof,) = a.receive(b.hello)
    with pytest.raises(AuthError):
        a.receive(forge(own_proof, b.hello))


def test_a_recorded_handshake_cannot_be_replayed_to_a_fresh_responder():
    a = initiator()
    recorded = [frame for who, frame in transcript(a, responder()) if who == "a"]
    fresh = responder(nonce=bytes(NONCE_SIZE))  # a new connection: the responder picks a new nonce
    hello, proof = recorded
    assert fresh.receive(hello) == []
    with pytest.raises(AuthError, match="wrong proof"):
        fresh.receive(proof)


def test_own_nonce_sent_back_is_refused():
    a = initiator()
    with pytest.raises(AuthError, match="our own nonce"):
        a.receive(Hello(nonce=NONCE_I, role="replica", ident="r1"))


@pytest.mark.parametrize("first", [Proof(mac=bytes(32)), "hello", None])
def test_first_frame_must_be_a_hello(first):
    with pytest.raises(AuthError, match="expected Hello as the first frame"):
        responder().receive(first)


def test_second_frame_must_be_a_proof():
    b = responder()
    b.receive(initiator().hello)
    with pytest.raises(AuthError, match="expected Proof from client 'c1', got Hello"):
        b.receive(initiator(nonce=bytes(NONCE_SIZE)).hello)


def test_a_failed_or_finished_handshake_takes_no_more_frames():
    a, b = initiator(), responder()
    transcript(a, b)
    with pytest.raises(RuntimeError, match="over"):
        a.receive(b.hello)
    c = responder()
    with pytest.raises(AuthError):
        c.receive("not a hello")
    with pytest.raises(RuntimeError, match="over"):
        c.receive(initiator().hello)


def test_closing_early_is_an_error_that_says_when():
    a, b = initiator(), responder()
    assert "before its Hello" in str(a.closed_error())
    a.receive(b.hello)
    assert "after our proof: it refused it" in str(a.closed_error())
    b.receive(initiator(nonce=bytes(NONCE_SIZE)).hello)
    assert "before sending its proof" in str(b.closed_error())


def test_handshake_checks_its_inputs():
    with pytest.raises(TypeError):
        Handshake.open(secret="text", role="c", ident="c", side=Side.INITIATOR, nonce=NONCE_I)
    with pytest.raises(ValueError):
        Handshake.open(secret=b"", role="c", ident="c", side=Side.INITIATOR, nonce=NONCE_I)
    with pytest.raises(ValueError):
        Handshake.open(secret=SECRET, role="c", ident="c", side=Side.INITIATOR, nonce=b"short")
    assert "test-cluster-secret" not in repr(initiator())
