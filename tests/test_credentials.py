"""Tests of tasksprint.credentials: reading the cluster secret file."""

from __future__ import annotations

import os

import pytest

from tasksprint.credentials import DEFAULT_SECRET, SecretError, load_secret


def test_load_secret_strips_trailing_whitespace(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"  c2VjcmV0IGJ5dGVz  \n\n")
    assert load_secret(path) == b"  c2VjcmV0IGJ5dGVz"
    assert load_secret(str(path)) == b"  c2VjcmV0IGJ5dGVz"


def test_load_secret_missing_file_says_how_to_create_one(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(SecretError) as info:
        load_secret(path)
    assert str(path) in str(info.value)
    assert "head -c 32 /dev/urandom | base64 >" in str(info.value)


@pytest.mark.parametrize("content", [b"", b" \n\t\r\n"])
def test_load_secret_empty_file(tmp_path, content):
    path = tmp_path / "secret"
    path.write_bytes(content)
    with pytest.raises(SecretError) as info:
        load_secret(path)
    assert str(path) in str(info.value)
    assert "/dev/urandom" in str(info.value)


def test_load_secret_unreadable_path(tmp_path):
    with pytest.raises(SecretError) as info:
        load_secret(tmp_path)  # a directory cannot be read as a file
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_load_secret_without_permission(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret")
    path.chmod(0)
    try:
        with pytest.raises(SecretError) as info:
            load_secret(path)
    finally:
        path.chmod(0o600)
    assert str(path) in str(info.value)


def test_default_secret_is_usable():
    assert isinstance(DEFAULT_SECRET, bytes) and len(DEFAULT_SECRET) >= 32


def test_no_default_secret_off_loopback():
    """Finding 6: without --secret-file a command starts only if every address it uses is loopback."""
    import argparse

    from tasksprint.launch import cluster_secret
    from tasksprint.wire import DEFAULT_SECRET, SecretError

    loopback = argparse.Namespace(secret_file=None, peers="127.0.0.1:7000,127.0.0.2:7001,[::1]:7002")
    assert cluster_secret(loopback) == DEFAULT_SECRET
    local_client = argparse.Namespace(secret_file=None, coordinators="localhost:7000", data_host="127.0.0.1")
    assert cluster_secret(local_client) == DEFAULT_SECRET
    for args in (
        argparse.Namespace(secret_file=None, peers="127.0.0.1:7000,10.0.0.2:7000,127.0.0.1:7002"),
        argparse.Namespace(secret_file=None, coordinators="127.0.0.1:7000", data_host="0.0.0.0"),
        argparse.Namespace(secret_file=None, coordinators="127.0.0.1:7000", listen="192.168.1.5:8470"),
    ):
        with pytest.raises(SecretError, match="--secret-file is required"):
            cluster_secret(args)


def test_a_replica_refuses_a_client_credential_as_its_secret(tmp_path):
    from tasksprint.cli import main
    from tasksprint.wire import client_credential

    credential = tmp_path / "client.credential"
    credential.write_bytes(client_credential(b"cluster-secret"))
    data = tmp_path / "data"
    data.mkdir()
    argv = ["replica", "--id", "0", "--peers", "127.0.0.1:1", "--data", str(data), "--secret-file", str(credential)]
    assert main(argv) == 2
