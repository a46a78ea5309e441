"""Device quirk normalisation: turn what copiers, scripts and ERPs send into mail Exchange accepts.

One job: map the bytes received in DATA to the bytes to spool, fixing only what Exchange Online
refuses (bare LF: 550 5.6.11; lines over 998 octets: 5.6.x) or what the relay must guarantee,
and leaving everything else byte-identical. A clean message (CRLF only, Date, Message-ID and
From present, no line over 998, no Bcc, ASCII headers or SMTPUTF8 allowed) comes back as the
very same object with no changes, so DKIM signatures survive. The clean path is a few C-level
scans of the buffer (`count`, `isascii`, `split`); nothing below loops over body lines in Python
unless a MIME part needs re-encoding, and everything is linear in the message size.

Rules, in order:
1. Line ends: LF, lone CR and CR...CR LF each become one CRLF (CR CR LF is one line end, not a
   line plus an empty one); the data ends with CRLF.
2. Header/body split: the header block is the run of field lines (`name:`, or a continuation
   starting with SP/HTAB); the first other line starts the body, and a blank line is inserted
   before it when missing. A message with no header at all gets the added fields + a blank line.
3. `Bcc:` and `Resent-Bcc:` fields (any case, with their continuation lines) are removed: the
   envelope alone decides who receives; no recipient is ever added or dropped here.
4. Missing `Date:` (from `now`, +0000), `Message-ID:` (`<time.uuid@domain>`) and `From:` (the
   envelope sender, or MAILER-DAEMON@hostname for a null sender) are added at the top.
5. Raw 8-bit in header fields (top level and MIME part headers): with `smtputf8` and valid UTF-8
   it is left raw and `needs_smtputf8` is set. Otherwise it is encoded: unstructured text and
   display names/comments as RFC 2047 B encoded-words in UTF-8 (bytes that are not valid UTF-8
   are read as Latin-1). Addresses (inside `<>` or containing `@`), message ids and `boundary=`
   cannot be encoded: they are left raw and `needs_smtputf8` is set. Parameters: `filename=`
   becomes RFC 2231 `filename*=UTF-8''...`, the standard form, which Exchange Online, current
   Outlook and Python's email package decode; `name=` (and any other parameter but `boundary`)
   gets an RFC 2047 encoded-word inside its quoted value: forbidden by RFC 2047 section 5, but
   it is what Outlook and Exchange themselves write, so a reader that ignores the RFC 2231
   filename still finds the name in the form Outlook reads. Thunderbird sends this same pair
   for the same reason.
6. Header lines over 998 octets are folded at whitespace (lines up to 78 where possible; the
   fold only inserts CRLF before existing whitespace, so unfolding gives the same value). A
   field with a run over 998 octets and no whitespace in it cannot be folded: the whole field
   is left as it is and noted (Exchange will refuse it; the note says why).
7. Body lines over 998 octets, per leaf MIME part (boundaries from Content-Type, found in the
   bytes): base64 is re-wrapped at 76 columns (same data); quoted-printable long lines get soft
   line breaks; anything else (7bit, 8bit, binary, none, unknown) is re-encoded as
   quoted-printable and that part's Content-Transfer-Encoding set (plus `MIME-Version: 1.0` at
   the top level if absent); Content-Type is kept. Parts without long lines stay byte-identical;
   over-long lines in a multipart preamble or epilogue (never displayed) are hard-wrapped.
8. An 8-bit body is left as it is and reported in `eightbit` (sent with BODY=8BITMIME).

Limits: it does not rewrite From for SendAs, fix a wrong Date, validate addresses, repair a
misspelt Content-Transfer-Encoding or an 8-bit body declared 7bit, nor decode uuencode; text in
an already encoded-word next to raw 8-bit text is encoded again. MIME nesting is followed 32
levels deep. SECURITY/I-O: pure: stdlib only, no I/O, no asyncio; the clock is passed in, the
only randomness is uuid4 in an added Message-ID. Never raises on any input (hypothesis-tested).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import quote

MAX_LINE = 998  # octets per line without CRLF (RFC 5321 4.5.3.1.6, RFC 5322 2.1.1)
FOLD_WIDTH = 78  # RFC 5322 2.1.1 SHOULD
B64_WIDTH = 76  # RFC 2045 6.8
CRLF = b"\r\n"
_MAX_DEPTH = 32
_MAX_BOUNDARY = 200  # RFC 2046 allows 70; longer values are not treated as boundaries
_IDENTITY_CTE = frozenset({"", "7bit", "8bit", "binary"})
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_ADDRESS_FIELDS = frozenset({
    "from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-bcc", "disposition-notification-to", "return-path", "return-receipt-to",
    "errors-to", "mail-followup-to", "mail-reply-to",
})  # fmt: skip
_ID_FIELDS = frozenset(
    {"message-id", "in-reply-to", "references", "content-id", "resent-message-id"}
)
_PARAM_FIELDS = frozenset({"content-type", "content-disposition"})
_REMOVED_FIELDS = frozenset({"bcc", "resent-bcc"})

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_LINE_END = re.compile(rb"\r*\n|\r")
_PIECE = re.compile(rb"[ \t]*[^ \t]+|[ \t]+")
_WS_SPLIT = re.compile(r"([ \t\r\n]+)")
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]*)', re.S)
_TOKEN = re.compile(
    r'(?P<q>"(?:[^"\\]|\\.)*"?)|(?P<c>\((?:[^()\\]|\\.)*\)?)|(?P<a><[^>]*>?)'
    r"|(?P<s>[ \t\r\n]+)|(?P<p>[,;:=])|(?P<w>[^ \t\r\n\"(<,;:=]+)",
    re.S,
)
_ATTR_SAFE = "!#$&+-.^_`|~"  # RFC 5987 attr-char besides ALPHA / DIGIT


@dataclass(frozen=True)
class Normalized:
    data: bytes  # the message to spool: CRLF line ends only, ends with CRLF (unless empty)
    changes: tuple[str, ...]  # one short log-friendly note per fix; () when untouched
    eightbit: bool  # the body (everything after the top header block) has 8-bit bytes
    needs_smtputf8: bool  # raw non-ASCII left in a header field


@dataclass
class _Field:
    name: str  # lower-case field name
    raw: bytes  # the whole field: first line, continuation lines, and its CRLF

    @property
    def label(self) -> str:
        return self.raw.split(b":", 1)[0].rstrip(b" \t").decode("ascii", "replace")


@dataclass
class _Entity:
    fields: list[_Field]
    sep: bytes  # the blank line between header and body, or b""
    body: bytes
    dirty: bool = False

    def to_bytes(self) -> bytes:
        return b"".join(f.raw for f in self.fields) + self.sep + self.body

    def get(self, name: str) -> _Field | None:
        return next((f for f in self.fields if f.name == name), None)

    def add(self, new: _Field) -> None:
        if self.fields and not self.fields[-1].raw.endswith(CRLF):
            self.fields[-1].raw += CRLF
        self.fields.append(new)
        self.dirty = True


@dataclass
class _Ctx:
    smtputf8: bool
    changes: list[str] = field(default_factory=list)
    needs_smtputf8: bool = False
    long_lines: bool = False
    boundaries: list[bytes] = field(default_factory=list)


def normalize_message(
    raw: bytes,
    *,
    envelope_from: str,
    hostname: str,
    now: datetime,
    smtputf8: bool,
    message_id_domain: str | None = None,
) -> Normalized:
    """Normalise one received message; see the module docstring for the rules."""
    ctx = _Ctx(smtputf8=smtputf8)
    data = _fix_line_ends(bytes(raw), ctx.changes)
    top = _parse_entity(data)
    _fix_top(
        top,
        ctx,
        body_follows=bool(top.body),
        envelope_from=envelope_from,
        hostname=hostname,
        now=now,
        id_domain=message_id_domain,
    )
    ctx.long_lines = _has_long_line(top.body)
    if ctx.long_lines or not top.body.isascii():
        _fix_body(top, ctx, "", 0)
    out = top.to_bytes() if top.dirty else data
    return Normalized(
        data=out,
        changes=tuple(ctx.changes),
        eightbit=not top.body.isascii(),
        needs_smtputf8=ctx.needs_smtputf8,
    )


def normalize_head(
    head: bytes,
    *,
    body_follows: bool,
    envelope_from: str,
    hostname: str,
    now: datetime,
    smtputf8: bool,
    message_id_domain: str | None = None,
) -> Normalized:
    """The header block of a message whose body needs nothing (see `body_is_clean`), fixed by
    the same rules as `normalize_message`: `head` is the block `header_length` found, the
    body (after it) stays byte-identical. Lets a large message be normalised from its first
    bytes. `data` is the new header block, or `head` itself when nothing changed."""
    ctx = _Ctx(smtputf8=smtputf8)
    top = _parse_entity(head)
    _fix_top(
        top,
        ctx,
        body_follows=body_follows,
        envelope_from=envelope_from,
        hostname=hostname,
        now=now,
        id_domain=message_id_domain,
    )
    return Normalized(
        data=top.to_bytes() if top.dirty else head,
        changes=tuple(ctx.changes),
        eightbit=False,
        needs_smtputf8=ctx.needs_smtputf8,
    )


def _fix_top(
    top: _Entity,
    ctx: _Ctx,
    *,
    body_follows: bool,
    envelope_from: str,
    hostname: str,
    now: datetime,
    id_domain: str | None,
) -> None:
    """Rules 2 to 6 on the top-level header block."""
    if top.sep == b"" and (body_follows or not top.fields):
        top.sep, top.dirty = CRLF, True
        if body_follows:
            ctx.changes.append("inserted blank line between header and body")
    _remove_bcc(top, ctx)
    _add_missing(top, ctx, sender=envelope_from, hostname=hostname, now=now, id_domain=id_domain)
    _fix_headers(top, ctx, "")


def header_length(window: bytes, *, whole: bool) -> int | None:
    """Where the body starts in a message whose first bytes are `window` (all of it when
    `whole`): the length of the header block with its blank line. None when the window
    cannot tell (the block, or the line after it, runs past the window)."""
    top = _parse_entity(window)
    length = len(window) - len(top.body)
    if whole or top.sep:
        return length
    return length if window.find(CRLF, length) >= 0 else None


def body_is_clean(chunks: Iterable[bytes], *, body_from: int) -> bool:
    """The data given in order as `chunks` has only CRLF line ends and ends with one (or is
    empty), and from offset `body_from` (a line start) on it is ASCII with no line over
    MAX_LINE: then `normalize_message` would change nothing after the header block. Reads
    each chunk once with C-level scans; stops at the first thing that needs the whole
    message."""
    offset, last, line = 0, b"", 0
    for chunk in chunks:
        if not chunk:
            continue
        if not _crlf_only(chunk, after_cr=last == b"\r"):
            return False
        if offset + len(chunk) > body_from:
            body = chunk[body_from - offset :] if offset < body_from else chunk
            line = _open_line(body, line, after_cr=offset >= body_from and last == b"\r")
            if line < 0 or not body.isascii():
                return False
        offset += len(chunk)
        last = chunk[-1:]
    return offset == 0 or last == b"\n"


def _crlf_only(chunk: bytes, *, after_cr: bool) -> bool:
    """Every CR in `chunk` is followed by LF and every LF preceded by CR, counting a CR the
    previous chunk ended with and one this chunk ends with (completed by the next)."""
    starts_lf = chunk[:1] == b"\n"
    if starts_lf != after_cr:
        return False
    pairs = chunk.count(CRLF)
    ends_cr = chunk[-1:] == b"\r"
    return chunk.count(b"\n") - starts_lf == pairs and chunk.count(b"\r") - ends_cr == pairs


def _open_line(body: bytes, carried: int, *, after_cr: bool) -> int:
    """The length so far of the line still open after `body` (CRLF line ends; `carried`
    bytes of it, a CR included, came before), or -1 once a line is over MAX_LINE."""
    if after_cr:  # the CRLF straddles two chunks: the carried line ends at this LF
        if carried - 1 > MAX_LINE:
            return -1
        body, carried = body[1:], 0
    lines = body.split(CRLF)
    if len(lines) == 1:
        carried += len(body)
        return -1 if carried - body.endswith(b"\r") > MAX_LINE else carried
    if carried + len(lines[0]) > MAX_LINE or max(map(len, lines[1:-1]), default=0) > MAX_LINE:
        return -1
    tail = len(lines[-1])
    return -1 if tail - lines[-1].endswith(b"\r") > MAX_LINE else tail


# --- line ends and parsing ----------------------------------------------------------------------


def _fix_line_ends(raw: bytes, changes: list[str]) -> bytes:
    n_crlf, n_lf, n_cr = raw.count(b"\r\n"), raw.count(b"\n"), raw.count(b"\r")
    data = raw
    if n_lf != n_crlf or n_cr != n_crlf:
        crcrlf = raw.count(b"\r\r\n")
        if n_lf > n_crlf:
            changes.append("bare LF line ends -> CRLF")
        if crcrlf:
            changes.append("CR CR LF line ends -> CRLF")
        if n_cr - n_crlf - crcrlf > 0:
            changes.append("bare CR line ends -> CRLF")
        if n_cr == 0:
            data = raw.replace(b"\n", CRLF)
        elif n_lf == 0:
            data = raw.replace(b"\r", CRLF)
        else:
            data = _LINE_END.sub(CRLF, raw)
    if data and not data.endswith(CRLF):
        data += CRLF
        changes.append("added CRLF at end of data")
    return data


def _parse_entity(buf: bytes) -> _Entity:
    """Split header fields from the body; the body starts at a blank or a non-field line."""
    fields: list[_Field] = []
    pos, start, name, n = 0, 0, "", len(buf)
    sep = b""
    while pos < n:
        eol = buf.find(CRLF, pos)
        end = n if eol < 0 else eol + 2
        if eol == pos:
            sep = CRLF
            break
        if buf[pos] in b" \t" and name:
            pos = end
            continue
        match = _FIELD_NAME.match(buf, pos)
        if match is None:
            break
        if name:
            fields.append(_Field(name, buf[start:pos]))
        name, start, pos = match.group(1).decode("ascii").lower(), pos, end
    if name:
        fields.append(_Field(name, buf[start:pos]))
    return _Entity(fields, sep, buf[pos + len(sep) :])


LONG_LINE_WINDOW = 1024 * 1024


def _has_long_line(buf: bytes) -> bool:
    """A line over MAX_LINE, looked for a window at a time (windows end at a line end), so a
    large body is never split into one list of all its lines."""
    if len(buf) <= MAX_LINE:
        return False
    start = 0
    while start < len(buf):
        end = buf.find(CRLF, min(start + LONG_LINE_WINDOW, len(buf)))
        end = len(buf) if end < 0 else end
        if max(map(len, buf[start:end].split(CRLF))) > MAX_LINE:
            return True
        start = end + len(CRLF)
    return False


# --- top-level header fixes ---------------------------------------------------------------------


def _remove_bcc(top: _Entity, ctx: _Ctx) -> None:
    kept = [f for f in top.fields if f.name not in _REMOVED_FIELDS]
    if len(kept) != len(top.fields):
        ctx.changes.extend(f"removed {f.label}" for f in top.fields if f.name in _REMOVED_FIELDS)
        top.fields, top.dirty = kept, True


def _add_missing(
    top: _Entity, ctx: _Ctx, *, sender: str, hostname: str, now: datetime, id_domain: str | None
) -> None:
    host = _domain(hostname)
    utc = (now if now.tzinfo else now.replace(tzinfo=UTC)).astimezone(UTC)
    added: list[_Field] = []
    if top.get("date") is None:
        added.append(_Field("date", f"Date: {format_datetime(utc)}\r\n".encode("ascii")))
    if top.get("message-id") is None:
        domain = _domain(id_domain) if id_domain else host
        value = f"<{utc:%Y%m%d%H%M%S}.{uuid.uuid4().hex}@{domain}>"
        added.append(_Field("message-id", f"Message-ID: {value}\r\n".encode("ascii")))
    if top.get("from") is None:
        address = re.sub(r"[\s<>\x00]", "", sender) or f"MAILER-DAEMON@{host}"
        added.append(_Field("from", b"From: <" + _utf8(address) + b">\r\n"))
    if added:
        ctx.changes.extend("added " + f.label for f in added)
        top.fields[:0] = added
        top.dirty = True


def _domain(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "", name).strip(".-") or "localhost"


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


# --- header fields at any level: 8-bit and long lines ------------------------------------------


def _fix_headers(ent: _Entity, ctx: _Ctx, where: str) -> None:
    loc = f" in part {where}" if where else ""
    for f in ent.fields:
        if not f.raw.isascii() and _encode_field(f, ctx, loc):
            ent.dirty = True
        if len(f.raw) > MAX_LINE + 2 and _fold_field(f, ctx, loc):
            ent.dirty = True


def _encode_field(f: _Field, ctx: _Ctx, loc: str) -> bool:
    colon = f.raw.index(b":")
    eol = CRLF if f.raw.endswith(CRLF) else b""
    value = f.raw[colon + 1 : len(f.raw) - len(eol)]
    try:
        text, charset = value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, charset = value.decode("latin-1"), "latin-1"
    if ctx.smtputf8 and charset == "utf-8":
        ctx.needs_smtputf8 = True
        return False
    how = "RFC 2047"
    if f.name in _ID_FIELDS:
        new = text
    elif f.name in _ADDRESS_FIELDS:
        new = _encode_address(text)
    elif f.name in _PARAM_FIELDS:
        new, how = _encode_params(text)
    else:
        new = _encode_unstructured(text)
    changed = new != text
    if changed:
        f.raw = f.raw[: colon + 1] + new.encode(charset) + eol
        ctx.changes.append(f"encoded 8-bit {f.label}{loc} as {how}")
    if not f.raw.isascii():
        ctx.needs_smtputf8 = True
        ctx.changes.append(f"left raw 8-bit in {f.label}{loc} (needs SMTPUTF8)")
    return changed


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 B encoded-words of at most 75 characters, never splitting a character."""
    data, words, pos = text.encode("utf-8"), [], 0
    while pos < len(data):
        end = min(pos + 45, len(data))
        while pos + 1 < end < len(data) and data[end] & 0xC0 == 0x80:
            end -= 1
        words.append("=?UTF-8?B?" + base64.b64encode(data[pos:end]).decode("ascii") + "?=")
        pos = end
    return words


