"""sender.py: the SendAs policy (issue #3 item 3) on raw message bytes.

The samples are the shared device samples (samples/devices/01, 07, 08), embedded so the suite
runs without /work/shared; 01 and 07 keep their header blocks whole and only the first PDF lines.
Exchange refuses a message whose envelope sender or From: the mailbox may not send as
(design/exchange-online.md §3.3): every From: address in a result must be permitted.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sender import SenderPolicy, SenderRewrite, apply_sender_policy, header_end

MAILBOX = "relay@contoso.com"

# samples/devices/01_canon_mfp_scan_qp_multipart.eml (PDF part shortened)
SAMPLE_01 = (
    b"Date: Fri, 27 Nov 2026 09:14:52 +0100\r\n"
    b"From: scanner@printer.local\r\n"
    b'To: "Compta" <compta@contoso.com>\r\n'
    b"Subject: Attached Image\r\n"
    b"MIME-Version: 1.0\r\n"
    b"X-Priority: 3\r\n"
    b"X-Mailer: Canon MFP\r\n"
    b"Message-ID: <20261127091452.0001.CanonTxNo.0142@printer.local.>\r\n"
    b'Content-Type: multipart/mixed; boundary="----_CANON_2611270914520142_"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"------_CANON_2611270914520142_\r\n"
    b"Content-Type: text/plain; charset=US-ASCII\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"\r\n"
    b"Attached Image\r\n"
    b"\r\n"
    b"------_CANON_2611270914520142_\r\n"
    b"Content-Type: application/pdf;\r\n"
    b' name="0142_261127091452_001.pdf"\r\n'
    b"Content-Disposition: attachment;\r\n"
    b' filename="0142_261127091452_001.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQKJeLjz9MKMSAwIG9iago8PCAvVHlwZSAvQ2F0YWxvZyAvUGFnZXMgMiAwIFIgPj4K\r\n"
    b"ZW5kb2JqCjIgMCBvYmoKPDwgL1R5cGUgL1BhZ2VzIC9LaWRzIFszIDAgUl0gL0NvdW50IDEgPj4K\r\n"
    b"IDAgUiAvSW5mbyA2IDAgUiA+PgpzdGFydHhyZWYKMjUwNAolJUVPRgo=\r\n"
    b"------_CANON_2611270914520142_--\r\n"
)

# samples/devices/07_older_mfp_at_in_display_name.eml (PDF part shortened)
SAMPLE_07 = (
    b"From: scanner@contoso.com <scanner@contoso.com>\r\n"
    b"To: achats@contoso.com\r\n"
    b"Subject: Scan to E-mail\r\n"
    b"Date: Fri, 27 Nov 2026 15:20:00 +0100\r\n"
    b"Message-ID: <DOC001.20261127152000@printer.local>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=Boundary_0000001_20261127\r\n"
    b"\r\n"
    b"--Boundary_0000001_20261127\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Scanned image from MFP.\r\n"
    b"--Boundary_0000001_20261127\r\n"
    b"Content-Type: application/octet-stream; name=DOC001.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=DOC001.pdf\r\n"
    b"\r\n"
    b"JVBERi0xLjQKJeLjz9MKMSAwIG9iago8PCAvVHlwZSAvQ2F0YWxvZyAvUGFnZXMgMiAwIFIgPj4K\r\n"
    b"c3RhcnR4cmVmCjI0ODQKJSVFT0YK\r\n"
    b"--Boundary_0000001_20261127--\r\n"
)

# samples/devices/08_glpi10_ticket_followup_sender_header.eml (whole)
SAMPLE_08 = (
    b"Sender: glpi@contoso.com\r\n"
    b"Auto-Submitted: auto-generated\r\n"
    b"X-Auto-Response-Suppress: OOF, DR, NDR, RN, NRN\r\n"
    b"In-Reply-To: <GLPI_k3v9x0c2p7m1q8w4z6r5t0y2u9i3o7a1s5d8f2g4-Ticket-1234/new@glpi01>\r\n"
    b"References: <GLPI_k3v9x0c2p7m1q8w4z6r5t0y2u9i3o7a1s5d8f2g4-Ticket-1234/new@glpi01>\r\n"
    b'From: "Support informatique" <helpdesk@contoso.com>\r\n'
    b"Reply-To: support@contoso.com\r\n"
    b"Subject: =?utf-8?Q?=5BGLPI_=230001234=5D_Nouveau_suivi_Imprimante_2e_?=\r\n"
    b" =?utf-8?Q?=C3=A9tage_=E2=80=93_bourrage_papier?=\r\n"
    b'To: "Utilisateur Exemple" <utilisateur@contoso.com>\r\n'
    b"Message-ID: <GLPI_k3v9x0c2p7m1q8w4z6r5t0y2u9i3o7a1s5d8f2g4-Ticket-1234/"
    b"add_followup.1795856402.1287349876@glpi01>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Date: Fri, 27 Nov 2026 16:05:02 +0100\r\n"
    b"Content-Type: multipart/alternative; boundary=Qm7b-D1x\r\n"
    b"\r\n"
    b"--Qm7b-D1x\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"URL : https://glpi.contoso.com/index.php?redirect=3Dticket_1234&noAUTO=3D1\r\n"
    b"Ticket : Description\r\n"
    b"\r\n"
    b"Titre : Imprimante 2e =C3=A9tage =E2=80=93 bourrage papier\r\n"
    b"Statut : En cours (attribu=C3=A9)\r\n"
    b"\r\n"
    b"Suivi n=C2=B03 (27-11-2026 16:05) : Le technicien a remplac=C3=A9 le roulea=\r\n"
    b"u d'entra=C3=AEnement ; merci de confirmer que l'impression fonctionne =C3=\r\n"
    b"=A0 nouveau.\r\n"
    b"\r\n"
    b"--=20\r\n"
    b"Support informatique\r\n"
    b"\r\n"
    b"--Qm7b-D1x\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b'<!DOCTYPE html><html><head><meta charset=3D"utf-8"><title>GLPI</title></hea=\r\n'
    b"d><body><p><strong>Titre :</strong> Imprimante 2e =C3=A9tage =E2=80=93 bour=\r\n"
    b"rage papier</p><p><strong>Suivi n=C2=B03</strong> (27-11-2026 16:05) : Le t=\r\n"
    b"echnicien a remplac=C3=A9 le rouleau d'entra=C3=AEnement ; merci de confirm=\r\n"
    b"er que l'impression fonctionne =C3=A0 nouveau.</p><p>-- <br>Support informa=\r\n"
    b"tique</p></body></html>\r\n"
    b"\r\n"
    b"--Qm7b-D1x--\r\n"
)

TAIL = b"To: compta@contoso.com\r\nSubject: Scan\r\n\r\nbody with From: x@printer.local\r\n"


def policy(*send_as: str, mode: str = "rewrite") -> SenderPolicy:
    return SenderPolicy(MAILBOX, tuple(send_as), mode)  # type: ignore[arg-type]


def replace_line(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def from_addresses(data: bytes) -> list[str]:
    """An independent reading: the stdlib's address parser on the unfolded From: fields."""
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", header_block(data)).decode("latin-1")
    values = re.findall(r"(?im)^from[ \t]*:(.*)$", unfolded)
    return [address for _, address in email.utils.getaddresses(values) if address]


