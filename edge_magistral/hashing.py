"""The one sha256 loop: every file hashed by the build, the store and admission is read here, in
chunks, with an optional :data:`~edge_magistral.progress.Advance` told the bytes done."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

from edge_magistral.progress import Advance

CHUNK = 8 * 1024 * 1024


def chunks(f: BinaryIO, advance: Advance | None = None) -> Iterator[bytes]:
    """The rest of an open file in :data:`CHUNK` pieces; ``advance`` hears each piece's size."""
    while chunk := f.read(CHUNK):
        if advance is not None:
            advance(len(chunk))
        yield chunk


def sha256_stream(f: BinaryIO, advance: Advance | None = None) -> str:
    """sha256 (hex) of the rest of an open file: hashes the very bytes of that open file."""
    h = hashlib.sha256()
    for chunk in chunks(f, advance):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str], advance: Advance | None = None) -> str:
    """sha256 (hex) of a file."""
    with open(path, "rb") as f:
        return sha256_stream(f, advance)


class Digest:
    """A running sha256 for bytes that arrive in pieces (a download, a copy), plus git's blob sha1
    when the hub's etag is one (its non-LFS files are checked against that)."""

    def __init__(self, size: int, etag: str = ""):
        self.sha256 = hashlib.sha256()
        self.git = hashlib.sha1(b"blob %d\0" % size) if re.fullmatch(r"[0-9a-f]{40}", etag) else None

    def update(self, b: bytes) -> None:
        self.sha256.update(b)
        if self.git is not None:
            self.git.update(b)

    def update_from(self, f: BinaryIO, advance: Advance | None = None) -> None:
        """Add the rest of an open file (the bytes an earlier, interrupted download left)."""
        for chunk in chunks(f, advance):
            self.update(chunk)

    def hexdigest(self) -> str:
        """The digest the hub's etag is comparable with."""
        return (self.git or self.sha256).hexdigest()

    def sha256_hex(self) -> str:
        return self.sha256.hexdigest()

    def matches(self, etag: str) -> bool:
        return self.hexdigest() == etag
