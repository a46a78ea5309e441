"""The shipped configurations in config/: each one passes `check-config`, and example.toml (the
commented reference) names every key the settings know.

The examples point at secret and certificate files that exist only on a real install
(/etc/oauth-relay/secrets/..., /run/secrets/...). The tests supply them the way an admin's
systemd unit or container does: RELAY_<SECTION>__<KEY> variables naming temporary files (a
secret, or a PEM certificate with its key made with trustme). Nothing else is changed, so what
is validated is the example as shipped.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import trustme
from pydantic import BaseModel

from relay.cli import main
from relay.config import Settings, load_settings

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.toml"))
# Which kind of file each *_file key holds.
FILE_KEYS = {
    "client_secret_file": "secret",
    "password_file": "secret",
    "certificate_file": "cert_and_key",
    "tls_cert_file": "cert_and_key",
    "tls_key_file": "key",
    "ca_file": "ca",
    "tls_ca_file": "ca",
}


def test_the_examples_are_there() -> None:
    names = {path.name for path in EXAMPLES}
    assert {
        "sandbox.toml",
        "example.toml",
        "copier-fleet.toml",
        "certificate.toml",
        "two-mailboxes.toml",
        "container.toml",
    } <= names


class Files:
    """Temporary stand-ins for the secret and certificate files an example names."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        ca = trustme.CA()
        leaf = ca.issue_cert("relay.contoso.lan")
        self.kinds = {
            "secret": b"test-secret-Value~not-the-ID\n",
            "cert_and_key": leaf.private_key_and_cert_chain_pem.bytes(),
            "key": leaf.private_key_pem.bytes(),
            "ca": ca.cert_pem.bytes(),
        }
        self.made: list[Path] = []

    def stand_in(self, key: str) -> str:
        path = self.directory / f"{len(self.made)}-{key}.pem"
        path.write_bytes(self.kinds[FILE_KEYS[key]])
        path.chmod(0o600)
        self.made.append(path)
        return str(path)


