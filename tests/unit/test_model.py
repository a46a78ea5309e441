"""model.py: queue entries and their JSON form (the spool's metadata file)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.model import (
    MAX_HISTORY,
    SCHEMA_VERSION,
    Attempt,
    QueueEntry,
    RcptState,
    Recipient,
)


def make_entry(**changes: object) -> QueueEntry:
    fields: dict[str, object] = {
        "queue_id": "0193A1B2C3D4E5F60",
        "mail_from": "scanner@printers.contoso.example",
        "recipients": (Recipient("alice@contoso.example"),),
        "received_at": 1_764_000_000.25,
        "size": 1234,
        "client": "192.168.1.20",
        "helo": "scanner-2f",
    }
    fields.update(changes)
    return QueueEntry(**fields)  # type: ignore[arg-type]


def test_json_form_is_exact() -> None:
    entry = make_entry(
        recipients=(
            Recipient("alice@contoso.example", RcptState.DELIVERED, "250 2.0.0 OK"),
            Recipient("bob@contoso.example"),
        ),
        attempts=1,
        next_attempt_at=1_764_000_060.0,
        history=(
            Attempt(
                1_764_000_001.0, "deferred", "432 4.3.2 Concurrent connections limit exceeded."
            ),
        ),
    )
    assert json.loads(entry.dumps()) == {
        "version": SCHEMA_VERSION,
        "queue_id": "0193A1B2C3D4E5F60",
        "mail_from": "scanner@printers.contoso.example",
        "recipients": [
            {"address": "alice@contoso.example", "state": "delivered", "reply": "250 2.0.0 OK"},
            {"address": "bob@contoso.example", "state": "pending", "reply": ""},
        ],
        "received_at": 1_764_000_000.25,
        "size": 1234,
        "client": "192.168.1.20",
        "helo": "scanner-2f",
        "smtputf8": False,
        "eightbit": False,
        "attempts": 1,
        "next_attempt_at": 1_764_000_060.0,
        "history": [
            {
                "at": 1_764_000_001.0,
                "outcome": "deferred",
                "reply": "432 4.3.2 Concurrent connections limit exceeded.",
            }
        ],
        "warned": False,
        "upstream": "",
    }
    assert SCHEMA_VERSION == 1


def test_fallback_fields_are_stored_only_when_used() -> None:
    entry = make_entry(
        recipients=(
            Recipient("alice@contoso.example", RcptState.DELIVERED, "250 2.0.0 OK", "graph"),
            Recipient("bob@contoso.example"),
        ),
        upstream="graph",
        route=("default", "graph"),
        refused=("default",),
    )
    data = json.loads(entry.dumps())
    assert data["route"] == ["default", "graph"]
    assert data["refused"] == ["default"]
    assert data["recipients"][0]["via"] == "graph"
    assert "via" not in data["recipients"][1]
    assert QueueEntry.loads(entry.dumps()) == entry


def test_non_ascii_is_stored_as_utf8_not_escaped() -> None:
    entry = make_entry(mail_from="jörg@bücher.example", smtputf8=True)
    raw = entry.dumps()
    assert "jörg@bücher.example".encode() in raw
    assert QueueEntry.loads(raw) == entry


addresses = st.text(min_size=1, max_size=40)  # any unicode, incl. non-ASCII and controls
finite = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)


@given(
    mail_from=st.text(max_size=40),
    recipients=st.lists(
        st.builds(Recipient, addresses, st.sampled_from(list(RcptState)), st.text(max_size=30)),
        min_size=1,
        max_size=5,
    ),
    received_at=finite,
    size=st.integers(min_value=0, max_value=2**40),
    client=st.text(max_size=20),
    helo=st.text(max_size=20),
    smtputf8=st.booleans(),
    eightbit=st.booleans(),
    attempts=st.integers(min_value=0, max_value=10_000),
    next_attempt_at=finite,
    history=st.lists(
        st.builds(
            Attempt,
            finite,
            st.sampled_from(["delivered", "deferred", "failed", "ambiguous"]),
            st.text(max_size=30),
        ),
        max_size=MAX_HISTORY,
    ),
)
def test_json_round_trip(
    mail_from,
    recipients,
    received_at,
    size,
    client,
    helo,
    smtputf8,
    eightbit,
    attempts,
    next_attempt_at,
    history,
) -> None:
    entry = QueueEntry(
        queue_id="0193A1B2C3D4E5F60",
        mail_from=mail_from,
        recipients=tuple(recipients),
        received_at=received_at,
        size=size,
        client=client,
        helo=helo,
        smtputf8=smtputf8,
        eightbit=eightbit,
        attempts=attempts,
        next_attempt_at=next_attempt_at,
        history=tuple(history),
    )
    assert QueueEntry.loads(entry.dumps()) == entry


def test_surrogate_escaped_address_cannot_be_serialised() -> None:
    """aiosmtpd hands undecodable bytes over as surrogates; the ingress refuses such addresses
    (553 5.1.7) before a QueueEntry exists, and the model never writes them."""
    address = b"caf\xe9@example.com".decode("utf-8", "surrogateescape")
    entry = make_entry(mail_from=address, recipients=(Recipient(address),))
    with pytest.raises(UnicodeEncodeError):
        entry.dumps()


def base_json() -> dict[str, object]:
    return json.loads(make_entry().dumps())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "unknown schema version 2"),
        ({"version": "1"}, "unknown schema version '1'"),
        ({"version": None}, "unknown schema version None"),
        ({"recipients": []}, "no recipients"),
    ],
)
def test_invalid_entries_raise_value_error(change: dict[str, object], message: str) -> None:
    data = {**base_json(), **change}
    with pytest.raises(ValueError, match=f"^{message}$"):
        QueueEntry.loads(json.dumps(data).encode())


def test_missing_version_is_unknown() -> None:
    data = base_json()
    del data["version"]
    with pytest.raises(ValueError, match="^unknown schema version None$"):
        QueueEntry.loads(json.dumps(data).encode())


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"version": 1, "queue_id": ',
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"version": 1}',  # every other field missing
        b'{"version": 1, "queue_id": "X", "mail_from": "a@b", "recipients": ["c@d"], '
        b'"received_at": 1, "size": 1}',  # recipient is not an object
        b'{"version": 1, "queue_id": "X", "mail_from": "a@b", "recipients": [{"address": '
        b'"c@d", "state": "lost"}], "received_at": 1, "size": 1}',  # unknown state
        b'{"version": 1, "queue_id": "X", "mail_from": "a@b", "recipients": [{"address": '
        b'"c@d", "state": "pending"}], "received_at": "yesterday", "size": 1}',
        b'{"version": 1, "queue_id": "X", "mail_from": "a@b", "recipients": [{"address": '
        b'"c@d", "state": "pending"}], "received_at": 1, "size": null}',
    ],
)
def test_malformed_metadata_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        QueueEntry.loads(raw)


def test_history_is_capped_at_max_history() -> None:
    entry = make_entry()
    for n in range(MAX_HISTORY + 5):
        entry = entry.after_attempt(
            Attempt(float(n), "deferred", f"451 4.7.0 try {n}"), next_attempt_at=1000.0 + n
        )
    assert MAX_HISTORY == 20
    assert entry.attempts == MAX_HISTORY + 5
    assert entry.next_attempt_at == 1000.0 + MAX_HISTORY + 4
    assert len(entry.history) == MAX_HISTORY
    assert [a.at for a in entry.history] == [float(n) for n in range(5, MAX_HISTORY + 5)]
    assert QueueEntry.loads(entry.dumps()) == entry


def test_after_attempt_does_not_change_the_original() -> None:
    entry = make_entry()
    later = entry.after_attempt(Attempt(1.0, "deferred", "451"), next_attempt_at=61.0)
    assert (entry.attempts, entry.history, entry.next_attempt_at) == (0, (), 0.0)
    assert (later.attempts, later.history, later.next_attempt_at) == (
        1,
        (Attempt(1.0, "deferred", "451"),),
        61.0,
    )


def test_pending_done_and_any_failed() -> None:
    a = Recipient("a@x.example", RcptState.DELIVERED, "250 2.0.0 OK")
    b = Recipient("b@x.example")
    c = Recipient("c@x.example", RcptState.FAILED, "550 5.1.10 not found")
    entry = make_entry(recipients=(a, b, c))
    assert entry.pending == (b,)
    assert entry.done is False
    assert entry.any_failed is True
    finished = entry.with_recipients((a, Recipient("b@x.example", RcptState.DELIVERED), c))
    assert finished.pending == ()
    assert finished.done is True
    assert make_entry(recipients=(a,)).any_failed is False