def _encode_unstructured(text: str) -> str:
    parts = _WS_SPLIT.split(text)  # words at even indices, whitespace at odd ones
    eight = [k for k in range(0, len(parts), 2) if not parts[k].isascii()]
    if not eight:
        return text
    first, last = eight[0], eight[-1]
    span = "".join(parts[first : last + 1]).replace("\r\n", "")
    return "".join(parts[:first]) + "\r\n ".join(_encoded_words(span)) + "".join(parts[last + 1 :])


def _tokens(text: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "w", m.group()) for m in _TOKEN.finditer(text)]


def _unquote(tok: str) -> str:
    inner = tok[1:-1] if len(tok) > 1 and tok.endswith('"') else tok[1:]
    return re.sub(r"\\(.)", r"\1", inner, flags=re.S).replace("\r\n", "")


def _encode_comment(tok: str) -> str:
    closed = len(tok) > 1 and tok.endswith(")")
    inner = (tok[1:-1] if closed else tok[1:]).replace("\r\n", "")
    return "(" + " ".join(_encoded_words(inner)) + (")" if closed else "")


def _encode_address(text: str) -> str:
    """Encode display names and comments; addresses themselves are left for SMTPUTF8."""
    toks = _tokens(text)
    out: list[str] = []
    k = 0
    while k < len(toks):
        kind, tok = toks[k]
        if _is_phrase_word(toks, k):
            end = k
            while end < len(toks) and (_is_phrase_word(toks, end) or toks[end][0] == "s"):
                end += 1
            while toks[end - 1][0] == "s":
                end -= 1
            run = toks[k:end]
            if all(t.isascii() for _, t in run):
                out.extend(t for _, t in run)
            else:
                words = [_unquote(t) if c == "q" else t.replace("\r\n", "") for c, t in run]
                out.append("\r\n ".join(_encoded_words("".join(words))))
            k = end
            continue
        out.append(_encode_comment(tok) if kind == "c" and not tok.isascii() else tok)
        k += 1
    return "".join(out)