# --- the copier (sample 01) ------------------------------------------------------------------


def test_copier_sample_01_gets_the_mailbox_in_envelope_and_from_and_a_reply_to() -> None:
    result = apply_sender_policy(policy("@contoso.com"), "scanner@printer.local", SAMPLE_01)

    assert result.mail_from == MAILBOX
    assert result.data == replace_line(
        SAMPLE_01,
        b"From: scanner@printer.local\r\n",
        b'From: "scanner at printer.local" <relay@contoso.com>\r\n'
        b"Reply-To: <scanner@printer.local>\r\n",
    )
    assert result.changes == (
        "envelope sender scanner@printer.local -> relay@contoso.com",
        'From: scanner@printer.local -> "scanner at printer.local" <relay@contoso.com>',
        "added Reply-To: <scanner@printer.local>",
    )


@pytest.mark.parametrize(
    ("from_value", "expected"),
    [
        (
            b'"Scanner 3rd floor" <scanner@printer.local>',
            b'"Scanner 3rd floor" <relay@contoso.com>',
        ),
        (b"Scanner 3rd floor <scanner@printer.local>", b'"Scanner 3rd floor" <relay@contoso.com>'),
        (b"Scanner <scanner@printer.local>", b'"Scanner" <relay@contoso.com>'),
        (b"<scanner@printer.local>", b'"scanner at printer.local" <relay@contoso.com>'),
        (b"scanner@printer.local (Scanner 2F)", b'"Scanner 2F" <relay@contoso.com>'),
        (b'"Say \\"hi\\"" <scanner@printer.local>', b'"Say \\"hi\\"" <relay@contoso.com>'),
        (b'"(Cron Daemon)" <root@backup01>', b'"(Cron Daemon)" <relay@contoso.com>'),
        # RFC 2047 encoded-words stay as they are, unquoted (quotes would stop their decoding)
        (
            b"=?utf-8?Q?Num=C3=A9risation?= Accueil <scan@printer.local>",
            b"=?utf-8?Q?Num=C3=A9risation?= Accueil <relay@contoso.com>",
        ),
        # raw UTF-8 from an old device (sample 05): the bytes are kept, another module encodes
        (
            b'"Num\xc3\xa9risation \xc3\xa0 l\'accueil" <scan@printer.local>',
            b'"Num\xc3\xa9risation \xc3\xa0 l\'accueil" <relay@contoso.com>',
        ),
        # a replaced address never leaves an address-like display name behind
        (
            b'"scan@printer.local" <scan@printer.local>',
            b'"scan at printer.local" <relay@contoso.com>',
        ),
    ],
)
def test_the_display_name_is_kept_for_the_mailbox(from_value: bytes, expected: bytes) -> None:
    data = b"From: " + from_value + b"\r\n" + TAIL
    result = apply_sender_policy(policy(), "scanner@printer.local", data)

    original = email.utils.getaddresses([from_value.decode("latin-1")])[0][1]
    assert result.data == (
        b"From: " + expected + b"\r\nReply-To: <" + original.encode("latin-1") + b">\r\n" + TAIL
    )


