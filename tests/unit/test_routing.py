"""Routing rules, pure: first match wins, every criterion of a rule must match, any entry of
a criterion may. Fallback, pure: which upstream of a route takes a message when its own is
closed or refuses its size."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.config import load_settings
from relay.errors import ConfigError
from relay.policy import (
    RouteRule,
    choose_route,
    fallback_upstream,
    first_open,
    refused_for_size,
)
from relay.replies import SmtpReply

LAN = ipaddress.ip_network("192.168.10.0/24")
RULES = (
    RouteRule(("invoices",), senders=("invoices@contoso.com", "@erp.contoso.com")),
    RouteRule(("copiers",), networks=(LAN,), listeners=("0.0.0.0:25",)),
    RouteRule(("fabrikam", "graph"), senders=("@fabrikam.com",)),
)


@pytest.mark.parametrize(
    ("sender", "client", "listener", "upstream"),
    [
        ("invoices@contoso.com", "10.0.0.5", "0.0.0.0:2525", "invoices"),
        ("INVOICES@Contoso.com", "10.0.0.5", "0.0.0.0:2525", "invoices"),
        ("billing@erp.contoso.com", "192.168.10.7", "0.0.0.0:25", "invoices"),  # first match
        ("billing@sub.erp.contoso.com", "10.0.0.5", "0.0.0.0:25", "default"),  # exact domain
        ("scanner@printer.local", "192.168.10.7", "0.0.0.0:25", "copiers"),
        ("scanner@printer.local", "192.168.10.7", "0.0.0.0:2525", "default"),  # AND
        ("scanner@printer.local", "192.168.11.7", "0.0.0.0:25", "default"),
        ("it@fabrikam.com", "10.0.0.5", "[::1]:25", "fabrikam graph"),
        ("", "192.168.10.7", "0.0.0.0:25", "copiers"),  # null sender: by the other criteria
        ("", "10.0.0.5", "0.0.0.0:25", "default"),
    ],
)
def test_choose_route(sender: str, client: str, listener: str, upstream: str) -> None:
    assert choose_route(RULES, sender, client, listener) == tuple(upstream.split())


def test_a_rule_without_criteria_matches_everything() -> None:
    assert choose_route((RouteRule(("all",)),), "x@y.z", "1.2.3.4", "") == ("all",)
    assert choose_route((), "x@y.z", "1.2.3.4", "") == ("default",)


ROUTE = ("smtp", "graph", "provider")


def closed(*names: str) -> Callable[[str], bool]:
    return lambda name: name in names


def test_a_new_message_goes_to_the_first_open_upstream() -> None:
    assert first_open(ROUTE, closed()) == "smtp"
    assert first_open(ROUTE, closed("smtp")) == "graph"
    assert first_open(ROUTE, closed("smtp", "graph")) == "provider"
    assert first_open(ROUTE, closed(*ROUTE)) == "smtp"  # all closed: it waits at the first


def test_a_closed_upstream_hands_over_only_to_an_open_one() -> None:
    assert fallback_upstream(ROUTE, "smtp", (), closed("smtp"), for_size=False) == "graph"
    assert fallback_upstream(ROUTE, "graph", (), closed("graph"), for_size=False) == "smtp"
    both = closed("smtp", "graph")
    assert fallback_upstream(ROUTE, "smtp", (), both, for_size=False) == "provider"
    assert fallback_upstream(ROUTE, "smtp", (), closed(*ROUTE), for_size=False) == ""
    assert fallback_upstream(("smtp",), "smtp", (), closed("smtp"), for_size=False) == ""
    assert fallback_upstream((), "smtp", (), closed("smtp"), for_size=False) == ""


def test_a_size_refusal_never_goes_back_to_an_upstream_that_refused() -> None:
    assert fallback_upstream(ROUTE, "graph", ("graph",), closed(), for_size=True) == "smtp"
    refused = ("graph", "smtp")
    assert fallback_upstream(ROUTE, "smtp", refused, closed(), for_size=True) == "provider"
    assert fallback_upstream(ROUTE, "provider", ROUTE, closed(), for_size=True) == ""
    # a closed upstream that may take it beats failing the message: it waits there
    assert fallback_upstream(ROUTE, "graph", ("graph",), closed("smtp"), for_size=True) == (
        "provider"
    )
    assert (
        fallback_upstream(("graph", "smtp"), "graph", ("graph",), closed("smtp"), for_size=True)
        == "smtp"
    )


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (SmtpReply(552, "5.3.4", "message too large for Graph"), True),
        (SmtpReply(552, "5.2.3", "message length exceeds administrative limit"), True),
        (SmtpReply(554, "5.3.4", "too big"), True),
        (SmtpReply(552, "", "exceeded storage allocation"), True),
        (SmtpReply(552, "5.2.2", "mailbox full"), False),
        (SmtpReply(452, "4.3.4", "try later"), False),
        (SmtpReply(550, "5.3.41", "not a size status"), False),
        (SmtpReply(550, "5.7.1", "relay denied"), False),
    ],
)
def test_size_refusals(reply: SmtpReply, expected: bool) -> None:
    assert refused_for_size(reply) is expected


BASE = """
[smtp]
listen = ["127.0.0.1:2525"]
allow = ["127.0.0.0/8"]
[upstream]
kind = "maildir"
path = "/tmp/m"
[upstreams.invoices]
kind = "maildir"
path = "/tmp/i"
"""


def problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    return error.value.problems


def test_routes_load(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        BASE + '[[route]]\nsender = ["@ERP.contoso.com"]\nclient = ["192.168.10.0/24"]\n'
        'listener = ["127.0.0.1:2525"]\nupstream = "invoices"\n',
        encoding="utf-8",
    )
    settings = load_settings(path)
    assert list(settings.all_upstreams()) == ["default", "invoices"]
    [rule] = settings.route
    assert rule.sender == ["@erp.contoso.com"]


def test_a_route_lists_upstreams_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE + '[[route]]\nupstream = ["invoices", "default"]\n', encoding="utf-8")
    [rule] = load_settings(path).route
    assert rule.upstream == ["invoices", "default"]
    text = BASE + '[[route]]\nupstream = ["invoices", "nowhere", "invoices"]\n'
    assert problems(tmp_path, text) == [
        ("route.0.upstream", "an upstream is listed twice: invoices")
    ]
    assert problems(tmp_path, BASE + "[[route]]\nupstream = []\n")[0][0] == "route.0.upstream"


def test_a_route_to_an_unknown_upstream_or_listener_is_refused(tmp_path: Path) -> None:
    text = BASE + '[[route]]\nlistener = ["0.0.0.0:25"]\nupstream = "payroll"\n'
    assert problems(tmp_path, text) == [
        ("route.0.upstream", "no upstream named 'payroll': ['default', 'invoices']"),
        ("route.0.listener", "no listener '0.0.0.0:25': ['127.0.0.1:2525']"),
    ]


@pytest.mark.parametrize("name", ["default", "Invoices", "in voices"])
def test_upstream_names(tmp_path: Path, name: str) -> None:
    text = BASE.replace("[upstreams.invoices]", f'[upstreams."{name}"]')
    [(path, reason)] = problems(tmp_path, text)
    assert path == "upstreams"
    assert "upstream names are lower-case" in reason


def test_two_upstreams_on_one_mailbox_are_refused(tmp_path: Path) -> None:
    text = """
[smtp]
allow = ["127.0.0.0/8"]
[upstream]
mailbox = "relay@contoso.com"
[upstream.oauth]
tenant_id = "t"
client_id = "c"
client_secret = "s"
[upstreams.copy]
mailbox = "Relay@contoso.com"
[upstreams.copy.oauth]
tenant_id = "t"
client_id = "c"
client_secret = "s"
"""
    assert problems(tmp_path, text) == [
        ("upstreams.copy.mailbox", "relay@contoso.com is already used by 'default'")
    ]


def test_a_mailbox_the_sender_policy_cannot_use_is_a_config_error(tmp_path: Path) -> None:
    text = """
[smtp]
allow = ["127.0.0.0/8"]
[upstream]
mailbox = "rélay@contoso.com"
[upstream.oauth]
tenant_id = "t"
client_id = "c"
client_secret = "s"
"""
    [(path, _reason)] = problems(tmp_path, text)
    assert path == "upstream.mailbox"