def _has_files(value: Any) -> bool:
    if isinstance(value, dict):
        return any((key in FILE_KEYS and item) or _has_files(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_files(item) for item in value)
    return False


def _replace_files(value: Any, files: Files) -> Any:
    if isinstance(value, dict):
        return {
            key: files.stand_in(key) if key in FILE_KEYS and item else _replace_files(item, files)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_replace_files(item, files) for item in value]
    return value


def file_overrides(data: dict[str, Any], files: Files) -> dict[str, str]:
    """RELAY_* variables pointing every file the config names at a stand-in.

    Tables are reached key by key (RELAY_UPSTREAMS__INVOICES__OAUTH__CLIENT_SECRET_FILE);
    an array of tables ([[listener]]) can only be replaced whole, as JSON.
    """
    env: dict[str, str] = {}

    def walk(table: dict[str, Any], path: list[str]) -> None:
        for key, value in table.items():
            name = "RELAY_" + "__".join(part.upper() for part in [*path, key])
            if key in FILE_KEYS and isinstance(value, str) and value:
                env[name] = files.stand_in(key)
            elif isinstance(value, dict):
                walk(value, [*path, key])
            elif isinstance(value, list) and _has_files(value):
                env[name] = json.dumps(_replace_files(value, files))

    walk(data, [])
    return env


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No RELAY_* variable from the developer's shell or CI leaks into the check."""
    for name in list(os.environ):
        if name.upper().startswith("RELAY_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_every_example_passes_check_config(
    path: Path,
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    files = Files(tmp_path)
    for name, value in file_overrides(data, files).items():
        clean_env.setenv(name, value)

    settings = load_settings(path)

    assert settings.all_upstreams()
    # Every file the example names was replaced by a stand-in, so every credential was read.
    for upstream in settings.all_upstreams().values():
        if upstream.kind == "exchange-online":
            oauth = upstream.oauth
            assert oauth.client_secret is not None or oauth.certificate_file is not None
    # And the command admins run says the same.
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "# configuration is valid" in captured.err
    assert "test-secret" not in captured.out  # secrets masked


def test_the_certificate_example_uses_a_certificate(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = CONFIG_DIR / "certificate.toml"
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    for name, value in file_overrides(data, Files(tmp_path)).items():
        clean_env.setenv(name, value)
    oauth = load_settings(path).upstream.oauth
    assert oauth.certificate_file is not None
    assert oauth.client_secret is None


def test_the_two_mailboxes_example_routes(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = CONFIG_DIR / "two-mailboxes.toml"
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    for name, value in file_overrides(data, Files(tmp_path)).items():
        clean_env.setenv(name, value)
    settings = load_settings(path)
    assert len(settings.all_upstreams()) == 2
    assert settings.route
    routed = {name for rule in settings.route for name in rule.upstream}
    assert routed <= set(settings.all_upstreams())


def test_the_copier_fleet_example_listens_on_port_25(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = CONFIG_DIR / "copier-fleet.toml"
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    for name, value in file_overrides(data, Files(tmp_path)).items():
        clean_env.setenv(name, value)
    settings = load_settings(path)
    assert ("0.0.0.0", 25) in settings.smtp.listen_addresses()
    assert settings.upstream.kind == "exchange-online"
    assert settings.upstream.host == "smtp.office365.com"
    assert settings.upstream.oauth.client_secret_file is not None


def test_the_container_example_matches_the_image(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """The Dockerfile's contract: no root, so an unprivileged SMTP port; metrics on 9464 on
    every address (published port, HEALTHCHECK); the spool on the image's volume; the secret
    from /run/secrets."""
    path = CONFIG_DIR / "container.toml"
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    assert data["upstream"]["oauth"]["client_secret_file"].startswith("/run/secrets/")
    for name, value in file_overrides(data, Files(tmp_path)).items():
        clean_env.setenv(name, value)
    settings = load_settings(path)
    assert all(port >= 1024 for _, port in settings.smtp.listen_addresses())
    assert settings.metrics.listen == "0.0.0.0:9464"
    assert str(settings.spool.path) == "/var/spool/oauth-relay"


# --- example.toml documents every key ----------------------------------------------------------

_COMMENTED = re.compile(r"^#\s?(\[\[?[a-z_.]+\]\]?\s*(#.*)?|[a-z_]+\s*=.*)$")


def uncommented(text: str) -> str:
    """example.toml with its commented-out tables and keys (`# [[listener]]`, `# name = ...`)
    turned back into TOML, so that every key it documents can be looked up by section."""
    lines = []
    for line in text.splitlines():
        match = _COMMENTED.match(line)
        lines.append(match.group(1) if match else line)
    return "\n".join(lines)


def _model_of(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """('table' | 'tables' | 'named', model) for a section, else None (a plain value)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table", annotation
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "tables", args[0]
    if origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return "named", args[1]
    return None


def undocumented(model: type[BaseModel], data: dict[str, Any], where: str) -> list[str]:
    """Keys of `model` that `data` lacks, and keys in `data` that `model` does not know."""
    problems = [
        f"{where}{key}: not a key of the settings" for key in data if key not in model.model_fields
    ]
    for name, field in model.model_fields.items():
        section = _model_of(field.annotation)
        if name not in data:
            problems.append(f"{where}{name}: not documented")
            continue
        value = data[name]
        if section is None:
            continue
        kind, sub = section
        if kind == "table":
            problems.extend(undocumented(sub, value, f"{where}{name}."))
        elif kind == "tables":
            merged: dict[str, Any] = {}
            for item in value:
                merged.update(item)
            problems.extend(undocumented(sub, merged, f"{where}{name}[]."))
        else:  # [upstreams.<name>]: any subset of [upstream]'s keys
            for label, table in value.items():
                problems.extend(
                    problem
                    for problem in undocumented(sub, table, f"{where}{name}.{label}.")
                    if not problem.endswith("not documented")
                )
    return problems


def test_example_toml_documents_every_key() -> None:
    text = (CONFIG_DIR / "example.toml").read_text(encoding="utf-8")
    data = tomllib.loads(uncommented(text))
    assert undocumented(Settings, data, "") == []


def test_the_key_check_notices_a_missing_key() -> None:
    text = (CONFIG_DIR / "example.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^rescan = .*$", "", text)
    text = re.sub(r"(?m)^shutdown_grace = .*$", "shutdown_gracee = 1", text)
    problems = undocumented(Settings, tomllib.loads(uncommented(text)), "")
    assert "delivery.rescan: not documented" in problems
    assert "server.shutdown_gracee: not a key of the settings" in problems
