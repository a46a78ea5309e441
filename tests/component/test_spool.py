"""spool.py on a real directory: durable commit, state moves, recovery and the daemon lock.

Every test works in its own tmp_path; faults are made with real files where possible (a file
where a directory should be, a body that already exists) and by patching `fsync_dir` only
where the kernel cannot be made to fail on demand.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import relay.spool as spool_module
from relay.errors import CorruptEntry, SpoolError, SpoolLocked
from relay.model import Attempt, QueueEntry, RcptState, Recipient
from relay.spool import RecoveryReport, Spool, State, new_queue_id, valid_queue_id

BODY = b"From: scanner@contoso.example\r\nSubject: scan\r\n\r\nhello\r\n"
ALL_DIRS = ("tmp", "data", "incoming", "active", "deferred", "failed", "hold", "corrupt")


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool")
    s.open()
    yield s
    s.close()


_counter = iter(range(1, 10**9))


def make_entry(body: bytes = BODY, **changes: object) -> QueueEntry:
    fields: dict[str, object] = {
        "queue_id": new_queue_id(1_764_000_000.0 + next(_counter)),
        "mail_from": "scanner@contoso.example",
        "recipients": (Recipient("alice@contoso.example"), Recipient("bob@contoso.example")),
        "received_at": 1_764_000_000.0,
        "size": len(body),
        "client": "192.168.1.20",
        "helo": "scanner",
    }
    fields.update(changes)
    return QueueEntry(**fields)  # type: ignore[arg-type]


def committed(spool: Spool, body: bytes = BODY, **changes: object) -> QueueEntry:
    entry = make_entry(body, **changes)
    spool.commit(entry, body)
    return entry


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_depth(**counts: int) -> dict[State, int]:
    return {state: counts.get(state.value, 0) for state in State}


# --- set-up ---------------------------------------------------------------------------------------


def test_open_creates_private_directories(tmp_path: Path) -> None:
    root = tmp_path / "var" / "spool"
    Spool(root).open()
    assert names(root) == sorted(ALL_DIRS)
    assert mode(root) == 0o700
    for name in ALL_DIRS:
        assert mode(root / name) == 0o700, name


def test_open_is_idempotent(spool: Spool) -> None:
    entry = committed(spool)
    spool.open()
    assert spool.find(entry.queue_id) is State.INCOMING


def test_open_failure_is_a_spool_error(tmp_path: Path) -> None:
    (tmp_path / "spool").write_bytes(b"not a directory")
    with pytest.raises(SpoolError, match="cannot create spool directories"):
        Spool(tmp_path / "spool").open()


# --- commit ---------------------------------------------------------------------------------------


def test_commit_writes_body_and_metadata_privately(spool: Spool) -> None:
    entry = committed(spool)
    qid = entry.queue_id
    assert names(spool.dir(State.INCOMING)) == [f"{qid}.json"]
    assert names(spool.data) == [f"{qid}.eml"]
    assert names(spool.tmp) == []
    assert spool.body_path(qid).read_bytes() == BODY
    assert json.loads(spool.meta_path(State.INCOMING, qid).read_bytes()) == entry.to_json()
    assert mode(spool.body_path(qid)) == 0o600
    assert mode(spool.meta_path(State.INCOMING, qid)) == 0o600
    assert spool.load(State.INCOMING, qid) == entry
    assert spool.read_body(qid) == BODY
    assert spool.find(qid) is State.INCOMING


def test_commit_of_an_empty_and_a_large_body(spool: Spool) -> None:
    big = os.urandom(3 * 1024 * 1024 + 7)
    for body in (b"", big):
        entry = committed(spool, body)
        assert spool.read_body(entry.queue_id) == body
        assert spool.load(State.INCOMING, entry.queue_id).size == len(body)


def test_commit_failure_when_incoming_is_not_a_directory(spool: Spool) -> None:
    spool.dir(State.INCOMING).rmdir()
    spool.dir(State.INCOMING).write_bytes(b"")
    entry = make_entry()
    with pytest.raises(SpoolError, match=f"^{entry.queue_id}: commit failed"):
        spool.commit(entry, BODY)
    assert names(spool.data) == []
    assert names(spool.tmp) == []


@pytest.mark.parametrize("name", ["data", "tmp"])
def test_commit_failure_when_a_spool_directory_is_a_file(spool: Spool, name: str) -> None:
    (spool.root / name).rmdir()
    (spool.root / name).write_bytes(b"")
    entry = make_entry()
    with pytest.raises(SpoolError, match=f"^{entry.queue_id}: commit failed"):
        spool.commit(entry, BODY)
    assert names(spool.dir(State.INCOMING)) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_commit_failure_when_data_is_read_only(spool: Spool) -> None:
    spool.data.chmod(0o500)
    try:
        with pytest.raises(SpoolError):
            spool.commit(make_entry(), BODY)
    finally:
        spool.data.chmod(0o700)
    assert names(spool.dir(State.INCOMING)) == []
    assert names(spool.tmp) == []


def test_commit_failure_when_the_body_path_exists(spool: Spool) -> None:
    entry = make_entry()
    spool.body_path(entry.queue_id).write_bytes(b"someone else's body")
    with pytest.raises(SpoolError, match=f"^{entry.queue_id}: commit failed"):
        spool.commit(entry, BODY)
    assert names(spool.dir(State.INCOMING)) == []
    assert names(spool.tmp) == []


def test_commit_failure_never_deletes_a_body_it_did_not_write(spool: Spool) -> None:
    entry = make_entry()
    spool.body_path(entry.queue_id).write_bytes(b"someone else's body")
    with pytest.raises(SpoolError):
        spool.commit(entry, BODY)
    assert spool.body_path(entry.queue_id).read_bytes() == b"someone else's body"


def test_commit_failure_after_the_rename_leaves_nothing_in_incoming(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync_dir = spool_module.fsync_dir

    def failing_fsync_dir(path: Path) -> None:
        if path == spool.dir(State.INCOMING):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(spool_module, "fsync_dir", failing_fsync_dir)
    entry = make_entry()
    with pytest.raises(SpoolError):
        spool.commit(entry, BODY)
    assert names(spool.dir(State.INCOMING)) == []
    assert names(spool.data) == []
    assert names(spool.tmp) == []


def test_commit_failure_while_serialising_is_a_spool_error(spool: Spool) -> None:
    address = b"caf\xe9@example.com".decode("utf-8", "surrogateescape")  # as aiosmtpd decodes
    entry = make_entry(mail_from=address)
    with pytest.raises(SpoolError):
        spool.commit(entry, BODY)
    assert names(spool.dir(State.INCOMING)) == []
    assert names(spool.data) == []


# --- reading --------------------------------------------------------------------------------------


def test_ids_lists_only_metadata_files_with_valid_ids(spool: Spool) -> None:
    a, b = committed(spool), committed(spool)
    incoming = spool.dir(State.INCOMING)
    (incoming / "README").write_text("x")
    (incoming / "abc.json").write_text("{}")
    (incoming / f"{a.queue_id}.json.bak").write_text("{}")
    assert sorted(spool.ids(State.INCOMING)) == sorted([a.queue_id, b.queue_id])
    assert list(spool.ids(State.DEFERRED)) == []


def test_load_of_a_missing_entry_raises_file_not_found(spool: Spool) -> None:
    with pytest.raises(FileNotFoundError):
        spool.load(State.INCOMING, new_queue_id())


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"version": 99}', "unknown schema version 99"),
        (b"[]", "metadata is not a JSON object"),
    ],
)
def test_load_of_unreadable_metadata_raises_corrupt_entry(
    spool: Spool, raw: bytes, reason: str
) -> None:
    qid = new_queue_id()
    spool.meta_path(State.INCOMING, qid).write_bytes(raw)
    with pytest.raises(CorruptEntry) as info:
        spool.load(State.INCOMING, qid)
    assert info.value.queue_id == qid
    assert info.value.reason.startswith(reason)


def test_load_of_metadata_naming_another_message(spool: Spool) -> None:
    entry = committed(spool)
    other = new_queue_id()
    os.rename(
        spool.meta_path(State.INCOMING, entry.queue_id), spool.meta_path(State.INCOMING, other)
    )
    with pytest.raises(CorruptEntry, match=f"metadata names another message \\({entry.queue_id}"):
        spool.load(State.INCOMING, other)


def test_depth_counts_every_state(spool: Spool) -> None:
    assert spool.depth() == no_depth()
    entries = [committed(spool) for _ in range(5)]
    spool.claim(entries[0].queue_id, State.INCOMING)
    spool.move(entries[1].queue_id, State.INCOMING, State.DEFERRED)
    spool.move(entries[2].queue_id, State.INCOMING, State.DEFERRED)
    spool.move(entries[3].queue_id, State.INCOMING, State.FAILED)
    (spool.dir(State.INCOMING) / "stray.txt").write_text("not counted")
    assert spool.depth() == no_depth(incoming=1, active=1, deferred=2, failed=1)


# --- changing state -------------------------------------------------------------------------------


def test_states_are_files_in_state_directories(spool: Spool) -> None:
    entry = committed(spool)
    qid = entry.queue_id
    meta = f"{qid}.json"

    assert spool.claim(qid, State.INCOMING) is True
    assert (names(spool.dir(State.INCOMING)), names(spool.dir(State.ACTIVE))) == ([], [meta])
    assert spool.find(qid) is State.ACTIVE

    deferred = entry.with_recipients(
        (
            Recipient("alice@contoso.example", RcptState.DELIVERED, "250 2.0.0 OK"),
            Recipient(
                "bob@contoso.example",
                RcptState.PENDING,
                "432 4.3.2 Concurrent connections limit exceeded.",
            ),
        )
    ).after_attempt(Attempt(1_764_000_100.0, "deferred", "432 4.3.2"), 1_764_000_160.0)
    spool.save(deferred, State.ACTIVE, State.DEFERRED)
    assert (names(spool.dir(State.ACTIVE)), names(spool.dir(State.DEFERRED))) == ([], [meta])
    assert spool.load(State.DEFERRED, qid) == deferred
    assert mode(spool.meta_path(State.DEFERRED, qid)) == 0o600
    assert names(spool.tmp) == []

    assert spool.claim(qid, State.DEFERRED) is True
    assert spool.move(qid, State.ACTIVE, State.FAILED) is True
    assert names(spool.dir(State.FAILED)) == [meta]
    assert spool.read_body(qid) == BODY  # the body never moves

    spool.remove(qid, State.FAILED)
    assert names(spool.dir(State.FAILED)) == []
    assert names(spool.data) == []
    assert spool.find(qid) is None


def test_save_in_place(spool: Spool) -> None:
    entry = committed(spool)
    spool.claim(entry.queue_id, State.INCOMING)
    later = entry.after_attempt(Attempt(5.0, "deferred", "451 4.4.2"), 65.0)
    spool.save(later, State.ACTIVE, State.ACTIVE)
    assert spool.load(State.ACTIVE, entry.queue_id) == later
    assert names(spool.dir(State.ACTIVE)) == [f"{entry.queue_id}.json"]
    assert names(spool.tmp) == []


def test_claim_of_a_missing_id_returns_false(spool: Spool) -> None:
    assert spool.claim(new_queue_id(), State.INCOMING) is False
    assert spool.move(new_queue_id(), State.DEFERRED, State.INCOMING) is False
    assert spool.depth() == no_depth()


def test_only_one_claim_wins(spool: Spool) -> None:
    entry = committed(spool)
    assert spool.claim(entry.queue_id, State.INCOMING) is True
    assert spool.claim(entry.queue_id, State.INCOMING) is False
    assert spool.depth() == no_depth(active=1)


def test_remove_tolerates_what_is_already_gone(spool: Spool) -> None:
    entry = committed(spool)
    spool.body_path(entry.queue_id).unlink()
    spool.remove(entry.queue_id, State.INCOMING)
    spool.remove(entry.queue_id, State.INCOMING)
    spool.remove(new_queue_id(), State.DEFERRED)
    assert spool.depth() == no_depth()


def test_quarantine_moves_metadata_and_body_to_corrupt(spool: Spool) -> None:
    entry = committed(spool)
    spool.quarantine(entry.queue_id, State.INCOMING, "operator said so")
    qid = entry.queue_id
    assert names(spool.dir(State.CORRUPT)) == [f"{qid}.eml", f"{qid}.json"]
    assert (spool.dir(State.CORRUPT) / f"{qid}.eml").read_bytes() == BODY
    assert names(spool.dir(State.INCOMING)) == []
    assert names(spool.data) == []


# --- recover() ------------------------------------------------------------------------------------


def test_recover_of_a_clean_spool(spool: Spool) -> None:
    committed(spool)
    committed(spool)
    assert spool.recover() == RecoveryReport(
        requeued=[], quarantined=[], removed_partial=0, queued=2
    )
    assert spool.depth() == no_depth(incoming=2)


def test_recover_removes_tmp_files(spool: Spool) -> None:
    entry = committed(spool)
    (spool.tmp / f"{new_queue_id()}.json").write_bytes(b'{"version": 1, "queue')
    (spool.tmp / f"{entry.queue_id}.1a2b3c4d.json").write_bytes(b"{}")
    (spool.tmp / ".probe-0000").write_bytes(b"")
    report = spool.recover()
    assert names(spool.tmp) == []
    assert report.removed_partial == 3
    assert report.queued == 1
    assert spool.load(State.INCOMING, entry.queue_id) == entry


def test_recover_requeues_active(spool: Spool) -> None:
    a, b, c = committed(spool), committed(spool), committed(spool)
    spool.claim(a.queue_id, State.INCOMING)
    spool.claim(b.queue_id, State.INCOMING)
    report = spool.recover()
    assert sorted(report.requeued) == sorted([a.queue_id, b.queue_id])
    assert report.quarantined == []
    assert report.queued == 3
    assert spool.depth() == no_depth(incoming=3)
    assert sorted(spool.ids(State.INCOMING)) == sorted([a.queue_id, b.queue_id, c.queue_id])


def assert_quarantined(spool: Spool, qid: str, meta: bytes, body: bytes | None) -> None:
    corrupt = spool.dir(State.CORRUPT)
    expected = [f"{qid}.json"] if body is None else [f"{qid}.eml", f"{qid}.json"]
    assert names(corrupt) == expected
    assert (corrupt / f"{qid}.json").read_bytes() == meta
    if body is not None:
        assert (corrupt / f"{qid}.eml").read_bytes() == body
    assert spool.find(qid) is State.CORRUPT
    assert not spool.body_path(qid).exists()


@pytest.mark.parametrize("state", [State.INCOMING, State.DEFERRED, State.FAILED, State.ACTIVE])
@pytest.mark.parametrize(
    "meta",
    [b"{not json at all", b"\xff\xfe\x00", b"[1, 2]", b'{"version": 1}'],
    ids=["bad-json", "binary", "not-object", "missing-fields"],
)
def test_recover_quarantines_unreadable_metadata_with_its_body(
    spool: Spool, state: State, meta: bytes
) -> None:
    entry = committed(spool)
    qid = entry.queue_id
    os.replace(spool.meta_path(State.INCOMING, qid), spool.meta_path(state, qid))
    spool.meta_path(state, qid).write_bytes(meta)
    report = spool.recover()
    assert report.quarantined == [qid]
    assert report.queued == 0
    assert_quarantined(spool, qid, meta, BODY)


def test_recover_quarantines_an_unknown_version(spool: Spool) -> None:
    entry = committed(spool)
    qid = entry.queue_id
    data = {**entry.to_json(), "version": 2, "new_field": "from the future"}
    meta = json.dumps(data).encode()
    spool.meta_path(State.INCOMING, qid).write_bytes(meta)
    report = spool.recover()
    assert report.quarantined == [qid]
    assert_quarantined(spool, qid, meta, BODY)


def test_recover_quarantines_metadata_whose_body_is_missing(spool: Spool) -> None:
    entry = committed(spool)
    qid = entry.queue_id
    meta = spool.meta_path(State.INCOMING, qid).read_bytes()
    spool.body_path(qid).unlink()
    report = spool.recover()
    assert report.quarantined == [qid]
    assert report.queued == 0
    assert_quarantined(spool, qid, meta, None)


@pytest.mark.parametrize("body", [BODY[:-3], BODY + b"extra", b""], ids=["short", "long", "empty"])
def test_recover_quarantines_a_body_of_the_wrong_size(spool: Spool, body: bytes) -> None:
    entry = committed(spool)
    qid = entry.queue_id
    meta = spool.meta_path(State.INCOMING, qid).read_bytes()
    spool.body_path(qid).write_bytes(body)
    report = spool.recover()
    assert report.quarantined == [qid]
    assert_quarantined(spool, qid, meta, body)


def test_recover_quarantines_metadata_naming_another_message(spool: Spool) -> None:
    entry = committed(spool)
    other = new_queue_id()
    meta = spool.meta_path(State.INCOMING, entry.queue_id).read_bytes()
    os.replace(spool.body_path(entry.queue_id), spool.body_path(other))
    os.replace(
        spool.meta_path(State.INCOMING, entry.queue_id), spool.meta_path(State.INCOMING, other)
    )
    report = spool.recover()
    assert report.quarantined == [other]
    assert_quarantined(spool, other, meta, BODY)


def test_recover_moves_stray_files_to_corrupt(spool: Spool) -> None:
    committed(spool)
    strays = {
        State.INCOMING: ("notes.txt", b"operator notes"),
        State.DEFERRED: ("abc.json", b"{}"),
        State.FAILED: ("0193A1B2C3D4E5F60.json.swp", b"vim"),
    }
    for state, (name, content) in strays.items():
        (spool.dir(state) / name).write_bytes(content)
    report = spool.recover()
    assert sorted(report.quarantined) == sorted(name for name, _ in strays.values())
    corrupt = spool.dir(State.CORRUPT)
    for state, (name, content) in strays.items():
        assert (corrupt / f"stray-{state.value}-{name}").read_bytes() == content
        assert not (spool.dir(state) / name).exists()
    assert report.queued == 1


def test_recover_removes_orphan_bodies(spool: Spool) -> None:
    kept = committed(spool)
    orphan = new_queue_id()
    spool.body_path(orphan).write_bytes(b"never acknowledged")
    report = spool.recover()
    assert names(spool.data) == [f"{kept.queue_id}.eml"]
    assert report.removed_partial == 1
    assert report.quarantined == []


def test_recover_keeps_bodies_of_every_known_state(spool: Spool) -> None:
    a, b, c = committed(spool), committed(spool), committed(spool)
    spool.move(b.queue_id, State.INCOMING, State.DEFERRED)
    spool.move(c.queue_id, State.INCOMING, State.FAILED)
    report = spool.recover()
    assert report == RecoveryReport(queued=2)
    assert names(spool.data) == sorted(f"{e.queue_id}.eml" for e in (a, b, c))


def test_recover_never_deletes_what_it_cannot_parse(spool: Spool) -> None:
    """A whole crash scene at once; everything not provably partial survives somewhere."""
    good = committed(spool)
    active = committed(spool)
    spool.claim(active.queue_id, State.INCOMING)
    broken = committed(spool)
    spool.meta_path(State.INCOMING, broken.queue_id).write_bytes(b"garbage")
    spool.move(broken.queue_id, State.INCOMING, State.DEFERRED)
    (spool.tmp / f"{new_queue_id()}.json").write_bytes(b"half")
    spool.body_path(new_queue_id()).write_bytes(b"orphan")
    (spool.dir(State.INCOMING) / "core").write_bytes(b"dump")

    report = spool.recover()

    assert report == RecoveryReport(
        requeued=[active.queue_id],
        quarantined=["core", broken.queue_id],
        removed_partial=2,
        queued=2,
    )
    assert spool.depth() == no_depth(incoming=2, corrupt=1)
    assert names(spool.dir(State.CORRUPT)) == sorted(
        [f"{broken.queue_id}.json", f"{broken.queue_id}.eml", "stray-incoming-core"]
    )
    assert names(spool.data) == sorted(f"{e.queue_id}.eml" for e in (good, active))
    assert spool.recover() == RecoveryReport(queued=2)  # idempotent


# --- lock, writable, ids --------------------------------------------------------------------------


def test_second_daemon_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool")
    first.open(lock=True)
    try:
        second = Spool(tmp_path / "spool")
        with pytest.raises(SpoolLocked):
            second.open(lock=True)
        Spool(tmp_path / "spool").open()  # the CLI opens without the lock
    finally:
        first.close()
    third = Spool(tmp_path / "spool")
    third.open(lock=True)  # released by close()
    third.close()


def test_writable(spool: Spool) -> None:
    assert spool.writable() is True
    assert names(spool.tmp) == []
    spool.tmp.rmdir()
    spool.tmp.write_bytes(b"")
    assert spool.writable() is False


def test_new_queue_id_shape() -> None:
    qid = new_queue_id(1_764_000_000.123)
    assert len(qid) == 17
    assert qid[:11] == f"{1_764_000_000_123:011X}"
    assert valid_queue_id(qid)
    assert qid == qid.upper()


def test_new_queue_ids_are_unique_within_one_millisecond() -> None:
    ids = {new_queue_id(1_764_000_000.0) for _ in range(50)}
    assert len(ids) == 50


def test_new_queue_ids_sort_by_time() -> None:
    times = [1_764_000_000.0 + n * 0.001 for n in range(0, 3000, 7)]
    ids = [new_queue_id(t) for t in times]
    assert sorted(ids) == ids
    assert new_queue_id() > new_queue_id(1_764_000_000.0)  # now is after November 2025


times = st.floats(min_value=0, max_value=(16**11 - 1) / 1000, allow_nan=False)


@given(times, times)
def test_new_queue_id_order_follows_time(a: float, b: float) -> None:
    first, second = sorted((a, b))
    id1, id2 = new_queue_id(first), new_queue_id(second)
    assert id1[:11] <= id2[:11]
    if int(first * 1000) < int(second * 1000):
        assert id1 < id2


@pytest.mark.parametrize(
    "queue_id",
    [
        "",
        "../x",
        "../0193A1B2C3D4E5F60",
        "0193A1B2C3D4E5F60/..",
        "0193a1b2c3d4e5f60",
        "0193A1B2C3D",
        "0" * 33,
        "0193A1B2C3D4E5F60.json",
        " 0193A1B2C3D4E5F60",
        "0193A1B2C3D4E5F6G",
        "/etc/passwd",
        "0193A1B2C3D4E5F60\x00",
    ],
)
def test_valid_queue_id_rejects(queue_id: str) -> None:
    assert valid_queue_id(queue_id) is False


def test_valid_queue_id_rejects_a_trailing_newline() -> None:
    assert valid_queue_id("0193A1B2C3D4E5F60\n") is False


@pytest.mark.parametrize("queue_id", ["0193A1B2C3D4", "0193A1B2C3D4E5F60", "F" * 32])
def test_valid_queue_id_accepts(queue_id: str) -> None:
    assert valid_queue_id(queue_id) is True


def test_save_never_brings_back_a_message_that_left_its_state(spool: Spool) -> None:
    entry = make_entry()
    spool.commit(entry, BODY)
    assert spool.claim(entry.queue_id, State.INCOMING)
    spool.remove(entry.queue_id, State.ACTIVE)  # e.g. deleted by an admin meanwhile
    with pytest.raises(FileNotFoundError):
        spool.save(entry, State.ACTIVE, State.DEFERRED)
    assert spool.find(entry.queue_id) is None
    assert not list(spool.tmp.iterdir())


def test_quarantine_never_overwrites_an_earlier_quarantine(spool: Spool) -> None:
    entry = make_entry()
    spool.commit(entry, BODY)
    corrupt = spool.dir(State.CORRUPT)
    (corrupt / f"{entry.queue_id}.json").write_bytes(b"kept from before")
    (corrupt / f"{entry.queue_id}.eml").write_bytes(b"kept body")
    spool.quarantine(entry.queue_id, State.INCOMING, "test")
    assert (corrupt / f"{entry.queue_id}.json").read_bytes() == b"kept from before"
    assert (corrupt / f"{entry.queue_id}.eml").read_bytes() == b"kept body"
    assert (corrupt / f"{entry.queue_id}.eml.1").read_bytes() == BODY
    assert (corrupt / f"{entry.queue_id}.json.1").exists()


def test_recover_keeps_held_messages_and_their_bodies(spool: Spool) -> None:
    entry = make_entry()
    spool.commit(entry, BODY)
    assert spool.claim(entry.queue_id, State.INCOMING)
    spool.save(entry, State.ACTIVE, State.HOLD)
    report = spool.recover()
    assert spool.find(entry.queue_id) is State.HOLD
    assert spool.read_body(entry.queue_id) == BODY
    assert report.quarantined == []
    assert report.queued == 0


# --- start-up in two parts: recover_start before accepting, check_entries while running ----------


def test_recover_start_reads_no_metadata_and_check_entries_lists_the_queue(spool: Spool) -> None:
    waiting = make_entry()
    later = replace(make_entry(), next_attempt_at=1_764_000_900.0, upstream="invoices")
    spool.commit(waiting, BODY)
    spool.commit(later, BODY)
    spool.move(later.queue_id, State.INCOMING, State.DEFERRED)
    broken = make_entry()
    spool.commit(broken, BODY)
    spool.meta_path(State.INCOMING, broken.queue_id).write_bytes(b"{not json")

    report = spool.recover_start()
    assert report.quarantined == [] and report.scheduled == []
    assert spool.find(broken.queue_id) is State.INCOMING  # not read yet: still in place

    spool.check_entries(report)
    assert report.quarantined == [broken.queue_id]
    assert sorted(report.scheduled) == sorted(
        [
            (waiting.queue_id, State.INCOMING, 0.0, ""),
            (later.queue_id, State.DEFERRED, 1_764_000_900.0, "invoices"),
        ]
    )
    assert report.queued == 2


def test_check_entries_skips_what_finishes_meanwhile(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message delivered (metadata then body removed) between the check's reads is skipped,
    never quarantined as 'body missing'."""
    done = make_entry()
    spool.commit(done, BODY)
    real_load = Spool.load

    def load_then_finish(self: Spool, state: State, queue_id: str) -> QueueEntry:
        entry = real_load(self, state, queue_id)
        self.remove(queue_id, state)  # a worker delivered it right after the check read it
        return entry

    monkeypatch.setattr(Spool, "load", load_then_finish)
    report = spool.check_entries(spool.recover_start())
    assert report.quarantined == [] and report.scheduled == []
    assert not list(spool.dir(State.CORRUPT).iterdir())