def _is_phrase_word(toks: list[tuple[str, str]], k: int) -> bool:
    kind, tok = toks[k]
    if kind == "w":
        return "@" not in tok
    if kind == "q":  # a quoted local part ("a b"@host) is an address, not a display name
        return not (k + 1 < len(toks) and toks[k + 1][1].startswith("@"))
    return False


def _encode_params(text: str) -> tuple[str, str]:
    toks = _tokens(text)
    out = [tok for _, tok in toks]
    methods: set[str] = set()
    for k, (kind, tok) in enumerate(toks):
        if tok.isascii():
            continue
        if kind == "c":
            out[k] = _encode_comment(tok)
            methods.add("RFC 2047")
            continue
        name_at = _param_name_at(toks, k) if kind in ("q", "w") else None
        if name_at is None:
            continue
        name = toks[name_at][1].lower()
        value = _unquote(tok) if kind == "q" else tok
        if name == "filename":
            out[name_at], out[k] = _rfc2231(toks[name_at][1], value)
            methods.add("RFC 2231")
        elif name != "boundary":  # a boundary must match the delimiter lines byte for byte
            out[k] = '"' + " ".join(_encoded_words(value)) + '"'
            methods.add("RFC 2047")
    return "".join(out), " and ".join(sorted(methods)) or "RFC 2047"


