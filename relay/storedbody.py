"""A spooled message body too large to hold in memory, read back in pieces for delivery.

One job: name a body file and its size, and read its first bytes (where the header block is)
and then pieces that end at line ends where they can (so an SMTP client can dot-stuff piece
by piece). Limits: the
file must not change while it is read (spool bodies are written once); reads are blocking,
so async callers run them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

PIECE = 256 * 1024
HEADER_LIMIT = 4 * 1024 * 1024  # a header block this long is sent on as body


@dataclass(frozen=True)
class StoredBody:
    path: Path
    size: int
    piece: int = PIECE  # bytes read at a time

    def read(self) -> bytes:
        """All of it (for an upstream that needs the whole message)."""
        return self.path.read_bytes()

    def start(self, limit: int = HEADER_LIMIT) -> bytes:
        """The first `limit` bytes (all of a shorter body): where its header block is."""
        with self.path.open("rb") as file:
            return file.read(limit)

    def pieces(self, offset: int) -> Generator[bytes, None, None]:
        """From `offset` to the end, about `piece` bytes at a time, each cut just after an LF
        where the piece has one; a longer run without LF is cut at `piece` bytes, never
        between a CR and what follows it."""
        with self.path.open("rb") as file:
            file.seek(offset)
            carry = b""
            while piece := file.read(self.piece):
                piece = carry + piece
                cut = piece.rfind(b"\n") + 1 or len(piece) - piece.endswith(b"\r")
                carry = piece[cut:]
                if cut:
                    yield piece[:cut]
            if carry:
                yield carry


MessageBody = bytes | StoredBody
