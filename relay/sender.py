"""Sender policy: an envelope sender and a From: that Exchange Online lets the mailbox send as.

One job: given the relay's mailbox and the addresses it may send as, choose the envelope sender
for the upstream session and, when `from_header = "rewrite"`, edit the From:, Sender: and
Reply-To: fields so Exchange does not refuse the message after the body with `554 5.2.252
SendAsDenied` (docs: design/exchange-online.md §3.3, which checks the envelope sender *and* every
From: address). Pure: stdlib only, no I/O and no logging. The caller logs `SenderRewrite.changes`
with the queue id, which is the record of every original value that was replaced.

Rules
* Envelope: a permitted sender is kept (without angle brackets). Anything else becomes the
  mailbox, the null sender `<>` included: Exchange needs a real MAIL FROM for a submission, and
  the NDRs it generates then go to the mailbox, never back to the device, so this cannot loop.
* `from_header = "keep"`: the data is never touched (same object), only the envelope changes.
* `from_header = "rewrite"`, on the header block only:
  - From: each address that is not permitted becomes the mailbox, under the original display
    name (RFC 2047 encoded-words kept verbatim; raw 8-bit bytes kept verbatim). Without a
    display name, the comment of an old-style `addr (Name)` is used, else the address itself
    with `@` spelt " at ". A display name never keeps an `@` once its address is replaced. Two
    entries that both became the mailbox are merged into one.
  - An unquoted `@` (or another RFC 5322 special) in a display name is quoted, and `@` is spelt
    " at ", even when the address is permitted (sample 07; Exchange and Graph refuse it).
  - A From: that cannot be parsed (unbalanced quotes, no address, ...) becomes `<mailbox>`.
  - Reply-To: `<original>, ...` is added after From: when addresses were replaced and the
    message has no Reply-To: of its own.
  - Sender: naming an address that is not permitted (GLPI, sample 08) is removed: with a single
    From: mailbox RFC 5322 §3.6.2 makes it optional, and `Sender: <mailbox>` would either repeat
    From: (a SHOULD NOT) or turn the message into a send-on-behalf, which Exchange checks
    against a different right than Send As. When From: still holds several addresses, RFC 5322
    requires one Sender: and Exchange rejects the message without it (`550 5.1.20`, MC886603),
    so then Sender: is set to the mailbox, and added if missing.
  - Edits are surgical: only those fields' lines change (rewritten fields are written on one
    line, folded at commas when long, with the field's own line ends and name spelling);
    every other byte stays. `changes` names each DKIM-Signature that signs a changed field
    (it no longer verifies; the log keeps the original values). Keep mode breaks none, and
    Exchange signs outgoing mail for the tenant's own domains itself.

Limits
* Reads the header block up to the first empty line or the first line that is neither a field
  nor a continuation; any line ending (CRLF, LF, CR CR LF, CR) is accepted and kept.
* A message without From: gets none here: the normaliser (issue 3 item 4) adds one before this
  runs, or from the rewritten envelope sender after it.
* Groups and obsolete CFWS inside an address are treated as unparseable. Only From: and Sender:
  are checked (Resent-* are not looked at by Exchange's Send As check).
* Never raises on data or envelope content; `SenderPolicy` raises ValueError on a bad mailbox,
  send_as entry or mode (configuration errors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

FromHeaderMode = Literal["keep", "rewrite"]

# RFC 5322 atext plus "." (obs-phrase, dot-atom) and 8-bit (RFC 6532): anything but controls,
# space and the specials.
_ATEXT = r'[^\x00-\x20\x7f"(),:;<>@\[\]\\]'
_ATOM = re.compile(_ATEXT + "+")
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# Each alternative starts with a different character, so matching stays linear on garbage.
_ADDRESS = re.compile(rf"(?:{_ATEXT}|{_QUOTED})+@(?:{_ATEXT}+|\[[^\[\]\\]*\])", re.DOTALL)
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LOG_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AT = re.compile(r"[ \t]*@[ \t]*")
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_EOL = re.compile(rb"\r+\n?|\n")
_FOLD_AT = 78
_WANTED = frozenset({"from", "sender", "reply-to", "dkim-signature"})

_Token = tuple[str, str]  # (kind, raw): q quoted-string, c comment, w space, s special, a other


# --- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderPolicy:
    """The mailbox the relay signs in as and what it may send as."""

    mailbox: str
    send_as: tuple[str, ...] = ()  # "scanner@contoso.com", "@contoso.com" or "contoso.com"
    from_header: FromHeaderMode = "rewrite"
    _addresses: frozenset[str] = field(init=False, repr=False, compare=False)
    _domains: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mailbox = self.mailbox.strip()
        if not mailbox.isascii() or _ADDRESS.fullmatch(mailbox) is None:
            raise ValueError(f"mailbox {self.mailbox!r} is not an address")
        if self.from_header not in ("keep", "rewrite"):
            raise ValueError(f"from_header must be 'keep' or 'rewrite', not {self.from_header!r}")
        addresses = {mailbox.lower()}
        domains: set[str] = set()
        for entry in self.send_as:
            item = entry.strip().lower()
            if "@" in item and not item.startswith("@"):
                if _ADDRESS.fullmatch(item) is None:
                    raise ValueError(f"send_as entry {entry!r} is not an address")
                addresses.add(item)
                continue
            domain = item.removeprefix("@")
            if _ATOM.fullmatch(domain) is None:
                raise ValueError(f"send_as entry {entry!r} is not an address or a domain")
            domains.add(domain)
        object.__setattr__(self, "mailbox", mailbox)
        object.__setattr__(self, "send_as", tuple(self.send_as))
        object.__setattr__(self, "_addresses", frozenset(addresses))
        object.__setattr__(self, "_domains", frozenset(domains))

    def permits(self, address: str) -> bool:
        """The mailbox itself, a listed address, or an address in a listed domain (any case)."""
        bare = address.strip(" \t")
        if bare.startswith("<") and bare.endswith(">"):
            bare = bare[1:-1].strip(" \t")
        if _ADDRESS.fullmatch(bare) is None:
            return False
        bare = bare.lower()
        return bare in self._addresses or bare.rpartition("@")[2] in self._domains


@dataclass(frozen=True)
class SenderRewrite:
    """What to send upstream, and what was changed to get there (for the log)."""

    mail_from: str  # envelope sender to use upstream
    data: bytes  # the message to send: the very same object when nothing changed
    changes: tuple[str, ...]  # each original value replaced, added or removed, in order


def apply_sender_policy(policy: SenderPolicy, mail_from: str, data: bytes) -> SenderRewrite:
    """Apply `policy` to one message (see the module docstring for the rules)."""
    changes: list[str] = []
    envelope = _envelope(policy, mail_from, changes)
    if policy.from_header == "keep":
        return SenderRewrite(envelope, data, tuple(changes))
    return SenderRewrite(envelope, _rewrite_headers(policy, data, changes), tuple(changes))


def _envelope(policy: SenderPolicy, mail_from: str, changes: list[str]) -> str:
    bare = mail_from.strip(" \t")
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip(" \t")
    if bare and policy.permits(bare):
        return bare
    if bare:
        changes.append(f"envelope sender {_for_log(bare, header=False)} -> {policy.mailbox}")
    else:
        changes.append(f"envelope sender <> -> {policy.mailbox} (null sender)")
    return policy.mailbox


# --- the header block --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str  # lower-case
    raw_name: bytes  # as written
    start: int
    end: int  # after the line end of the field's last line
    value: str  # unfolded, one character per byte (latin-1)
    line_end: bytes  # what ends the field's last line; b"" at the end of the data
    fold: bytes  # a line end to use inside and after the field


def _header_fields(data: bytes) -> list[_Field]:
    """From:, Sender:, Reply-To: and DKIM-Signature:, read up to the empty line or the first
    line that is not a header line (a script that forgot the empty line)."""
    fields: list[_Field] = []
    first_eol = line_end = b""
    in_field = False  # continuation lines belong to a field
    current: tuple[str, bytes, int, list[bytes], bytes] | None = None  # a field we want
    pos = 0

    def close(upto: int) -> None:
        if current is not None:
            name, raw_name, start, parts, eol = current
            value = b"".join(parts).decode("latin-1")
            fold = eol or first_eol or b"\r\n"
            fields.append(_Field(name, raw_name, start, upto, value, line_end, fold))

    while pos < len(data):
        match = _EOL.search(data, pos)
        content_end, end = (match.start(), match.end()) if match else (len(data), len(data))
        line = data[pos:content_end]
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if not in_field:
                break
            if current is not None:
                current[3].append(line)
        else:
            name_match = _FIELD_NAME.match(line)
            if name_match is None:
                break
            close(pos)
            in_field, current = True, None
            name = name_match.group(1).decode("ascii").lower()
            if name in _WANTED:
                raw_name = line[: name_match.end() - 1]  # "From", "FROM ": as written
                eol = data[content_end:end]
                current = (name, raw_name, pos, [line[name_match.end() :]], eol)
        line_end = data[content_end:end]
        first_eol = first_eol or line_end
        pos = end
    close(pos)
    return fields


def header_end(data: bytes, *, whole: bool) -> int | None:
    """Where the header block that `_header_fields` reads ends in `data` (the first bytes of
    a message, all of it when `whole`): the offset of the empty line or the first line that
    is not a header line, or of the end when `whole` and there is none. None when the block
    may go on past `data`. The policy applied to `data[:end]` changes the same bytes as on
    the whole message, and leaves `data[end:]` as it is."""
    pos, in_field = 0, False
    while pos < len(data):
        match = _EOL.search(data, pos)
        if match is None:
            return len(data) if whole else None  # a last line that may not be complete
        line = data[pos : match.start()]
        if not line:
            return pos
        if line[:1] in (b" ", b"\t"):
            if not in_field:
                return pos
        elif _FIELD_NAME.match(line) is None:
            return pos
        else:
            in_field = True
        pos = match.end()
    return pos if whole else None


# --- address lists -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mailbox:
    text: str  # the entry as written (unfolded, stripped)
    phrase: tuple[_Token, ...]  # display name tokens; empty for a bare addr-spec
    address: str  # "" for <>
    comments: tuple[str, ...]  # comment texts around a bare addr-spec: its old-style name
    angle: bool


def _lex(text: str) -> list[_Token] | None:
    """Tokens of a structured header value; None when a quote or comment is left open."""
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return None
            tokens.append(("q", text[i : j + 1]))
            i = j + 1
        elif ch == "(":
            depth, j = 0, i
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            if j >= n:
                return None
            tokens.append(("c", text[i : j + 1]))
            i = j + 1
        elif ch in " \t":
            j = i
            while j < n and text[j] in " \t":
                j += 1
            tokens.append(("w", text[i:j]))
            i = j
        elif ch in ",<>":
            tokens.append(("s", ch))
            i += 1
        else:
            j = i
            while j < n and text[j] not in '"( \t,<>':
                j += 1
            tokens.append(("a", text[i:j]))
            i = j
    return tokens


def _parse_list(value: str) -> list[_Mailbox] | None:
    """The mailboxes of a From:/Sender: value; None when any part of it is not one."""
    tokens = _lex(value)
    if tokens is None:
        return None
    elements: list[list[_Token]] = [[]]
    depth = 0
    for token in tokens:
        depth += {("s", "<"): 1, ("s", ">"): -1}.get(token, 0)
        if token == ("s", ",") and depth == 0:
            elements.append([])
        else:
            elements[-1].append(token)
    mailboxes: list[_Mailbox] = []
    carry: list[_Token] = []  # "Doe, John <j@x>": an unquoted comma inside a display name
    for element in elements:
        tokens = carry + element
        if not carry and all(kind == "w" for kind, _ in tokens):
            continue  # obs-mbox-list allows empty elements
        if all(t != ("s", "<") and not (t[0] == "a" and "@" in t[1]) for t in tokens):
            carry = [*tokens, ("s", ",")]
            continue
        mailbox = _parse_mailbox(tokens)
        if mailbox is None:
            return None
        mailboxes.append(mailbox)
        carry = []
    return None if carry else mailboxes


def _parse_mailbox(tokens: list[_Token]) -> _Mailbox | None:
    text = "".join(raw for _, raw in tokens).strip(" \t")
    opens = [i for i, token in enumerate(tokens) if token == ("s", "<")]
    closes = [i for i, token in enumerate(tokens) if token == ("s", ">")]
    if opens or closes:
        if len(opens) != 1 or len(closes) != 1 or closes[0] < opens[0]:
            return None
        lt, gt = opens[0], closes[0]
        if any(kind not in ("w", "c") for kind, _ in tokens[gt + 1 :]):
            return None
        address = _addr_spec(tokens[lt + 1 : gt], in_angle=True)
        if address is None:
            return None
        return _Mailbox(text, tuple(tokens[:lt]), address, (), True)
    address = _addr_spec(tokens, in_angle=False)
    if not address:
        return None
    comments = tuple(raw[1:-1] for kind, raw in tokens if kind == "c")
    return _Mailbox(text, (), address, comments, False)


def _addr_spec(tokens: list[_Token], *, in_angle: bool) -> str | None:
    """The address in `tokens` (comments and outer space dropped), "" for <>, None if none."""
    i, j = 0, len(tokens)
    while i < j and tokens[i][0] in ("w", "c"):
        i += 1
    while j > i and tokens[j - 1][0] in ("w", "c"):
        j -= 1
    core = tokens[i:j]
    if any(kind in ("w", "c") or (kind == "s" and not in_angle) for kind, _ in core):
        return None
    address = "".join(raw for _, raw in core)
    if in_angle and address.startswith("@"):  # obs-route "@a,@b:user@host"
        _, colon, address = address.partition(":")
        if not colon:
            return None
    if not address:
        return "" if in_angle else None
    return address if _ADDRESS.fullmatch(address) else None


# --- display names -----------------------------------------------------------------------------


def _phrase_ok(phrase: tuple[_Token, ...]) -> bool:
    """A display name Exchange accepts as written: atoms, quoted strings, comments."""
    return all(
        kind in ("w", "c", "q") or (kind == "a" and _ATOM.fullmatch(raw) is not None)
        for kind, raw in phrase
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(raw: str) -> str:
    return re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.DOTALL)


def _clean(text: str) -> str:
    """Display text without controls and with "@" spelt " at "."""
    return _AT.sub(" at ", _CONTROL.sub(" ", text)).strip(" ")


def _render(phrase: tuple[_Token, ...]) -> str:
    """A display name fit for Exchange: one quoted string, or words when it has encoded-words."""
    words: list[list[_Token]] = [[]]
    for token in phrase:
        if token[0] == "w":
            if words[-1]:
                words.append([])
        else:
            words[-1].append(token)
    items: list[tuple[bool, str]] = []  # (encoded-word, text)
    for word in words:
        if len(word) == 1 and word[0][0] == "a" and _ENCODED_WORD.fullmatch(word[0][1]):
            items.append((True, word[0][1]))
            continue
        text = _clean("".join(_unquote(raw) if kind == "q" else raw for kind, raw in word))
        if text:
            items.append((False, text))
    if not any(encoded for encoded, _ in items):
        text = " ".join(text for _, text in items)
        return _quote(text) if text else ""
    return " ".join(
        text if encoded or _ATOM.fullmatch(text) else _quote(text) for encoded, text in items
    )


def _display_for(mailbox: _Mailbox) -> str:
    """The display name to put in front of the mailbox when `mailbox` is replaced."""
    rendered = _render(mailbox.phrase)
    if rendered:
        return rendered
    comment = _clean(" ".join(re.sub(r"\\(.)", r"\1", c) for c in mailbox.comments))
    if comment:
        return _quote(comment)
    return _quote(_clean(mailbox.address)) if mailbox.address else ""


def _entry(display: str, address: str) -> str:
    return f"{display} <{address}>" if display else f"<{address}>"


# --- the rewrite -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FromOutcome:
    value: str | None  # new value, None when unchanged
    entries: tuple[str, ...]  # the entries written
    replaced: tuple[str, ...]  # original addresses that were replaced
    count: int  # addresses in the field afterwards
    reason: str  # "", "unparseable" or "display name sanitised"


def _rewrite_from(policy: SenderPolicy, value: str) -> _FromOutcome:
    mailboxes = _parse_list(value)
    own = policy.mailbox.lower()
    if not mailboxes:
        new = f"<{policy.mailbox}>"
        return _FromOutcome(new, (new,), (), 1, "unparseable")
    entries: list[str] = []
    replaced: list[str] = []
    changed = sanitised = False
    has_own = own_replaced = False  # the mailbox is in `entries`; it came from a replacement
    for mailbox in mailboxes:
        is_own = mailbox.address.lower() == own
        if policy.permits(_as_text(mailbox.address)):
            if is_own and own_replaced:
                continue  # already there, under a replaced entry's display name
            if mailbox.angle and not _phrase_ok(mailbox.phrase):
                entries.append(_entry(_render(mailbox.phrase), mailbox.address))
                changed = sanitised = True
            else:
                entries.append(mailbox.text)
            has_own = has_own or is_own
            continue
        changed = True
        if mailbox.address:
            replaced.append(mailbox.address)
        if not has_own:
            entries.append(_entry(_display_for(mailbox), policy.mailbox))
            has_own = own_replaced = True
    if not changed:
        return _FromOutcome(None, tuple(entries), (), len(entries), "")
    reason = "display name sanitised" if sanitised else ""
    return _FromOutcome(", ".join(entries), tuple(entries), tuple(replaced), len(entries), reason)


def _rewrite_sender(policy: SenderPolicy, value: str) -> tuple[bool, str | None]:
    """(permitted, sanitised value or None)."""
    mailboxes = _parse_list(value)
    if (
        mailboxes is None
        or len(mailboxes) != 1
        or not policy.permits(_as_text(mailboxes[0].address))
    ):
        return False, None
    mailbox = mailboxes[0]
    if mailbox.angle and not _phrase_ok(mailbox.phrase):
        return True, _entry(_render(mailbox.phrase), mailbox.address)
    return True, None


def _field_bytes(raw_name: bytes, entries: tuple[str, ...], fold: bytes) -> bytes:
    """`Name: a, b` on one line, folded after a comma when longer than 78 characters."""
    lines = [raw_name.decode("ascii") + ": "]
    for index, entry in enumerate(entries):
        piece = entry + ("," if index < len(entries) - 1 else "")
        if index and len(lines[-1]) + 1 + len(piece) > _FOLD_AT:
            lines.append(" " + piece)
        else:
            lines[-1] += ("" if index == 0 else " ") + piece
    folded = [part for line in lines for part in _fold_long(line)]
    return fold.join(line.encode("latin-1") for line in folded)


def _fold_long(line: str, limit: int = 900) -> list[str]:
    """Split a line longer than `limit` at spaces (RFC 5322 folding), so that a rewritten
    field never exceeds the 998-octet line limit. A run without spaces stays whole."""
    parts: list[str] = []
    while len(line) > limit:
        cut = line.rfind(" ", 1, limit)
        if cut <= 0:
            break
        parts.append(line[:cut])
        line = line[cut:]
    return [*parts, line]


@dataclass
class _Edits:
    """Field replacements on the raw bytes, and the names of the fields they touch."""

    data: bytes
    changes: list[str]
    spans: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # start -> (end, new)
    touched: set[str] = field(default_factory=set)

    def replace(self, f: _Field, entries: tuple[str, ...] | None) -> None:
        """Rewrite `f` with `entries`, or remove it when None."""
        new = b"" if entries is None else _field_bytes(f.raw_name, entries, f.fold) + f.line_end
        self.spans[f.start] = (f.end, new)
        self.touched.add(f.name)

    def add_after(self, f: _Field, lines: list[bytes]) -> None:
        end, head = self.spans.get(f.start, (f.end, self.data[f.start : f.end]))
        if f.line_end:
            tail = b"".join(line + f.fold for line in lines)
        else:
            tail = b"".join(f.fold + line for line in lines)
        self.spans[f.start] = (end, head + tail)

    def result(self) -> bytes:
        if not self.spans:
            return self.data
        out: list[bytes] = []
        pos = 0
        for start in sorted(self.spans):
            end, replacement = self.spans[start]
            out += [self.data[pos:start], replacement]
            pos = end
        out.append(self.data[pos:])
        return b"".join(out)


def _rewrite_headers(policy: SenderPolicy, data: bytes, changes: list[str]) -> bytes:
    fields = _header_fields(data)
    froms = [f for f in fields if f.name == "from"]
    edits = _Edits(data, changes)
    from_count, replaced = _rewrite_from_fields(policy, froms, edits)
    added: list[bytes] = []
    if replaced and not any(f.name == "reply-to" for f in fields):
        entries = tuple(f"<{address}>" for address in replaced)
        added.append(_field_bytes(b"Reply-To", entries, froms[0].fold))
        edits.touched.add("reply-to")
        changes.append(f"added Reply-To: {_for_log(', '.join(entries))}")
    senders = [f for f in fields if f.name == "sender"]
    if not _rewrite_sender_fields(policy, senders, from_count, edits) and from_count > 1:
        added.append(_field_bytes(b"Sender", (f"<{policy.mailbox}>",), froms[0].fold))
        edits.touched.add("sender")
        changes.append(f"added Sender: <{policy.mailbox}> (From: holds {from_count} addresses)")
    if added:
        edits.add_after(froms[0], added)
    if edits.spans:
        changes.extend(_dkim_notes(fields, edits.touched))
    return edits.result()


def _rewrite_from_fields(
    policy: SenderPolicy, froms: list[_Field], edits: _Edits
) -> tuple[int, list[str]]:
    """Rewrite every From: field; (addresses left in From:, original addresses replaced)."""
    count = 0
    replaced: list[str] = []
    for f in froms:
        outcome = _rewrite_from(policy, f.value)
        count += outcome.count
        for address in outcome.replaced:
            if address.lower() not in {r.lower() for r in replaced}:
                replaced.append(address)
        if outcome.value is not None:
            edits.replace(f, outcome.entries)
            note = f" ({outcome.reason})" if outcome.reason else ""
            edits.changes.append(f"From: {_for_log(f.value)} -> {_for_log(outcome.value)}{note}")
    return count, replaced


def _rewrite_sender_fields(
    policy: SenderPolicy, senders: list[_Field], from_count: int, edits: _Edits
) -> bool:
    """Keep, sanitise, replace or remove each Sender: field; True when one is left."""
    mailbox = f"<{policy.mailbox}>"
    left = False
    for f in senders:
        permitted, sanitised = _rewrite_sender(policy, f.value)
        old = _for_log(f.value)
        if permitted:
            left = True
            if sanitised is not None:
                edits.replace(f, (sanitised,))
                edits.changes.append(
                    f"Sender: {old} -> {_for_log(sanitised)} (display name sanitised)"
                )
        elif from_count > 1:
            left = True
            edits.replace(f, (mailbox,))
            edits.changes.append(f"Sender: {old} -> {mailbox}")
        else:
            edits.replace(f, None)
            edits.changes.append(f"removed Sender: {old}")
    return left


def _dkim_notes(fields: list[_Field], changed: set[str]) -> list[str]:
    notes: list[str] = []
    for f in fields:
        if f.name != "dkim-signature":
            continue
        tags: dict[str, str] = {}
        for part in f.value.split(";"):
            key, eq, val = part.partition("=")
            if eq:
                tags[key.strip().lower()] = "".join(val.split())
        signed = {name.lower() for name in tags.get("h", "").split(":")}
        broken = sorted(changed & signed)
        if broken:
            domain = _for_log(tags.get("d", "?"))
            notes.append(f"DKIM-Signature d={domain} signs {', '.join(broken)}: no longer verifies")
    return notes


def _as_text(header_address: str) -> str:
    """A header address (one character per byte) as the text it spells in UTF-8, so that a raw
    UTF-8 address from an old device compares equal to the same address in the config."""
    return header_address.encode("latin-1").decode("utf-8", "surrogateescape")


def _for_log(text: str, *, header: bool = True) -> str:
    """One printable line; a header value's raw bytes shown as UTF-8, controls escaped."""
    if header:  # one character per byte: show the bytes as the UTF-8 they nearly always are
        text = text.encode("latin-1", "replace").decode("utf-8", "backslashreplace")
    text = text.replace("\t", " ").strip()
    return _LOG_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
