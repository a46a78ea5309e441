"""config.py and `check-config`: TOML + RELAY_* variables -> frozen settings, or every problem.

Reads real temporary files; touches no network and no spool.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from relay.cli import main
from relay.config import (
    Settings,
    format_duration,
    load_settings,
    parse_duration,
    parse_host_port,
    render,
)
from relay.errors import ConfigError

SECRET = "Qx8Q~r2.Hk_4Ffh-NpA7sLc9vTzYbW0eJdUoMi3"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"

FULL = f"""
[smtp]
listen = ["0.0.0.0:25", "[::1]:2525"]
allow = ["192.168.1.0/24", "127.0.0.1/32", "fd00::/8"]
hostname = "relay.lan"
max_message_size = 10485760
max_recipients = 100

[spool]
path = "/var/spool/oauth-relay-test"

[delivery]
max_age = "2d"
concurrency = 4
retry_initial = "30s"
retry_max = "1h"

[upstream]
kind = "exchange-online"
host = "smtp.office365.com"
port = 587
mailbox = "relay@contoso.com"
timeout = "90s"

[upstream.oauth]
tenant_id = "{TENANT}"
client_id = "{CLIENT}"
client_secret = "{SECRET}"

[metrics]
listen = ""

[server]
shutdown_grace = "30s"

[log]
level = "debug"
format = "json"
"""

MAILDIR = """
[smtp]
allow = ["127.0.0.0/8"]

[upstream]
kind = "maildir"
path = "/tmp/maildir"
"""

EXCHANGE_HEAD = """
[smtp]
allow = ["127.0.0.0/8"]

