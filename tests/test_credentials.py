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
