"""Mutual TLS around the wire protocol (``--tls-cert``, ``--tls-key``, ``--tls-ca``).

Certificates come from a throwaway CA (trustme).  In process: frames go
through TLS both ways; a peer without a certificate of the CA, or a plain
TCP peer, is refused and logged while the server goes on serving.  With
real processes: three replicas started with the flags elect a leader and
apply commands from a client using the same CA.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from tasksprint import wire
from tasksprint.launch import configure_tls
from tasksprint.localcluster import HOST, free_ports

SECRET = b"tls-test-secret"
GUARD_SECONDS = 60  # only so that a hang fails


def files(tmp_path: Path, ca: trustme.CA, name: str) -> tuple[Path, Path, Path]:
    cert = ca.issue_cert(HOST, "localhost")
    paths = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key", tmp_path / f"{name}-ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return paths


async def echo(conn: wire.Connection) -> None:
    while True:
        await conn.send(await conn.receive())


def test_frames_travel_inside_mutual_tls_and_strangers_are_refused(tmp_path):
    ca = trustme.CA()
    tls = wire.TLS.from_files(*files(tmp_path, ca, "good"))
    stranger = wire.TLS.from_files(*files(tmp_path, trustme.CA(), "stranger"))

    async def main() -> None:
        with trio.fail_after(GUARD_SECONDS):
            async with trio.open_nursery() as nursery:
                server = wire.Endpoint(secret=SECRET, role="replica", ident="0", tls=tls)
                listeners = await nursery.start(functools.partial(wire.serve, echo, HOST, 0, server))
                port = listeners[0].socket.getsockname()[1]
                conn = await wire.connect(HOST, port, wire.Endpoint(secret=SECRET, role="client", ident="c", tls=tls))
                async with conn:
                    assert isinstance(conn._stream, trio.SSLStream)
                    await conn.send({"through": "tls"})
                    assert await conn.receive() == {"through": "tls"}
                # A certificate of another CA, or no TLS at all: no connection.
                for other in (stranger, None):
                    with pytest.raises(wire.NETWORK_ERRORS):
                        await wire.connect(
                            HOST, port, wire.Endpoint(secret=SECRET, role="client", ident="x", tls=other)
                        )
                conn = await wire.connect(HOST, port, wire.Endpoint(secret=SECRET, role="client", ident="c", tls=tls))
                async with conn:
                    await conn.send("still serving")
                    assert await conn.receive() == "still serving"
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_idle_tls_connection_is_closed_and_the_server_goes_on(tmp_path):
    """The idle timer closes a connection whose receive waits inside TLS as it does a plain one."""
    tls = wire.TLS.from_files(*files(tmp_path, trustme.CA(), "good"))
    ended: list[BaseException] = []

    async def serve_one(conn: wire.Connection) -> None:
        try:
            await echo(conn)
        except BaseException as exc:
            ended.append(exc)
            raise

    async def main() -> None:
        with trio.fail_after(GUARD_SECONDS):
            async with trio.open_nursery() as nursery:
                server = wire.Endpoint(secret=SECRET, role="replica", ident="0", tls=tls, limits=wire.Limits(idle=0.2))
                listeners = await nursery.start(functools.partial(wire.serve, serve_one, HOST, 0, server))
                port = listeners[0].socket.getsockname()[1]
                client = wire.Endpoint(secret=SECRET, role="client", ident="c", tls=tls)
                async with await wire.connect(HOST, port, client) as conn:
                    with pytest.raises(wire.NETWORK_ERRORS):
                        await conn.receive()  # nothing sent: the server closes it once idle
                assert [type(e) for e in ended] == [wire.IdleTimeout]
                async with await wire.connect(HOST, port, client) as conn:
                    await conn.send("still serving")
                    assert await conn.receive() == "still serving"
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_tls_flags_must_come_together_and_name_usable_files(tmp_path):
    import argparse

    cert, key, ca = files(tmp_path, trustme.CA(), "x")
    with pytest.raises(wire.SecretError, match="all three"):
        configure_tls(argparse.Namespace(tls_cert=cert, tls_key=key, tls_ca=None))
    with pytest.raises(wire.SecretError, match="--tls-ca"):
        configure_tls(argparse.Namespace(tls_cert=cert, tls_key=key, tls_ca=tmp_path / "missing.pem"))


@pytest.mark.slow
def test_replicas_started_with_tls_flags_serve_a_tls_client(tmp_path):
    cert, key, ca_file = files(tmp_path, trustme.CA(), "node")
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(b"a-cluster-secret-for-tls\n")
    ports = free_ports(3)
    peers = ",".join(f"{HOST}:{p}" for p in ports)
    procs = []
    try:
        for i in range(3):
            (tmp_path / f"r{i}").mkdir()
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tasksprint.cli", "replica", "--id", str(i), "--peers", peers]
                    + ["--data", str(tmp_path / f"r{i}"), "--secret-file", str(secret), "--log-format", "json"]
                    + ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca_file)],
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / f"r{i}.log", "wb"),  # noqa: SIM115 (closed with the process)
                )
            )
        tls = wire.TLS.from_files(cert, key, ca_file)

        async def main() -> None:
            from tasksprint.log_client import LogClient

            addrs = [(HOST, p) for p in ports]
            wire.use_tls(tls)
            try:
                with trio.fail_after(GUARD_SECONDS):
                    async with LogClient(addrs, b"a-cluster-secret-for-tls") as lc:
                        assert await lc.submit(["append", "k", 1], deadline=GUARD_SECONDS) == 1
            finally:
                wire.use_tls(None)
            # Without TLS the same client cannot even complete a connection.
            with pytest.raises(wire.NETWORK_ERRORS):
                await wire.connect(
                    HOST, ports[0], wire.Endpoint(secret=b"a-cluster-secret-for-tls", role="client", ident="p")
                )

        trio.run(main)
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
