"""The durable queue on disk: the only code that reads or writes the spool directory.

Layout (one filesystem): `data/<id>.eml` holds a message's raw bytes, written once and never
changed; `<state>/<id>.json` holds its envelope and per-recipient state. The metadata file is the
commit marker, and a message changes state only by an atomic rename of it between the state
directories incoming/, active/, deferred/, failed/ and corrupt/. `tmp/` holds metadata being
written and, as `<id>.recv`, bodies too large to hold in memory while they arrive (committed
by fsync through their own handle and a rename into data/). `commit()` returns only once
body, metadata and both directory entries are fsynced; `commit_batch()` (group commit,
Linux syncfs) writes several messages' bodies and their metadata in tmp/, flushes once,
then renames the metadata into incoming/: from the flush on, a complete `tmp/<id>.json`
with its complete body is itself a committed message.

Recovery at start-up promotes such tmp/ entries to incoming/, removes half-written files,
requeues active/ (in flight when the process died) and quarantines anything unreadable in
corrupt/, never deleting it. Every operation tolerates ENOENT where another worker or the CLI
may have got there first. Synchronous by design: async callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO

from relay.errors import CorruptEntry, SpoolError, SpoolLocked
from relay.model import QueueEntry
from relay.osutil import (
    FilesystemFlush,
    filesystem_flush,
    fsync_dir,
    lock_exclusively,
    make_private_dir,
    open_private_file,
    unlink_quietly,
    write_private_file,
)
from relay.storedbody import MessageBody, StoredBody

log = logging.getLogger("relay.spool")

_ID = re.compile(r"[0-9A-F]{12,32}")


class State(StrEnum):
    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    FAILED = "failed"
    HOLD = "hold"  # kept for an admin to release or delete (ambiguous outcomes, by hand)
    CORRUPT = "corrupt"


QUEUED_STATES = (State.INCOMING, State.DEFERRED)


def new_queue_id(now: float | None = None) -> str:
    """Time-ordered, unique, filename-safe: 11 hex digits of milliseconds + 6 random."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:011X}{secrets.token_hex(3).upper()}"


def valid_queue_id(queue_id: str) -> bool:
    return _ID.fullmatch(queue_id) is not None


@dataclass
class RecoveryReport:
    requeued: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    removed_partial: int = 0
    queued: int = 0
    # queued messages as found: id, state, due time (0: now), upstream ("" = the default)
    scheduled: list[tuple[str, State, float, str]] = field(default_factory=list, compare=False)


def _write_new(path: Path, parts: tuple[bytes, ...], written: list[Path]) -> None:
    """Create `path` exclusively and durably; remember it for clean-up only once created."""
    write_private_file(path, *parts)
    written.append(path)


def _commit_failed(queue_id: str, cause: Exception) -> SpoolError:
    error = SpoolError(f"{queue_id}: commit failed: {cause}")
    error.__cause__ = cause
    return error


def _remove_all(paths: list[Path]) -> None:
    for path in reversed(paths):
        with contextlib.suppress(OSError):
            path.unlink()


@dataclass(frozen=True)
class BodyFile:
    """A complete message file in tmp/, written (not yet fsynced) through `file`, which is
    still open: the commit fsyncs it through the same handle, so a write-back error since
    it was opened is seen, then renames it into data/. Its head is already in it."""

    path: Path
    file: IO[bytes]
    size: int


Body = bytes | BodyFile
NewMessage = tuple[QueueEntry, Body, bytes]  # entry, body, head (the trace line)


def body_size(body: Body, head: bytes) -> int:
    return body.size if isinstance(body, BodyFile) else len(head) + len(body)


def _free_name(path: Path) -> Path:
    """`path`, or `path` with a numbered suffix when something is already there: quarantine
    never overwrites what an earlier quarantine kept."""
    candidate, number = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{number}")
        number += 1
    return candidate