def test_an_existing_reply_to_is_left_alone() -> None:
    data = replace_line(
        SAMPLE_01,
        b"X-Priority: 3\r\n",
        b"X-Priority: 3\r\nReply-To: Compta <compta@contoso.com>\r\n",
    )
    result = apply_sender_policy(policy(), "scanner@printer.local", data)

    assert result.data == replace_line(
        data,
        b"From: scanner@printer.local\r\n",
        b'From: "scanner at printer.local" <relay@contoso.com>\r\n',
    )
    assert not any("Reply-To" in change for change in result.changes)


# --- the older MFP (sample 07): an unquoted @ in the display name -----------------------------


def test_sample_07_display_name_is_sanitised_even_when_the_address_is_permitted() -> None:
    result = apply_sender_policy(policy("@contoso.com"), "scanner@contoso.com", SAMPLE_07)

    assert result.mail_from == "scanner@contoso.com"
    assert result.data == replace_line(
        SAMPLE_07,
        b"From: scanner@contoso.com <scanner@contoso.com>\r\n",
        b'From: "scanner at contoso.com" <scanner@contoso.com>\r\n',
    )
    assert result.changes == (
        "From: scanner@contoso.com <scanner@contoso.com> -> "
        '"scanner at contoso.com" <scanner@contoso.com> (display name sanitised)',
    )


def test_sample_07_not_permitted_is_rewritten_with_the_sanitised_name() -> None:
    result = apply_sender_policy(policy(), "scanner@contoso.com", SAMPLE_07)

    assert result.mail_from == MAILBOX
    assert result.data == replace_line(
        SAMPLE_07,
        b"From: scanner@contoso.com <scanner@contoso.com>\r\n",
        b'From: "scanner at contoso.com" <relay@contoso.com>\r\n'
        b"Reply-To: <scanner@contoso.com>\r\n",
    )


def test_keep_mode_does_not_sanitise() -> None:
    result = apply_sender_policy(
        policy("@contoso.com", mode="keep"), "scanner@contoso.com", SAMPLE_07
    )

    assert result.data is SAMPLE_07
    assert result.changes == ()


# --- GLPI (sample 08): Sender: differs from From: --------------------------------------------


def test_glpi_permitted_from_with_a_foreign_sender_loses_the_sender() -> None:
    result = apply_sender_policy(policy("helpdesk@contoso.com"), "glpi@contoso.com", SAMPLE_08)

    assert result.mail_from == MAILBOX
    assert result.data == replace_line(SAMPLE_08, b"Sender: glpi@contoso.com\r\n", b"")
    assert result.changes == (
        "envelope sender glpi@contoso.com -> relay@contoso.com",
        "removed Sender: glpi@contoso.com",
    )