def _param_name_at(toks: list[tuple[str, str]], k: int) -> int | None:
    """Index of the parameter name whose value is token k, if token k is a value."""
    j = k - 1
    while j >= 0 and toks[j][0] == "s":
        j -= 1
    if j < 0 or toks[j][1] != "=":
        return None
    j -= 1
    while j >= 0 and toks[j][0] == "s":
        j -= 1
    return j if j >= 0 and toks[j][0] == "w" and toks[j][1].isascii() else None


def _rfc2231(name: str, value: str) -> tuple[str, str]:
    encoded = quote(value, safe=_ATTR_SAFE, encoding="utf-8", errors="replace")
    if len(encoded) <= 200:
        return name + "*", "UTF-8''" + encoded
    chunks, pos = [], 0
    while pos < len(encoded):  # continuations (RFC 2231 3), never splitting a %XX escape
        end = min(pos + 60, len(encoded))
        while pos + 3 < end < len(encoded) and "%" in encoded[end - 2 : end]:
            end -= 1
        chunks.append(encoded[pos:end])
        pos = end
    rest = "".join(f";\r\n {name}*{n}*={c}" for n, c in enumerate(chunks[1:], 1))
    return name + "*0*", "UTF-8''" + chunks[0] + rest


def _fold_field(f: _Field, ctx: _Ctx, loc: str) -> bool:
    eol = CRLF if f.raw.endswith(CRLF) else b""
    lines = f.raw[: len(f.raw) - len(eol)].split(CRLF)
    longest = max(map(len, lines))
    if longest <= MAX_LINE:
        return False
    out: list[bytes] = []
    for line in lines:
        out.extend(_fold_line(line) if len(line) > MAX_LINE else [line])
    if max(map(len, out)) > MAX_LINE:  # a fold elsewhere in it would not save the field
        ctx.changes.append(f"left unfoldable {f.label}{loc} ({longest} chars, no whitespace)")
        return False
    f.raw = CRLF.join(out) + eol
    ctx.changes.append(f"folded {f.label}{loc} ({longest} chars)")
    return True


