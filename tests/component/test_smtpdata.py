"""The DATA reader on a real asyncio StreamReader: exact unstuffing, smuggling-safe end of
data, size limit while receiving, pipelined bytes left for the next command."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtpdata import DataAborted, DataReader, DataResult


def stuff(body: bytes) -> bytes:
    """What smtplib sends for `body`: leading dots doubled after every LF, CRLF-dot-CRLF."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", body) + b".\r\n"


def stream(wire: bytes, *, limit: int = 64 * 1024, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(wire)
    if eof:
        reader.feed_eof()
    return reader


async def read(wire: bytes, *, limit: int = 1_000_000, stream_limit: int = 64 * 1024) -> DataResult:
    return await DataReader(stream(wire, limit=stream_limit), limit).read()


async def test_plain_message_and_leading_dots() -> None:
    body = b"Subject: x\r\n\r\n.hidden\r\n..two\r\nend\r\n"
    result = await read(stuff(body))
    assert result == DataResult(body, len(body))


async def test_empty_message() -> None:
    assert await read(b".\r\n") == DataResult(b"", 0)


@pytest.mark.parametrize(
    "probe", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\r", b"\n.\n\r\n"]
)
async def test_smuggling_probes_never_end_the_data(probe: bytes) -> None:
    reader = stream(b"a" + probe + b"MAIL FROM:<x@y>\r\n", eof=False)
    task = asyncio.ensure_future(DataReader(reader, 10_000).read())
    await asyncio.sleep(0)  # let the reader consume what is there (no timing involved)
    assert not task.done()
    reader.feed_data(b"\r\n.\r\n")
    result = await asyncio.wait_for(task, 5)
    assert result.data is not None
    assert b"MAIL FROM:<x@y>" in result.data


async def test_bytes_after_the_end_stay_for_the_next_command() -> None:
    reader = stream(b"hello\r\n.\r\nQUIT\r\n")
    assert (await DataReader(reader, 100).read()).data == b"hello\r\n"
    assert await reader.readuntil(b"\n") == b"QUIT\r\n"


async def test_too_big_is_read_to_the_end_and_dropped() -> None:
    reader = stream(stuff(b"x" * 50 + b"\r\n" + b"y" * 50 + b"\r\n") + b"QUIT\r\n")
    result = await DataReader(reader, 60).read()
    assert result.data is None
    assert result.size == 104
    assert await reader.readuntil(b"\n") == b"QUIT\r\n"


async def test_limit_counts_unstuffed_bytes() -> None:
    body = b".\r\n" * 10  # 30 bytes, 40 on the wire
    assert (await read(stuff(body), limit=30)).data == body


async def test_long_lines_and_bare_lf_lines() -> None:
    body = b"A" * 5000 + b"\n" + b"B" * 3000 + b"\r\n"
    assert (await read(stuff(body), stream_limit=64)).data == body


async def test_crlf_split_across_chunks_still_ends_the_data() -> None:
    # with a 4-byte stream limit the CR of "...\r\n.\r\n" arrives in one chunk, the LF in the next
    body = b"abcdefg\r\n"
    assert (await read(stuff(body), stream_limit=4)).data == body


async def test_closed_during_data_after_bare_lf_dot() -> None:
    reader = DataReader(stream(b"Subject: backup\n\nok\n.\n"), 1000)
    with pytest.raises(DataAborted):
        await reader.read()
    assert reader.ended_with_bare_lf_dot


async def test_closed_during_data_otherwise() -> None:
    reader = DataReader(stream(b"Subject: half a message\r\nand th"), 1000)
    with pytest.raises(DataAborted):
        await reader.read()
    assert not reader.ended_with_bare_lf_dot


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600).map(lambda b: b.replace(b"\x00", b"")), st.integers(2, 64))
async def test_round_trip_matches_the_reference(body: bytes, stream_limit: int) -> None:
    """Whatever the body, what a stuffing client sends comes back exactly (CRLF-terminated)."""
    expected = body if body.endswith(b"\r\n") else body + b"\r\n"
    result = await read(stuff(body), stream_limit=stream_limit)
    assert result.data == expected


def reference(wire: bytes, limit: int) -> tuple[DataResult, bytes] | None:
    """RFC 5321 by the letter, a line at a time: lines end at LF; the data ends at the first
    line that is exactly ".<CRLF>" after a CRLF-terminated line (or at the start); a leading
    dot is removed from every other line. Returns the result and the bytes left over, or None
    when the data does not end."""
    body = bytearray()
    position = 0
    after_crlf = True  # the DATA command's CRLF
    while (newline := wire.find(b"\n", position)) >= 0:
        line = wire[position : newline + 1]
        position = newline + 1
        if after_crlf and line == b".\r\n":
            size = len(body)
            return DataResult(bytes(body) if size <= limit else None, size), wire[position:]
        body += line[1:] if line.startswith(b".") else line
        after_crlf = line.endswith(b"\r\n")
    return None


WIRE_PARTS = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"x", b"yz" * 40, b".\r\n"]
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(WIRE_PARTS, max_size=40).map(b"".join),
    st.lists(st.integers(1, 90), min_size=1, max_size=8),
    st.integers(3, 64),
    st.integers(0, 200),
)
async def test_any_stream_in_any_chunks_matches_the_line_reference(
    wire: bytes, chunks: list[int], stream_limit: int, limit: int
) -> None:
    """Arbitrary bytes (probes, bare CR and LF, dots, several end markers, bytes after the
    end) fed in arbitrary chunks: the same body, size, end and leftover as the reference."""
    wire += b"\r\n.\r\nQUIT\r\n"  # it always ends, perhaps earlier
    expected, rest = reference(wire, limit) or pytest.fail("the reference never ended")
    reader = asyncio.StreamReader(limit=stream_limit)
    task = asyncio.ensure_future(DataReader(reader, limit).read())
    position, sizes = 0, iter(chunks * (len(wire) + 1))
    while position < len(wire) and not task.done():
        size = next(sizes)
        reader.feed_data(wire[position : position + size])
        position += size
        for _ in range(3):
            await asyncio.sleep(0)  # let the reader take what is there (no timing involved)
    reader.feed_data(wire[position:])  # the rest, if the data ended before it was fed
    reader.feed_eof()
    assert await asyncio.wait_for(task, 5) == expected
    assert await reader.read() == rest  # nothing eaten past the end