# --- group commit's commit marker: a complete tmp/ entry ------------------------------------------


def flushed_but_not_published(spool: Spool, body: bytes = BODY) -> QueueEntry:
    """What a crash leaves after group commit's flush and before the rename into incoming/."""
    entry = make_entry(body)
    spool.body_path(entry.queue_id).write_bytes(body)
    (spool.tmp / f"{entry.queue_id}.json").write_bytes(entry.dumps())
    return entry


def test_recover_promotes_a_committed_tmp_entry(spool: Spool) -> None:
    entry = flushed_but_not_published(spool)
    report = spool.recover()
    assert spool.load(State.INCOMING, entry.queue_id) == entry
    assert report.requeued == [entry.queue_id]  # possibly acknowledged: counted as in flight
    assert report.queued == 1
    assert names(spool.tmp) == []


def test_recover_removes_a_tmp_entry_whose_body_is_incomplete_or_already_published(
    spool: Spool,
) -> None:
    short = flushed_but_not_published(spool)
    spool.body_path(short.queue_id).write_bytes(BODY[:-1])  # the flush never finished
    published = committed(spool)
    (spool.tmp / f"{published.queue_id}.json").write_bytes(published.dumps())  # stale copy
    report = spool.recover()
    assert report.requeued == []
    assert names(spool.tmp) == []
    assert spool.find(short.queue_id) is None
    assert not spool.body_path(short.queue_id).exists()  # then an orphan body: removed
    assert spool.load(State.INCOMING, published.queue_id) == published