def _fold_line(line: bytes) -> list[bytes]:
    """Break before whitespace so lines stay within FOLD_WIDTH where the words allow it."""
    pieces = _PIECE.findall(line)
    out: list[bytes] = []
    cur = pieces[0]
    for piece in pieces[1:]:
        if len(cur) + len(piece) > FOLD_WIDTH and piece.strip(b" \t"):
            out.append(cur)
            cur = piece
        else:
            cur += piece
    out.append(cur)
    return out


# --- bodies: the MIME tree, in bytes ------------------------------------------------------------


def _fix_body(ent: _Entity, ctx: _Ctx, where: str, depth: int) -> None:
    ctype, boundary = _content_type(ent)
    cte = _cte(ent)
    if depth < _MAX_DEPTH and ctype.startswith("multipart/") and boundary is not None:
        ctx.boundaries.append(boundary)
        found, new = _fix_multipart(ent.body, boundary, ctx, where, depth)
        ctx.boundaries.pop()
        if found:
            if new is not None:
                ent.body, ent.dirty = new, True
            return
    if depth < _MAX_DEPTH and ctype in _MESSAGE_TYPES and cte in _IDENTITY_CTE:
        inner = _parse_entity(ent.body)
        _fix_headers(inner, ctx, where)
        _fix_body(inner, ctx, where, depth + 1)
        if inner.dirty:
            ent.body, ent.dirty = inner.to_bytes(), True
        return
    if ctx.long_lines and _has_long_line(ent.body):
        _fix_leaf(ent, cte, ctx, where, depth)


