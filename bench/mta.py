"""The two MTAs under test for bench/run.py, and the processes the harness must clean up.

`Relay` runs the real daemon (`python -m relay serve --config FILE`, the harness's own python,
so `relay` is imported from the venv or from PYTHONPATH) with a sandbox config in a temp
directory; its output goes to a file, which is polled for the `ready:` line. `Postfix` is a
throwaway Postfix instance: main.cf and master.cf written from scratch in a temp directory,
its own queue and data directories there, smtpd on 127.0.0.1:PORT, started and stopped with
`postfix -c DIR start|stop`. Nothing outside the temp directory is read or changed except
Postfix's own programs and /etc/postfix's postfix-files (meta_directory) for `postfix check`.

Both deliver to `127.0.0.1:upstream_port`: a sink (bench/sink.py), or a port that refuses
connections (`ClosedPort`), so the upstream is down and mail stays queued.

`Processes` remembers everything started, so that a failure or Ctrl-C still stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
MIB = 1024 * 1024
READY = re.compile(r"ready: smtp=(\S+) metrics=\S+.* startup=([\d.]+)s")
QUEUE_CHECKED = re.compile(r"queue: \d+ messages scheduled")  # the start-up check is done
MAX_MESSAGE_SIZE = 40 * MIB  # a 30 MiB scan plus headers fits


# --- clean-up ----------------------------------------------------------------------------------


class Processes:
    """Stop functions of everything running; `stop_all` runs those still registered."""

    def __init__(self) -> None:
        self._stops: dict[int, Callable[[], None]] = {}
        self._next = 0

    def add(self, stop: Callable[[], None]) -> int:
        self._next += 1
        self._stops[self._next] = stop
        return self._next

    def done(self, token: int) -> None:
        self._stops.pop(token, None)

    def stop_all(self) -> None:
        for token in sorted(self._stops, reverse=True):
            stop = self._stops.pop(token)
            try:
                stop()
            except Exception as exc:  # keep stopping the others
                print(f"clean-up: {exc}", file=sys.stderr)


RUNNING = Processes()


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- /proc -------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in bytes (missing keys: the process is gone or a zombie)."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def children(pid: int) -> list[int]:
    """Direct children of `pid`."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                found.extend(int(child) for child in handle.read().split())
    except OSError:
        return []
    return found