[upstream]
mailbox = "relay@contoso.com"
"""

CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY_PEM = (
    "-----BEGIN " + "PRIVATE KEY-----\nMIIE\n-----END " + "PRIVATE KEY-----\n"
)  # a stub, no key


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("RELAY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def oauth(tmp_path: Path, body: str) -> Path:
    return write(tmp_path, f"{EXCHANGE_HEAD}\n[upstream.oauth]\n{body}")


# --- valid files ----------------------------------------------------------------------------------


def test_full_valid_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL))
    assert s.smtp.listen == ["0.0.0.0:25", "[::1]:2525"]
    assert s.smtp.listen_addresses() == [("0.0.0.0", 25), ("::1", 2525)]
    assert s.smtp.allow == ["192.168.1.0/24", "127.0.0.1/32", "fd00::/8"]
    assert s.smtp.networks() == (
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert (s.smtp.hostname, s.smtp.max_message_size, s.smtp.max_recipients) == (
        "relay.lan",
        10_485_760,
        100,
    )
    assert s.spool.path == Path("/var/spool/oauth-relay-test")
    assert (s.delivery.max_age, s.delivery.concurrency) == (172_800.0, 4)
    assert (s.delivery.retry_initial, s.delivery.retry_max) == (30.0, 3600.0)
    assert (s.upstream.kind, s.upstream.host, s.upstream.port) == (
        "exchange-online",
        "smtp.office365.com",
        587,
    )
    assert (s.upstream.mailbox, s.upstream.timeout) == ("relay@contoso.com", 90.0)
    assert (s.upstream.oauth.tenant_id, s.upstream.oauth.client_id) == (TENANT, CLIENT)
    assert isinstance(s.upstream.oauth.client_secret, SecretStr)
    assert s.upstream.oauth.client_secret.get_secret_value() == SECRET
    assert s.upstream.oauth.authority == "https://login.microsoftonline.com"
    assert s.upstream.oauth.scope == "https://outlook.office365.com/.default"
    assert s.metrics.listen == ""
    assert s.server.shutdown_grace == 30.0
    assert (s.log.level, s.log.format) == ("debug", "json")


def test_defaults_of_a_minimal_maildir_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MAILDIR))
    assert s.upstream.kind == "maildir"
    assert s.upstream.path == Path("/tmp/maildir")
    assert s.smtp.listen == ["127.0.0.1:2525"]
    assert (s.smtp.max_message_size, s.smtp.max_recipients) == (36_700_160, 500)
    assert (s.delivery.max_age, s.delivery.concurrency) == (432_000.0, 3)
    assert (s.delivery.retry_initial, s.delivery.retry_max) == (60.0, 3600.0)
    assert s.spool.path == Path("/var/spool/oauth-relay")
    assert s.metrics.listen == "127.0.0.1:9464"
    assert s.server.shutdown_grace == 20.0
    assert (s.log.level, s.log.format) == ("info", "text")


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MAILDIR))
    with pytest.raises(ValidationError):
        s.delivery.concurrency = 9  # type: ignore[misc]


def test_relay_config_variable_names_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RELAY_CONFIG", str(write(tmp_path, FULL)))
    assert load_settings(None).smtp.hostname == "relay.lan"


# --- environment overrides ------------------------------------------------------------------------


def test_env_overrides_a_value_of_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RELAY_DELIVERY__CONCURRENCY", "5")
    s = load_settings(write(tmp_path, FULL))
    assert s.delivery.concurrency == 5
    assert s.delivery.retry_initial == 30.0  # the rest of [delivery] still comes from the file


def test_env_overrides_a_nested_value(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RELAY_UPSTREAM__OAUTH__CLIENT_ID", "11111111-2222-3333-4444-555555555555")
    monkeypatch.setenv("RELAY_UPSTREAM__OAUTH__CLIENT_SECRET", "from-the-environment")
    s = load_settings(write(tmp_path, FULL))
    assert s.upstream.oauth.client_id == "11111111-2222-3333-4444-555555555555"
    assert s.upstream.oauth.client_secret.get_secret_value() == "from-the-environment"
    assert s.upstream.oauth.tenant_id == TENANT
    assert s.upstream.mailbox == "relay@contoso.com"


def test_env_value_is_validated_like_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RELAY_DELIVERY__CONCURRENCY", "0")
    assert problems_of(write(tmp_path, FULL)) == [
        ("delivery.concurrency", "Input should be greater than or equal to 1")
    ]


# --- secrets --------------------------------------------------------------------------------------


def test_client_secret_file_is_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(f"{SECRET}\n", encoding="utf-8")
    path = oauth(
        tmp_path,
        f'tenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\n'
        f'client_secret_file = "{tmp_path / "secret"}"\n',
    )
    s = load_settings(path)
    assert s.upstream.oauth.client_secret.get_secret_value() == SECRET
    assert s.upstream.oauth.client_secret_file == tmp_path / "secret"
    assert SECRET not in repr(s)
    assert SECRET not in str(s)
    assert SECRET not in render(s)


def test_client_secret_never_shown(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL))
    assert SECRET not in repr(s)
    assert SECRET not in repr(s.upstream.oauth)
    assert SECRET not in str(s.upstream.oauth.client_secret)
    assert SECRET not in s.model_dump_json()
    text = render(s)
    assert SECRET not in text
    assert tomllib.loads(text)["upstream"]["oauth"]["client_secret"] == "**********"


def test_secret_and_secret_file_together_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET, encoding="utf-8")
    path = oauth(
        tmp_path,
        f'tenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\n'
        f'client_secret = "{SECRET}"\n'
        f'client_secret_file = "{tmp_path / "secret"}"\n',
    )
    assert problems_of(path) == [
        ("upstream.oauth.client_secret_file", "set client_secret or client_secret_file, not both")
    ]


def test_unreadable_and_empty_secret_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    path = oauth(
        tmp_path,
        f'tenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\nclient_secret_file = "{missing}"\n',
    )
    assert problems_of(path) == [
        (
            "upstream.oauth.client_secret_file",
            f"{str(missing)!r} cannot be read (No such file or directory)",
        )
    ]
    (tmp_path / "empty").write_text("\n\n", encoding="utf-8")
    path = oauth(
        tmp_path,
        f'tenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\n'
        f'client_secret_file = "{tmp_path / "empty"}"\n',
    )
    assert problems_of(path) == [
        ("upstream.oauth.client_secret_file", f"{str(tmp_path / 'empty')!r} is empty")
    ]


# --- the allowlist fails closed -------------------------------------------------------------------

ALLOW_REASON = (
    "no client network is allowed: list the devices' networks, "
    'e.g. allow = ["192.168.1.0/24", "127.0.0.1/32"]'
)


def test_empty_allow_list_is_an_error(tmp_path: Path) -> None:
    text = MAILDIR.replace('allow = ["127.0.0.0/8"]', "allow = []")
    assert problems_of(write(tmp_path, text)) == [("smtp.allow", ALLOW_REASON)]


@pytest.mark.parametrize(
    "text",
    [
        '[smtp]\nlisten = ["127.0.0.1:2525"]\n[upstream]\nkind = "maildir"\npath = "/tmp/m"\n',
        '[upstream]\nkind = "maildir"\npath = "/tmp/m"\n',
    ],
    ids=["no-allow-key", "no-smtp-section"],
)
def test_missing_allow_list_is_an_error(tmp_path: Path, text: str) -> None:
    assert problems_of(write(tmp_path, text)) == [("smtp.allow", ALLOW_REASON)]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (
            "10.0.0.1/8",
            "'10.0.0.1/8' has host bits set: write 10.0.0.0/8 for the whole network "
            "or 10.0.0.1/32 for the one address",
        ),
        (
            "192.168.1.20/24",
            "'192.168.1.20/24' has host bits set: write 192.168.1.0/24 for the "
            "whole network or 192.168.1.20/32 for the one address",
        ),
        (
            "fd00::1/8",
            "'fd00::1/8' has host bits set: write fd00::/8 for the whole network or "
            "fd00::1/128 for the one address",
        ),
        ("192.168.1.0/33", "'192.168.1.0/33' is not an IP address or network (CIDR)"),
        ("printers", "'printers' is not an IP address or network (CIDR)"),
        ("", "'' is not an IP address or network (CIDR)"),
    ],
)
def test_bad_allow_entries_have_plain_reasons(tmp_path: Path, entry: str, reason: str) -> None:
    text = MAILDIR.replace('allow = ["127.0.0.0/8"]', f'allow = ["127.0.0.0/8", "{entry}"]')
    assert problems_of(write(tmp_path, text)) == [("smtp.allow", reason)]


def test_single_addresses_are_normalised_to_host_networks(tmp_path: Path) -> None:
    text = MAILDIR.replace('allow = ["127.0.0.0/8"]', 'allow = [" 192.168.1.20 ", "::1"]')
    s = load_settings(write(tmp_path, text))
    assert s.smtp.allow == ["192.168.1.20/32", "::1/128"]


# --- other field problems -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MAILDIR.replace("[smtp]", "[smtp]\nallowed = []"),
            [("smtp.allowed", "unknown key (check its spelling and section)")],
        ),
        (
            "concurrency = 3\n" + MAILDIR,
            [("concurrency", "unknown key (check its spelling and section)")],
        ),
        (
            MAILDIR + '\n[queue]\npath = "/x"\n',
            [("queue", "unknown key (check its spelling and section)")],
        ),
    ],
    ids=["in-section", "top-level", "unknown-section"],
)
def test_unknown_keys(tmp_path: Path, text: str, expected: list[tuple[str, str]]) -> None:
    assert problems_of(write(tmp_path, text)) == expected


def test_bad_durations(tmp_path: Path) -> None:
    text = MAILDIR + (
        '\n[delivery]\nmax_age = "5 fortnights"\nretry_initial = "0s"\nretry_max = true\n'
        '\n[server]\nshutdown_grace = "-5s"\n'
    )
    assert problems_of(write(tmp_path, text)) == [
        ("delivery.max_age", "'5 fortnights' is not a duration such as '30s', '1m', '1h' or '5d'"),
        ("delivery.retry_initial", "must be a finite duration longer than zero"),
        ("delivery.retry_max", "expected a duration such as '30s', '1m', '1h' or '5d'"),
        ("server.shutdown_grace", "'-5s' is not a duration such as '30s', '1m', '1h' or '5d'"),
    ]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_durations_are_refused(tmp_path: Path, value: str) -> None:
    text = MAILDIR + f"\n[delivery]\nretry_max = {value}\n"
    assert problems_of(write(tmp_path, text)) == [
        ("delivery.retry_max", "must be a finite duration longer than zero")
    ]


def test_ca_files_must_exist(tmp_path: Path) -> None:
    text = MAILDIR.replace(
        'kind = "maildir"', 'kind = "maildir"\ntls_ca_file = "/nonexistent/ca.pem"'
    )
    assert problems_of(write(tmp_path, text)) == [
        ("upstream.tls_ca_file", "'/nonexistent/ca.pem' is not a readable file")
    ]


def test_hostname_must_be_a_host_name(tmp_path: Path) -> None:
    text = MAILDIR.replace("[smtp]", '[smtp]\nhostname = "relais-épinal"')
    assert problems_of(write(tmp_path, text)) == [
        ("smtp.hostname", "'relais-épinal' is not a host name (letters, digits, dots, hyphens)")
    ]


def test_retry_max_shorter_than_retry_initial(tmp_path: Path) -> None:
    text = MAILDIR + '\n[delivery]\nretry_initial = "1h"\nretry_max = "10m"\n'
    assert problems_of(write(tmp_path, text)) == [
        ("delivery", "retry_max must not be shorter than retry_initial")
    ]


def test_equal_retry_bounds_are_fine(tmp_path: Path) -> None:
    text = MAILDIR + '\n[delivery]\nretry_initial = "10m"\nretry_max = "600"\n'
    s = load_settings(write(tmp_path, text))
    assert (s.delivery.retry_initial, s.delivery.retry_max) == (600.0, 600.0)


def test_exchange_online_lists_every_missing_field(tmp_path: Path) -> None:
    text = '[smtp]\nallow = ["127.0.0.0/8"]\n[upstream]\nkind = "exchange-online"\n'
    assert problems_of(write(tmp_path, text)) == [
        ("upstream.mailbox", "required: the mailbox the app sends as, e.g. relay@contoso.com"),
        ("upstream.oauth.tenant_id", "required: the Directory (tenant) ID of the tenant"),
        ("upstream.oauth.client_id", "required: the Application (client) ID of the app"),
        (
            "upstream.oauth.client_secret",
            "set client_secret, client_secret_file or certificate_file",
        ),
    ]


def test_exchange_online_is_the_default_kind(tmp_path: Path) -> None:
    text = '[smtp]\nallow = ["127.0.0.0/8"]\n[upstream.oauth]\nscope = "https://x"\n'
    assert [path for path, _ in problems_of(write(tmp_path, text))] == [
        "upstream.mailbox",
        "upstream.oauth.tenant_id",
        "upstream.oauth.client_id",
        "upstream.oauth.client_secret",
        "upstream.oauth.scope",
    ]


@pytest.mark.parametrize(
    ("oauth_body", "expected"),
    [
        (
            f'tenant_id = "{TENANT}"\nclient_secret = "{SECRET}"\n',
            ("upstream.oauth.client_id", "required: the Application (client) ID of the app"),
        ),
        (
            f'tenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\n',
            (
                "upstream.oauth.client_secret",
                "set client_secret, client_secret_file or certificate_file",
            ),
        ),
    ],
    ids=["client_id", "credential"],
)
def test_a_single_missing_field_has_its_own_path(tmp_path: Path, oauth_body, expected) -> None:
    assert problems_of(oauth(tmp_path, oauth_body)) == [expected]


def test_certificate_file_without_a_key(tmp_path: Path) -> None:
    cert = tmp_path / "app.pem"
    cert.write_text(CERT_PEM, encoding="ascii")
    text = (
        f'[smtp]\nallow = ["127.0.0.0/8"]\n[upstream]\nmailbox = "nobody"\n'
        f'[upstream.oauth]\ntenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\n'
        f'certificate_file = "{cert}"\n'
    )
    assert problems_of(write(tmp_path, text)) == [
        ("upstream.mailbox", "required: the mailbox the app sends as, e.g. relay@contoso.com"),
        ("upstream.oauth.certificate_file", f"{str(cert)!r} must hold a private key (PEM)"),
    ]


def test_certificate_file_without_a_key_alone(tmp_path: Path) -> None:
    cert = tmp_path / "app.pem"
    cert.write_text(CERT_PEM, encoding="ascii")
    path = oauth(
        tmp_path, f'tenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\ncertificate_file = "{cert}"\n'
    )
    assert problems_of(path) == [
        ("upstream.oauth.certificate_file", f"{str(cert)!r} must hold a private key (PEM)")
    ]


def test_certificate_file_with_key_and_certificate_is_accepted(tmp_path: Path) -> None:
    cert = tmp_path / "app.pem"
    cert.write_text(KEY_PEM + CERT_PEM, encoding="ascii")
    path = oauth(
        tmp_path, f'tenant_id = "{TENANT}"\nclient_id = "{CLIENT}"\ncertificate_file = "{cert}"\n'
    )
    s = load_settings(path)
    assert s.upstream.oauth.certificate_file == cert
    assert s.upstream.oauth.client_secret is None


def test_maildir_without_path(tmp_path: Path) -> None:
    text = '[smtp]\nallow = ["127.0.0.0/8"]\n[upstream]\nkind = "maildir"\n'
    assert problems_of(write(tmp_path, text)) == [
        ("upstream", "kind = 'maildir' needs path: the folder delivered mail goes to")
    ]


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert problems_of(missing) == [(str(missing), "config file not found")]


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[smtp]\nallow = ["127.0.0.0/8"\n')
    [(where, reason)] = problems_of(path)
    assert where == str(path)
    assert reason.startswith("not valid TOML: ")


def test_config_error_message_lists_every_problem() -> None:
    error = ConfigError([("smtp.allow", "empty"), ("delivery", "bad order")])
    assert str(error) == "smtp.allow: empty; delivery: bad order"


# --- value parsers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("5d", 432_000.0),
        ("2w", 1_209_600.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("45", 45.0),
        (" 10S ", 10.0),
        (30, 30.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "0", "0s", "-1s", "5x", "s", "1h-", "h1", True, None, [1]])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (604_800.0, "1w"),
        (172_800.0, "2d"),
        (3600.0, "1h"),
        (5400.0, "90m"),
        (90.0, "90s"),
        (0.5, "0.5s"),
        (1.25, "1.25s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("relay.lan:25", ("relay.lan", 25)),
        ("[fe80::1%eth0]:25", ("fe80::1%eth0", 25)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize(
    "value", ["127.0.0.1", ":25", "::1:25", "[::1]25", "host:x", "host:70000", "[nothost]:25"]
)
def test_parse_host_port_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(value)


# --- render() -------------------------------------------------------------------------------------


def test_render_round_trips_through_tomllib(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, FULL))
    data = tomllib.loads(render(s))
    assert data["smtp"] == {
        "listen": ["0.0.0.0:25", "[::1]:2525"],
        "allow": ["192.168.1.0/24", "127.0.0.1/32", "fd00::/8"],
        "hostname": "relay.lan",
        "max_message_size": 10_485_760,
        "max_recipients": 100,
        "max_sessions": 200,
        "max_sessions_per_client": 20,
        "command_timeout": "5m",
        "data_timeout": "3m",
        "max_command_length": 2048,
        "max_header_size": 1_048_576,
        "max_messages_per_session": 1000,
        "max_errors_per_session": 20,
        "i_understand_open_relay": False,
    }
    assert data["delivery"] == {
        "max_age": "2d",
        "concurrency": 4,
        "retry_initial": "30s",
        "retry_max": "1h",
        "bounce_to": "sender",
        "on_ambiguous": "resend",
        "rescan": "1m",
        "setup_pause": "5m",
        "warn_after": "",
    }
    assert data["upstream"]["oauth"]["client_secret"] == "**********"
    assert data["upstream"]["oauth"]["client_secret_file"] == ""
    assert data["log"] == {"level": "debug", "format": "json"}
    assert set(data) == {
        "smtp",
        "spool",
        "delivery",
        "upstream",
        "metrics",
        "server",
        "log",
        "route",
        "listener",
        "user",
    }
    assert data["route"] == []  # no [[route]] in that file; no [upstreams.*] either
    assert data["listener"] == [] and data["user"] == []


def test_render_output_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    text = MAILDIR + '\n[spool]\npath = "/srv/spool \\"quoted\\""\n[log]\nformat = "json"\n'
    first = load_settings(write(tmp_path, text))
    second = load_settings(write(tmp_path, render(first), name="rendered.toml"))
    assert second.model_dump() == first.model_dump()
    assert second.spool.path == Path('/srv/spool "quoted"')


# --- check-config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["option", "positional"])
def test_check_config_prints_the_masked_config(tmp_path: Path, capsys, form: str) -> None:
    path = write(tmp_path, FULL)
    argv = (
        ["check-config", "--config", str(path)] if form == "option" else ["check-config", str(path)]
    )
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == render(load_settings(path))
    assert SECRET not in out
    assert 'client_secret = "**********"' in out
    assert err == "# configuration is valid\n"


def test_check_config_reports_every_problem_with_its_path(tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path,
        (
            '[smtp]\nallow = []\nlisten = ["0.0.0.0"]\n'
            '[delivery]\nretry_initial = "soon"\n'
            '[upstream]\nkind = "exchange-online"\n'
            '[log]\nlevel = "loud"\n'
        ),
    )
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "configuration is invalid:",
        "  smtp.listen.0: '0.0.0.0' is not host:port (for example '0.0.0.0:25')",
        "  smtp.allow: " + ALLOW_REASON,
        "  delivery.retry_initial: 'soon' is not a duration such as '30s', '1m', '1h' or '5d'",
        "  upstream.mailbox: required: the mailbox the app sends as, e.g. relay@contoso.com",
        "  upstream.oauth.tenant_id: required: the Directory (tenant) ID of the tenant",
        "  upstream.oauth.client_id: required: the Application (client) ID of the app",
        "  upstream.oauth.client_secret: set client_secret, client_secret_file or certificate_file",
        "  log.level: Input should be 'debug', 'info', 'warning' or 'error'",
    ]


def test_check_config_of_a_missing_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["check-config", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"configuration is invalid:\n  {missing}: config file not found\n"
    )


def test_settings_class_is_exported() -> None:
    assert Settings.model_config["env_prefix"] == "RELAY_"
    assert Settings.model_config["env_nested_delimiter"] == "__"