def _content_type(ent: _Entity) -> tuple[str, bytes | None]:
    f = ent.get("content-type")
    if f is None:
        return "text/plain", None
    value = f.raw.split(b":", 1)[1].replace(CRLF, b"").decode("latin-1")
    ctype = value.split(";", 1)[0].strip().lower()
    for m in _PARAM.finditer(value):
        if m.group(1).lower() == "boundary":
            bnd = m.group(2)
            if bnd.startswith('"'):
                bnd = re.sub(r"\\(.)", r"\1", bnd[1:-1], flags=re.S)
            if 0 < len(bnd) <= _MAX_BOUNDARY:
                return ctype, bnd.encode("latin-1")
            break
    return ctype, None


def _cte(ent: _Entity) -> str:
    f = ent.get("content-transfer-encoding")
    if f is None:
        return ""
    value = f.raw.split(b":", 1)[1].decode("latin-1")
    return value.replace("\r\n", "").strip().split(";")[0].split("(")[0].strip().lower()


def _delimiters(body: bytes, boundary: bytes) -> list[tuple[int, int, bool]]:
    """(start, end after its CRLF, is_close) of each delimiter line, up to the close one."""
    delim, found = b"--" + boundary, []
    i = body.find(delim)
    while i >= 0:
        after = i + len(delim)
        if i == 0 or body[i - 2 : i] == CRLF:
            close = body.startswith(b"--", after)
            k = after + 2 if close else after
            while k < len(body) and body[k] in b" \t":
                k += 1
            if k == len(body) or body.startswith(CRLF, k):
                found.append((i, min(k + 2, len(body)), close))
                if close:
                    break
        i = body.find(delim, after)
    return found


