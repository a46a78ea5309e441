"""Group commit on a real spool directory: messages committed together share flushes, each is
durable and intact, a failure of one message fails only it, a failed flush fails the whole
batch and leaves nothing behind, and without syncfs every message is committed on its own."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from relay import osutil
from relay import spool as spool_module
from relay.errors import SpoolError
from relay.groupcommit import GroupCommit
from relay.model import QueueEntry, Recipient
from relay.spool import Spool, State, new_queue_id

needs_syncfs = pytest.mark.skipif(
    osutil.filesystem_flush(Path("/")) is None, reason="no trustworthy syncfs here"
)


def entry() -> QueueEntry:
    return QueueEntry(
        queue_id=new_queue_id(),
        mail_from="scanner@contoso.com",
        recipients=(Recipient("bob@example.org"),),
        received_at=1_764_000_000.0,
        size=10,
    )


def opened(tmp_path: Path, *, group_commit: bool = True) -> Spool:
    spool = Spool(tmp_path / "spool", group_commit=group_commit)
    spool.open()
    return spool


@needs_syncfs
async def test_concurrent_commits_share_flushes_and_each_is_durable(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    assert spool.shares_flushes
    commits = GroupCommit(spool)
    entries = [entry() for _ in range(20)]
    await asyncio.gather(
        *(
            commits.commit(e, f"body {n}\r\n".encode(), b"Received: x\r\n")
            for n, e in enumerate(entries)
        )
    )
    assert commits.batched == 20
    assert commits.batches < 20  # shared: they arrived while the first flush was under way
    for number, item in enumerate(entries):
        assert spool.load(State.INCOMING, item.queue_id) == item
        assert spool.read_body(item.queue_id) == f"Received: x\r\nbody {number}\r\n".encode()
    assert not list(spool.tmp.iterdir())


@needs_syncfs
def test_one_failed_message_fails_only_itself(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    good, bad = entry(), entry()
    spool.body_path(bad.queue_id).mkdir()  # its body cannot be created
    errors = spool.commit_batch([(good, b"a\r\n", b""), (bad, b"b\r\n", b"")])
    assert errors[0] is None
    assert isinstance(errors[1], SpoolError)
    assert spool.ids(State.INCOMING).__next__() == good.queue_id
    assert spool.find(bad.queue_id) is None


@needs_syncfs
def test_metadata_that_cannot_be_written_fails_only_its_message(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    good = entry()
    bad = replace(entry(), mail_from="j\udcc3rgen@example.org")  # not encodable as UTF-8
    errors = spool.commit_batch([(bad, b"b\r\n", b""), (good, b"a\r\n", b"")])
    assert isinstance(errors[0], SpoolError) and errors[1] is None
    assert spool.find(bad.queue_id) is None
    assert not spool.body_path(bad.queue_id).exists()  # nothing left behind
    assert spool.load(State.INCOMING, good.queue_id) == good


class FailingFlush:
    def flush(self) -> None:
        raise OSError(errno.EIO, "write-back failed")

    def close(self) -> None:
        pass


@needs_syncfs
def test_a_failed_flush_fails_the_batch_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(_path: Path) -> Callable[[], FailingFlush]:
        return FailingFlush

    monkeypatch.setattr(spool_module, "filesystem_flush", failing)
    spool = opened(tmp_path)
    items = [entry(), entry()]
    errors = spool.commit_batch([(e, b"x\r\n", b"") for e in items])
    assert all(isinstance(error, SpoolError) for error in errors)
    assert all(isinstance(error.__cause__, OSError) for error in errors if error)
    assert not list(spool.data.iterdir())
    assert not list(spool.tmp.iterdir())
    assert not list(spool.dir(State.INCOMING).iterdir())


async def test_without_syncfs_each_message_is_committed_on_its_own(tmp_path: Path) -> None:
    spool = opened(tmp_path, group_commit=False)
    assert not spool.shares_flushes
    commits = GroupCommit(spool)
    entries = [entry() for _ in range(5)]
    await asyncio.gather(*(commits.commit(e, b"x\r\n") for e in entries))
    assert commits.batches == 0
    assert sorted(spool.ids(State.INCOMING)) == sorted(e.queue_id for e in entries)
    assert spool.commit_batch([(entry(), b"y\r\n", b"")]) == [None]


@needs_syncfs
async def test_an_interrupted_group_commit_answers_every_waiter(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    commits = GroupCommit(spool)
    waiters = [asyncio.ensure_future(commits.commit(entry(), b"x\r\n")) for _ in range(3)]
    await asyncio.sleep(0)  # they are queued and the runner exists
    assert commits._runner is not None
    commits._runner.cancel()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
    assert all(r is None or isinstance(r, SpoolError) for r in results)  # none hangs