def test_glpi_nothing_permitted_keeps_its_own_reply_to() -> None:
    result = apply_sender_policy(policy(), "glpi@contoso.com", SAMPLE_08)

    expected = replace_line(SAMPLE_08, b"Sender: glpi@contoso.com\r\n", b"")
    expected = replace_line(
        expected,
        b'From: "Support informatique" <helpdesk@contoso.com>\r\n',
        b'From: "Support informatique" <relay@contoso.com>\r\n',
    )
    assert result.data == expected
    assert result.changes == (
        "envelope sender glpi@contoso.com -> relay@contoso.com",
        'From: "Support informatique" <helpdesk@contoso.com> -> '
        '"Support informatique" <relay@contoso.com>',
        "removed Sender: glpi@contoso.com",
    )


def test_glpi_all_permitted_is_untouched() -> None:
    result = apply_sender_policy(policy("contoso.com"), "glpi@contoso.com", SAMPLE_08)

    assert result == SenderRewrite("glpi@contoso.com", SAMPLE_08, ())
    assert result.data is SAMPLE_08


def test_a_permitted_sender_is_kept() -> None:
    data = b"From: a@printer.local\r\nSender: Relay <relay@contoso.com>\r\n" + TAIL
    result = apply_sender_policy(policy(), MAILBOX, data)

    assert result.data == (
        b'From: "a at printer.local" <relay@contoso.com>\r\nReply-To: <a@printer.local>\r\n'
        b"Sender: Relay <relay@contoso.com>\r\n" + TAIL
    )


# --- what is permitted ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "permitted"),
    [
        ("relay@contoso.com", True),
        ("RELAY@Contoso.COM", True),
        ("<relay@contoso.com>", True),
        ("scanner@contoso.com", True),
        ("Scanner@CONTOSO.com", True),
        ("anyone@fabrikam.com", True),
        ("anyone@FABRIKAM.COM", True),
        ("anyone@northwind.example", True),
        ("other@contoso.com", False),
        ("scanner@printer.local", False),
        ("anyone@sub.fabrikam.com", False),
        ("anyone@fabrikam.com.evil.example", False),
        ("fabrikam.com", False),
        ("@fabrikam.com", False),
        ("", False),
        ("<>", False),
        ("garbage", False),
        ("a b@fabrikam.com", False),
        ('"a b"@fabrikam.com', True),
    ],
)
def test_permits(address: str, permitted: bool) -> None:
    subject = SenderPolicy(MAILBOX, ("Scanner@Contoso.com", "@Fabrikam.com", "northwind.example"))
    assert subject.permits(address) is permitted


@pytest.mark.parametrize(
    ("mailbox", "send_as", "mode"),
    [
        ("relay", (), "rewrite"),
        ("", (), "rewrite"),
        ("relay@contoso.com", ("",), "rewrite"),
        ("relay@contoso.com", ("a b@contoso.com",), "rewrite"),
        ("relay@contoso.com", ("@a@b",), "rewrite"),
        ("relay@contoso.com", (), "drop"),
    ],
)
def test_a_bad_policy_is_refused(mailbox: str, send_as: tuple[str, ...], mode: str) -> None:
    with pytest.raises(ValueError):
        SenderPolicy(mailbox, send_as, mode)  # type: ignore[arg-type]


# --- keep mode and the envelope ---------------------------------------------------------------


def test_keep_mode_permitted_is_byte_for_byte_unchanged() -> None:
    result = apply_sender_policy(policy("@contoso.com", mode="keep"), "glpi@contoso.com", SAMPLE_08)

    assert result == SenderRewrite("glpi@contoso.com", SAMPLE_08, ())
    assert result.data is SAMPLE_08


def test_keep_mode_changes_only_the_envelope() -> None:
    result = apply_sender_policy(policy(mode="keep"), "scanner@printer.local", SAMPLE_01)

    assert result.mail_from == MAILBOX
    assert result.data is SAMPLE_01
    assert result.changes == ("envelope sender scanner@printer.local -> relay@contoso.com",)


def test_rewrite_mode_permitted_is_unchanged() -> None:
    data = b"From: Relay <Relay@Contoso.com>\r\n" + TAIL
    result = apply_sender_policy(policy(), "relay@contoso.com", data)

    assert result == SenderRewrite("relay@contoso.com", data, ())
    assert result.data is data


