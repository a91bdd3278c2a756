"""Content digests of files: what a model file, a pseudo label or a training checkpoint was
made from, so that a changed input is noticed even where the file's name stays the same."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_digest(groups: Mapping[str, Sequence[str | Path] | str | Path | None]) -> str:
    """Hex SHA-256 over named groups of files: each group's name, its number of files and,
    in the given order, each file's content digest (:func:`file_sha256`).

    ``groups``: ``{role: files}``, a role's files as a sequence, one path, or None (no
    files; the role still counts, so ``{"a": None}`` and ``{}`` differ). Paths enter only
    through their bytes: a renamed or moved copy of the same files gives the same digest,
    and a file rewritten with other content under the same name gives another one. Raises
    FileNotFoundError naming the role and file when one is missing.
    """
    h = hashlib.sha256()
    for role in sorted(groups):
        files = groups[role]
        paths = [] if files is None else [files] if isinstance(files, (str, Path)) else list(files)
        h.update(f"{role}:{len(paths)}\n".encode())
        for p in paths:
            try:
                h.update(bytes.fromhex(file_sha256(p)))
            except FileNotFoundError:
                raise FileNotFoundError(f"{role} file {p} does not exist") from None
    return h.hexdigest()
