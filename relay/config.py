"""Configuration: one frozen settings object read from a TOML file and RELAY_* variables.

One job: turn the TOML file (`--config PATH` or RELAY_CONFIG) plus environment overrides
(`RELAY_<SECTION>__<KEY>`, nested sections joined by `__`) into validated, typed settings, or a
ConfigError listing every invalid field with its path and a plain reason. Secrets are SecretStr
and may come from `*_file` keys (systemd credentials, Docker secrets); they never appear in a
repr or in `render()`. Reads only the config and secret files; no other I/O.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from relay.dsn import usable_address
from relay.errors import ConfigError
from relay.localauth import check_hash_format
from relay.sender import SenderPolicy

# --- value types -------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float:
    """'90s', '1m', '1h30m', '5d' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '1m', '1h' or '5d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(rf"(?:{_DURATION.pattern}\s*)+", text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))
        else:
            raise ValueError(f"{value!r} is not a duration such as '30s', '1m', '1h' or '5d'")
    else:
        raise ValueError("expected a duration such as '30s', '1m', '1h' or '5d'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("must be a finite duration longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]


def parse_host_port(value: str) -> tuple[str, int]:
    """'127.0.0.1:2525', '[::1]:2525' or 'relay.lan:25' -> (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r}: write IPv6 addresses as '[::1]:2525'")
        ipaddress.IPv6Address(host.split("%", 1)[0])
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r} is not host:port (for example '0.0.0.0:25')")
        if ":" in host:
            raise ValueError(f"{value!r}: write IPv6 addresses in brackets, as '[::1]:2525'")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535")
    return host, int(port)


def _check_host_port(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a 'host:port' string")
    parse_host_port(value)
    return value.strip()


HostPort = Annotated[str, BeforeValidator(_check_host_port)]


def parse_network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            net = ipaddress.ip_network(text, strict=False)
            host = text.split("/")[0]
            raise ValueError(
                f"{value!r} has host bits set: write {net} for the whole network "
                f"or {host}/{net.max_prefixlen} for the one address"
            ) from exc
        raise ValueError(f"{value!r} is not an IP address or network (CIDR)") from exc


def _blank_is_none(value: object) -> object:
    """ "" means "not set" (TOML has no null; check-config prints unset values as "")."""
    return None if isinstance(value, str) and not value.strip() else value


def _to_path(value: object) -> object:
    if isinstance(value, str):
        if not value.strip():
            return None
        return Path(os.path.expandvars(value.strip()))
    return value


OptionalPath = Annotated[Path | None, BeforeValidator(_to_path)]


def _readable_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"{str(value)!r} is not a readable file")
    return value


OptionalFile = Annotated[Path | None, BeforeValidator(_to_path), AfterValidator(_readable_file)]


def _field_problem(key: str, reason: str) -> PydanticCustomError:
    """A model-level problem reported at the path of one of its fields."""
    return PydanticCustomError("field_problems", reason, {"problems": [(key, reason)]})


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- sections ----------------------------------------------------------------------------------


NOTHING_ALLOWED = (
    "no client network is allowed: list the devices' networks, "
    'e.g. allow = ["192.168.1.0/24", "127.0.0.1/32"]'
)


class SmtpSettings(_Section):
    listen: list[HostPort] = Field(default_factory=lambda: ["127.0.0.1:2525"])
    allow: list[str] = Field(default_factory=list, validate_default=True)
    hostname: str = Field(default_factory=socket.gethostname, min_length=1)
    max_message_size: int = Field(default=36_700_160, ge=1024)
    max_recipients: int = Field(default=500, ge=1, le=100_000)
    # Limits, per the whole daemon unless named per client or session.
    max_sessions: int = Field(default=200, ge=1, le=100_000)
    max_sessions_per_client: int = Field(default=20, ge=1, le=100_000)
    command_timeout: Duration = 300.0  # RFC 5321 4.5.3.2.7: 5 minutes
    data_timeout: Duration = 180.0  # silence allowed inside DATA (RFC 5321 4.5.3.2.5)
    max_command_length: int = Field(default=2048, ge=512, le=65_536)
    max_header_size: int = Field(default=1_048_576, ge=1024)
    max_messages_per_session: int = Field(default=1000, ge=1)
    max_errors_per_session: int = Field(default=20, ge=1, le=10_000)
    i_understand_open_relay: bool = False  # for the [smtp] listen entries

    @field_validator("hostname")
    @classmethod
    def _hostname_is_a_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?", value):
            raise ValueError(f"{value!r} is not a host name (letters, digits, dots, hyphens)")
        return value

    @field_validator("allow")
    @classmethod
    def _allow_fails_closed(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value and info.data.get("listen") != []:  # only [[listener]]s may do without
            raise ValueError(NOTHING_ALLOWED)
        return [str(parse_network(v)) for v in value]

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(parse_network(v) for v in self.allow)

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_host_port(v) for v in self.listen]


TlsMode = Literal["none", "starttls", "implicit"]
AuthMode = Literal["none", "accept-any", "users"]
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")


def _address_or_domain(value: list[str]) -> list[str]:
    for item in value:
        if not re.fullmatch(r"([^@\s<>]+@|@)[^@\s<>]+\.[^@\s<>]+", item.strip()):
            raise ValueError(
                f"{item!r} is neither an address (erp@contoso.com) nor an @domain (@contoso.com)"
            )
    return [item.strip().lower() for item in value]


def _domains(value: list[str]) -> list[str]:
    for item in value:
        if not re.fullmatch(
            r"@?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.[A-Za-z]{2,}", item.strip()
        ):
            raise ValueError(f"{item!r} is not a domain (contoso.com)")
    return [item.strip().lower().lstrip("@") for item in value]


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def covers_everything(networks: list[str]) -> bool:
    """The networks together cover every IPv4 address or every IPv6 address."""
    parsed = [parse_network(n) for n in networks]
    v4 = [n for n in parsed if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in parsed if isinstance(n, ipaddress.IPv6Network)]
    return (
        sum(n.num_addresses for n in ipaddress.collapse_addresses(v4)) == 2**32
        or sum(n.num_addresses for n in ipaddress.collapse_addresses(v6)) == 2**128
    )


class ListenerSettings(_Section):
    """One [[listener]]: an address with its own TLS, AUTH and sender/recipient policy."""

    address: HostPort
    name: str = ""  # how routes and logs name it; the address when empty
    tls: TlsMode = "none"
    tls_cert_file: OptionalFile = None  # PEM; may also hold the key
    tls_key_file: OptionalFile = None
    tls_min_version: Literal["1.0", "1.1", "1.2", "1.3"] = "1.2"
    legacy_tls: bool = False  # must be true for TLS 1.0/1.1 (old printers)
    require_tls: bool = False
    allow: list[str] = Field(default_factory=list)  # empty: [smtp] allow
    auth: AuthMode = "none"
    require_auth: bool = False
    auth_without_tls: bool = False  # loopback listeners only
    auth_relay_anywhere: bool = False  # users may send from outside `allow`
    recipient_domains: list[str] = Field(default_factory=list)  # empty: any
    senders: list[str] = Field(default_factory=list)  # empty: any
    i_understand_open_relay: bool = False

    _senders = field_validator("senders")(_address_or_domain)
    _recipient_domains = field_validator("recipient_domains")(_domains)

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(parse_network(v)) for v in value]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", value):
            raise ValueError(f"{value!r}: listener names are lower-case letters, digits, - and _")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ListenerSettings:
        problems = self.problems()
        if problems:
            raise PydanticCustomError(
                "field_problems", "the listener is inconsistent", {"problems": problems}
            )
        return self

    def problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.tls != "none" and self.tls_cert_file is None:
            problems.append(("tls_cert_file", f"tls = {self.tls!r} needs a certificate (PEM)"))
        if self.tls == "none" and self.require_tls:
            problems.append(("require_tls", 'needs tls = "starttls" or "implicit"'))
        if TLS_VERSIONS.index(self.tls_min_version) < 2 and not self.legacy_tls:
            problems.append(
                (
                    "tls_min_version",
                    "TLS 1.0 and 1.1 are broken: allow them only on a listener for old "
                    "printers, with legacy_tls = true",
                )
            )
        if self.auth == "none" and (self.require_auth or self.auth_relay_anywhere):
            problems.append(("auth", 'require_auth and auth_relay_anywhere need auth = "users"'))
        if self.auth != "users" and self.auth_relay_anywhere:
            problems.append(("auth_relay_anywhere", 'needs auth = "users" (with passwords)'))
        if self.auth_without_tls and not is_loopback_host(parse_host_port(self.address)[0]):
            problems.append(
                (
                    "auth_without_tls",
                    "passwords in clear text are allowed on loopback listeners only",
                )
            )
        return problems

    @property
    def label(self) -> str:
        return self.name or self.address


class UserSettings(_Section):
    """One [[user]] for local SMTP AUTH on listeners with auth = "users"."""

    name: str = Field(min_length=1, max_length=64)
    password_hash: SecretStr
    senders: list[str] = Field(min_length=1)

    _senders = field_validator("senders")(_address_or_domain)

    @field_validator("name")
    @classmethod
    def _login(cls, value: str) -> str:
        if not re.fullmatch(r"[^\s:]+", value):
            raise ValueError(f"{value!r}: a user name has no spaces or colons")
        return value

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, value: SecretStr) -> SecretStr:
        problem = check_hash_format(value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return value


class SpoolSettings(_Section):
    path: Path = Path("/var/spool/oauth-relay")
    # messages accepted at the same moment share one syncfs flush (Linux 5.17+); off: one
    # fsync per file, for a filesystem shared with heavy writers (syncfs flushes theirs too)
    group_commit: bool = True


class DeliverySettings(_Section):
    max_age: Duration = 5 * 86400.0
    concurrency: int = Field(default=3, ge=1, le=64)
    retry_initial: Duration = 60.0
    retry_max: Duration = 3600.0
    bounce_to: str = "sender"
    on_ambiguous: Literal["resend", "hold"] = "resend"
    rescan: Duration = 60.0  # how often the spool is scanned for messages put back by hand
    # how long an upstream with a set-up problem (5.7.139, a refused login or permission)
    # waits before it is tried again; its routes' fallbacks carry the mail meanwhile
    setup_pause: Duration = Field(default=300.0, ge=1.0)
    warn_after: Annotated[Duration | None, BeforeValidator(_blank_is_none)] = None

    @field_validator("bounce_to")
    @classmethod
    def _bounce_target(cls, value: str) -> str:
        value = value.strip()
        if value.lower() in ("sender", "none"):
            return value.lower()
        if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", value) or not usable_address(value):
            raise ValueError('must be "sender", "none" or an address such as it@contoso.com')
        return value

    @model_validator(mode="after")
    def _retry_order(self) -> DeliverySettings:
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be shorter than retry_initial")
        return self


EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"


class OAuthSettings(_Section):
    tenant_id: str = ""
    client_id: str = ""
    client_secret: SecretStr | None = None
    client_secret_file: OptionalPath = None
    certificate_file: OptionalPath = None
    authority: str = "https://login.microsoftonline.com"
    ca_file: OptionalFile = None
    scope: str = EXCHANGE_SCOPE  # kind = "graph": GRAPH_SCOPE unless set
    timeout: Duration = 30.0

    @field_validator("client_secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value:
            return None
        return value

    @field_validator("authority")
    @classmethod
    def _authority_https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be an https:// URL such as https://login.microsoftonline.com")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _secret_from_file(self) -> OAuthSettings:
        if self.client_secret_file is None:
            return self
        if self.client_secret is not None:
            raise _field_problem(
                "client_secret_file", "set client_secret or client_secret_file, not both"
            )
        secret = read_secret_file(self.client_secret_file, "client_secret_file")
        object.__setattr__(self, "client_secret", secret)
        return self

    def problems(self) -> list[tuple[str, str]]:
        """What is missing for the exchange-online upstream (empty list: usable)."""
        found: list[tuple[str, str]] = []
        if not self.tenant_id:
            found.append(("tenant_id", "required: the Directory (tenant) ID of the tenant"))
        if not self.client_id:
            found.append(("client_id", "required: the Application (client) ID of the app"))
        if self.client_secret is None and self.certificate_file is None:
            found.append(
                ("client_secret", "set client_secret, client_secret_file or certificate_file")
            )
        if self.client_secret is not None and self.certificate_file is not None:
            found.append(("certificate_file", "set a client secret or a certificate, not both"))
        if self.certificate_file is not None:
            found.extend(_pem_problems(self.certificate_file))
        if not self.scope.endswith("/.default"):
            found.append(("scope", "app-only tokens need a scope ending in '/.default'"))
        return found


def _pem_problems(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        return [("certificate_file", f"{str(path)!r} cannot be read ({exc.strerror})")]
    missing = [
        what
        for what, marker in (
            ("a certificate", "CERTIFICATE-----"),
            ("a private key", "PRIVATE KEY-----"),
        )
        if marker not in text
    ]
    if missing:
        return [("certificate_file", f"{str(path)!r} must hold {' and '.join(missing)} (PEM)")]
    return []


def read_secret_file(path: Path, key: str) -> SecretStr:
    """A secret from a file (systemd credential, Docker secret), surrounding whitespace off."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise _field_problem(key, f"{str(path)!r} cannot be read ({exc.strerror})") from None
    if not secret:
        raise _field_problem(key, f"{str(path)!r} is empty")
    return SecretStr(secret)