@pytest.mark.parametrize("null", ["", "<>", " <> "])
def test_the_null_sender_becomes_the_mailbox(null: str) -> None:
    data = b"From: Relay <relay@contoso.com>\r\n" + TAIL
    result = apply_sender_policy(policy(), null, data)

    assert result.mail_from == MAILBOX
    assert result.data is data
    assert result.changes == ("envelope sender <> -> relay@contoso.com (null sender)",)


@pytest.mark.parametrize("given", ["Scanner@Contoso.COM", "<Scanner@Contoso.COM>"])
def test_a_permitted_envelope_sender_is_kept(given: str) -> None:
    result = apply_sender_policy(policy("@contoso.com"), given, SAMPLE_08)

    assert result == SenderRewrite("Scanner@Contoso.COM", SAMPLE_08, ())


def test_an_envelope_sender_that_is_not_an_address_is_replaced() -> None:
    result = apply_sender_policy(policy("@contoso.com"), "a b@contoso.com", SAMPLE_08)

    assert result.mail_from == MAILBOX
    assert result.changes == ("envelope sender a b@contoso.com -> relay@contoso.com",)


# --- multiple From: addresses -----------------------------------------------------------------


def test_several_from_addresses_keep_the_permitted_ones_and_gain_a_sender() -> None:
    data = b"From: Scanner <scan@printer.local>, Compta <compta@contoso.com>\r\n" + TAIL
    result = apply_sender_policy(policy("@contoso.com"), "scan@printer.local", data)

    assert result.data == (
        b'From: "Scanner" <relay@contoso.com>, Compta <compta@contoso.com>\r\n'
        b"Reply-To: <scan@printer.local>\r\n"
        b"Sender: <relay@contoso.com>\r\n" + TAIL
    )
    assert result.changes == (
        "envelope sender scan@printer.local -> relay@contoso.com",
        "From: Scanner <scan@printer.local>, Compta <compta@contoso.com> -> "
        '"Scanner" <relay@contoso.com>, Compta <compta@contoso.com>',
        "added Reply-To: <scan@printer.local>",
        "added Sender: <relay@contoso.com> (From: holds 2 addresses)",
    )


def test_several_replaced_addresses_become_one_mailbox_entry() -> None:
    data = (
        b"From: A <a@printer.local>, b@printer.local, relay@contoso.com, A2 <A@printer.local>\r\n"
        + TAIL
    )
    result = apply_sender_policy(policy(), MAILBOX, data)

    assert result.data == (
        b'From: "A" <relay@contoso.com>\r\n'
        b"Reply-To: <a@printer.local>, <b@printer.local>\r\n" + TAIL
    )


def test_a_foreign_sender_with_several_from_addresses_becomes_the_mailbox() -> None:
    data = b"From: a@contoso.com, b@contoso.com\r\nSender: glpi@printer.local\r\n" + TAIL
    result = apply_sender_policy(policy("contoso.com"), MAILBOX, data)

    assert result.data == (
        b"From: a@contoso.com, b@contoso.com\r\nSender: <relay@contoso.com>\r\n" + TAIL
    )
    assert result.changes == ("Sender: glpi@printer.local -> <relay@contoso.com>",)


def test_a_long_rewritten_list_is_folded_at_commas() -> None:
    names = [f"colleague-number-{n}@contoso.com" for n in range(4)]
    data = b"From: x@printer.local, " + ", ".join(names).encode() + b"\r\n" + TAIL
    result = apply_sender_policy(policy("contoso.com"), MAILBOX, data)

    head = header_block(result.data)
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert from_addresses(result.data) == [MAILBOX, *names]


# --- folded, odd and garbage From: fields ------------------------------------------------------


def test_a_folded_from_is_rewritten_as_one_field() -> None:
    data = b'Date: x\r\nFrom: "Scanner\r\n 3rd floor"\r\n\t<scanner@printer.local>\r\n' + TAIL
    result = apply_sender_policy(policy(), "scanner@printer.local", data)

    assert result.data == (
        b'Date: x\r\nFrom: "Scanner 3rd floor" <relay@contoso.com>\r\n'
        b"Reply-To: <scanner@printer.local>\r\n" + TAIL
    )
    assert result.changes[1] == (
        'From: "Scanner 3rd floor" <scanner@printer.local> -> '
        '"Scanner 3rd floor" <relay@contoso.com>'
    )


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"   ",
        b"scanner",
        b'"Scanner <scanner@printer.local>',
        b"Scanner <scanner@printer.local",
        b"Scanner <scanner> ",
        b"scanner@printer.local scanner@printer.local",
        b"<a@contoso.com> <b@contoso.com>",
        b"(unclosed comment scanner@printer.local",
        b"Group: a@contoso.com;",
        b"\x00\xff\xfe@@@",
    ],
)
def test_garbage_from_becomes_the_mailbox(value: bytes) -> None:
    data = b"From:" + value + b"\r\n" + TAIL
    result = apply_sender_policy(policy("contoso.com"), MAILBOX, data)

    assert result.data == b"From: <relay@contoso.com>\r\n" + TAIL
    assert len(result.changes) == 1
    assert result.changes[0].startswith("From: ")
    assert result.changes[0].endswith(" -> <relay@contoso.com> (unparseable)")


