"""Small operating-system helpers with a portable fallback.

One job: keep POSIX-only calls (directory fsync, syncfs, file modes, advisory locks) behind
functions that do the right thing on Linux and degrade safely elsewhere (the Windows service
comes later). Nothing here knows about mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

IS_POSIX = os.name == "posix"
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable. No-op where unsupported."""
    if not IS_POSIX:
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path, *parts: bytes, sync: bool = True) -> None:
    """Create `path` (which must not exist) readable by the owner only, write the parts one
    after the other (no joined copy of a large body), fsync (unless the caller flushes the
    whole filesystem itself: `sync=False`), close."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)  # never leave a partial file behind
        raise
    os.close(fd)


def open_private_file(path: Path) -> IO[bytes]:
    """Create `path` (which must not exist) readable by the owner only, open for reading and
    writing."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        return os.fdopen(fd, "w+b")
    except BaseException:
        os.close(fd)
        raise


COPY_PIECE = 1024 * 1024


def copy_range(src: IO[bytes], dst: IO[bytes], offset: int, count: int) -> None:
    """Append `count` bytes of `src` from `offset` to `dst` (flushed by the caller): in the
    kernel with copy_file_range (Linux, BSD), else (or for what it left) through a buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        with contextlib.suppress(OSError):  # EXDEV, ENOSYS, EINVAL: copy the rest by hand
            while done < count:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), count - done, offset + done)
                if copied == 0:
                    break
                done += copied
    if done == count:
        return
    src.seek(offset + done)
    dst.seek(0, os.SEEK_END)
    while done < count:
        piece = src.read(min(COPY_PIECE, count - done))
        if not piece:
            raise OSError(f"{count - done} bytes short copying {src.name}")
        dst.write(piece)
        done += len(piece)
    dst.flush()


# Linux: syncfs() reports write-back errors since 5.8, and the filesystem's own (journal, log)
# since 5.17; before, it could return 0 where fsync() would have failed.
SYNCFS_REPORTS_ERRORS = (5, 17)
# where syncfs() flushes what fsync() of each file would (not FUSE, CIFS, NFS, overlay...)
SYNCFS_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs", "f2fs"})


class FilesystemFlush:
    """One flush of everything written to a filesystem since it was opened (Linux syncfs):
    open it before writing, call `flush()` after. Several files then share one flush instead
    of an fsync each (group commit). Write-back errors since the open are reported."""

    def __init__(self, path: Path, syncfs: Callable[[int], int]) -> None:
        self._syncfs = syncfs
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))

    def flush(self) -> None:
        if self._syncfs(self._fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}")

    def close(self) -> None:
        os.close(self._fd)


def filesystem_flush(path: Path) -> Callable[[], FilesystemFlush] | None:
    """A factory of FilesystemFlush for the filesystem holding `path`, or None where there is
    no trustworthy syncfs (not Linux, a kernel before 5.17, a filesystem not known to flush
    like fsync, no libc symbol): callers then fsync every file and directory."""
    if not sys.platform.startswith("linux") or _kernel_version() < SYNCFS_REPORTS_ERRORS:
        return None
    if filesystem_type(path) not in SYNCFS_FILESYSTEMS:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return lambda: FilesystemFlush(path, syncfs)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem mounted where `path` is ("ext4", "overlay"...), from
    /proc/self/mountinfo; "" when unknown."""
    target = os.path.realpath(path)
    best, found = -1, ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 5 or not rest:
                    continue
                point = parts[4].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) > best:
                    best, found = len(point), rest.split()[0]
    except OSError:
        return ""
    return found


def _kernel_version() -> tuple[int, int]:
    numbers = re.findall(r"\d+", os.uname().release)[:2]
    return (int(numbers[0]), int(numbers[1])) if len(numbers) == 2 else (0, 0)


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def lock_exclusively(handle: IO[bytes]) -> bool:
    """Take a non-blocking exclusive advisory lock on an open file; False if another holds it."""
    if sys.platform == "win32":  # pragma: no cover - Windows service comes later
        import msvcrt  # noqa: PLC0415 - Windows only

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl  # noqa: PLC0415 - POSIX only

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlink_quietly(path: Path) -> bool:
    """Remove a file; False when it was already gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def install_stop_handlers(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[str], None]
) -> None:
    """Call `on_signal(name)` on SIGTERM/SIGINT, from the event loop where supported."""
    for name in ("SIGTERM", "SIGINT"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            loop.add_signal_handler(signum, on_signal, name)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            signal.signal(signum, _threadsafe_handler(loop, on_signal, name))


def _threadsafe_handler(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[str], None], name: str
) -> Callable[[int, object], None]:
    def handler(_signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(on_signal, name)

    return handler


def install_reload_handler(loop: asyncio.AbstractEventLoop, on_reload: Callable[[], None]) -> None:
    """Call `on_reload()` on SIGHUP, from the event loop. No-op where there is no SIGHUP."""
    signum = getattr(signal, "SIGHUP", None)
    if signum is None:
        return
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signum, on_reload)


def remove_reload_handler(loop: asyncio.AbstractEventLoop) -> None:
    signum = getattr(signal, "SIGHUP", None)
    if signum is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signum)


def remove_stop_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for name in ("SIGTERM", "SIGINT"):
        signum = getattr(signal, name, None)
        if signum is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)


def owner_name(path: Path) -> str:
    """The name of the user that owns `path` ("" where ownership is not POSIX)."""
    if not IS_POSIX:
        return ""
    import pwd  # noqa: PLC0415 - POSIX only

    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def sd_notify(*assignments: str) -> bool:
    """Tell the service manager about our state (sd_notify(3): READY=1, RELOADING=1,
    STOPPING=1, WATCHDOG=1, STATUS=...). A no-op, returning False, when not started by
    systemd with Type=notify (no NOTIFY_SOCKET) or where there are no Unix sockets."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    family = getattr(socket, "AF_UNIX", None)
    if not address or family is None:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec= when it applies to this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
