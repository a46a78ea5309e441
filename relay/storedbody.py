"""A spooled message body too large to hold in memory, read back in pieces for delivery.

One job: name a body file and its size, and read it as its header block and then as pieces
that each end at a line end (so an SMTP client can dot-stuff piece by piece). Limits: the
file must not change while it is read (spool bodies are written once); reads are blocking,
so async callers run them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
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

    def header_block(self) -> bytes:
        """The bytes up to and including the first empty line (`b""` when there is none in
        the first HEADER_LIMIT bytes: then nothing counts as header)."""
        with self.path.open("rb") as file:
            start = file.read(HEADER_LIMIT)
        end = start.find(b"\r\n\r\n")
        if start.startswith(b"\r\n"):
            return b"\r\n"
        return start[: end + 4] if end >= 0 else b""

    def pieces(self, offset: int) -> Iterator[bytes]:
        """From `offset` to the end, about `piece` bytes at a time, each but the last ending
        with an LF (a line longer than `piece` comes as one longer piece)."""
        with self.path.open("rb") as file:
            file.seek(offset)
            carry = b""
            while piece := file.read(self.piece):
                piece = carry + piece
                cut = piece.rfind(b"\n") + 1
                if cut == 0:
                    carry = piece
                    continue
                carry = piece[cut:]
                yield piece[:cut]
            if carry:
                yield carry


MessageBody = bytes | StoredBody
