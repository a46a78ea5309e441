"""replies.py: SMTP replies as values, and the constants the ingress sends."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay import replies
from relay.replies import INGRESS_REPLIES, SmtpReply, queued


@pytest.mark.parametrize("constant", INGRESS_REPLIES, ids=str)
def test_every_ingress_reply_has_a_matching_enhanced_class(constant: SmtpReply) -> None:
    if constant.code // 100 == 3:  # RFC 2034: intermediate replies carry no enhanced code
        assert constant.enhanced == ""
        return
    assert constant.enhanced != ""
    assert constant.enhanced[0] == str(constant.code)[0]
    assert constant.code // 100 in (2, 4, 5)


@pytest.mark.parametrize("constant", INGRESS_REPLIES, ids=str)
def test_ingress_replies_are_single_line_and_generic(constant: SmtpReply) -> None:
    assert constant.text
    assert "\r" not in constant.text
    assert "\n" not in constant.text
    parts = [str(constant.code), constant.enhanced, constant.text]
    assert str(constant) == " ".join(part for part in parts if part)


def test_every_reply_constant_in_the_module_is_registered() -> None:
    named = [value for value in vars(replies).values() if isinstance(value, SmtpReply)]
    assert named
    assert set(named) <= set(INGRESS_REPLIES)


def test_the_ingress_reply_texts() -> None:
    assert str(replies.ACCESS_DENIED) == "554 5.7.1 Access denied: this client may not relay here"
    assert str(replies.TOO_MANY_RECIPIENTS) == "452 4.5.3 Too many recipients"
    assert str(replies.TEMPORARY_FAILURE) == "451 4.3.0 Temporary failure, please try again later"
    assert str(replies.SHUTTING_DOWN) == "421 4.3.2 Service shutting down, try again later"
    assert str(queued("0193A1B2C3D4E5F60")) == "250 2.0.0 Ok: queued as 0193A1B2C3D4E5F60"


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (
            535,
            "5.7.3 Authentication unsuccessful [SN4PR0601CA0012.namprd06.prod.outlook.com "
            "2025-11-29T18:00:00.000Z 08DE2F0C7A1B2C3D]",
            SmtpReply(
                535,
                "5.7.3",
                "Authentication unsuccessful [SN4PR0601CA0012.namprd06.prod."
                "outlook.com 2025-11-29T18:00:00.000Z 08DE2F0C7A1B2C3D]",
            ),
        ),
        (
            554,
            "5.2.252 SendAsDenied; a@x.example not allowed to send as b@x.example",
            SmtpReply(
                554, "5.2.252", "SendAsDenied; a@x.example not allowed to send as b@x.example"
            ),
        ),
        (
            432,
            "4.3.2 Concurrent connections limit exceeded.",
            SmtpReply(432, "4.3.2", "Concurrent connections limit exceeded."),
        ),
        (
            235,
            "2.7.0 Authentication successful",
            SmtpReply(235, "2.7.0", "Authentication successful"),
        ),
        (250, "2.0.0", SmtpReply(250, "2.0.0", "")),
        # no enhanced code: the text is left alone
        (
            220,
            "SN4PR0601CA0012.outlook.office365.com Microsoft ESMTP MAIL Service ready",
            SmtpReply(
                220, "", "SN4PR0601CA0012.outlook.office365.com Microsoft ESMTP MAIL Service ready"
            ),
        ),
        (250, "", SmtpReply(250, "", "")),
        (
            354,
            "Start mail input; end with <CRLF>.<CRLF>",
            SmtpReply(354, "", "Start mail input; end with <CRLF>.<CRLF>"),
        ),
        # an enhanced code of another class is text, not an enhanced code
        (250, "5.0.0 odd server", SmtpReply(250, "", "5.0.0 odd server")),
        (451, "2.0.0 odd server", SmtpReply(451, "", "2.0.0 odd server")),
        # malformed enhanced codes are text
        (550, "5.1.1234 too many digits", SmtpReply(550, "", "5.1.1234 too many digits")),
        (550, "5.1 short", SmtpReply(550, "", "5.1 short")),
        (550, "5.1.1. trailing dot", SmtpReply(550, "", "5.1.1. trailing dot")),
        # multi-line replies and stray whitespace collapse to one line
        (
            451,
            "4.7.500 Server busy.\n  Please try again later",
            SmtpReply(451, "4.7.500", "Server busy. Please try again later"),
        ),
        (250, "  2.1.5   Recipient   OK \r\n", SmtpReply(250, "2.1.5", "Recipient OK")),
    ],
)
def test_parse(code: int, message: str, expected: SmtpReply) -> None:
    assert SmtpReply.parse(code, message) == expected


@pytest.mark.parametrize(
    ("code", "enhanced"),
    [
        (0, ""),
        (199, ""),
        (600, ""),
        (999, ""),
        (-250, ""),
        (250, "2.0"),
        (250, "2.0.0.0"),
        (250, "6.0.0"),
        (250, "3.0.0"),
        (250, "2.0.1000"),
        (250, "x.y.z"),
        (250, " 2.0.0"),
        (250, "2.0.0 "),
    ],
)
def test_invalid_replies_raise(code: int, enhanced: str) -> None:
    with pytest.raises(ValueError):
        SmtpReply(code, enhanced)


@pytest.mark.parametrize("code", [0, 199, 600, 1000])
def test_parse_of_an_invalid_code_raises(code: int) -> None:
    with pytest.raises(ValueError):
        SmtpReply.parse(code, "2.0.0 OK")


def test_replies_are_frozen_values() -> None:
    reply = SmtpReply(250, "2.0.0", "OK")
    with pytest.raises(dataclasses.FrozenInstanceError):
        reply.code = 550  # type: ignore[misc]
    assert reply == SmtpReply(250, "2.0.0", "OK")
    assert hash(reply) == hash(SmtpReply(250, "2.0.0", "OK"))


@pytest.mark.parametrize(
    ("code", "positive", "transient", "permanent"),
    [
        (220, True, False, False),
        (250, True, False, False),
        (334, True, False, False),
        (354, True, False, False),
        (421, False, True, False),
        (499, False, True, False),
        (500, False, False, True),
        (554, False, False, True),
    ],
)
def test_reply_class(code: int, positive: bool, transient: bool, permanent: bool) -> None:
    reply = SmtpReply(code)
    assert (reply.is_positive, reply.is_transient, reply.is_permanent) == (
        positive,
        transient,
        permanent,
    )


def test_str_omits_missing_parts() -> None:
    assert str(SmtpReply(250)) == "250"
    assert str(SmtpReply(250, "2.0.0")) == "250 2.0.0"
    assert str(SmtpReply(250, "", "OK")) == "250 OK"


@given(
    st.sampled_from([2, 4, 5]),
    st.integers(min_value=0, max_value=99),
    st.integers(min_value=0, max_value=999),
    st.integers(min_value=0, max_value=999),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20).map(
        lambda t: t.strip()
    ),
)
def test_parse_inverts_str(klass: int, rest: int, subject: int, detail: int, text: str) -> None:
    reply = SmtpReply(klass * 100 + rest, f"{klass}.{subject}.{detail}", text)
    assert SmtpReply.parse(reply.code, str(reply).partition(" ")[2]) == reply