def test_header_names_keep_their_spelling() -> None:
    data = b"FROM : scan@printer.local\r\nsender: x@printer.local\r\n" + TAIL
    result = apply_sender_policy(policy(), MAILBOX, data)

    assert result.data == (
        b'FROM : "scan at printer.local" <relay@contoso.com>\r\n'
        b"Reply-To: <scan@printer.local>\r\n" + TAIL
    )


def test_an_unquoted_comma_in_a_display_name_is_one_mailbox() -> None:
    data = b"From: Doe, John <john@contoso.com>\r\n" + TAIL
    result = apply_sender_policy(policy("contoso.com"), MAILBOX, data)

    assert result.data == b'From: "Doe, John" <john@contoso.com>\r\n' + TAIL


def test_only_the_header_block_is_read() -> None:
    data = b"Subject: x\r\n\r\nFrom: scanner@printer.local\r\nSender: a@b.c\r\n"
    assert apply_sender_policy(policy(), MAILBOX, data).data is data


def test_no_header_separator_stops_at_the_first_body_line() -> None:
    # sample 15: a shell script that forgot the empty line
    data = b"From: Backup <backup@srv>\nSubject: done\nBackup finished: From: x@y\n"
    result = apply_sender_policy(policy(), MAILBOX, data)

    assert result.data == (
        b'From: "Backup" <relay@contoso.com>\nReply-To: <backup@srv>\n'
        b"Subject: done\nBackup finished: From: x@y\n"
    )


@pytest.mark.parametrize("eol", [b"\n", b"\r\r\n", b"\r"])
def test_line_ends_are_kept(eol: bytes) -> None:
    data = b"From: scan@printer.local" + eol + b"Subject: s" + eol + eol + b"body" + eol
    result = apply_sender_policy(policy(), MAILBOX, data)

    assert result.data == (
        b'From: "scan at printer.local" <relay@contoso.com>'
        + eol
        + b"Reply-To: <scan@printer.local>"
        + eol
        + b"Subject: s"
        + eol
        + eol
        + b"body"
        + eol
    )


def test_a_from_at_the_very_end_of_the_data() -> None:
    result = apply_sender_policy(policy(), MAILBOX, b"Subject: s\r\nFrom: scan@printer.local")

    assert result.data == (
        b'Subject: s\r\nFrom: "scan at printer.local" <relay@contoso.com>\r\n'
        b"Reply-To: <scan@printer.local>"
    )


def test_a_message_without_from_is_left_to_the_normaliser() -> None:
    data = b"To: a@contoso.com\r\nSubject: ERP\r\n\r\n<html></html>\r\n"  # sample 17
    result = apply_sender_policy(policy(), "erp-noreply@contoso.com", data)

    assert result.data is data
    assert result.mail_from == MAILBOX


def test_changes_name_the_dkim_signatures_a_rewrite_breaks() -> None:
    data = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=printer.local; s=s1;\r\n"
        b"\th=From:To:Subject:Reply-To; bh=x; b=y\r\n"
        b"DKIM-Signature: v=1; d=other.example; h=to:subject; bh=x; b=y\r\n"
        b"From: scan@printer.local\r\n" + TAIL
    )
    result = apply_sender_policy(policy(), MAILBOX, data)

    assert result.changes[-1] == (
        "DKIM-Signature d=printer.local signs from, reply-to: no longer verifies"
    )
    assert sum("DKIM" in change for change in result.changes) == 1


