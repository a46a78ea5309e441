"""normalize.py: device quirk normalisation before the spool (issue 3, items 4 and 5).

One test per quirk against the captured-style samples in tests/fixtures/devices (byte-exact
copies of shared/samples/devices), each asserting the exact outcome; then every sample through
Python's email parser; then hypothesis on arbitrary and on MIME-shaped bytes. Pure: no I/O but
reading the fixtures.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
import time
from dataclasses import fields
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.normalize import Normalized, normalize_message

FIXTURES = Path(__file__).parents[1] / "fixtures" / "devices"
SHARED = Path(__file__).parents[2].parent / "shared" / "samples" / "devices"
ENVELOPES: dict[str, dict[str, object]] = json.loads((FIXTURES / "envelopes.json").read_text())
NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
DATE = b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
HOST = "relay.contoso.com"
MID = re.compile(rb"\AMessage-ID: <20261127100000\.[0-9a-f]{32}@relay\.contoso\.com>\r\n")
SAMPLES = sorted(p.name for p in FIXTURES.glob("*.eml"))
CLEAN = ["01", "06", "07", "08", "11"]


def sample(prefix: str) -> tuple[str, bytes]:
    (name,) = [n for n in SAMPLES if n.startswith(prefix + "_")]
    return name, (FIXTURES / name).read_bytes()


def norm(raw: bytes, *, sender: str = "sender@contoso.com", smtputf8: bool = False) -> Normalized:
    return normalize_message(raw, envelope_from=sender, hostname=HOST, now=NOW, smtputf8=smtputf8)


def run(prefix: str, *, smtputf8: bool = False) -> tuple[bytes, Normalized]:
    name, raw = sample(prefix)
    sender = str(ENVELOPES[name]["mail_from"])
    return raw, norm(raw, sender=sender, smtputf8=smtputf8)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def split(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head + b"\r\n", body


def strip_mid(data: bytes) -> bytes:
    """The data without the added Message-ID line, which must be its first line."""
    match = MID.match(data)
    assert match, data[:120]
    return data[match.end() :]


def leaves(data: bytes) -> list[object]:
    """What each leaf part decodes to (Content-Transfer-Encoding undone)."""
    msg = parse(data)
    return [p.get_payload(decode=True) for p in msg.walk() if not p.is_multipart()]


def assert_wire_clean(data: bytes) -> None:
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
    assert data.endswith(b"\r\n")
    assert max(map(len, data.split(b"\r\n"))) <= 998


# --- the fixtures -------------------------------------------------------------------------------


def test_fixtures_hold_the_17_samples_and_their_envelopes() -> None:
    assert len(SAMPLES) == 17
    assert sorted(ENVELOPES) == SAMPLES


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared samples folder not present")
@pytest.mark.parametrize("name", [*SAMPLES, "envelopes.json"])
def test_fixtures_are_byte_exact_copies_of_the_shared_samples(name: str) -> None:
    assert (FIXTURES / name).read_bytes() == (SHARED / name).read_bytes()


# --- well-formed mail is not touched ------------------------------------------------------------


@pytest.mark.parametrize("smtputf8", [False, True])
@pytest.mark.parametrize("prefix", CLEAN)
def test_well_formed_samples_come_back_byte_identical(prefix: str, smtputf8: bool) -> None:
    raw, result = run(prefix, smtputf8=smtputf8)
    assert result.data == raw
    assert result.data is raw  # the fast path hands back the buffer itself
    assert result.changes == ()
    assert result.needs_smtputf8 is False


def test_08_glpi_dkim_candidate_is_untouched() -> None:
    raw, result = run("08")
    assert result == Normalized(data=raw, changes=(), eightbit=False, needs_smtputf8=False)


def test_11_latin1_8bit_body_is_left_and_flagged() -> None:
    raw, result = run("11")
    assert result.data is raw
    assert result.eightbit is True
    assert b"r\xe8glement" in result.data  # not re-encoded: we send BODY=8BITMIME


# --- line ends ----------------------------------------------------------------------------------


def test_02_bare_lf_becomes_crlf_and_nothing_else_changes() -> None:
    raw, result = run("02")
    assert result.changes == ("bare LF line ends -> CRLF",)
    assert result.data == raw.replace(b"\n", b"\r\n")
    assert re.search(rb"(?<!\r)\n", result.data) is None
    assert len(result.data.split(b"\r\n")) == len(raw.split(b"\n"))  # same line count
    assert result.eightbit is True
    assert leaves(result.data)[1] == leaves(raw)[1]  # the PDF: same bytes


def test_16_cr_cr_lf_is_one_line_end_and_the_parser_sees_every_header() -> None:
    raw, result = run("16")
    assert len(parse(raw).keys()) == 1  # the trap: before, Python sees one header field
    assert result.changes == ("CR CR LF line ends -> CRLF", "added Message-ID")
    assert strip_mid(result.data) == raw.replace(b"\r\r\n", b"\r\n")
    msg = parse(result.data)
    assert msg.keys() == [
        "Message-ID", "From", "To", "Subject", "Date", "Mime-Version", "Content-Type", "X-Mailer"
    ]  # fmt: skip
    assert msg.defects == []
    assert (
        msg.get_payload() == "Backup job: nightly-shares\r\nFiles copied: 1204\r\nErrors: 0\r\n\r\n"
    )


def test_bare_cr_line_ends_each_become_one_crlf() -> None:
    result = norm(b"Subject: old Mac\rFrom: a@contoso.com\r\rline 1\r\rline 3")
    assert result.changes[0] == "bare CR line ends -> CRLF"
    assert result.data.endswith(
        b"Subject: old Mac\r\nFrom: a@contoso.com\r\n\r\nline 1\r\n\r\nline 3\r\n"
    )


def test_mixed_line_ends_are_each_one_line_end() -> None:
    raw = b"Date: x\r\nMessage-ID: <a@b>\nFrom: a@b\r\r\n\r\n1\r2\n3\r\r\n"
    result = norm(raw)
    assert result.data == b"Date: x\r\nMessage-ID: <a@b>\r\nFrom: a@b\r\n\r\n1\r\n2\r\n3\r\n"


def test_missing_final_crlf_is_added() -> None:
    _, result = run("15")
    assert result.data.endswith(b" \r\n \r\n")  # whitespace-only trailing lines stay
    result = norm(b"Date: x\r\nMessage-ID: <a@b>\r\nFrom: a@b\r\n\r\nno newline")
    assert result.changes == ("added CRLF at end of data",)
    assert result.data.endswith(b"\r\n\r\nno newline\r\n")


# --- header/body split, Bcc, missing fields -----------------------------------------------------


def test_15_missing_separator_is_inserted_without_losing_the_first_body_line() -> None:
    raw, result = run("15")
    assert result.changes == (
        "bare LF line ends -> CRLF",
        "inserted blank line between header and body",
        "added Date",
        "added Message-ID",
        "encoded 8-bit Subject as RFC 2047",
    )
    head, body = split(result.data)
    assert head.isascii()
    assert (
        body
        == b"Sauvegarde OK : 1 204 fichiers copi\xc3\xa9s\r\nDur\xc3\xa9e : 00:14:32\r\n \r\n \r\n"
    )
    msg = parse(result.data)
    assert msg.defects == []
    assert msg["Subject"] == "Sauvegarde termin\u00e9e srv-files01"
    assert msg["From"] == "backup-script@srv-files01.contoso.local"
    assert result.data.startswith(DATE)
    assert MID.match(result.data[len(DATE) :])
    assert result.eightbit is True
    assert result.needs_smtputf8 is False


def test_15_with_smtputf8_keeps_the_utf8_subject_raw() -> None:
    _, result = run("15", smtputf8=True)
    assert b"Subject: Sauvegarde termin\xc3\xa9e srv-files01\r\n" in result.data
    assert result.needs_smtputf8 is True
    assert "encoded 8-bit Subject as RFC 2047" not in result.changes


def test_03_bcc_is_removed_and_message_id_added_envelope_untouched() -> None:
    name, _ = sample("03")
    raw, result = run("03")
    assert result.changes == ("removed Bcc", "added Message-ID")
    assert strip_mid(result.data) == raw.replace(b"Bcc: fax-archive@contoso.com\r\n", b"")
    msg = parse(result.data)
    assert msg.get_all("Bcc") is None
    assert "fax-archive@contoso.com" not in result.data.decode()
    # item 5: the envelope alone decides who receives; normalisation has no say in it
    assert ENVELOPES[name]["rcpt_to"] == ["fax-inbox@contoso.com", "fax-archive@contoso.com"]
    assert [f.name for f in fields(Normalized)] == ["data", "changes", "eightbit", "needs_smtputf8"]
    assert leaves(result.data) == leaves(raw)


def test_every_bcc_field_goes_whatever_its_case_and_folding() -> None:
    raw = (
        b"bcc: a@contoso.com,\r\n b@contoso.com\r\nTo: c@contoso.com\r\nBCC : d@contoso.com\r\n"
        b"Resent-Bcc: e@contoso.com\r\nDate: x\r\nMessage-ID: <a@b>\r\nFrom: f@b\r\n\r\nbody\r\n"
    )
    result = norm(raw)
    assert result.changes == ("removed bcc", "removed BCC", "removed Resent-Bcc")
    assert (
        result.data
        == b"To: c@contoso.com\r\nDate: x\r\nMessage-ID: <a@b>\r\nFrom: f@b\r\n\r\nbody\r\n"
    )


@pytest.mark.parametrize("prefix", ["10", "12"])
def test_10_12_only_a_message_id_is_added(prefix: str) -> None:
    raw, result = run(prefix)
    assert result.changes == ("added Message-ID",)
    assert strip_mid(result.data) == raw


def test_14_date_and_message_id_added_from_and_8bit_body_left() -> None:
    raw, result = run("14")
    assert result.changes == ("added Date", "added Message-ID")
    assert result.data.startswith(DATE)
    assert strip_mid(result.data[len(DATE) :]) == raw
    msg = parse(result.data)
    assert msg["From"] == '"(Cron Daemon)" <root@backup01>'  # SendAs rewriting is not ours
    assert "MIME-Version" not in msg  # nothing re-encoded, so none needed
    assert result.eightbit is True


def test_17_from_date_and_message_id_added_long_html_line_quoted_printable() -> None:
    raw, result = run("17")
    assert result.changes == (
        "added Date",
        "added Message-ID",
        "added From",
        "encoded long body lines as quoted-printable",
    )
    msg = parse(result.data)
    assert msg["From"].addresses[0].addr_spec == "erp-noreply@contoso.com"
    assert msg.get_all("MIME-Version") == ["1.0"]
    assert msg.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    assert msg["Content-Type"] == "text/html"
    assert msg.get_payload(decode=True) == split(raw)[1]
    assert_wire_clean(result.data)
    assert max(map(len, split(result.data)[1].split(b"\r\n"))) <= 76


def test_null_sender_gives_mailer_daemon_and_message_id_domain_is_used() -> None:
    result = normalize_message(
        b"Subject: x\r\n\r\nbody\r\n",
        envelope_from="",
        hostname="relay01.contoso.com",
        now=datetime(2026, 1, 2, 3, 4, 5),  # naive: taken as UTC
        smtputf8=False,
        message_id_domain="mail.contoso.com",
    )
    head = split(result.data)[0]
    assert head.startswith(b"Date: Fri, 02 Jan 2026 03:04:05 +0000\r\nMessage-ID: <20260102030405.")
    assert (
        b"@mail.contoso.com>\r\nFrom: <MAILER-DAEMON@relay01.contoso.com>\r\nSubject: x\r\n" in head
    )


def test_present_fields_are_left_alone_even_odd_ones() -> None:
    _, result = run("06")  # Date in 2000: a wrong clock is not a wire problem
    assert parse(result.data)["Date"] == "Sat, 01 Jan 2000 00:07:41 +0000"
    _, result = run("01")  # Message-ID domain with a trailing dot
    assert b"Message-ID: <20261127091452.0001.CanonTxNo.0142@printer.local.>\r\n" in result.data


def test_message_with_no_header_gets_added_fields_and_a_blank_line() -> None:
    result = norm(b"just a line from a script\n")
    head, body = split(result.data)
    assert [line.split(b":")[0] for line in head.split(b"\r\n")[:-1]] == [
        b"Date", b"Message-ID", b"From"
    ]  # fmt: skip
    assert body == b"just a line from a script\r\n"
    assert result.changes == (
        "bare LF line ends -> CRLF",
        "inserted blank line between header and body",
        "added Date",
        "added Message-ID",
        "added From",
    )


def test_empty_message_and_header_only_message() -> None:
    empty = norm(b"")
    assert parse(empty.data)["From"] == "sender@contoso.com"
    assert empty.data.endswith(b"\r\n\r\n")
    only = norm(b"Date: x\r\nMessage-ID: <a@b>\r\nFrom: a@b\r\n")
    assert only.data == b"Date: x\r\nMessage-ID: <a@b>\r\nFrom: a@b\r\n"
    assert only.changes == ()


# --- long lines -------------------------------------------------------------------------------


def test_09_long_references_folded_and_unfolds_to_the_same_value() -> None:
    raw, result = run("09")
    assert result.changes == ("folded References (3791 chars)",)
    assert result.data.replace(b"\r\n ", b" ") == raw  # folding only inserts CRLF
    head = split(result.data)[0]
    references = head[head.index(b"References:") : head.index(b"\r\nContent-Type:")]
    assert max(map(len, references.split(b"\r\n"))) <= 78
    ids = re.findall(r"<[^>]+>", str(parse(result.data)["References"]))
    assert ids == re.findall(r"<[^>]+>", str(parse(raw)["References"]))
    assert len(ids) == 60


def test_header_without_whitespace_is_left_and_noted() -> None:
    raw = b"Date: x\r\nMessage-ID: <a@b>\r\nFrom: a@b\r\nX-Token: " + b"A" * 1500 + b"\r\n\r\nb\r\n"
    result = norm(raw)
    assert result.data is raw
    assert result.changes == ("left unfoldable X-Token (1509 chars, no whitespace)",)


def test_04_single_line_base64_rewrapped_at_76_same_bytes() -> None:
    raw, result = run("04")
    assert result.changes == ("re-wrapped base64 in part 2 at 76 columns",)
    assert result.data.replace(b"\r\n", b"") == raw.replace(b"\r\n", b"")  # only line breaks moved
    start = result.data.index(b"JVBERi0")
    end = result.data.index(b"\r\n----=_XRX_20261127134530_0001--", start)
    b64_lines = result.data[start:end].split(b"\r\n")
    assert {len(line) for line in b64_lines[:-1]} == {76}
    assert 0 < len(b64_lines[-1]) <= 76
    assert result.data[:start] == raw[:start]  # the text part and all before it: untouched
    pdf = leaves(result.data)[1]
    assert pdf == leaves(raw)[1]
    assert isinstance(pdf, bytes)
    assert pdf.startswith(b"%PDF-1.4")


def test_13_perfdata_line_reencoded_quoted_printable_same_bytes() -> None:
    raw, result = run("13")
    assert result.changes == ("encoded long body lines as quoted-printable",)
    raw_head, raw_body = split(raw)
    head, body = split(result.data)
    assert head == raw_head.replace(b"Encoding: 8bit", b"Encoding: quoted-printable")
    assert max(map(len, body.split(b"\r\n"))) <= 76
    msg = parse(result.data)
    assert msg.get_payload(decode=True) == raw_body
    assert result.eightbit is False  # the 8-bit bytes are now =XX escapes


def _with_part(prefix: str, old: bytes, new: bytes) -> bytes:
    _, raw = sample(prefix)
    assert old in raw
    return raw.replace(old, new)


def test_long_quoted_printable_line_gets_soft_line_breaks() -> None:
    long_qp = b"Imprimante 2e =C3=A9tage =E2=80=93 bourrage papier. " * 30  # 1,500 chars
    raw = _with_part("08", b"Ticket : Description\r\n", long_qp + b"\r\n")
    result = norm(raw)
    assert result.changes == ("re-wrapped long quoted-printable lines in part 1",)
    assert_wire_clean(result.data)
    assert leaves(result.data) == leaves(raw)
    assert result.data.replace(b"=\r\n", b"") == raw.replace(b"=\r\n", b"")


def test_long_line_in_nested_part_touches_only_that_part() -> None:
    _, raw = sample("12")
    html = b"<p>" + b"Chiffre d'affaires " * 60 + b"</p>"
    part = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    start = raw.index(part)
    end = raw.index(b"\r\n----boundary_0_", start)
    raw = raw[:start] + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html + raw[end:]
    result = norm(raw)
    assert result.changes == (
        "added Message-ID",
        "encoded long body lines in part 1.1 as quoted-printable",
    )
    assert_wire_clean(result.data)
    assert leaves(result.data) == leaves(raw)
    before, after = raw.split(html)
    assert strip_mid(result.data).startswith(before[: -len(b"\r\n\r\n")])
    assert strip_mid(result.data).endswith(after)


def test_long_line_in_multipart_preamble_is_wrapped() -> None:
    raw = _with_part("03", b"\r\n\r\n--RICOH", b"\r\n\r\n" + b"x" * 1200 + b"\r\n--RICOH")
    result = norm(raw)
    assert "wrapped long lines in the preamble of the message" in result.changes
    assert_wire_clean(result.data)
    assert leaves(result.data) == leaves(raw)


# --- raw 8-bit headers --------------------------------------------------------------------------


def test_05_raw_utf8_headers_encoded_and_decode_to_the_original_text() -> None:
    raw, result = run("05")
    assert result.changes == (
        "encoded 8-bit From as RFC 2047",
        "encoded 8-bit Subject as RFC 2047",
        "encoded 8-bit Content-Type in part 2 as RFC 2047",
        "encoded 8-bit Content-Disposition in part 2 as RFC 2231",
    )
    assert result.needs_smtputf8 is False
    assert result.eightbit is True  # the text part stays 8bit
    non_ascii = [line for line in result.data.split(b"\r\n") if not line.isascii()]
    assert non_ascii == [
        b"Document num\xc3\xa9ris\xc3\xa9 : Facture_4711_R\xc3\xa9ception.pdf",
        b"Exp\xc3\xa9diteur : Accueil \xe2\x80\x93 rez-de-chauss\xc3\xa9e",
    ]
    msg = parse(result.data)
    assert msg["From"].addresses[0].display_name == "Num\u00e9risation Accueil"
    assert msg["From"].addresses[0].addr_spec == "scan@printer.local"
    assert msg["Subject"] == "Num\u00e9risation du 27/11/2026 \u2013 facture n\u00b04711"
    attachment = next(msg.iter_attachments())
    assert attachment.get_filename() == "Facture_4711_R\u00e9ception.pdf"
    assert attachment["Content-Type"].params["name"] == "Facture_4711_R\u00e9ception.pdf"
    assert b"filename*=UTF-8''Facture_4711_R%C3%A9ception.pdf" in result.data
    assert leaves(result.data) == leaves(raw)


def test_05_with_smtputf8_is_left_raw_and_flagged() -> None:
    raw, result = run("05", smtputf8=True)
    assert result == Normalized(data=raw, changes=(), eightbit=True, needs_smtputf8=True)


def test_latin1_header_bytes_fall_back_to_latin1() -> None:
    raw = _with_part("11", b"Subject: Relance facture", b"Subject: Relance factur\xe9e")
    result = norm(raw)
    assert result.changes == ("encoded 8-bit Subject as RFC 2047",)
    assert parse(result.data)["Subject"] == "Relance factur\u00e9e 2026-0815"
    assert split(result.data)[0].isascii()


def test_non_ascii_address_cannot_be_encoded_and_needs_smtputf8() -> None:
    raw = _with_part(
        "07",
        b"From: scanner@contoso.com <scanner@contoso.com>",
        'From: "J\u00e9r\u00f4me M\u00fcller" <j\u00e9r\u00f4me@contoso.com>'.encode(),
    )
    result = norm(raw)
    assert result.changes == (
        "encoded 8-bit From as RFC 2047",
        "left raw 8-bit in From (needs SMTPUTF8)",
    )
    assert result.needs_smtputf8 is True
    from_line = split(result.data)[0].split(b"\r\n")[0]
    assert (
        from_line
        == b"From: =?UTF-8?B?SsOpcsO0bWUgTcO8bGxlcg==?= <j\xc3\xa9r\xc3\xb4me@contoso.com>"
    )
    assert parse(result.data)["From"].addresses[0].display_name == "J\u00e9r\u00f4me M\u00fcller"


def test_non_ascii_envelope_sender_for_added_from_needs_smtputf8() -> None:
    result = norm(b"Subject: x\r\n\r\nbody\r\n", sender="j\u00e9r\u00f4me@contoso.com")
    assert "From: <j\u00e9r\u00f4me@contoso.com>\r\n".encode() in result.data
    assert result.needs_smtputf8 is True


def test_unstructured_header_keeps_ascii_words_outside_the_encoded_span() -> None:
    result = norm(
        "Date: x\r\nMessage-ID: <a@b>\r\nFrom: a@b\r\nX-Note: d\u00e9but, fin\r\n\r\nb\r\n".encode()
    )
    assert b"X-Note: =?UTF-8?B?ZMOpYnV0LA==?= fin\r\n" in result.data
    assert parse(result.data)["X-Note"] == "d\u00e9but, fin"


# --- every sample through Python's parser -------------------------------------------------------


@pytest.mark.parametrize("smtputf8", [False, True])
@pytest.mark.parametrize("name", SAMPLES)
def test_every_normalised_sample_is_fit_for_exchange(name: str, smtputf8: bool) -> None:
    raw, result = run(name[:2], smtputf8=smtputf8)
    assert_wire_clean(result.data)  # no bare LF (550 5.6.11), no line over 998 (5.6.x)
    msg = parse(result.data)
    for field_name in ("Date", "Message-ID", "From"):
        assert len(msg.get_all(field_name, [])) == 1, field_name
    assert len(msg["From"].addresses) == 1
    assert msg.get_all("Bcc") is None
    head = split(result.data)[0]
    assert head.isascii() or result.needs_smtputf8
    # every part decodes to the same bytes as before (line ends made canonical first)
    assert leaves(result.data) == leaves(re.sub(rb"\r*\n|\r", b"\r\n", raw))
    again = norm(result.data, smtputf8=smtputf8)
    assert again.data is result.data
    assert again.changes == ()


# --- robustness: hypothesis -------------------------------------------------------------------


def check_invariants(raw: bytes, *, smtputf8: bool) -> None:
    result = norm(raw, smtputf8=smtputf8)
    data = result.data
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
    assert data.endswith(b"\r\n")
    for line in data.split(b"\r\n"):
        if len(line) > 998:  # only in a header that folding at whitespace cannot save
            assert max(map(len, re.findall(rb"[ \t]*[^ \t]+|[ \t]+", line))) > 998, line[:80]
            assert any(c.startswith("left unfoldable") for c in result.changes)
    assert parse(data).get_all("Bcc") is None
    assert not re.search(rb"(?im)^bcc[ \t]*:", split(data)[0])
    again = norm(data, smtputf8=smtputf8)
    assert again.data == data
    assert all(c.startswith("left ") for c in again.changes)


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(max_size=4000), smtputf8=st.booleans())
def test_arbitrary_bytes_never_raise_and_come_out_clean_and_stable(
    raw: bytes, smtputf8: bool
) -> None:
    check_invariants(raw, smtputf8=smtputf8)


FRAGMENTS = [
    b"From: \"\xc3\xa9 (x)\" <a@b>", b"To: J\xe9r\xf4me <j\xc3\xa9@b>, (c\xc3\xa9) x@y",
    b"Bcc: z@y", b"bcc : q", b" continued", b"\tcontinued \xff",
    b"Subject: \xc3\xa9t\xc3\xa9 =?utf-8?q?x?=",
    b"Content-Type: multipart/mixed; boundary=\"b\xc3\xa9\"", b"Content-Type: multipart/mixed;",
    b" boundary=bnd", b"--bnd", b"--bnd--", b"--b\xc3\xa9", b"--b\xc3\xa9--", b"",
    b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
    b"Content-Type: message/rfc822", b"Content-Disposition: attachment; filename=\"\xc3\xa9.pdf\"",
    b"Content-Type: text/plain; name=\xc3\xa9", b"A" * 1200, b"x " * 700, b"=C3=A9" * 300,
    b"- " * 600, b"-" * 1100, b"\x00\x01\x7f", b"body line", b"References: " + b"<a@b> " * 300,
    b"Message-ID: <\xc3\xa9@b>", b":", b"From x", b"X-Long: " + b"y" * 1100 + b" z",
]  # fmt: skip
message_like = st.tuples(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40),
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n"]), min_size=1, max_size=3),
).map(lambda t: b"".join(f + t[1][i % len(t[1])] for i, f in enumerate(t[0])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=message_like, smtputf8=st.booleans())
def test_mime_shaped_garbage_never_raises_and_comes_out_clean_and_stable(
    raw: bytes, smtputf8: bool
) -> None:
    check_invariants(raw, smtputf8=smtputf8)


LINES = st.sampled_from([
    b"", b"hello world", b"caf\xc3\xa9 cr\xc3\xa8me", b"x" * 1200, b"a b " * 400, b"=C3=A9" * 250,
    b"-- sig", b"\xe9t\xe9", b" ", b"QUJD" * 300, b"\x00\xff=",
])  # fmt: skip
TOP_FIELDS = [  # fields Python's parser reads as fields too
    b"Subject: r\xc3\xa9sum\xc3\xa9", b'From: "Caf\xc3\xa9" <a@b.c>', b"Bcc: x@y", b"Date: x",
    b"MIME-Version: 1.0", b"References: " + b"<a@b> " * 250, b"X-L: " + b"y" * 1100,
]  # fmt: skip
CTES = st.sampled_from([b"", b"7bit", b"8bit", b"base64", b"quoted-printable", b"binary", b"x-y"])
NAMES = st.sampled_from([b"report.pdf", b"R\xc3\xa9ception.pdf", b"\xe9t\xe9.txt"])


@st.composite
def mime_entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A MIME entity with CRLF line ends: nested multiparts or a leaf with some encoding."""
    if depth < 3 and draw(st.booleans()):
        boundary = b"=_b" + str(depth).encode()
        body = [b"preamble " + draw(LINES)]
        for part in draw(st.lists(mime_entity(depth + 1), min_size=1, max_size=3)):
            body += [b"--" + boundary, part]
        body += [b"--" + boundary + b"--", draw(LINES)]
        head = b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
        return head + b"\r\n".join(body)
    fields = [b'Content-Type: text/plain; name="' + draw(NAMES) + b'"']
    if draw(st.booleans()):
        fields.append(b'Content-Disposition: attachment; filename="' + draw(NAMES) + b'"')
    if cte := draw(CTES):
        fields.append(b"Content-Transfer-Encoding: " + cte)
    lines: list[bytes] = draw(st.lists(LINES, max_size=6))
    return b"\r\n".join(fields) + b"\r\n\r\n" + b"\r\n".join(lines)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    top=st.lists(st.sampled_from(TOP_FIELDS), max_size=4),
    entity=mime_entity(),
    line_end=st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]),
    smtputf8=st.booleans(),
)
def test_mime_trees_keep_every_part_decoding_to_the_same_bytes(
    top: list[bytes], entity: bytes, line_end: bytes, smtputf8: bool
) -> None:
    raw = b"".join(f + b"\r\n" for f in top) + entity + b"\r\n"
    raw = raw.replace(b"\r\n", line_end)
    check_invariants(raw, smtputf8=smtputf8)
    before = leaves(re.sub(rb"\r*\n|\r", b"\r\n", raw))
    assert leaves(norm(raw, smtputf8=smtputf8).data) == before