class UpstreamSettings(_Section):
    kind: Literal["exchange-online", "graph", "smtp", "maildir"] = "exchange-online"
    host: str = "smtp.office365.com"
    port: int = Field(default=587, ge=1, le=65535)
    mailbox: str = ""
    tls_ca_file: OptionalFile = None
    path: OptionalPath = None
    timeout: Duration = 60.0
    messages_per_minute: Annotated[int | None, BeforeValidator(_blank_is_none)] = Field(
        default=None, ge=0
    )
    recipients_per_day: Annotated[int | None, BeforeValidator(_blank_is_none)] = Field(
        default=None, ge=0
    )
    connections: Annotated[int | None, BeforeValidator(_blank_is_none)] = Field(
        default=None, ge=1, le=64
    )
    send_as: list[str] = Field(default_factory=list)
    from_header: Literal["keep", "rewrite"] = "rewrite"
    # kind = "graph" only: Microsoft Graph sendMail (national clouds: their Graph endpoint).
    graph_base_url: str = "https://graph.microsoft.com/v1.0"
    max_request_size: int = Field(default=4 * 1024 * 1024, ge=65536)  # Graph's request limit
    # kind = "smtp" only: any SMTP server (a provider, a smart host, the tenant's MX).
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    allow_plaintext: bool = False
    auth: Literal["none", "plain", "login"] = "none"
    username: str = ""
    password: SecretStr | None = None
    password_file: OptionalPath = None

    @field_validator("password", mode="before")
    @classmethod
    def _empty_password_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value else value

    @field_validator("send_as")
    @classmethod
    def _send_as_entries(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(r"([^@\s<>]+@)?@?[A-Za-z0-9.-]+\.[A-Za-z]{2,}", item.strip()):
                raise ValueError(
                    f"{item!r} is neither an address (scanner@contoso.com) nor a domain "
                    "(@contoso.com)"
                )
        return [item.strip() for item in value]

    oauth: OAuthSettings = Field(default_factory=OAuthSettings)

    def budget(self) -> tuple[int, int]:
        """(messages per minute, recipients per day); 0 = unlimited. Exchange Online's
        per-mailbox limits by default, none for the sandbox."""
        exchange = self.kind in ("exchange-online", "graph")  # a provider's are its own
        per_minute = self.messages_per_minute
        per_day = self.recipients_per_day
        return (
            (30 if exchange else 0) if per_minute is None else per_minute,
            (10_000 if exchange else 0) if per_day is None else per_day,
        )

    def max_connections(self) -> int:
        """Sessions open at once to this upstream (Exchange allows 3 per mailbox)."""
        if self.connections is not None:
            return self.connections
        return {"exchange-online": 3, "graph": 4, "smtp": 10}.get(self.kind, 64)

    @model_validator(mode="after")
    def _complete_for_kind(self) -> UpstreamSettings:
        if self.kind == "maildir":
            if self.path is None:
                raise ValueError("kind = 'maildir' needs path: the folder delivered mail goes to")
            return self
        if self.kind == "smtp":
            return self._complete_smtp()
        if self.kind == "graph" and self.oauth.scope == EXCHANGE_SCOPE:
            object.__setattr__(self.oauth, "scope", GRAPH_SCOPE)
        problems: list[tuple[str, str]] = []
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", self.mailbox):
            problems.append(
                ("mailbox", "required: the mailbox the app sends as, e.g. relay@contoso.com")
            )
        if not problems:
            try:
                SenderPolicy(self.mailbox, tuple(self.send_as), from_header=self.from_header)
            except ValueError as exc:
                problems.append(("mailbox", str(exc)))
        problems.extend((f"oauth.{key}", reason) for key, reason in self.oauth.problems())
        if self.kind == "graph":
            if "outlook." in self.oauth.scope:  # national clouds have other Graph hosts
                problems.append(("oauth.scope", f"kind = 'graph' needs {GRAPH_SCOPE}"))
            if not self.graph_base_url.startswith("https://"):
                problems.append(("graph_base_url", "must be an https:// URL"))
        if problems:
            raise PydanticCustomError(
                "field_problems",
                f"the {self.kind} upstream is incomplete",
                {"problems": problems},
            )
        return self

    def _complete_smtp(self) -> UpstreamSettings:
        if self.password_file is not None:
            if self.password is not None:
                raise _field_problem("password_file", "set password or password_file, not both")
            object.__setattr__(
                self, "password", read_secret_file(self.password_file, "password_file")
            )
        problems = self.smtp_problems()
        if problems:
            raise PydanticCustomError(
                "field_problems", "the smtp upstream is incomplete", {"problems": problems}
            )
        return self

    def smtp_problems(self) -> list[tuple[str, str]]:
        """What is missing or unsafe for kind = "smtp" (empty list: usable)."""
        problems: list[tuple[str, str]] = []
        if not self.host.strip():
            problems.append(("host", "required: the SMTP server, e.g. smtp.sendgrid.net"))
        if self.tls == "none" and not self.allow_plaintext:
            problems.append(
                (
                    "tls",
                    'tls = "none" sends mail (and any password) in clear text: set '
                    "allow_plaintext = true if this server is on a network you trust",
                )
            )
        if self.auth == "none" and self.password is not None:
            problems.append(("auth", 'a password is set but auth = "none": say "plain" or "login"'))
        if self.auth != "none":
            if not self.username:
                problems.append(("username", f'auth = "{self.auth}" needs a username'))
            if self.password is None:
                problems.append(
                    ("password", f'auth = "{self.auth}" needs password or password_file')
                )
        if self.mailbox:
            try:
                SenderPolicy(self.mailbox, tuple(self.send_as), from_header=self.from_header)
            except ValueError as exc:
                problems.append(("mailbox", str(exc)))
        return problems


class MetricsSettings(_Section):
    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _listen_or_off(cls, value: str) -> str:
        if value.strip():
            parse_host_port(value)
        return value.strip()


class ServerSettings(_Section):
    shutdown_grace: Duration = 20.0


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


DEFAULT_UPSTREAM = "default"


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


class RouteSettings(_Section):
    """One [[route]] rule: every criterion given must match; a list matches if any entry does."""

    sender: list[str] = Field(default_factory=list)  # addresses or @domains
    client: list[str] = Field(default_factory=list)  # client networks
    listener: list[str] = Field(default_factory=list)  # a [smtp] listen entry or listener name
    # one name, or several in order: the later ones take the message when the earlier are
    # paused (e.g. 5.7.139) or refuse its size
    upstream: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(min_length=1)

    @field_validator("upstream")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"an upstream is listed twice: {', '.join(repeated)}")
        return value

    @field_validator("sender")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(r"([^@\s<>]+@|@)[^@\s<>]+\.[^@\s<>]+", item.strip()):
                raise ValueError(f"{item!r} is neither an address nor an @domain")
        return [item.strip().lower() for item in value]

    @field_validator("client")
    @classmethod
    def _clients(cls, value: list[str]) -> list[str]:
        return [str(parse_network(item)) for item in value]