def alive(pid: int) -> bool:
    """`pid` exists and is not a zombie (daemons' zombies wait for init to reap them)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def pss(pid: int) -> int:
    """Proportional set size of `pid` in bytes: its private pages plus its share of the pages
    it shares (0 when it is gone)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_pss(pid: int) -> int:
    """Sum of PSS over `pid` and its descendants: what the process tree costs in memory,
    without counting shared libraries once per process as a sum of RSS would."""
    return pss(pid) + sum(tree_pss(child) for child in children(pid))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class ClosedPort:
    """A loopback port that refuses connections for as long as this object lives: a socket is
    bound to it without listening, so nothing else can take the port meanwhile."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def wait_for_greeting(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=5) as conn:
                if conn.recv(512).startswith(b"220"):
                    conn.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers SMTP on {HOST}:{port}")
        time.sleep(0.05)


# --- oauth-relay -------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def relay_config(work: Path, upstream_port: int, concurrency: int) -> Path:
    sections: dict[str, dict[str, object]] = {
        "smtp": {
            "listen": [f"{HOST}:0"],
            "allow": ["127.0.0.0/8"],
            "hostname": "relay.bench.test",
            "max_message_size": MAX_MESSAGE_SIZE,
        },
        "spool": {"path": str(work / "spool")},
        "delivery": {"concurrency": concurrency},
        "upstream": {
            "kind": "smtp",
            "host": HOST,
            "port": upstream_port,
            "tls": "none",
            "allow_plaintext": True,
            "auth": "none",
            "messages_per_minute": 0,
            "recipients_per_day": 0,
            "connections": concurrency,
        },
        "metrics": {"listen": ""},
        "log": {"level": "info", "format": "text"},
    }
    return write_toml(work / "relay.toml", sections)


def write_toml(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    """A config file of flat sections (enough for the relay's)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class Relay:
    """oauth-relay as a subprocess, one per call of start()."""

    label = "oauth-relay"

    def __init__(self, work: Path, upstream_port: int, concurrency: int) -> None:
        self.work = work
        self.config = relay_config(work, upstream_port, concurrency)
        self.spool = work / "spool"
        self.log_path = work / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready_seconds = 0.0  # process start to the ready line, seen from outside
        self.startup_logged = 0.0  # the ready line's own startup= figure
        self._token = 0
        self.started = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 300) -> None:
        env = {**os.environ}
        env.pop("RELAY_CONFIG", None)
        with self.log_path.open("wb") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
                cwd=self.work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the harness only; it stops us
            )
        self._token = RUNNING.add(self.stop)
        self.started = started
        self._wait_ready(started, timeout)

    def _wait_ready(self, started: float, timeout: float) -> None:
        assert self.proc is not None
        deadline = started + timeout
        with self.log_path.open("rb") as log:
            pending = b""
            while True:
                chunk = log.read()
                now = time.monotonic()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    match = READY.search(line.decode("utf-8", "replace"))
                    if match:
                        self.ready_seconds = now - started
                        self.startup_logged = float(match.group(2))
                        self.port = int(match.group(1).split(",")[0].rpartition(":")[2])
                        return
                if self.proc.poll() is not None or now > deadline:
                    raise RuntimeError(f"oauth-relay not ready:\n{self.log_tail()}")
                if not chunk:
                    time.sleep(0.002)

    def wait_for_log(self, pattern: re.Pattern[str], timeout: float = 300) -> float:
        """Seconds from the process start until a log line matching `pattern` (read again
        from the top, so a line already written counts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern.search(self.log_path.read_text(encoding="utf-8", errors="replace")):
                return time.monotonic() - self.started
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"oauth-relay never logged {pattern.pattern!r}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def memory(self) -> int:
        """VmRSS in bytes."""
        return proc_status(self.pid).get("VmRSS", 0)

    def peak_memory(self) -> int:
        """VmHWM in bytes: the highest VmRSS since the process started."""
        return proc_status(self.pid).get("VmHWM", 0)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            RUNNING.done(self._token)
            if self.proc.returncode not in (0, None):
                print(
                    f"oauth-relay exited with {self.proc.returncode}:\n{self.log_tail()}",
                    file=sys.stderr,
                )


# --- Postfix -----------------------------------------------------------------------------------


def postfix_installed() -> bool:
    return all(shutil.which(tool) for tool in ("postfix", "postconf"))


MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{smtpd} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_main_cf(work: Path, upstream_port: int, concurrency: int) -> str:
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(work / "queue"),
        "data_directory": str(work / "data"),
        "myhostname": "postfix.bench.test",
        "mydomain": "bench.test",
        "myorigin": "$mydomain",
        "inet_interfaces": HOST,
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "mydestination": "",
        "local_recipient_maps": "",
        "relay_domains": "",
        "relayhost": f"[{HOST}]:{upstream_port}",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "maillog_file": str(work / "maillog"),
        "maillog_file_prefixes": str(work),
        "message_size_limit": str(MAX_MESSAGE_SIZE + MIB),
        "mailbox_size_limit": "0",
        "default_process_limit": "100",
        "smtp_destination_concurrency_limit": str(concurrency),
        "default_destination_concurrency_limit": str(concurrency),
        "smtpd_banner": "$myhostname ESMTP",
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


class Postfix:
    """A throwaway Postfix instance in `work` (which must be reachable by the postfix user).

    Its queue directory is copied (`cp -a`, owners and modes kept) from a template that
    Postfix's own `post-install create-missing` made once per harness run, and it is started
    with `quick-start`, which skips postfix-script's slow checks (1.7 s per start); it is
    stopped by SIGTERM to its master, which ends its children (`postfix stop` sleeps 1 s)."""

    label = "Postfix"
    _template: Path | None = None

    def __init__(self, work: Path, upstream_port: int, concurrency: int) -> None:
        self.work = work
        self.etc = work / "etc"
        self.queue = work / "queue"
        self.port = free_port()
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.work / "data").mkdir()
        user = pwd.getpwnam("postfix")
        os.chown(work / "data", user.pw_uid, user.pw_gid)
        (self.etc / "main.cf").write_text(
            postfix_main_cf(work, upstream_port, concurrency), encoding="ascii"
        )
        (self.etc / "master.cf").write_text(
            MASTER_CF.format(smtpd=f"{HOST}:{self.port}"), encoding="ascii"
        )
        # Postfix waits (in 300 ms steps, up to 2 s) for a dictionary or config file modified
        # less than a second ago to settle: ours are complete, so date them back a minute
        for written in ("main.cf", "master.cf"):
            moment = time.time() - 60
            os.utime(self.etc / written, (moment, moment))
        self._token = 0
        self.master = 0

    @classmethod
    def template(cls, base: Path) -> Path:
        """An empty queue directory made by Postfix itself, once per harness run."""
        if cls._template is None or not cls._template.exists():
            work = base / "postfix-template"
            work.mkdir(mode=0o755)
            (work / "queue").mkdir(mode=0o755)
            Postfix(work, 25, 1)._postfix("post-install", "create-missing", check=True)
            cls._template = work / "queue"
        return cls._template

    def _postfix(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            start_new_session=True,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed:\n{self.log_tail()}")
        return done

    def start(self) -> None:
        template = self.template(self.work.parent)
        subprocess.run(["cp", "-a", str(template), str(self.queue)], check=True)
        (self.queue / "quick-start").touch()
        self._token = RUNNING.add(self.stop)
        self._postfix("start", check=True)
        self.master = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        wait_for_greeting(self.port)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.work / "maillog").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no maillog)"
        return "\n".join(text.splitlines()[-lines:])

    def memory(self) -> int:
        """Sum of PSS over the master and its children, in bytes."""
        return tree_pss(self.master)

    def peak_memory(self) -> int:
        """No kernel high-water mark for a process tree: the caller samples memory()."""
        return 0

    def stop(self) -> None:
        if self.master:
            group = [*children(self.master), self.master]
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.master, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while any(alive(pid) for pid in group):
                if time.monotonic() > deadline:
                    for pid in group:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
            self.master = 0
        else:
            self._postfix("abort")  # start failed half-way: whatever runs, end it
        RUNNING.done(self._token)
