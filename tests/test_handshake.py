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
from tasksprint.codec import BadMessage
from tasksprint.handshake import (
    NONCE_SIZE,
    AuthError,
    Handshake,
    Hello,
    Proof,
    Side,
    client_credential,
    parse_frame,
    proof_mac,
    role_keys,
)

SECRET = b"test-cluster-secret"
KEY = role_keys(SECRET).client  # the key of every connection but replica-to-replica
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


def hello(role: str, ident: str, nonce: bytes) -> Hello:
    return Hello(nonce=nonce, role=role, ident=ident)


def test_proof_binds_side_both_roles_both_idents_and_both_nonces():
    n1, n2 = b"\x01" * NONCE_SIZE, b"\x02" * NONCE_SIZE
    i, r = hello("client", "c1", n1), hello("replica", "0", n2)
    base = proof_mac(KEY, Side.INITIATOR, i, r)
    assert len(base) == 32
    variants = [
        proof_mac(KEY, Side.RESPONDER, i, r),
        proof_mac(KEY, Side.INITIATOR, hello("data", "c1", n1), r),
        proof_mac(KEY, Side.INITIATOR, hello("client", "c2", n1), r),
        proof_mac(KEY, Side.INITIATOR, i, hello("replica", "1", n2)),  # another responder: no relaying
        proof_mac(KEY, Side.INITIATOR, i, hello("client", "0", n2)),
        proof_mac(KEY, Side.INITIATOR, hello("client", "c1", n2), hello("replica", "0", n1)),
        proof_mac(KEY + b"x", Side.INITIATOR, i, r),
        # length prefixes keep the role/ident boundary unambiguous
        proof_mac(KEY, Side.INITIATOR, hello("clientc", "1", n1), r),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_proof_mac_and_role_keys_match_the_documented_layout_and_vectors():
    # Built by hand from docs/wire.md, independently of proof_mac and role_keys.
    secret, ni, nr = b"example-secret", bytes(range(32)), bytes(range(32, 64))
    client_key = hmac.new(secret, b"tasksprint-role-key-v1:client", hashlib.sha256).digest()
    replica_key = hmac.new(secret, b"tasksprint-role-key-v1:replica", hashlib.sha256).digest()
    keys = role_keys(secret)
    assert (keys.client, keys.replica) == (client_key, replica_key)
    data = (
        b"tasksprint-handshake-v2"
        + b"\x01"
        + (b"\x00\x06client" + b"\x00\x02c1" + ni)
        + (b"\x00\x07replica" + b"\x00\x010" + nr)
    )
    mac_i = proof_mac(client_key, Side.INITIATOR, hello("client", "c1", ni), hello("replica", "0", nr))
    assert mac_i == hmac.new(client_key, data, hashlib.sha256).digest()
    assert mac_i.hex() == VECTOR_I
    mac_r = proof_mac(replica_key, Side.RESPONDER, hello("replica", "1", ni), hello("replica", "0", nr))
    assert mac_r.hex() == VECTOR_R


VECTOR_I = "a53a315b1169f403b24c286844c61fa14d12d2f7bfaea614cb4f401aefc0006b"
VECTOR_R = "2d66e72bac0e9be9ed77e77ed72b35e2e6e025ed832f5f709a2759cbbec4a5b8"


def test_a_client_credential_holds_the_client_key_only():
    credential = client_credential(SECRET)
    assert credential.startswith(b"tasksprint-client-key-v1:") and credential.endswith(b"\n")
    keys = role_keys(credential.strip())
    assert keys.replica is None and keys.client == role_keys(SECRET).client
    with pytest.raises(ValueError, match="cannot act as a replica"):
        Handshake.open(secret=credential, role="replica", ident="0", side=Side.INITIATOR, nonce=NONCE_I)
    with pytest.raises(ValueError, match="64 hex digits"):
        role_keys(b"tasksprint-client-key-v1:abcd")


def test_a_client_credential_talks_to_a_replica_but_cannot_pass_as_one():
    """Finding 6: a worker machine's credential never authenticates as a replica."""
    credential = client_credential(SECRET)
    a = Handshake.open(secret=credential, role="client", ident="w1", side=Side.INITIATOR, nonce=NONCE_I)
    b = responder()
    transcript(a, b)
    assert a.done and b.done
    # Claiming the replica role with the client key: the proof is made with
    # the client key (all it has) and the responder wants the replica key.
    forged = Hello(nonce=NONCE_I, role="replica", ident="2")
    b = responder()
    assert b.receive(forged) == []
    mac = proof_mac(role_keys(credential).client, Side.INITIATOR, forged, b.hello)
    with pytest.raises(AuthError, match="replica key"):
        b.receive(Proof(mac=mac))


def test_a_proof_relayed_to_another_replica_is_refused():
    """Finding 6: the proof names the responder, so a man in the middle cannot relay it elsewhere."""
    a = Handshake.open(secret=SECRET, role="replica", ident="0", side=Side.INITIATOR, nonce=NONCE_I)
    # The attacker answers replica 0 with replica 2's nonce but says it is replica 1.
    victim = Handshake.open(secret=SECRET, role="replica", ident="2", side=Side.RESPONDER, nonce=NONCE_R)
    (proof,) = a.receive(Hello(nonce=NONCE_R, role="replica", ident="1"))
    assert victim.receive(a.hello) == []
    with pytest.raises(AuthError, match="wrong proof"):
        victim.receive(proof)


def test_an_initiator_refuses_a_responder_that_is_not_the_one_it_called():
    a = Handshake.open(
        secret=SECRET, role="replica", ident="0", side=Side.INITIATOR, nonce=NONCE_I, expect=("replica", "1")
    )
    with pytest.raises(AuthError, match="expected replica '1'"):
        a.receive(Hello(nonce=NONCE_R, role="replica", ident="2"))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xd9\xea\x89\x84\x65Hello",
        codec.encode(Hello(nonce=NONCE_I, role="r", ident="i")) + b"\x00",
        codec.encode(["Hello", NONCE_I, "r", "i"]),
        # Shared references (tag 28/29): the general decoder would build a DAG.
        b"\xd8\x1c" + codec.encode(Hello(nonce=NONCE_I, role="r", ident="i")),
        codec.encode(Hello(nonce=NONCE_I, role="r", ident="i")).replace(b"\x58\x20", b"\x5a\x00\x00\x00\x20"),
        b"\xd9\xea\x89\x82\x65Proof\x58\x20" + bytes(31),
        b"\xd9\xea\x89\x84\x65Hello\x58\x20" + NONCE_I + b"\x61r\x62\xff\xfe",
    ],
)
def test_the_fixed_shape_parser_takes_exactly_the_two_handshake_frames(body):
    with pytest.raises(BadMessage):
        parse_frame(body)