def test_group_commit_publishes_into_incoming(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "grouped")
    spool.open()
    entries = [make_entry(), make_entry()]
    assert spool.commit_batch([(e, BODY, b"") for e in entries]) == [None, None]
    assert sorted(spool.ids(State.INCOMING)) == sorted(e.queue_id for e in entries)
    assert names(spool.tmp) == []


def test_check_entries_skips_what_a_worker_claims_and_puts_back_meanwhile(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claimed between the check's reads and put back at once (budget, refused connection):
    still a healthy message, never quarantined."""
    entry = committed(spool)
    spool.move(entry.queue_id, State.INCOMING, State.DEFERRED)
    real_load = Spool.load

    def load_while_claimed(self: Spool, state: State, queue_id: str) -> QueueEntry:
        assert self.claim(queue_id, state)
        try:
            return real_load(self, state, queue_id)
        finally:
            self.move(queue_id, State.ACTIVE, state)

    monkeypatch.setattr(Spool, "load", load_while_claimed)
    report = spool.check_entries(spool.recover_start())
    assert report.quarantined == []
    assert spool.find(entry.queue_id) is State.DEFERRED


def test_check_entries_stops_when_asked(spool: Spool) -> None:
    for _ in range(3):
        committed(spool)
    report = spool.check_entries(spool.recover_start(), stop=lambda: True)
    assert report.scheduled == [] and report.quarantined == []
