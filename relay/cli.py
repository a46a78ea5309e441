"""Command line: `oauth-relay serve | check-config | queue ...`; the only place exit codes are
chosen.

One job: parse argv, load the settings once, hand them to the daemon or print them. Exit codes:
0 clean, 2 configuration error, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import __version__, localauth, queuetool
from relay.config import Settings, load_settings, parse_host_port, render
from relay.errors import ConfigError, RelayError
from relay.logs import setup_logging
from relay.spool import Spool, State

if TYPE_CHECKING:
    from relay import doctor

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
    _queue_parser(commands)
    test = commands.add_parser(
        "send-test",
        help="send a test message through the running relay and wait for its outcome",
        description="Send a test message to the running relay over SMTP, like a device, and "
        "wait until it is delivered or fails.",
    )
    test.add_argument("--config", type=Path, help="TOML config file (default: $RELAY_CONFIG)")
    test.add_argument("--to", required=True, help="recipient of the test message")
    test.add_argument("--from", dest="sender", help="sender (default: the upstream mailbox)")
    test.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (120)")
    test.add_argument("--server", help="host:port of the relay (default: its first listener)")
    _doctor_parser(commands)
    hashing = commands.add_parser(
        "hash-password",
        help="hash a password for a [[user]] (local SMTP AUTH)",
        description="Read a password (twice from a terminal, once from a pipe) and print the "
        "password_hash to put in a [[user]] table.",
    )
    hashing.set_defaults(config=None)
    return parser


def _doctor_parser(commands: Any) -> None:
    text = (
        "check the set-up step by step (config, spool, DNS, TCP, TLS, token, claims, AUTH, "
        "send-as) and stop at the first broken step with its fix"
    )
    check = commands.add_parser("doctor", help=text, description=text)
    check.add_argument("config_path", nargs="?", type=Path, help="config file (same as --config)")
    check.add_argument("--config", type=Path, help="TOML config file (default: $RELAY_CONFIG)")
    check.add_argument("--upstream", help="check only this upstream (default: all)")
    check.add_argument(
        "--send-to",
        metavar="ADDRESS",
        help="then send a real test message to ADDRESS through the running relay",
    )
    check.add_argument("--from", dest="sender", help="sender of that message (the mailbox)")
    check.add_argument("--timeout", type=float, default=20.0, help="seconds per step (20)")
    check.add_argument(
        "--wait", type=float, default=120.0, help="seconds to wait for the test message (120)"
    )
    check.add_argument("--json", action="store_true", help="print the steps as JSON at the end")


QUEUE_VERBS = {
    "list": "list queued messages (oldest first)",
    "show": "envelope, recipient states, attempt history and headers of one message",
    "retry": "make a deferred message (or --all) due now",
    "hold": "keep a queued message from being delivered",
    "release": "put a held message back in the queue",
    "delete": "delete a message (not one being delivered)",
    "export": "write a message's .eml to standard output",
    "summary": "messages waiting, by upstream and age (like qshape)",
}


def _queue_parser(commands: Any) -> None:
    queue = commands.add_parser("queue", help="look at and act on the queue (daemon running)")
    queue.add_argument("--config", type=Path, help="TOML config file (default: $RELAY_CONFIG)")
    verbs = queue.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in QUEUE_VERBS.items():
        sub = verbs.add_parser(verb, help=text, description=text)
        if verb in ("show", "hold", "release", "delete", "export"):
            sub.add_argument("queue_id")
        if verb == "retry":
            sub.add_argument("queue_id", nargs="?")
            sub.add_argument("--all", action="store_true", help="every deferred message")
        if verb == "list":
            sub.add_argument("--state", choices=[s.value for s in queuetool.LISTED])
            sub.add_argument("--sender", default="", help="an address or @domain")
        if verb in ("list", "show", "summary"):
            sub.add_argument("--json", action="store_true", help="machine-readable output")


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
    setup_logging(settings.log.level, settings.log.format, settings.secret_values())
    from relay import daemon  # noqa: PLC0415 - check-config needs none of the runtime

    path = args.config or args.config_path
    asyncio.run(daemon.run(settings, reload_settings=lambda: load_settings(path)))
    return EXIT_OK


def _daemon_spool(settings: Settings) -> Spool:
    """The spool a daemon uses (it leaves its lock file there); a wrong path would otherwise
    look like an empty queue, or like a delivered test message."""
    spool = Spool(settings.spool.path)
    if not (spool.root / "lock").is_file():
        raise queuetool.QueueToolError(
            f"no relay spool at {spool.root}: use the daemon's config and environment "
            "(RELAY_SPOOL__PATH in a systemd unit, for example)"
        )
    return spool


def queue(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    spool = _daemon_spool(settings)
    verb = args.verb
    if verb == "list":
        states = (State(args.state),) if args.state else queuetool.LISTED
        _print_listing(queuetool.entries(spool, states, args.sender), args.json)
    elif verb == "show":
        _print_json(queuetool.show(spool, args.queue_id))
    elif verb == "summary":
        _print_summary(queuetool.summary(spool), args.json)
    elif verb == "export":
        sys.stdout.buffer.write(queuetool.export(spool, args.queue_id))
    elif verb == "retry" and args.all:
        print(f"{queuetool.retry_all(spool)} deferred messages are due now")
    elif verb == "retry" and not args.queue_id:
        raise queuetool.QueueToolError("give a queue id, or --all")
    else:
        getattr(queuetool, verb)(spool, args.queue_id)
        print(f"{args.queue_id}: {verb} done")
    return EXIT_OK


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_listing(items: list[queuetool.Listed], as_json: bool) -> None:
    now = time.time()
    if as_json:
        _print_json([item.as_json(now) for item in items])
        return
    for item in items:
        row = item.as_json(now)
        print(
            f"{row['queue_id']}  {row['state']:<8} {row['age_seconds']:>9.0f}s  "
            f"{row['sender'] or '<>'} -> {', '.join(row['recipients'])}"
            + (f"  [{row['last_error']}]" if row["last_error"] else "")
        )
    print(f"-- {len(items)} messages")


def _print_summary(shape: dict[str, dict[str, int]], as_json: bool) -> None:
    if as_json:
        _print_json(shape)
        return
    columns = [name for _, name in queuetool.AGE_BUCKETS] + ["total"]
    print(f"{'upstream':<16}" + "".join(f"{c:>8}" for c in columns))
    for upstream, row in sorted(shape.items()):
        print(f"{upstream:<16}" + "".join(f"{row[c]:>8}" for c in columns))


def send_test(args: argparse.Namespace) -> int:
    from relay import sendtest  # noqa: PLC0415 - only for this command

    settings = load_settings(args.config)
    _daemon_spool(settings)
    sender = args.sender or settings.upstream.mailbox or f"postmaster@{settings.smtp.hostname}"
    server = parse_host_port(args.server) if args.server else None
    queue_id = sendtest.submit(settings, sender, args.to, timeout=30, server=server)
    print(f"queued as {queue_id}; waiting up to {args.timeout:.0f}s for the outcome")
    outcome = sendtest.follow(settings, queue_id, args.timeout)
    print(f"{queue_id}: {outcome.summary}")
    return EXIT_OK if outcome.delivered else EXIT_ERROR


def run_doctor(args: argparse.Namespace) -> int:
    from relay import doctor  # noqa: PLC0415 - its probes are not needed to serve

    path = args.config or args.config_path
    source = str(path or os.environ.get("RELAY_CONFIG") or "the environment")
    emit = (lambda step: None) if args.json else _print_step
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        step = doctor.config_failed(source, exc.problems)
        emit(step)
        _finish_doctor([step], args.json)
        return EXIT_CONFIG
    if args.upstream is not None and args.upstream not in settings.all_upstreams():
        names = ", ".join(settings.all_upstreams())
        raise ConfigError([("--upstream", f"no upstream {args.upstream!r} (there are: {names})")])
    setup_logging("error", "text", settings.secret_values())
    options = doctor.Options(
        timeout=args.timeout,
        upstream=args.upstream,
        send_to=args.send_to,
        sender=args.sender,
        wait=args.wait,
    )
    steps = doctor.run(settings, source, options, emit)
    _finish_doctor(steps, args.json)
    return EXIT_ERROR if any(step.status == "FAIL" for step in steps) else EXIT_OK


def _print_step(step: doctor.Step) -> None:
    mark = {"ok": " ok ", "warn": "warn", "FAIL": "FAIL"}[step.status]
    print(f"[{mark}] {step.scope:<10} {step.name:<8} {step.detail}", flush=True)
    if step.fix:
        print(f"{'':>27}fix: {step.fix}", flush=True)


def _finish_doctor(steps: list[doctor.Step], as_json: bool) -> None:
    if as_json:
        _print_json([step.as_json() for step in steps])
        return
    failed = [f"{step.scope}: {step.name}" for step in steps if step.status == "FAIL"]
    if failed:
        print(f"doctor: stopped at {', '.join(failed)}. Fix it and run doctor again.")
    else:
        print("doctor: every check passed.")


def hash_password_command(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("oauth-relay: the passwords differ", file=sys.stderr)
            return EXIT_ERROR
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("oauth-relay: empty password", file=sys.stderr)
        return EXIT_ERROR
    print(localauth.hash_password(password))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "serve": serve,
        "check-config": check_config,
        "queue": queue,
        "send-test": send_test,
        "doctor": run_doctor,
        "hash-password": hash_password_command,
    }
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