def test_the_fixed_shape_parser_reads_what_the_encoder_writes():
    for msg in [
        Hello(nonce=NONCE_I, role="client", ident=""),
        Hello(nonce=NONCE_R, role="r" * 64, ident="é" * 256),
        Proof(mac=bytes(range(32))),
    ]:
        assert parse_frame(codec.encode(msg)) == msg


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
    assert sent[2][1] == Proof(mac=proof_mac(KEY, Side.INITIATOR, a.hello, b.hello))
    assert sent[3][1] == Proof(mac=proof_mac(KEY, Side.RESPONDER, a.hello, b.hello))
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
    with pytest.raises(AuthError, match="does not hold the client key"):
        b.receive(proof)
    assert b.peer is None and not b.done


def test_initiator_refuses_a_proof_made_with_another_secret():
    a, b = initiator(), responder(secret=b"another secret")
    b.receive(a.hello)
    (proof,) = a.receive(b.hello)
    other = role_keys(b"another secret").client
    (answer,) = b.receive(Proof(mac=proof_mac(other, Side.INITIATOR, a.hello, b.hello)))
    with pytest.raises(AuthError, match="wrong proof"):
        a.receive(answer)
    assert a.peer is None


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda own_proof, peer_hello: own_proof, id="reflected"),
        pytest.param(
            lambda own_proof, peer_hello: Proof(mac=proof_mac(KEY, Side.INITIATOR, initiator().hello, peer_hello)),
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
