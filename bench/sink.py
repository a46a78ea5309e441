"""A fast counting SMTP sink for bench/run.py: the upstream both MTAs deliver to.

    python bench/sink.py [--host 127.0.0.1] [--port 0]

It speaks just enough ESMTP for a relay's client (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP,
QUIT, with PIPELINING and 8BITMIME offered), answers 250 to everything, keeps no message
bodies, and records for each message the CLOCK_MONOTONIC time of its final dot (Linux's
monotonic clock is the same in every process, so the harness can compare it with its own
time.monotonic()) and the value of its `X-Bench-Id:` header, if any, from the first 16 KiB.

Control: one line on stdout when listening, `port N`; then commands on stdin, one per line,
each answered by one line on stdout:

    count                  -> number of messages received so far
    wait N SECONDS         -> the time the N-th message arrived, or `timeout COUNT`
    waitid ID SECONDS      -> the time the message with X-Bench-Id ID arrived, or `timeout COUNT`
    stats                  -> JSON: messages, sessions, bytes
    quit                   -> exits

asyncio.Protocol on a plain event loop: about 5-10k messages/s of 5 KB on one core (bench/run.py
measures its capacity in the `calibration` step, so a table can show it was not the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

HEAD_KEEP = 16 * 1024
BENCH_ID = b"\nx-bench-id:"
GREETING = b"220 sink.bench.test ESMTP bench sink\r\n"
EHLO_REPLY = (
    b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n250 SMTPUTF8\r\n"
)


class Record:
    """What the sink has seen, and who is waiting for what."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.by_id: dict[str, float] = {}
        self.sessions = 0
        self.bytes = 0
        self.waiters: list[tuple[int, str, asyncio.Future[float]]] = []

    def arrived(self, head: bytes, size: int) -> None:
        now = time.monotonic()
        self.times.append(now)
        self.bytes += size
        bench_id = find_bench_id(head)
        if bench_id:
            self.by_id[bench_id] = now
        if self.waiters:
            self._wake()

    def _wake(self) -> None:
        still = []
        for count, bench_id, future in self.waiters:
            if future.done():
                continue
            if bench_id and bench_id in self.by_id:
                future.set_result(self.by_id[bench_id])
            elif not bench_id and len(self.times) >= count:
                future.set_result(self.times[count - 1])
            else:
                still.append((count, bench_id, future))
        self.waiters = still

    async def wait(self, count: int, bench_id: str, seconds: float) -> str:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters.append((count, bench_id, future))
        self._wake()
        try:
            return f"{await asyncio.wait_for(future, seconds):.6f}"
        except TimeoutError:
            return f"timeout {len(self.times)}"


def find_bench_id(head: bytes) -> str:
    lower = head.lower()
    at = lower.find(BENCH_ID)
    if at < 0:
        return ""
    end = head.find(b"\r\n", at + 1)
    return head[at + len(BENCH_ID) : end if end > 0 else None].strip().decode("ascii", "replace")


class SinkProtocol(asyncio.Protocol):
    """One SMTP session. Commands may come pipelined: replies go out in order, in one write."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.buffer = bytearray()
        self.in_data = False
        self.head = bytearray()
        self.size = 0
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.record.sessions += 1
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        if self.in_data:
            data = self._data(data, out)
        if data:
            self.buffer += data
            self._commands(out)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _data(self, data: bytes, out: list[bytes]) -> bytes:
        """Consume message data; returns what follows the final dot (pipelined commands)."""
        if len(self.head) < HEAD_KEEP:
            self.head += data[: HEAD_KEEP - len(self.head)]
        window = self.tail + data
        end = window.find(b"\r\n.\r\n")
        if end < 0:
            self.size += len(data)
            self.tail = window[-4:]
            return b""
        used = end + 5 - len(self.tail)  # bytes of `data` up to and including the final dot
        self.size += used
        self.in_data = False
        self.tail = b""
        self.record.arrived(bytes(self.head), self.size)
        out.append(b"250 2.0.0 Ok: queued\r\n")
        return data[used:]

    def _commands(self, out: list[bytes]) -> None:
        while not self.in_data:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                self.head = bytearray(b"\r\n")  # so a first header line matches BENCH_ID
                self.size = 0
                self.tail = b"\r\n"  # an empty message: the final dot right after DATA
                rest = bytes(self.buffer)
                self.buffer.clear()
                rest = self._data(rest, out)
                self.buffer += rest
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                if self.transport is not None:
                    self.transport.write(b"".join(out))
                    out.clear()
                    self.transport.close()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP and anything else
                out.append(b"250 2.0.0 Ok\r\n")


async def control(record: Record, server: asyncio.Server) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        raw = await reader.readline()
        if not raw:
            break
        parts = raw.decode().split()
        if not parts:
            continue
        command, args = parts[0], parts[1:]
        if command == "count":
            reply = str(len(record.times))
        elif command == "wait":
            reply = await record.wait(int(args[0]), "", float(args[1]))
        elif command == "waitid":
            reply = await record.wait(0, args[0], float(args[1]))
        elif command == "stats":
            reply = json.dumps(
                {"messages": len(record.times), "sessions": record.sessions, "bytes": record.bytes}
            )
        elif command == "quit":
            break
        else:
            reply = f"error unknown command {command}"
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    server.close()


async def main(host: str, port: int) -> None:
    record = Record()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(record), host, port, backlog=512)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"port {bound}\n")
    sys.stdout.flush()
    await control(record, server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
