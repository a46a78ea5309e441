"""storedbody.py: a spooled body read back in pieces that end at line ends (issue #8).
Real files in tmp_path; hypothesis over contents, offsets and piece sizes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from relay.storedbody import StoredBody

CONTENT = st.lists(
    st.sampled_from([b"line\r\n", b"\r\n", b".dot\r\n", b"x" * 300 + b"\r\n", b"bare\n", b"tail"]),
    max_size=60,
).map(b"".join)


@given(content=CONTENT, offset=st.integers(0, 400), piece=st.integers(1, 700))
def test_pieces_give_back_the_file_from_the_offset_each_ending_a_line(
    content: bytes, offset: int, piece: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "body.eml"
        path.write_bytes(content)
        pieces = list(StoredBody(path, len(content), piece).pieces(offset))
    assert b"".join(pieces) == content[offset:]
    assert all(p.endswith(b"\n") for p in pieces[:-1])
    assert all(pieces)


def test_header_block_is_up_to_the_first_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "body.eml"
    path.write_bytes(b"Subject: x\r\nFrom: a@b\r\n\r\nbody\r\n\r\nmore\r\n")
    assert StoredBody(path, 0).header_block() == b"Subject: x\r\nFrom: a@b\r\n\r\n"
    path.write_bytes(b"no empty line at all\r\n")
    assert StoredBody(path, 0).header_block() == b""
    path.write_bytes(b"\r\nbody only\r\n")
    assert StoredBody(path, 0).header_block() == b"\r\n"
