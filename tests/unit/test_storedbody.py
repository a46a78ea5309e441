"""storedbody.py: a spooled body read back in pieces that end at line ends (issue #8).
Real files in tmp_path; hypothesis over contents, offsets and piece sizes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from relay.storedbody import StoredBody

CONTENT = st.lists(
    st.sampled_from(
        [
            b"line\r\n",
            b"\r\n",
            b".dot\r\n",
            b"x" * 300 + b"\r\n",
            b"bare\n",
            b"tail",
            b"\r",
            b"y" * 900,
        ]
    ),
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
    piece_size = piece
    assert b"".join(pieces) == content[offset:]
    assert all(pieces)
    for piece, after in zip(pieces, pieces[1:], strict=False):
        # cut after an LF where the piece has one, and never inside a CR LF
        assert piece.endswith(b"\n") or b"\n" not in piece
        assert not (piece.endswith(b"\r") and after.startswith(b"\n"))
        assert len(piece) <= 2 * piece_size


def test_start_is_the_first_bytes(tmp_path: Path) -> None:
    path = tmp_path / "body.eml"
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    assert StoredBody(path, 19).start(9) == b"Subject: "
    assert StoredBody(path, 19).start() == b"Subject: x\r\n\r\nbody\r\n"
