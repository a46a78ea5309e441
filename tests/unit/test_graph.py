"""The Graph adapter's pure parts: who receives (the envelope) and who is shown (the headers),
the encoded size against Graph's request limit, and the graph kind's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import GRAPH_SCOPE, ConfigError, load_settings
from relay.graph import envelope_headers, retry_after


def test_headers_that_match_the_envelope_are_left_alone() -> None:
    data = b"From: a@contoso.com\r\nTo: Bob <bob@example.org>\r\nSubject: x\r\n\r\nbody\r\n"
    assert envelope_headers(data, ["BOB@example.org"]) is data


def test_the_envelope_decides_who_receives_and_the_headers_who_is_shown() -> None:
    data = (
        b"From: a@contoso.com\r\n"
        b"To: Bob <bob@example.org>, Team List <list@example.org>\r\n"
        b"Subject: x\r\n"
        b"Cc: =?utf-8?q?Carol_M=C3=BCller?= <carol@example.net>,\r\n"
        b"\tnot-sent@example.net\r\n"
        b"Bcc: header-bcc@example.com\r\n"
        b"X-Other: kept\r\n\r\nbody\r\n"
    )
    out = envelope_headers(data, ["bob@example.org", "carol@example.net", "hidden@example.com"])
    head, body = out.split(b"\r\n\r\n", 1)
    assert body == b"body\r\n"
    assert head.split(b"\r\n") == [
        b"From: a@contoso.com",
        b"To: Bob <bob@example.org>",
        b"Cc: =?utf-8?q?Carol_M=C3=BCller?= <carol@example.net>",
        b"Bcc: <hidden@example.com>",
        b"Subject: x",
        b"X-Other: kept",
    ]


def test_a_recipient_listed_twice_is_shown_once_and_an_old_bcc_goes() -> None:
    data = b"To: a@example.org\r\nCc: a@example.org\r\nBcc: a@example.org\r\n\r\nx"
    assert envelope_headers(data, ["a@example.org"]) == b"To: <a@example.org>\r\n\r\nx"


def test_no_recipient_headers_at_all_means_everyone_is_bcc() -> None:
    out = envelope_headers(b"Subject: x\r\n\r\nx", ["x@example.org", "y@example.org"])
    assert out.startswith(b"Bcc: <x@example.org>,\r\n\t<y@example.org>\r\nSubject: x")


GRAPH = """
[smtp]
listen = ["127.0.0.1:0"]
allow = ["127.0.0.1/32"]
[upstream]
kind = "graph"
mailbox = "relay@contoso.com"
[upstream.oauth]
tenant_id = "aaaabbbb-0000-cccc-1111-dddd2222eeee"
client_id = "00001111-aaaa-2222-bbbb-3333cccc4444"
client_secret = "s3cret"
"""


def test_the_graph_kind_takes_the_graph_scope_and_exchange_limits(tmp_path: Path) -> None:
    path = tmp_path / "graph.toml"
    path.write_text(GRAPH)
    upstream = load_settings(path).upstream
    assert upstream.oauth.scope == GRAPH_SCOPE
    assert upstream.budget() == (30, 10_000)
    assert upstream.max_connections() == 4
    assert upstream.graph_base_url == "https://graph.microsoft.com/v1.0"


def test_the_graph_kind_refuses_an_exchange_scope_set_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "graph.toml"
    path.write_text(GRAPH + 'scope = "https://outlook.office.com/.default"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert any(key == "upstream.oauth.scope" for key, _ in caught.value.problems)


OAUTH = """tenant_id = "aaaabbbb-0000-cccc-1111-dddd2222eeee"
client_id = "00001111-aaaa-2222-bbbb-3333cccc4444"
client_secret = "s3cret"
"""


def upstream_block(section: str, kind: str) -> str:
    return (
        f'[{section}]\nkind = "{kind}"\nmailbox = "relay@contoso.com"\n[{section}.oauth]\n{OAUTH}'
    )


def test_smtp_auth_and_graph_may_share_a_mailbox_but_not_two_of_a_kind(tmp_path: Path) -> None:
    head = '[smtp]\nlisten = ["127.0.0.1:0"]\nallow = ["127.0.0.1/32"]\n'
    path = tmp_path / "both.toml"
    path.write_text(
        head
        + upstream_block("upstream", "exchange-online")
        + upstream_block("upstreams.g", "graph")
    )
    kinds = {u.kind for u in load_settings(path).all_upstreams().values()}
    assert kinds == {"graph", "exchange-online"}
    path.write_text(path.read_text() + upstream_block("upstreams.g2", "graph"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert ("upstreams.g2.mailbox", "relay@contoso.com is already used by 'g'") in (
        caught.value.problems
    )


def test_two_to_fields_become_one() -> None:
    data = b"To: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nx"
    out = envelope_headers(data, ["a@example.org", "b@example.org"])
    assert out == b"To: <a@example.org>,\r\n\t<b@example.org>\r\nSubject: x\r\n\r\nx"


def test_a_bare_lf_message_is_left_as_it_is() -> None:
    data = b"To: a@example.org\nSubject: x\n\nbody\n"
    assert envelope_headers(data, ["b@example.org"]) is data


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        ("0", 1.0),
        ("3600", 60.0),
        ("", 30.0),
        ("soon", 30.0),
        ("Thu, 01 Jan 1970 00:00:20 GMT", 20.0),  # an HTTP date, 20 s after "now" = 0
    ],
)
def test_retry_after_takes_seconds_or_a_date_within_bounds(header: str, seconds: float) -> None:
    assert retry_after(header, now=0.0) == seconds
