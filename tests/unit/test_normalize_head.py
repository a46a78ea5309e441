"""normalize.py's header-only path (issue #8): a large message is normalised from its header
block while its body stays in a file. The property: whenever `body_is_clean` says the body
needs nothing, normalising the header block alone (`header_length`, `normalize_head`) and
appending the body gives exactly what `normalize_message` gives for the whole message; and
`body_is_clean`, fed the data in arbitrary chunks, agrees with a line-by-line reference.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.normalize import (
    MAX_LINE,
    body_is_clean,
    header_length,
    normalize_head,
    normalize_message,
)

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
HOST = "relay.contoso.com"
MID = re.compile(rb"Message-ID: <[^>]*>")


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


def reference_clean(data: bytes, body_from: int) -> bool:
    """Line by line: CRLF only, ends with CRLF, an ASCII body with no line over MAX_LINE."""
    if not data:
        return True
    if not data.endswith(b"\r\n") or re.search(rb"\r(?!\n)|(?<!\r)\n", data):
        return False
    body = data[body_from:]
    return body.isascii() and all(len(line) <= MAX_LINE for line in body.split(b"\r\n"))


def whole(data: bytes, smtputf8: bool) -> bytes:
    out = normalize_message(
        data, envelope_from="scan@contoso.com", hostname=HOST, now=NOW, smtputf8=smtputf8
    )
    return MID.sub(b"Message-ID: <x>", out.data)


def by_head(data: bytes, smtputf8: bool, cuts: list[int]) -> bytes | None:
    body_from = header_length(data, whole=True)
    assert body_from is not None
    if not body_is_clean(chunked(data, cuts), body_from=body_from):
        return None
    head = data[:body_from]
    out = normalize_head(
        head,
        body_follows=len(data) > body_from,
        envelope_from="scan@contoso.com",
        hostname=HOST,
        now=NOW,
        smtputf8=smtputf8,
    )
    assert (out.data is head) == (not out.changes or out.data == head)
    return MID.sub(b"Message-ID: <x>", out.data + data[body_from:])


HEADER_LINES = st.sampled_from([
    b"From: Scanner <scan@contoso.com>", b"To: a@contoso.com", b"Date: Fri, 27 Nov 2026",
    b"Message-ID: <1@scan>", b"Subject: caf\xc3\xa9", b"Bcc: hidden@contoso.com",
    b" continued", b"X-Long: " + b"a " * 600, b"X-Solid: " + b"b" * 1200, b"not a field",
    b"", b"Content-Type: text/plain", b"Subject: \xe9t\xe9",
])  # fmt: skip
BODY_LINES = st.sampled_from([
    b"", b"hello", b"x" * 998, b"x" * 999, b"QUJD" * 19, b".dot", b"caf\xc3\xa9", b"From: x",
    b"line\rcr", b"line\nlf",
])  # fmt: skip


@settings(max_examples=400)
@given(
    header=st.lists(HEADER_LINES, max_size=8),
    body=st.lists(BODY_LINES, max_size=12),
    separator=st.booleans(),
    final=st.sampled_from([b"\r\n", b"", b"\n"]),
    smtputf8=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=6),
)
def test_header_only_normalisation_equals_the_whole_message_one(
    header: list[bytes],
    body: list[bytes],
    separator: bool,
    final: bytes,
    smtputf8: bool,
    cuts: list[int],
) -> None:
    lines = [*header, *([b""] if separator else []), *body]
    data = b"\r\n".join(lines) + (final if lines else b"")
    body_from = header_length(data, whole=True)
    assert body_from is not None
    assert body_is_clean(chunked(data, cuts), body_from=body_from) == reference_clean(
        data, body_from
    )
    by_header = by_head(data, smtputf8, cuts)
    if by_header is not None:
        assert by_header == whole(data, smtputf8)


@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_body_is_clean_agrees_with_the_reference_on_any_bytes(data: bytes, cuts: list[int]) -> None:
    body_from = header_length(data, whole=True)
    assert body_from is not None
    assert body_is_clean(chunked(data, cuts), body_from=body_from) == reference_clean(
        data, body_from
    )


def test_long_line_across_chunks_is_found_and_one_of_998_is_not() -> None:
    ok = b"Subject: x\r\n\r\n" + b"y" * MAX_LINE + b"\r\n"
    long = b"Subject: x\r\n\r\n" + b"y" * (MAX_LINE + 1) + b"\r\n"
    for cut in range(1, len(long)):
        assert body_is_clean([ok[:cut], ok[cut:]], body_from=14)
        assert not body_is_clean([long[:cut], long[cut:]], body_from=14), cut


def test_a_long_header_line_does_not_make_the_body_unclean() -> None:
    data = b"X-Solid: " + b"z" * 2000 + b"\r\n\r\nbody\r\n"
    body_from = header_length(data, whole=True)
    assert body_from == len(data) - 6
    assert body_is_clean([data], body_from=body_from)


def test_header_length_needs_the_line_after_a_block_without_blank_line() -> None:
    data = b"Subject: x\r\nX-Cut-Off-Field: y\r\n"
    assert header_length(data[:15], whole=False) is None  # "X-Cu" may be a field
    assert header_length(b"Subject: x\r\n\r\nbody", whole=False) == 14
    assert header_length(b"Subject: x\r\nbody line\r\n", whole=False) == 12
    assert header_length(b"Subject: x\r\nbody li", whole=False) is None
