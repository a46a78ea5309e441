"""The DATA path's CPU cost per MB (issue #8 item 2): the piece-wise reader in
relay/smtpdata.py against a line-at-a-time reader (the previous implementation, kept here as
the baseline), in the same process, on the same bytes, fed to a real asyncio StreamReader in
64 KiB chunks as a socket would.

    python bench/data_path.py [--size-mb 8] [--runs 5]

Bodies: a copier's scan (base64 in 76-character CRLF lines), a text report with many lines
ending in a dot and stuffed dots, and one long line. Prints ms per MB (median of runs, min-max)
and the ratio baseline / ours. No assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from relay.smtpdata import DataReader

MIB = 1024 * 1024
CHUNK = 64 * 1024
STREAM_LIMIT = 1001  # aiosmtpd's line_length_limit: the StreamReader limit in the relay


class LineReader:
    """The previous reader: one readuntil(b"\\n") per line, unstuffing line by line."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def read(self) -> bytes:
        buffer = io.BytesIO()
        last_byte = b"\n"
        after_crlf = True
        while True:
            try:
                raw = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as overrun:
                raw = await self._reader.readexactly(overrun.consumed)
            if after_crlf and raw == b".\r\n":
                return buffer.getvalue()
            after_crlf = raw.endswith(b"\r\n") or (raw == b"\n" and last_byte == b"\r")
            buffer.write(raw[1:] if last_byte == b"\n" and raw.startswith(b".") else raw)
            last_byte = raw[-1:]


def scan(size: int) -> bytes:
    encoded = base64.b64encode(os.urandom(size * 3 // 4))
    return b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


def report(size: int) -> bytes:
    line = b"Total for account 4711 on 2026-11-29: 1,234.56 EUR.\r\n..stuffed line\r\n"
    return line * (size // len(line))


def long_line(size: int) -> bytes:
    return b"x" * size + b"\r\n"


async def timed(read: Callable[[asyncio.StreamReader], Awaitable[object]], wire: bytes) -> float:
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    task = asyncio.ensure_future(read(reader))
    started = time.process_time()
    for start in range(0, len(wire), CHUNK):
        reader.feed_data(wire[start : start + CHUNK])
        await asyncio.sleep(0)
    await task
    return time.process_time() - started


async def ours(reader: asyncio.StreamReader) -> object:
    return await DataReader(reader, 1 << 40).read()


async def baseline(reader: asyncio.StreamReader) -> object:
    return await LineReader(reader).read()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mb * MIB
    print("| body | line reader ms/MB | piece reader ms/MB | speed-up |")
    print("|---|---:|---:|---:|")
    for name, make in (
        ("scan (base64)", scan),
        ("text report", report),
        ("one long line", long_line),
    ):
        wire = make(size) + b".\r\n"
        mb = len(wire) / MIB
        old = [await timed(baseline, wire) * 1000 / mb for _ in range(args.runs)]
        new = [await timed(ours, wire) * 1000 / mb for _ in range(args.runs)]
        print(
            f"| {name} | {statistics.median(old):.1f} ({min(old):.1f}-{max(old):.1f}) "
            f"| {statistics.median(new):.1f} ({min(new):.1f}-{max(new):.1f}) "
            f"| {statistics.median(old) / statistics.median(new):.1f}x |"
        )


if __name__ == "__main__":
    asyncio.run(main())
