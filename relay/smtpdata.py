"""The DATA reader: the message body from after the 354 up to `<CRLF>.<CRLF>`, dot-unstuffed.

One job: read exactly one message body from an asyncio StreamReader. Only `<CRLF>.<CRLF>` ends
the data (RFC 5321 4.1.1.4): `<LF>.<LF>`, `<LF>.<CRLF>` and `<CR>.<CR>` are content, so no
smuggling probe can end a message early or start a second one. Lines may end in a bare LF or
be of any length (copiers send both; the normaliser fixes them later), unlike aiosmtpd's own
reader, which answers `500 Line too long`. A leading dot is removed from every line that starts
after an LF, the way clients stuff them. Past `limit` bytes the rest is read and dropped, so the
client still gets its reply after the final dot. Bytes after the end marker stay in the reader
for the next pipelined command. The body is collected in memory, or handed piece by piece to
a `BodySink` (the relay's keeps large bodies in a file: relay.received).

The body is read in large pieces, not lines: the stream reader finds the end marker in C, and
a piece is unstuffed with one `bytes.replace`. While the last bytes received could begin an
end marker (after a CR or CRLF, at the start), bytes are read one at a time until they
complete it or cannot, so nothing past the end is ever read; otherwise a piece runs up to the
whole `<CRLF>.<CRLF>`, which the stream reader never splits between two pieces.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

END_LINE = b".\r\n"
END_OF_DATA = b"\r\n.\r\n"
HELD = (b"\r\n.", b"\r\n.\r")  # not yet data: the rest may make them the end marker
TAIL = 48
_BARE_LF_END = re.compile(rb"(?<!\r)\n\.(?:\n[^\n]{0,16}){0,2}\n?\Z")
PROGRESS_EVERY = 64 * 1024


@dataclass(frozen=True)
class DataResult:
    data: bytes | None  # None when the message was larger than the limit
    size: int  # bytes received after unstuffing (counted even past the limit)


class BodySink(Protocol):
    """Where a body goes while it arrives, when not into memory (see relay.received)."""

    async def write(self, data: bytes) -> None: ...

    def drop(self) -> None:
        """The body is over the limit: keep nothing; no more writes follow."""


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
        sink: BodySink | None = None,
    ) -> None:
        self._reader = reader
        self._limit = limit
        self._on_progress = on_progress
        self._sink = sink
        self.tail = b""

    @property
    def ended_with_bare_lf_dot(self) -> bool:
        """The client meant to end the data but used `<LF>.<LF>` (a shell script's echo), maybe
        followed by a `quit` line that it took for a command."""
        return bool(_BARE_LF_END.search(self.tail))

    async def read(self) -> DataResult:
        """The body, unstuffed (with a sink, `data` is b"": the body went to the sink).
        Raises DataAborted if the connection closes first."""
        try:
            return await self._read()
        except asyncio.CancelledError:  # the session ended (EOF, timeout) while we waited
            self._note_unread()
            raise

    def _note_unread(self) -> None:
        """Add what the stream reader holds but we had not asked for yet to `tail` (a piece
        waits for the end marker, so the last lines may still be there). StreamReader has no
        public peek; without its buffer the diagnostics just see less."""
        unread = getattr(self._reader, "_buffer", b"")
        if isinstance(unread, bytes | bytearray):
            self.tail = (self.tail + bytes(unread[-TAIL:]))[-TAIL:]

    async def _read(self) -> DataResult:
        buffer = io.BytesIO()  # getvalue() hands over its buffer: no join
        size = 0
        before = b"\r\n"  # the last bytes received: at first, the DATA command's CRLF
        held = b""  # "." or ".\r" after a CRLF: the end marker, or content once more arrives
        last = b"\n"  # the byte before the next data (a dot after an LF is a stuffed one)
        since_progress = 0
        while True:
            if _end_started(before):  # a byte at a time, until it is or is not the end
                raw = await self._exactly(1)
                before = (before + raw)[-4:]
                ended = before.endswith(END_OF_DATA[1:]) and held == END_OF_DATA[2:4]
                if ended or before.endswith(HELD):
                    held += raw
                    data = b""
                else:
                    data, held = held + raw, b""
            else:
                raw, ended = await self._next_piece()
                before = (before + raw[-4:])[-4:]
                data = raw[: -len(END_LINE)] if ended else raw
            self.tail = (self.tail + raw[-TAIL:])[-TAIL:]
            if data:
                unstuffed = data[1:] if last == b"\n" and data[:1] == b"." else data
                last = data[-1:]
                unstuffed = unstuffed.replace(b"\n.", b"\n")
                over = size > self._limit
                size += len(unstuffed)
                if size <= self._limit:
                    if self._sink is None:
                        buffer.write(unstuffed)
                    else:
                        await self._sink.write(unstuffed)
                elif not over:  # too big: read on to the end, keep nothing
                    buffer = io.BytesIO()
                    if self._sink is not None:
                        self._sink.drop()
            if ended:
                return DataResult(buffer.getvalue() if size <= self._limit else None, size)
            since_progress += len(raw)
            if since_progress >= PROGRESS_EVERY:
                since_progress = 0
                self._on_progress()

    async def _next_piece(self) -> tuple[bytes, bool]:
        """Everything up to and including the next end marker (True), or as much as is
        buffered without one (False). An end marker never straddles two pieces: the stream
        reader searches all it holds and keeps a partial one back."""
        try:
            return await self._reader.readuntil(END_OF_DATA), True
        except asyncio.LimitOverrunError as overrun:
            return await self._exactly(overrun.consumed), False
        except asyncio.IncompleteReadError as partial:
            self._aborted(partial.partial)

    async def _exactly(self, count: int) -> bytes:
        try:
            return await self._reader.readexactly(count)
        except asyncio.IncompleteReadError as partial:
            self._aborted(partial.partial)

    def _aborted(self, partial: bytes) -> NoReturn:
        self.tail = (self.tail + partial[-TAIL:])[-TAIL:]
        raise DataAborted from None


def _end_started(before: bytes) -> int:
    """How many bytes of an end marker `before` ends with (0: none): the longest of `\r`,
    `\r\n`, `\r\n.`, `\r\n.\r`. Reading the rest of the marker, no more, cannot
    read past the end of the data."""
    return max(
        (n for n in range(1, len(END_OF_DATA)) if before.endswith(END_OF_DATA[:n])), default=0
    )