class Settings(BaseSettings):
    """The whole configuration. Built once, in cli.py, and handed out by section."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    smtp: SmtpSettings = Field(default_factory=dict, validate_default=True)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    route: list[RouteSettings] = Field(default_factory=list)
    listener: list[ListenerSettings] = Field(default_factory=list)
    user: list[UserSettings] = Field(default_factory=list)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @field_validator("upstreams")
    @classmethod
    def _upstream_names(cls, value: dict[str, UpstreamSettings]) -> dict[str, UpstreamSettings]:
        for name in value:
            if name == DEFAULT_UPSTREAM or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
                raise ValueError(
                    f"{name!r}: upstream names are lower-case letters, digits, - and _ "
                    f"(and not {DEFAULT_UPSTREAM!r}, the name of [upstream])"
                )
        return value

    @model_validator(mode="after")
    def _routes_point_somewhere(self) -> Settings:
        known = {DEFAULT_UPSTREAM, *self.upstreams}
        listeners = {listener.label for listener in self.listeners()}
        problems: list[tuple[str, str]] = []
        for number, rule in enumerate(self.route):
            problems.extend(
                (f"route.{number}.upstream", f"no upstream named {name!r}: {sorted(known)}")
                for name in rule.upstream
                if name not in known
            )
            problems.extend(
                (f"route.{number}.listener", f"no listener {listener!r}: {sorted(listeners)}")
                for listener in rule.listener
                if listener not in listeners
            )
        if problems:
            raise PydanticCustomError(
                "field_problems", "routes are invalid", {"problems": problems}
            )
        return self

    @model_validator(mode="after")
    def _one_upstream_per_mailbox(self) -> Settings:
        """Exchange's limits are per mailbox: two upstreams on one mailbox would each pace as if
        alone, and together exceed them. (One SMTP AUTH and one Graph upstream on the same
        mailbox are allowed: one is the other's way out when SMTP AUTH is off.)"""
        seen: dict[tuple[str, str], str] = {}
        problems = []
        for name, upstream in self.all_upstreams().items():
            if upstream.kind not in ("exchange-online", "graph"):
                continue
            key = (upstream.kind, upstream.mailbox.lower())
            if key in seen:
                problems.append(
                    (f"upstreams.{name}.mailbox", f"{key[1]} is already used by {seen[key]!r}")
                )
            seen.setdefault(key, name)
        if problems:
            raise PydanticCustomError("field_problems", "mailboxes repeat", {"problems": problems})
        return self

    @model_validator(mode="after")
    def _listeners_are_safe(self) -> Settings:
        problems = listener_problems(self.listeners(), self.listener, self.user)
        if problems:
            raise PydanticCustomError(
                "field_problems", "listeners are invalid", {"problems": problems}
            )
        return self

    def listeners(self) -> list[ListenerSettings]:
        """Every listener: the [smtp] listen entries (plain, [smtp] allow), then [[listener]]s
        (their own allow, or [smtp] allow)."""
        plain = [
            ListenerSettings(
                address=address,
                allow=self.smtp.allow,
                i_understand_open_relay=self.smtp.i_understand_open_relay,
            )
            for address in self.smtp.listen
        ]
        explicit = [
            listener if listener.allow else listener.model_copy(update={"allow": self.smtp.allow})
            for listener in self.listener
        ]
        return plain + explicit

    def secret_values(self) -> list[str]:
        """Every secret in the settings, for the log redaction."""
        values = []
        for upstream in self.all_upstreams().values():
            for secret in (upstream.oauth.client_secret, upstream.password):
                if secret is not None:
                    values.append(secret.get_secret_value())
        return values

    def all_upstreams(self) -> dict[str, UpstreamSettings]:
        """[upstream] as "default", then the named [upstreams.*]."""
        return {DEFAULT_UPSTREAM: self.upstream, **self.upstreams}


def listener_problems(
    listeners: list[ListenerSettings],
    declared: list[ListenerSettings],
    users: list[UserSettings],
) -> list[tuple[str, str]]:
    """Problems across listeners and users: none at all, repeated names or addresses, AUTH
    without users, and the open-relay guard."""
    if not listeners:
        return [("smtp.listen", "no listener: set [smtp] listen or add a [[listener]]")]
    problems: list[tuple[str, str]] = []
    first = len(listeners) - len(declared)
    key = {
        index: ("smtp.listen" if index < first else f"listener.{index - first}")
        for index in range(len(listeners))
    }
    seen_labels: set[str] = set()
    seen_addresses: set[str] = set()
    for index, listener in enumerate(listeners):
        ephemeral = parse_host_port(listener.address)[1] == 0  # tests: each gets its own port
        if listener.label in seen_labels or (listener.address in seen_addresses and not ephemeral):
            problems.append((key[index], f"{listener.label} is listed twice"))
        if listener.name or not ephemeral:
            seen_labels.add(listener.label)
        seen_addresses.add(listener.address)
        if not listener.allow and not listener.auth_relay_anywhere:
            problems.append((f"{key[index]}.allow", NOTHING_ALLOWED))
        if listener.auth == "users" and not users:
            problems.append((f"{key[index]}.auth", 'auth = "users" needs at least one [[user]]'))
        if open_relay(listener):
            problems.append(
                (
                    key[index],
                    f"{listener.address} would be an open relay: it listens beyond this "
                    f"machine, allows {', '.join(listener.allow)} and requires no AUTH. Narrow "
                    "allow to your networks, or set i_understand_open_relay = true",
                )
            )
    names = [user.name for user in users]
    problems.extend(
        (f"user.{index}.name", f"{name!r} is listed twice")
        for index, name in enumerate(names)
        if name in names[:index]
    )
    return list(dict.fromkeys(problems))


def open_relay(listener: ListenerSettings) -> bool:
    """Anyone on the internet could send through it (and it was not said on purpose)."""
    host = parse_host_port(listener.address)[0]
    authenticated = listener.auth == "users" and listener.require_auth
    return (
        not is_loopback_host(host)
        and covers_everything(listener.allow)
        and not authenticated
        and not listener.i_understand_open_relay
    )


RESTART_SECTIONS = ("spool", "delivery", "metrics", "server")
RESTART_UPSTREAM_KEYS = ("messages_per_minute", "recipients_per_day", "connections")


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The changed keys a reload does not apply (they are read once, at start)."""
    changed: list[str] = []
    for section in RESTART_SECTIONS:
        before, after = getattr(old, section).model_dump(), getattr(new, section).model_dump()
        changed += [f"{section}.{key}" for key in before if before[key] != after.get(key)]
    if old.log.format != new.log.format:
        changed.append("log.format")
    for name, upstream in new.all_upstreams().items():
        previous = old.all_upstreams().get(name)
        if previous is None:
            continue
        prefix = "upstream" if name == DEFAULT_UPSTREAM else f"upstreams.{name}"
        changed += [
            f"{prefix}.{key}"
            for key in RESTART_UPSTREAM_KEYS
            if getattr(previous, key) != getattr(upstream, key)
        ]
    return changed


# --- loading -----------------------------------------------------------------------------------


def _settings_class(toml_file: Path | None) -> type[Settings]:
    """A Settings subclass whose sources are: init values, environment, then the TOML file."""

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
            return tuple(sources)

    return FileSettings


def load_settings(path: Path | None) -> Settings:
    """Read and validate the configuration (the file, then RELAY_* variables over it).

    `path` None means RELAY_CONFIG, or no file at all. Raises ConfigError listing every problem.
    """
    if path is None and os.environ.get("RELAY_CONFIG"):
        path = Path(os.environ["RELAY_CONFIG"])
    if path is not None:
        _check_toml(path)
    try:
        return _settings_class(path)()
    except ValidationError as exc:
        raise ConfigError(_problems(exc)) from None


def _check_toml(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([(str(path), "config file not found")]) from None
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read the config file ({exc.strerror})")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"not valid TOML: {exc}")]) from None


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        path = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section)"
        if error["type"] == "missing":
            message = "required, but missing from the config file and the environment"
        if error["type"] == "field_problems":
            for key, reason in error.get("ctx", {}).get("problems", []):
                problems.append((f"{path}.{key}" if path else key, reason))
            continue
        problems.append((path or "(top level)", message))
    return problems


# --- showing -----------------------------------------------------------------------------------


def render(settings: Settings) -> str:
    """The effective configuration as TOML, with every secret masked."""
    data = settings.model_dump(mode="json")
    lines: list[str] = []
    _render_table(lines, [], data)
    return "\n".join(lines).strip() + "\n"


def _render_table(lines: list[str], prefix: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_tables(v)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in table.items() if _is_tables(v)}
    if prefix and scalars:
        lines.append(f"\n[{'.'.join(prefix)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables.items():
        _render_table(lines, [*prefix, key], value)
    for key, items in arrays.items():
        for item in items:
            lines.append(f"\n[[{'.'.join([*prefix, key])}]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())


def _is_tables(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