def _fix_multipart(
    body: bytes, boundary: bytes, ctx: _Ctx, where: str, depth: int
) -> tuple[bool, bytes | None]:
    delims = _delimiters(body, boundary)
    if not delims:
        return False, None
    pieces: list[bytes] = []
    cursor, dirty = 0, False
    label = f"part {where}" if where else "the message"
    regions = [(0, delims[0][0], f"preamble of {label}")]
    for n, (_, end, close) in enumerate(delims):
        if close:
            regions.append((end, len(body), f"epilogue of {label}"))
            break
        stop = max(end, delims[n + 1][0] - 2) if n + 1 < len(delims) else len(body)
        regions.append((end, stop, f"{where}.{n + 1}" if where else str(n + 1)))
    for start, stop, name in regions:
        chunk = body[start:stop]
        if name.startswith(("preamble", "epilogue")):
            new = _hard_wrap(chunk, ctx, name) if ctx.long_lines else None
        else:
            part = _parse_entity(chunk)
            _fix_headers(part, ctx, name)
            _fix_body(part, ctx, name, depth + 1)
            new = part.to_bytes() if part.dirty else None
        if new is not None:
            pieces += [body[cursor:start], new]
            cursor, dirty = stop, True
    return True, (b"".join([*pieces, body[cursor:]]) if dirty else None)


def _hard_wrap(chunk: bytes, ctx: _Ctx, name: str) -> bytes | None:
    if not _has_long_line(chunk):
        return None
    out = []
    for line in chunk.split(CRLF):
        pos = 0
        while len(line) - pos > MAX_LINE:
            cut = pos + MAX_LINE
            while cut > pos + MAX_LINE - 80 and line[cut : cut + 1] == b"-":
                cut -= 1  # a wrapped line starting with "--" could pass for a delimiter
            out.append(line[pos:cut])
            pos = cut
        out.append(line[pos:])
    ctx.changes.append(f"wrapped long lines in the {name}")
    return CRLF.join(out)