def test_changes_are_single_printable_lines() -> None:
    data = b'From: "Num\xc3\xa9ro\x1b[31m" <scan@printer.local>\r\n' + TAIL
    result = apply_sender_policy(policy(), "bad\r\nsender@printer.local", data)

    assert result.changes[0] == "envelope sender bad\\x0d\\x0asender@printer.local -> " + MAILBOX
    assert result.changes[1] == (
        'From: "Num\u00e9ro\\x1b[31m" <scan@printer.local> -> '
        '"Num\u00e9ro [31m" <relay@contoso.com>'
    )
    assert b'"Num\xc3\xa9ro [31m" <relay@contoso.com>' in result.data


# --- properties -------------------------------------------------------------------------------

PIECES = [
    b"scan@printer.local",
    b"relay@contoso.com",
    b"Scanner@Contoso.com",
    b"x@fabrikam.com",
    b"<",
    b">",
    b"<>",
    b'"',
    b"\\",
    b"(",
    b")",
    b",",
    b":",
    b";",
    b"@",
    b" ",
    b"\t",
    b"\r\n ",
    b"\n",
    b"\r",
    b"=?utf-8?Q?Num=C3=A9?=",
    b"Num\xc3\xa9risation",
    b"\xa0\x85",
    b"Scanner 3rd floor",
    b"[1.2.3.4]",
    b"\x00",
]
HEADER_NAMES = [b"From", b"from", b"FROM ", b"Sender", b"Reply-To", b"To", b"Subject", b"X"]

header_values = st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join)
header_lines = st.tuples(st.sampled_from(HEADER_NAMES), header_values).map(
    lambda nv: nv[0] + b":" + nv[1]
)
header_blocks = st.lists(header_lines, max_size=6).map(lambda ls: b"\r\n".join(ls) + b"\r\n\r\nb")

PROPERTY_POLICY = policy("Scanner@Contoso.com", "@fabrikam.com")


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=300), header_blocks), st.sampled_from(["", "a@b", "x y"]))
def test_garbage_never_raises_and_rewrites_once(data: bytes, mail_from: str) -> None:
    result = apply_sender_policy(PROPERTY_POLICY, mail_from, data)

    assert PROPERTY_POLICY.permits(result.mail_from)
    assert isinstance(result.data, bytes)
    assert all(isinstance(c, str) and "\n" not in c and "\r" not in c for c in result.changes)
    again = apply_sender_policy(PROPERTY_POLICY, result.mail_from, result.data)
    assert again.changes == ()  # a fixed point: everything left is permitted and clean
    assert again.data is result.data


# (entry, the address it names that the policy does not permit, or None; unparseable)
FromEntry = tuple[bytes, "str | None", bool]
from_entries: st.SearchStrategy[FromEntry] = st.one_of(
    st.sampled_from(
        [
            (b"scan@printer.local", "scan@printer.local", False),
            (b"<Scan@printer.local>", "Scan@printer.local", False),
            (b"Scanner <scan@printer.local>", "scan@printer.local", False),
            (b'"Scanner, 2F" <scan@printer.local>', "scan@printer.local", False),
            (b"scan@contoso.com <scan@contoso.com>", "scan@contoso.com", False),
            (b'"Num\xc3\xa9risation" <scan@printer.local>', "scan@printer.local", False),
            (b"Doe, John <j@printer.local>", "j@printer.local", False),
            (b"root@backup01 (Cron Daemon)", "root@backup01", False),
            (b"Scanner@Contoso.com", None, False),
            (b"x@fabrikam.com (Fax)", None, False),
            (b"=?utf-8?Q?Num=C3=A9?= <x@Fabrikam.com>", None, False),
            (b"relay@contoso.com", None, False),
            (b"<>", None, False),
            (b'"broken <b@printer.local>', None, True),
            (b"Scanner <scanner>", None, True),
        ]
    ),
    st.builds(
        lambda name, addr: (
            name + b" <" + addr + b">",
            addr.decode() if b"printer" in addr else None,
            False,
        ),
        st.sampled_from([b"A", b'"a@b"', b"a@b", b"(c)", b"", b"A\xc3\xa0"]),
        st.sampled_from([b"a@printer.local", b"A@FABRIKAM.COM", b"relay@contoso.com"]),
    ),
)
structured_messages = st.tuples(
    # two unbalanced quotes would balance each other: at most one
    st.lists(from_entries, min_size=1, max_size=3).filter(
        lambda es: sum(entry.startswith(b'"broken') for entry, _, _ in es) <= 1
    ),
    st.sampled_from([b"", b"Sender: glpi@printer.local\r\n", b"Sender: x@fabrikam.com\r\n"]),
    st.sampled_from([b"", b"Reply-To: help@contoso.com\r\n"]),
    st.sampled_from([b", ", b",\r\n "]),
)


