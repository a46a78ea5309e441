"""Command line: `oauth-relay serve | check-config`, and the only place exit codes are chosen.

One job: parse argv, load the settings once, hand them to the daemon or print them. Exit codes:
0 clean, 2 configuration error, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from relay import __version__
from relay.config import Settings, load_settings, render
from relay.errors import ConfigError, RelayError
from relay.logs import setup_logging

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2

log = logging.getLogger("relay.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oauth-relay",
        description="SMTP relay that delivers to Exchange Online with OAuth2 (XOAUTH2).",
    )
    parser.add_argument("--version", action="version", version=f"oauth-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("serve", "run the relay daemon"),
        ("check-config", "validate the configuration and print it with secrets masked"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "config_path", nargs="?", type=Path, help="config file (same as --config)"
        )
        command.add_argument(
            "--config", type=Path, help="TOML config file (default: $RELAY_CONFIG)"
        )
    return parser


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config or args.config_path)


def _print_problems(error: ConfigError) -> None:
    print("configuration is invalid:", file=sys.stderr)
    for path, reason in error.problems:
        print(f"  {path}: {reason}", file=sys.stderr)


def check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(render(settings), end="")
    print("# configuration is valid", file=sys.stderr)
    return EXIT_OK


def serve(args: argparse.Namespace) -> int:
    settings = _load(args)
    secrets = []
    if settings.upstream.oauth.client_secret is not None:
        secrets.append(settings.upstream.oauth.client_secret.get_secret_value())
    setup_logging(settings.log.level, settings.log.format, secrets)
    from relay import daemon  # noqa: PLC0415 - check-config needs none of the runtime

    asyncio.run(daemon.run(settings))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"serve": serve, "check-config": check_config}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    except RelayError as exc:
        print(f"oauth-relay: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(
            f"oauth-relay: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
