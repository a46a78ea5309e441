"""The DATA reader: the message body from after the 354 up to `<CRLF>.<CRLF>`, dot-unstuffed.

One job: read exactly one message body from an asyncio StreamReader. Only `<CRLF>.<CRLF>` ends
the data (RFC 5321 4.1.1.4): `<LF>.<LF>`, `<LF>.<CRLF>` and `<CR>.<CR>` are content, so no
smuggling probe can end a message early or start a second one. Lines may end in a bare LF or
be of any length (copiers send both; the normaliser fixes them later), unlike aiosmtpd's own
reader, which answers `500 Line too long`. A leading dot is removed from every line that starts
after an LF, the way clients stuff them. Past `limit` bytes the rest is read and dropped, so the
client still gets its reply after the final dot. Bytes after the end marker stay in the reader
for the next pipelined command.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

END_LINE = b".\r\n"
TAIL = 48
_BARE_LF_END = re.compile(rb"(?<!\r)\n\.(?:\n[^\n]{0,16}){0,2}\n?\Z")
PROGRESS_EVERY = 64 * 1024


@dataclass(frozen=True)
class DataResult:
    data: bytes | None  # None when the message was larger than the limit
    size: int  # bytes received after unstuffing (counted even past the limit)


class DataAborted(Exception):
    """The connection closed before the end of the data."""


class DataReader:
    """Reads one message body; `tail` keeps the last bytes seen, for diagnostics when the
    client goes away before the end (or the reading task is cancelled)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        limit: int,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self._reader = reader
        self._limit = limit
        self._on_progress = on_progress
        self.tail = b""

    @property
    def ended_with_bare_lf_dot(self) -> bool:
        """The client meant to end the data but used `<LF>.<LF>` (a shell script's echo), maybe
        followed by a `quit` line that it took for a command."""
        return bool(_BARE_LF_END.search(self.tail))

    async def read(self) -> DataResult:
        """The body, unstuffed. Raises DataAborted if the connection closes first."""
        buffer = io.BytesIO()  # getvalue() hands over its buffer: no join, no per-line objects
        size = 0
        last_byte = b"\n"  # the CRLF that ended the DATA command line
        after_crlf = True
        since_progress = 0
        while True:
            raw = await self._next_piece()
            if after_crlf and raw == END_LINE:
                return DataResult(buffer.getvalue() if size <= self._limit else None, size)
            self.tail = (self.tail + raw)[-TAIL:]
            after_crlf = raw.endswith(b"\r\n") or (raw == b"\n" and last_byte == b"\r")
            piece = raw[1:] if last_byte == b"\n" and raw.startswith(b".") else raw
            last_byte = raw[-1:]
            size += len(piece)
            if size <= self._limit:
                buffer.write(piece)
            elif buffer.tell():
                buffer = io.BytesIO()  # too big: read on to the end, keep nothing
            since_progress += len(raw)
            if since_progress >= PROGRESS_EVERY:
                since_progress = 0
                self._on_progress()

    async def _next_piece(self) -> bytes:
        """A line up to and including its LF, or a chunk of a line too long to buffer."""
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as overrun:
            return await self._reader.readexactly(overrun.consumed)
        except asyncio.IncompleteReadError as partial:
            self.tail = (self.tail + partial.partial)[-TAIL:]
            raise DataAborted from None