def without_sender_fields(data: bytes) -> bytes:
    head, body = data.split(b"\r\n\r\n", 1)
    field = rb"(?im)^(from|sender|reply-to)[ \t]*:[^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n"
    kept = re.sub(field, b"", head + b"\r\n")
    return kept + b"\r\n" + body


@settings(max_examples=300)
@given(structured_messages)
def test_every_from_address_is_permitted_and_nothing_else_moves(
    parts: tuple[list[FromEntry], bytes, bytes, bytes],
) -> None:
    entries, sender, reply_to, separator = parts
    from_value = separator.join(entry for entry, _, _ in entries)
    data = b"Date: d\r\n" + sender + b"From: " + from_value + b"\r\n" + reply_to + TAIL
    result = apply_sender_policy(PROPERTY_POLICY, "scan@printer.local", data)

    addresses = from_addresses(result.data)
    assert addresses
    assert all(PROPERTY_POLICY.permits(address) for address in addresses), addresses
    assert without_sender_fields(result.data) == without_sender_fields(data)
    if len(addresses) > 1:  # RFC 5322 3.6.2, Exchange 550 5.1.20
        assert re.search(rb"\r\nSender: (<relay@contoso.com>|x@fabrikam.com)\r\n", result.data)
    else:
        assert b"Sender: glpi" not in result.data
    foreign = {}
    for _, address, _ in entries:
        if address is not None:
            foreign.setdefault(address.lower(), address)
    garbage = any(bad for _, _, bad in entries)
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", result.data)
    if foreign and not garbage and not reply_to:
        expected = ", ".join(f"<{address}>" for address in foreign.values()).encode()
        assert b"\r\nReply-To: " + expected + b"\r\n" in unfolded
    else:
        assert unfolded.count(b"Reply-To:") == (1 if reply_to else 0)


def test_raw_utf8_from_address_listed_in_send_as_is_permitted() -> None:
    """An old device writes its UTF-8 address raw in From:; the config lists it as text."""
    policy = SenderPolicy("relay@contoso.com", ("jürgen@contoso.com",))
    data = "From: Jürgen Müller <jürgen@contoso.com>\r\nSubject: x\r\n\r\nhi\r\n".encode()
    result = apply_sender_policy(policy, "jürgen@contoso.com", data)
    assert result.data is data
    assert result.changes == ()


def test_a_rewritten_from_with_a_very_long_display_name_stays_under_998_octets() -> None:
    policy = SenderPolicy("relay@contoso.com")
    name = " ".join(["Word"] * 200)
    data = f'From: "{name}" <x@printer.local>\r\nSubject: s\r\n\r\nb\r\n'.encode()
    result = apply_sender_policy(policy, "x@printer.local", data)
    assert max(len(line) for line in result.data.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(result.data, policy=email.policy.default)
    assert parsed["From"].addresses[0].addr_spec == "relay@contoso.com"


# A large message is sent from its spool file: the policy sees only the first bytes up to
# header_end, and the rest goes as it is. That must equal the policy on the whole message.
whole_messages = st.tuples(
    st.lists(
        st.one_of(header_lines, st.sampled_from([b" folded", b"\tx", b"not a field", b""])),
        max_size=8,
    ),
    st.sampled_from([b"\r\n", b"\n", b"\r"]),
    st.sampled_from([b"", b"body\r\n", b"From: in the body\r\n"]),
).map(lambda t: t[1].join(t[0]) + t[1] + t[2])


@settings(max_examples=400)
@given(whole_messages, st.integers(0, 400), st.sampled_from(["", "a@b", "x y"]))
def test_policy_on_the_header_block_alone_equals_the_policy_on_the_whole_message(
    data: bytes, prefix: int, mail_from: str
) -> None:
    whole = apply_sender_policy(PROPERTY_POLICY, mail_from, data)
    for start, is_whole in ((data[:prefix], prefix >= len(data)), (data, True)):
        end = header_end(start, whole=is_whole)
        if end is None:
            assert not is_whole
            continue
        head = apply_sender_policy(PROPERTY_POLICY, mail_from, start[:end])
        assert head.data + data[end:] == whole.data
        assert (head.mail_from, head.changes) == (whole.mail_from, whole.changes)