# --- performance: the clean path is a few scans of the buffer ------------------------------------


def _scan(size: int, line_end: bytes) -> bytes:
    head = b"Date: x\r\nMessage-ID: <a@b>\r\nFrom: a@b\r\nContent-Type: application/pdf\r\n"
    head += b"Content-Transfer-Encoding: base64\r\n\r\n"
    line = base64.b64encode(bytes(range(256)) * 3)[:76]
    return (head + (line + b"\r\n") * (size // 78)).replace(b"\r\n", line_end)


def test_30mb_clean_scan_takes_the_fast_path() -> None:
    raw = _scan(30_000_000, b"\r\n")
    started = time.perf_counter()
    result = norm(raw)
    elapsed = time.perf_counter() - started
    assert result.data is raw
    assert elapsed < 2.0, elapsed


def test_30mb_bare_lf_scan_is_fixed_in_linear_time() -> None:
    raw = _scan(30_000_000, b"\n")
    started = time.perf_counter()
    result = norm(raw)
    elapsed = time.perf_counter() - started
    assert result.changes == ("bare LF line ends -> CRLF",)
    assert len(result.data) == len(raw) + raw.count(b"\n")
    assert elapsed < 3.0, elapsed


def test_re_encoded_8bit_text_without_content_type_declares_its_charset() -> None:
    """The MIME default is US-ASCII: once a long UTF-8 line is quoted-printable, the charset
    must be said or readers show mojibake."""
    raw = (
        b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\nMessage-ID: <cs@example.com>\r\n"
        b"From: a@example.com\r\nSubject: x\r\n\r\n" + ("Grüße " * 300).encode() + b"\r\n"
    )
    result = normalize_message(
        raw, envelope_from="a@example.com", hostname="relay.test", now=NOW, smtputf8=False
    )
    parsed = email.message_from_bytes(result.data, policy=email.policy.default)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_content().startswith("Grüße Grüße")


@settings(max_examples=300)
@given(
    st.lists(st.integers(min_value=0, max_value=1200), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=4096),
)
def test_long_lines_are_found_window_by_window(lengths: list[int], window: int) -> None:
    import relay.normalize as normalize

    body = b"\r\n".join(b"x" * n for n in lengths)
    naive = (
        len(body) > normalize.MAX_LINE and max(map(len, body.split(b"\r\n"))) > normalize.MAX_LINE
    )
    saved = normalize.LONG_LINE_WINDOW
    normalize.LONG_LINE_WINDOW = window
    try:
        assert normalize._has_long_line(body) is naive
    finally:
        normalize.LONG_LINE_WINDOW = saved


def test_a_long_line_of_raw_equals_signs_is_wrapped_in_full_lines() -> None:
    """Invalid quoted-printable ('=' not followed by hex): each soft line still carries about
    75 octets (the wrap once stepped back a byte at a time, down to one octet a line)."""
    body = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + b"=" * 1000 + b"\r\n"
    top = DATE + b"Message-ID: <qp@contoso.com>\r\nFrom: a@contoso.com\r\n"
    out = norm(top + body).data
    wrapped = out.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
    assert all(len(line) <= 76 for line in wrapped)
    assert len(wrapped) < 20
    assert b"".join(line.removesuffix(b"=") for line in wrapped[:-2]) + wrapped[-2] == b"=" * 1000
