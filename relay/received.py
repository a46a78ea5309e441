"""A message body while DATA arrives, and the body file a large one is committed from.

One job: keep the body of one DATA in memory up to `spill_at` bytes, and past that in a
private file in the spool's tmp/ (the Received: line first), written in a worker thread a
few hundred KiB at a time, so a session holds about `spill_at` bytes whatever the message
size. Once the data is complete, `inspect_spilled` and a `settle_*` function turn a spilled
body into the file to commit: when the body needs no normalising (CRLF only, ASCII, no line
over 998, checked a window at a time) only the header block is normalised, from the file's
first bytes, and the file is kept (or its body copied in the kernel behind a new header
block); otherwise the message is normalised in memory like a small one, which callers should
do one at a time.

Limits: the file is written but not fsynced here (the commit does that through the same
handle). Copying behind a new header block reads the data back through the page cache
without an fsync first: a write-back error on it that is followed by eviction before the
copy would go unseen. A spilled file that is never committed is removed by `discard`, or
by spool recovery at the next start. Blocking calls: async callers use worker threads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from relay.normalize import (
    Normalized,
    body_is_clean,
    header_length,
    normalize_head,
    normalize_message,
)
from relay.osutil import copy_range, open_private_file, unlink_quietly
from relay.policy import header_message_id, header_too_large
from relay.spool import BodyFile

SPILL_AT = 1024 * 1024  # bytes of body kept in memory before it goes to a file
WRITE_AT = 256 * 1024  # bytes gathered before each write of a spilled body
SCAN_WINDOW = 1024 * 1024

OpenFile = Callable[[], tuple[Path, IO[bytes]]]


@dataclass(frozen=True)
class Spilled:
    """A complete body in a file: `head` (the Received: line) then the data as received."""

    path: Path
    file: IO[bytes]
    head: bytes
    size: int  # of the file: head and data


class ReceivingBody:
    """The sink the DATA reader writes the unstuffed body to."""

    def __init__(self, open_file: OpenFile, *, head: bytes, spill_at: int = SPILL_AT) -> None:
        self._open_file = open_file
        self._head = head
        self._spill_at = spill_at
        self._pieces: list[bytes] = []
        self._held = 0  # bytes in _pieces
        self._written = 0  # bytes in the file
        self._path: Path | None = None
        self._file: IO[bytes] | None = None
        self._dropped = False
        self.error: OSError | None = None  # the file could not be made or written

    @property
    def spilled(self) -> bool:
        return self._file is not None

    async def write(self, data: bytes) -> None:
        """Never raises: a failure to write is kept in `error`, the rest of the data is
        dropped (the reader reads on to the end, so no body line is taken for a command)."""
        if self._dropped:
            return
        self._pieces.append(data)
        self._held += len(data)
        try:
            if self._file is None and self._held > self._spill_at:
                self._path, self._file = await self._opened()
                self._pieces.insert(0, self._head)
                self._held += len(self._head)
            if self._file is not None and self._held >= WRITE_AT:
                await self._write_held()
        except OSError as exc:
            self.error = exc
            self.drop()

    async def _opened(self) -> tuple[Path, IO[bytes]]:
        """The file, created in a worker thread; closed and removed if the session ends
        before the thread is done."""
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_file))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise

    def drop(self) -> None:
        """The message is over the size limit: keep nothing more, free what is held."""
        self._dropped = True
        self._pieces, self._held = [], 0
        self.discard()

    async def finish(self) -> bytes | Spilled:
        """The body in memory, or the complete file (written, not fsynced). OSError when
        the file could not be written."""
        if self.error is not None:
            raise self.error
        if self._file is None or self._path is None:
            data = b"".join(self._pieces)
            self._pieces, self._held = [], 0
            return data
        try:
            await self._write_held()
            await asyncio.to_thread(self._file.flush)
        except OSError:
            self.discard()
            raise
        return Spilled(self._path, self._file, self._head, self._written)

    def discard(self) -> None:
        """Close and remove the file, if any (idempotent; harmless after a commit took it)."""
        if self._file is not None:
            self._file.close()
        if self._path is not None:
            unlink_quietly(self._path)
        self._file = self._path = None

    async def _write_held(self) -> None:
        file = self._file
        if file is None or not self._pieces:
            return
        data = b"".join(self._pieces)
        self._pieces, self._held = [], 0
        await asyncio.to_thread(file.write, data)
        self._written += len(data)


def _close_opened(opening: asyncio.Future[tuple[Path, IO[bytes]]]) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    path, file = opening.result()
    file.close()
    unlink_quietly(path)


@dataclass(frozen=True)
class Settled:
    """A spilled message ready to commit."""

    body: BodyFile
    normalized: Normalized  # `data` is b"": the data is in the file
    message_id: str  # its Message-ID:, for the log line that traces it


def as_received(spilled: Spilled) -> Settled:
    """The file as it is: for when normalising failed (never expected)."""
    body = BodyFile(spilled.path, spilled.file, spilled.size)
    return Settled(body, Normalized(b"", (), eightbit=True, needs_smtputf8=False), "")


@dataclass(frozen=True)
class Normalizing:
    """What `normalize_message` needs besides the data."""

    envelope_from: str
    hostname: str
    now: datetime
    smtputf8: bool


@dataclass(frozen=True)
class Inspection:
    """What one pass over a spilled message found."""

    header_too_large: bool = False
    head: bytes | None = None  # the header block, when only it needs normalising


def inspect_spilled(spilled: Spilled, max_header_size: int) -> Inspection:
    """Whether the header block is over `max_header_size`, and else the header block when
    the body needs no normalising (`head` None: the whole message must be normalised in
    memory). Reads the file once, a window at a time."""
    file = spilled.file
    file.seek(len(spilled.head))
    window = file.read(max_header_size + SCAN_WINDOW)
    if header_too_large(window, max_header_size):
        return Inspection(header_too_large=True)
    data_size = spilled.size - len(spilled.head)
    body_from = header_length(window, whole=len(window) == data_size)
    if body_from is None or not body_is_clean(_chunks(file, window), body_from=body_from):
        return Inspection()
    return Inspection(head=window[:body_from])


def settle_header_only(spilled: Spilled, head: bytes, how: Normalizing) -> Settled:
    """Normalise the header block `head` of a clean spilled message (as `inspect_spilled`
    found it); keep its body as it is."""
    body_from = len(head)
    data_size = spilled.size - len(spilled.head)
    normalized = normalize_head(
        head,
        body_follows=data_size > body_from,
        envelope_from=how.envelope_from,
        hostname=how.hostname,
        now=how.now,
        smtputf8=how.smtputf8,
    )
    settled = _kept(normalized)
    message_id = header_message_id(normalized.data)
    if normalized.data is head:
        return Settled(BodyFile(spilled.path, spilled.file, spilled.size), settled, message_id)
    start = len(spilled.head) + body_from
    body = _replace(spilled, (spilled.head, normalized.data), body_at=start)
    return Settled(body, settled, message_id)


def settle_in_memory(spilled: Spilled, how: Normalizing) -> Settled:
    """Normalise a spilled message that needs its body changed: read whole, as if small."""
    file = spilled.file
    file.seek(len(spilled.head))
    normalized = normalize_message(
        file.read(),
        envelope_from=how.envelope_from,
        hostname=how.hostname,
        now=how.now,
        smtputf8=how.smtputf8,
    )
    message_id = header_message_id(normalized.data)
    body = _replace(spilled, (spilled.head, normalized.data), body_at=spilled.size)
    return Settled(body, _kept(normalized), message_id)


def _kept(normalized: Normalized) -> Normalized:
    """What the commit needs of a normalisation, without the data (it is in the file)."""
    return Normalized(b"", normalized.changes, normalized.eightbit, normalized.needs_smtputf8)


def _chunks(file: IO[bytes], first: bytes) -> Iterator[bytes]:
    yield first
    while chunk := file.read(SCAN_WINDOW):
        yield chunk


def _replace(spilled: Spilled, parts: tuple[bytes, ...], *, body_at: int) -> BodyFile:
    """A new file in place of the spilled one: `parts`, then the old file from `body_at` on
    (copied in the kernel where the platform can), renamed over the old one."""
    new_path = spilled.path.with_suffix(".new")
    new = open_private_file(new_path)
    try:
        for part in parts:
            new.write(part)
        new.flush()
        copy_range(spilled.file, new, body_at, spilled.size - body_at)
        size = os.fstat(new.fileno()).st_size
        spilled.file.close()  # before the rename: Windows cannot replace an open file
        os.replace(new_path, spilled.path)
    except BaseException:
        new.close()
        unlink_quietly(new_path)
        raise
    return BodyFile(spilled.path, new, size)
