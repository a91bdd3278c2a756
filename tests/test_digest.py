"""semiseg.io.digest: content digests of files and of named groups of files."""

from __future__ import annotations

import hashlib

import pytest

from semiseg.io.digest import file_sha256, files_digest


def test_file_sha256_is_the_bytes_digest(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * (3 << 20))  # several read blocks
    assert file_sha256(p) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_files_digest_follows_content_order_and_roles(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    base = files_digest({"labelled": [a, b], "prototypes": None})
    # A copy under another name: the same content, the same digest.
    (tmp_path / "sub").mkdir()
    a2 = tmp_path / "sub" / "renamed"
    a2.write_bytes(b"one")
    assert files_digest({"labelled": [a2, b], "prototypes": None}) == base
    assert files_digest({"prototypes": None, "labelled": (a, b)}) == base  # role order does not matter
    # Another order, another role, a role without files, another content: another digest.
    assert files_digest({"labelled": [b, a], "prototypes": None}) != base
    assert files_digest({"unlabelled": [a, b], "prototypes": None}) != base
    assert files_digest({"labelled": [a, b]}) != base
    assert files_digest({"labelled": [a], "prototypes": b}) != files_digest({"labelled": [a, b]})
    b.write_bytes(b"two!")
    assert files_digest({"labelled": [a, b], "prototypes": None}) != base


def test_files_digest_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pseudo file .*missing.h5 does not exist"):
        files_digest({"pseudo": [tmp_path / "missing.h5"]})