class Spool:
    """A spool directory. Open it once per process; the daemon also takes its lock."""

    def __init__(self, root: Path, *, group_commit: bool = True) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.data = root / "data"
        self._lock_handle: IO[bytes] | None = None
        self._group_commit = group_commit
        self._flush: Callable[[], FilesystemFlush] | None = None

    # --- set-up --------------------------------------------------------------------------------

    def open(self, *, lock: bool = False) -> None:
        """Create the directories (mode 0700). With `lock`, refuse to share with another daemon."""
        try:
            for directory in (self.root, self.tmp, self.data, *(self.dir(s) for s in State)):
                make_private_dir(directory)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directories under {self.root}: {exc}") from exc
        if self._group_commit and self._one_filesystem():
            self._flush = filesystem_flush(self.root)
        if lock:
            handle = (self.root / "lock").open("ab")
            if not lock_exclusively(handle):
                handle.close()
                raise SpoolLocked(f"another oauth-relay daemon is using {self.root}")
            self._lock_handle = handle

    def _one_filesystem(self) -> bool:
        """One syncfs covers the spool only if data/, tmp/ and incoming/ share its filesystem."""
        devices = {path.stat().st_dev for path in (self.root, self.data, self.tmp)}
        return len(devices | {self.dir(State.INCOMING).stat().st_dev}) == 1

    @property
    def shares_flushes(self) -> bool:
        """True when commit_batch() shares one flush among its messages (group commit)."""
        return self._flush is not None

    def close(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def dir(self, state: State) -> Path:
        return self.root / state.value

    def meta_path(self, state: State, queue_id: str) -> Path:
        return self.dir(state) / f"{queue_id}.json"

    def body_path(self, queue_id: str) -> Path:
        return self.data / f"{queue_id}.eml"

    def writable(self) -> bool:
        """True when a file can be created in the spool right now (for /readyz)."""
        probe = self.tmp / f".probe-{secrets.token_hex(4)}"
        try:
            write_private_file(probe, b"")
        except OSError:
            return False
        unlink_quietly(probe)
        return True

    # --- accepting -----------------------------------------------------------------------------

    def receive_file(self, queue_id: str) -> tuple[Path, IO[bytes]]:
        """A new private file in tmp/ for a body too large to hold in memory while it
        arrives; recovery removes it if the process dies before it is committed."""
        path = self.tmp / f"{queue_id}.recv"
        return path, open_private_file(path)

    def commit(self, entry: QueueEntry, body: Body, head: bytes = b"") -> None:
        """Store a new message (`head` then `body`: the trace line is not glued onto a large
        body in memory; a BodyFile has its head in it) durably in incoming/. Returns only
        when it is on stable storage."""
        queue_id = entry.queue_id
        written: list[Path] = []
        try:
            meta = entry.dumps()
            if isinstance(body, BodyFile):
                self._take_body_file(queue_id, body, written)
            else:
                _write_new(self.body_path(queue_id), (head, body), written)
            fsync_dir(self.data)
            _write_new(self.tmp / f"{queue_id}.json", (meta,), written)
            os.replace(written[-1], self.meta_path(State.INCOMING, queue_id))
            written[-1] = self.meta_path(State.INCOMING, queue_id)
            fsync_dir(self.dir(State.INCOMING))
        except Exception as exc:
            _remove_all(written)  # only what this call created
            raise SpoolError(f"{queue_id}: commit failed: {exc}") from exc

    def commit_batch(self, messages: Sequence[NewMessage]) -> list[SpoolError | None]:
        """Store new messages durably with one shared flush instead of four fsyncs each.

        Bodies go to data/ and metadata to tmp/<id>.json, all flushed together; then the
        metadata is renamed into incoming/. The rename is not flushed: a complete tmp/ entry
        whose body is complete is itself the commit (recovery promotes it to incoming/), so
        the message is safe from the flush on. Per message: None once it is on stable
        storage, or the error; a failed flush fails every message of the batch, and a failed
        message leaves nothing behind. Without a shared flush, each is committed alone."""
        if self._flush is None:
            return [self._commit_alone(*message) for message in messages]
        errors: list[SpoolError | None] = [None] * len(messages)
        written: list[list[Path]] = [[] for _ in messages]
        try:
            flush = self._flush()  # opened before writing: it reports write-back errors since
        except OSError as exc:
            return [_commit_failed(m[0].queue_id, exc) for m in messages]
        try:
            for number, (entry, body, head) in enumerate(messages):
                errors[number] = self._write_body(entry, body, head, written[number])
                if errors[number] is None:
                    errors[number] = self._write_meta(entry, written[number])
            flush.flush()  # bodies, metadata and their directory entries: the commit
            for number, (entry, _, _) in enumerate(messages):
                if errors[number] is None:
                    errors[number] = self._publish(entry, written[number])
        except Exception as exc:  # a flush failed: nothing of the batch is known to be durable
            errors = [
                e or _commit_failed(m[0].queue_id, exc)
                for e, m in zip(errors, messages, strict=True)
            ]
        finally:
            flush.close()
        for error, paths in zip(errors, written, strict=True):
            if error is not None:
                _remove_all(paths)
        return errors

    def _take_body_file(self, queue_id: str, body: BodyFile, written: list[Path]) -> None:
        """fsync a received body file through its own handle, close it, move it into data/."""
        try:
            os.fsync(body.file.fileno())
        finally:
            body.file.close()
        os.replace(body.path, self.body_path(queue_id))
        written.append(self.body_path(queue_id))

    def _commit_alone(self, entry: QueueEntry, body: Body, head: bytes) -> SpoolError | None:
        try:
            self.commit(entry, body, head)
        except SpoolError as exc:
            return exc
        return None

    def _write_body(
        self, entry: QueueEntry, body: Body, head: bytes, written: list[Path]
    ) -> SpoolError | None:
        try:
            if isinstance(body, BodyFile):
                self._take_body_file(entry.queue_id, body, written)
                return None
            write_private_file(self.body_path(entry.queue_id), head, body, sync=False)
        except Exception as exc:
            return _commit_failed(entry.queue_id, exc)
        written.append(self.body_path(entry.queue_id))
        return None

    def _write_meta(self, entry: QueueEntry, written: list[Path]) -> SpoolError | None:
        tmp_meta = self.tmp / f"{entry.queue_id}.json"
        try:
            write_private_file(tmp_meta, entry.dumps(), sync=False)
        except Exception as exc:  # also metadata that cannot be encoded: this message only
            return _commit_failed(entry.queue_id, exc)
        written.append(tmp_meta)
        return None

    def _publish(self, entry: QueueEntry, written: list[Path]) -> SpoolError | None:
        """tmp/ -> incoming/, where delivery looks (durable with the next flush or fsync;
        until then recovery would promote the tmp/ entry the same way)."""
        queue_id = entry.queue_id
        try:
            os.replace(written[-1], self.meta_path(State.INCOMING, queue_id))
        except OSError as exc:
            return _commit_failed(queue_id, exc)
        written[-1] = self.meta_path(State.INCOMING, queue_id)
        return None

    # --- reading -------------------------------------------------------------------------------

    def ids(self, state: State) -> Iterator[str]:
        """Queue ids with a metadata file in `state` (unsorted)."""
        try:
            with os.scandir(self.dir(state)) as entries:
                for item in entries:
                    name = item.name
                    if name.endswith(".json") and valid_queue_id(name[:-5]):
                        yield name[:-5]
        except FileNotFoundError:
            return

    def load(self, state: State, queue_id: str) -> QueueEntry:
        """Read one entry. FileNotFoundError if it moved; CorruptEntry if it cannot be parsed."""
        raw = self.meta_path(state, queue_id).read_bytes()
        try:
            entry = QueueEntry.loads(raw)
        except ValueError as exc:
            raise CorruptEntry(queue_id, str(exc)) from None
        if entry.queue_id != queue_id:
            raise CorruptEntry(queue_id, f"metadata names another message ({entry.queue_id})")
        return entry

    def read_body(self, queue_id: str) -> bytes:
        return self.body_path(queue_id).read_bytes()

    def body_for_delivery(self, queue_id: str, in_memory_up_to: int) -> MessageBody:
        """The body in memory when it is small, else a StoredBody to read in pieces.
        FileNotFoundError when it is missing."""
        path = self.body_path(queue_id)
        size = path.stat().st_size
        return path.read_bytes() if size <= in_memory_up_to else StoredBody(path, size)

    def find(self, queue_id: str) -> State | None:
        """The state a message is in now, or None."""
        for state in State:
            if self.meta_path(state, queue_id).exists():
                return state
        return None

    def oldest_queued(self) -> float | None:
        """Acceptance time of the oldest message not yet finished (ids start with it)."""
        ids = [i for s in (State.INCOMING, State.ACTIVE, State.DEFERRED) for i in self.ids(s)]
        return int(min(ids)[:11], 16) / 1000 if ids else None

    def depth(self) -> dict[State, int]:
        return {state: sum(1 for _ in self.ids(state)) for state in State}

    # --- changing state ------------------------------------------------------------------------

    def move(self, queue_id: str, src: State, dst: State) -> bool:
        """Atomically move a message between states; False when it was no longer in `src`."""
        try:
            os.replace(self.meta_path(src, queue_id), self.meta_path(dst, queue_id))
        except FileNotFoundError:
            return False
        fsync_dir(self.dir(dst))
        return True

    def claim(self, queue_id: str, src: State) -> bool:
        """Take a queued message for delivery (src -> active); False if someone else did.
        Durable: a message that was being delivered when the power failed must be found in
        active/, where recovery counts it as in flight (a possible duplicate)."""
        return self.move(queue_id, src, State.ACTIVE)

    def claim_and_load(self, queue_id: str, src: State) -> QueueEntry | None:
        """`claim`, then `load` from active/ (one worker-thread hop for delivery): None when
        someone else took it first; CorruptEntry or FileNotFoundError as `load`."""
        if not self.claim(queue_id, src):
            return None
        return self.load(State.ACTIVE, queue_id)

    def save(self, entry: QueueEntry, src: State, dst: State) -> None:
        """Durably rewrite an entry's metadata in `src`, then move it to `dst`.

        FileNotFoundError when the message is no longer in `src` (someone else moved or
        deleted it): a save never brings back a message that left its state."""
        if not self.meta_path(src, entry.queue_id).exists():
            raise FileNotFoundError(f"{entry.queue_id} is no longer in {src.value}/")
        tmp_meta = self.tmp / f"{entry.queue_id}.{secrets.token_hex(4)}.json"
        try:
            write_private_file(tmp_meta, entry.dumps())
            os.replace(tmp_meta, self.meta_path(src, entry.queue_id))
        except OSError as exc:
            unlink_quietly(tmp_meta)
            raise SpoolError(f"{entry.queue_id}: cannot save state: {exc}") from exc
        if src is dst:
            fsync_dir(self.dir(src))
        else:
            self.move(entry.queue_id, src, dst)

    def delete(self, queue_id: str, state: State) -> bool:
        """Delete a message by hand; False when it was no longer in `state` (claimed meanwhile)."""
        if not unlink_quietly(self.meta_path(state, queue_id)):
            return False
        fsync_dir(self.dir(state))
        unlink_quietly(self.body_path(queue_id))
        return True

    def remove(self, queue_id: str, state: State, *, durable: bool = True) -> None:
        """Forget a finished message: metadata first (the commit marker), then the body.
        `durable=False` (a delivered message): no fsync; if a power failure undoes the
        removal, the message is found in active/ (its claim was durable) and sent again,
        counted as in flight."""
        unlink_quietly(self.meta_path(state, queue_id))
        if durable:
            fsync_dir(self.dir(state))
        unlink_quietly(self.body_path(queue_id))

    def quarantine(self, queue_id: str, state: State, reason: str) -> None:
        """Move an unreadable message, metadata and body, to corrupt/. Never deletes."""
        corrupt = self.dir(State.CORRUPT)
        moved = False
        # body first: a crash in between leaves metadata whose body is missing, which the next
        # recovery quarantines too; the other order would leave an "orphan" body to remove
        for src, name in (
            (self.body_path(queue_id), f"{queue_id}.eml"),
            (self.meta_path(state, queue_id), f"{queue_id}.json"),
        ):
            try:
                os.replace(src, _free_name(corrupt / name))
                moved = True
            except FileNotFoundError:
                continue
        if moved:
            fsync_dir(corrupt)
        log.error("quarantined in corrupt/: %s", reason, extra={"queue_id": queue_id})

    # --- start-up ------------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Make the spool consistent after a crash: `recover_start`, then `check_entries`."""
        report = self.recover_start()
        self.check_entries(report)
        return report

    def recover_start(self) -> RecoveryReport:
        """The part of recovery that must come before accepting and delivering, and reads no
        metadata (quick with any queue): half-written files in tmp/ removed, messages that
        were in flight back to incoming/, stray files set aside, bodies that no metadata file
        names removed (never acknowledged, or already finished)."""
        report = RecoveryReport()
        report.removed_partial += self._settle_tmp(report)
        for queue_id in list(self.ids(State.ACTIVE)):
            if self.move(queue_id, State.ACTIVE, State.INCOMING):
                report.requeued.append(queue_id)
        self._quarantine_strays(report)
        named = {queue_id for state in State for queue_id in self.ids(state)}
        report.removed_partial += self._remove_orphan_bodies(named)
        return report

    def check_entries(
        self, report: RecoveryReport, stop: Callable[[], bool] = lambda: False
    ) -> RecoveryReport:
        """Read every stored entry once: quarantine what cannot be read, or whose body is
        missing or of another size, and list what is queued (for the scheduler). Safe while
        the daemon accepts and delivers: entries that move or finish meanwhile are skipped."""
        for state in (State.INCOMING, State.DEFERRED, State.FAILED, State.HOLD):
            for queue_id in list(self.ids(state)):
                if stop():
                    return report  # shutting down: the next start checks again
                entry = self._check_entry(state, queue_id, report)
                if entry is not None and state in QUEUED_STATES:
                    report.queued += 1
                    due = entry.next_attempt_at if state is State.DEFERRED else 0.0
                    report.scheduled.append((queue_id, state, due, entry.upstream))
        return report

    def _settle_tmp(self, report: RecoveryReport) -> int:
        """A new message's metadata in tmp/ with its complete body was committed (group
        commit flushes both before the rename into incoming/): it goes to incoming/, counted
        with the requeued (it may have been acknowledged or not: a duplicate is possible).
        Everything else in tmp/ is a partial write and is removed. Returns how many removed."""
        removed = 0
        for item in self.tmp.iterdir():
            if not item.is_file():
                continue
            queue_id = item.name.removesuffix(".json")
            if item.name.endswith(".json") and valid_queue_id(queue_id) and self._complete(item):
                os.replace(item, self.meta_path(State.INCOMING, queue_id))
                report.requeued.append(queue_id)
                continue
            if unlink_quietly(item):
                removed += 1
        if report.requeued:
            fsync_dir(self.dir(State.INCOMING))
        return removed

    def _complete(self, tmp_meta: Path) -> bool:
        """A committed new message: its metadata parses, names it, is nowhere else yet, and
        its body has the size the metadata says."""
        queue_id = tmp_meta.name.removesuffix(".json")
        if self.find(queue_id) is not None:
            return False  # already published: this is a stale copy
        try:
            entry = QueueEntry.loads(tmp_meta.read_bytes())
            size = self.body_path(queue_id).stat().st_size
        except (OSError, ValueError):
            return False
        return entry.queue_id == queue_id and size == entry.size

    def _quarantine_strays(self, report: RecoveryReport) -> None:
        """Files in state directories that are not `<id>.json` are set aside, not deleted."""
        for state in (State.INCOMING, State.ACTIVE, State.DEFERRED, State.FAILED, State.HOLD):
            for item in self.dir(state).iterdir():
                name = item.name
                if name.endswith(".json") and valid_queue_id(name[:-5]):
                    continue
                target = _free_name(self.dir(State.CORRUPT) / f"stray-{state.value}-{name}")
                os.replace(item, target)
                report.quarantined.append(name)
                log.error("stray file %s in %s/ moved to corrupt/", name, state.value)

    def _check_entry(
        self, state: State, queue_id: str, report: RecoveryReport
    ) -> QueueEntry | None:
        """The entry if it can be delivered; None if it moved meanwhile or was set aside.
        Runs beside live delivery: a message claimed between two reads, and perhaps put back,
        is skipped; only a body that is still missing once its metadata is seen again counts
        as missing (bodies disappear only with their message)."""
        try:
            entry = self.load(state, queue_id)
        except FileNotFoundError:
            return None  # claimed, moved or finished meanwhile
        except CorruptEntry as exc:
            problem = f"unreadable metadata: {exc.reason}"
        except OSError as exc:
            problem = f"cannot read: {exc}"
        else:
            try:
                size = self.body_path(queue_id).stat().st_size
            except FileNotFoundError:
                if not self.meta_path(state, queue_id).exists():
                    return None  # finished between the two reads
                if self.body_path(queue_id).exists():
                    return None  # a race with a state change: not ours to judge now
                problem = "message body is missing"
            except OSError as exc:
                problem = f"cannot read: {exc}"
            else:
                if size == entry.size:
                    return entry
                problem = f"body is {size} bytes, metadata says {entry.size}"
        self.quarantine(queue_id, state, problem)
        report.quarantined.append(queue_id)
        return None

    def _remove_orphan_bodies(self, known: set[str]) -> int:
        """Bodies without metadata were never acknowledged (or already finished): remove."""
        removed = 0
        for item in self.data.iterdir():
            queue_id = item.name.removesuffix(".eml")
            if queue_id not in known and unlink_quietly(item):
                removed += 1
        if removed:
            fsync_dir(self.data)
        return removed
