"""A Python SMTP load generator for bench/run.py: the fallback when Postfix's smtp-source is
not installed, with the same shape.

    python bench/loadgen.py --port P [--host 127.0.0.1] --sessions S --count N --size BYTES
                            [--per-connection K]

S sessions run at once; each connects, says EHLO, sends K messages (MAIL, RCPT, DATA, one
recipient each), says QUIT and connects again, until N messages have been sent in all. A
message is like smtp-source's: From, To, Date and Message-Id headers, then BYTES bytes of
payload in lines of 79 characters. Every reply is checked (220/250/354/221); the first
unexpected one ends the run with exit status 1.

Prints one line of JSON: {"seconds": wall time from the first connect to the last reply,
"messages": sent, "sessions": connections made}. Commands are not pipelined (smtp-source does
not pipeline either).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from email.utils import formatdate

LINE = 79


def payload(size: int) -> bytes:
    """`size` bytes of CRLF lines, like smtp-source -l (which counts LF line ends)."""
    lines = []
    left = size
    number = 0
    while left > 0:
        take = min(LINE, left - 1) if left > 1 else 0
        number += 1
        text = (str(number % 10) + "X" * LINE)[:take]
        lines.append(text.encode() + b"\r\n")
        left -= take + 1
    return b"".join(lines)


def message(index: int, body: bytes) -> bytes:
    head = (
        "From: <from@bench.test>\r\n"
        "To: <to@bench.test>\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-Id: <{os.getpid()}.{index}@bench.test>\r\n\r\n"
    ).encode()
    return head + body + b".\r\n"


class Failed(Exception):
    pass


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise Failed(f"connection closed while waiting for {code.decode()}")
        if line[3:4] != b"-":
            break
    if not line.startswith(code):
        raise Failed(f"expected {code.decode()}, got {line.decode(errors='replace').strip()}")


class Counter:
    def __init__(self, total: int) -> None:
        self.left = total
        self.taken = 0
        self.sent = 0
        self.sessions = 0

    def reserve(self, wanted: int) -> range:
        """Indexes of the next messages for one connection (empty when all are taken)."""
        take = min(wanted, self.left)
        self.left -= take
        self.taken += take
        return range(self.taken - take, self.taken)


async def session(host: str, port: int, per_connection: int, body: bytes, counter: Counter) -> None:
    while indexes := counter.reserve(per_connection):
        reader, writer = await asyncio.open_connection(host, port)
        counter.sessions += 1
        try:
            await expect(reader, b"220")
            writer.write(b"EHLO bench.test\r\n")
            await expect(reader, b"250")
            for index in indexes:
                writer.write(b"MAIL FROM:<from@bench.test>\r\n")
                await expect(reader, b"250")
                writer.write(b"RCPT TO:<to@bench.test>\r\n")
                await expect(reader, b"250")
                writer.write(b"DATA\r\n")
                await expect(reader, b"354")
                writer.write(message(index, body))
                await expect(reader, b"250")
                counter.sent += 1
            writer.write(b"QUIT\r\n")
            await expect(reader, b"221")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def run(args: argparse.Namespace) -> dict[str, float]:
    body = payload(args.size)
    counter = Counter(args.count)
    started = time.monotonic()
    await asyncio.gather(
        *(
            session(args.host, args.port, args.per_connection, body, counter)
            for _ in range(args.sessions)
        )
    )
    return {
        "seconds": time.monotonic() - started,
        "messages": counter.sent,
        "sessions": counter.sessions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--per-connection", type=int, default=1)
    args = parser.parse_args()
    try:
        result = asyncio.run(run(args))
    except (Failed, OSError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