def _fix_leaf(ent: _Entity, cte: str, ctx: _Ctx, where: str, depth: int) -> None:
    loc = f" in part {where}" if where else ""
    rewrapped = _rewrap_qp(ent.body) if cte == "quoted-printable" else None
    if cte == "base64":
        ent.body = _rewrap_base64(ent.body)
        ctx.changes.append(f"re-wrapped base64{loc} at 76 columns")
    elif rewrapped is not None and not _collides(rewrapped, ent.body, ctx):
        ent.body = rewrapped
        ctx.changes.append(f"re-wrapped long quoted-printable lines{loc}")
    else:
        decoded = binascii.a2b_qp(ent.body) if cte == "quoted-printable" else ent.body
        encoded, name = _encode_qp(decoded), "quoted-printable"
        if _collides(encoded, ent.body, ctx):
            encoded, name = base64.encodebytes(decoded).replace(b"\n", CRLF), "base64"
        ent.body = encoded
        _set_cte(ent, name)
        _declare_charset(ent, decoded, ctx, loc)
        if depth == 0 and ent.get("mime-version") is None:
            ent.add(_Field("mime-version", b"MIME-Version: 1.0\r\n"))
            ctx.changes.append("added MIME-Version")
        ctx.changes.append(f"encoded long body lines{loc} as {name}")
    ent.dirty = True


def _rewrap_base64(body: bytes) -> bytes:
    flat = body.replace(CRLF, b"")
    lines = [flat[i : i + B64_WIDTH] for i in range(0, len(flat), B64_WIDTH)]
    return CRLF.join(lines) + (CRLF if body.endswith(CRLF) else b"")


def _rewrap_qp(body: bytes) -> bytes:
    return CRLF.join(_qp_soft_wrap(ln) if len(ln) > MAX_LINE else ln for ln in body.split(CRLF))


def _qp_soft_wrap(line: bytes) -> bytes:
    out, pos = [], 0
    while len(line) - pos > B64_WIDTH:
        cut = pos + B64_WIDTH - 1
        escape = line.rfind(b"=", max(pos + 1, cut - 2), cut)  # never split "=XX"
        if escape >= 0:
            cut = escape
        out.append(line[pos:cut] + b"=")
        pos = cut
    out.append(line[pos:])
    return CRLF.join(out)


def _encode_qp(data: bytes) -> bytes:
    encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    return encoded if CRLF in data else encoded.replace(b"\n", CRLF)


def _collides(encoded: bytes, original: bytes, ctx: _Ctx) -> bool:
    """True if re-encoding made a line look like an enclosing multipart delimiter."""
    return any(
        encoded.count(b"\n--" + b) != original.count(b"\n--" + b)
        or (encoded.startswith(b"--" + b) and not original.startswith(b"--" + b))
        for b in ctx.boundaries
    )


def _declare_charset(ent: _Entity, decoded: bytes, ctx: _Ctx, loc: str) -> None:
    """Once encoded, 8-bit text needs its charset declared (the MIME default is US-ASCII):
    a part with no Content-Type becomes text/plain with the charset its bytes are valid in."""
    if decoded.isascii() or ent.get("content-type") is not None:
        return
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        charset = "iso-8859-1"
    else:
        charset = "utf-8"
    field = f"Content-Type: text/plain; charset={charset}\r\n".encode()
    ent.add(_Field("content-type", field))
    ctx.changes.append(f"declared text/plain; charset={charset}{loc}")


def _set_cte(ent: _Entity, name: str) -> None:
    new = _Field("content-transfer-encoding", f"Content-Transfer-Encoding: {name}\r\n".encode())
    if ent.sep == b"":
        ent.sep = CRLF
    at = next((k for k, f in enumerate(ent.fields) if f.name == new.name), None)
    if at is None:
        ent.add(new)
        return
    kept = [f for f in ent.fields[at + 1 :] if f.name != new.name]
    ent.fields[at:] = [new, *kept]  # the body is not empty here, so each field ends in CRLF
