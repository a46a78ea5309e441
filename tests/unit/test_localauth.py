"""Local SMTP AUTH decisions: scrypt hashes, sender rules, login lookup and the failure
throttle. No sockets; hashes use a tiny scrypt n (TEST_N) except where the default is the
point."""

from __future__ import annotations

import base64
import hashlib
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import relay.localauth as localauth
from relay.localauth import (
    MAX_WORK,
    MIN_N,
    NOT_OURS,
    SCRYPT_N,
    AuthThrottle,
    LocalUser,
    authenticate,
    check_hash_format,
    hash_password,
    sender_allowed,
    verify_password,
)

TEST_N = 16  # cheap: 16 KiB, microseconds
SALT = bytes(range(16))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def made(n: int = 16384, r: int = 8, p: int = 1, salt: bytes = SALT, key: bytes = bytes(32)) -> str:
    """A hash string built by hand (no scrypt run)."""
    return f"scrypt$n={n},r={r},p={p}${b64(salt)}${b64(key)}"


def parts(encoded: str) -> list[str]:
    return encoded.split("$")


@pytest.fixture(scope="module")
def cheap() -> str:
    return hash_password("correct horse", salt=SALT, n=TEST_N)


# --- hashing -----------------------------------------------------------------------------------


def test_round_trip(cheap: str) -> None:
    assert verify_password("correct horse", cheap)


@pytest.mark.parametrize(
    "wrong", ["correct hors", "correct horse ", "Correct horse", "correct horsf", "x"]
)
def test_wrong_password(cheap: str, wrong: str) -> None:
    assert not verify_password(wrong, cheap)


def test_default_is_strong_and_verifies() -> None:
    # n=2**15, r=8 needs just over OpenSSL's default 32 MiB maxmem: this also proves that
    # maxmem is passed.
    encoded = hash_password("s3cret")
    scheme, params, salt, key = parts(encoded)
    assert (scheme, params) == ("scrypt", f"n={SCRYPT_N},r=8,p=1")
    assert SCRYPT_N >= 2**14
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(key)) == 32
    assert check_hash_format(encoded) is None
    assert verify_password("s3cret", encoded)


def test_random_salt_by_default() -> None:
    one, two = hash_password("same", n=TEST_N), hash_password("same", n=TEST_N)
    assert parts(one)[2] != parts(two)[2]
    assert one != two
    assert verify_password("same", one) and verify_password("same", two)


def test_given_salt_is_deterministic() -> None:
    assert hash_password("same", salt=SALT, n=TEST_N) == hash_password("same", salt=SALT, n=TEST_N)
    assert parts(hash_password("same", salt=SALT, n=TEST_N))[2] == b64(SALT)


@pytest.mark.parametrize("password", ["pässwörd", "пароль", "密码🔑", "\u00a0tab\tand space"])
def test_unicode_password(password: str) -> None:
    encoded = hash_password(password, salt=SALT, n=TEST_N)
    assert verify_password(password, encoded)
    assert not verify_password(password.encode("utf-8").decode("latin-1"), encoded)


def test_composed_and_decomposed_forms_agree() -> None:
    composed = "p\u00e4ss"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    encoded = hash_password(composed, salt=SALT, n=TEST_N)
    assert verify_password(decomposed, encoded)


def test_unencodable_password() -> None:
    encoded = hash_password("pass", salt=SALT, n=TEST_N)
    assert not verify_password("pa\ud800ss", encoded)  # a lone surrogate: not UTF-8
    with pytest.raises(ValueError):
        hash_password("pa\ud800ss", salt=SALT, n=TEST_N)


def test_empty_password() -> None:
    with pytest.raises(ValueError):
        hash_password("", n=TEST_N)
    # even against a hash of "" made elsewhere, the empty password never logs in
    key = localauth._derive(b"", SALT, n=TEST_N, r=8, p=1, length=32)
    assert not verify_password("", made(n=TEST_N, key=key))


@pytest.mark.parametrize(
    ("salt", "n"),
    [(bytes(15), TEST_N), (bytes(65), TEST_N), (SALT, 15), (SALT, 1), (SALT, 2**21)],
)
def test_hash_password_refuses_bad_arguments(salt: bytes, n: int) -> None:
    with pytest.raises(ValueError):
        hash_password("pass", salt=salt, n=n)


def test_hand_built_hash_matches_format(cheap: str) -> None:
    key = localauth._derive(b"correct horse", SALT, n=TEST_N, r=8, p=1, length=32)
    assert cheap == made(n=TEST_N, key=key)


def _flip_key(encoded: str) -> str:
    head, key = encoded.rsplit("$", 1)
    raw = bytearray(base64.b64decode(key))
    raw[0] ^= 1
    return f"{head}${b64(bytes(raw))}"


def _other_salt(encoded: str) -> str:
    scheme, params, _, key = parts(encoded)
    return "$".join([scheme, params, b64(bytes(16)), key])


def _other_n(encoded: str) -> str:
    return encoded.replace(f"n={TEST_N},", f"n={TEST_N * 2},")


def _other_r(encoded: str) -> str:
    return encoded.replace(",r=8,", ",r=4,")


def _other_p(encoded: str) -> str:
    return encoded.replace(",p=1$", ",p=2$")


@pytest.mark.parametrize("tamper", [_flip_key, _other_salt, _other_n, _other_r, _other_p])
def test_tampered_hash(cheap: str, tamper: Callable[[str], str]) -> None:
    tampered = tamper(cheap)
    assert tampered != cheap
    assert not verify_password("correct horse", tampered)


def test_truncated_key_is_refused(cheap: str) -> None:
    # scrypt's output for 16 bytes is the first 16 bytes of its output for 32: a cut key
    # would still verify (with half the strength) if any length were accepted.
    head, key = cheap.rsplit("$", 1)
    raw = base64.b64decode(key)
    assert localauth._derive(b"correct horse", SALT, n=TEST_N, r=8, p=1, length=16) == raw[:16]
    assert not verify_password("correct horse", f"{head}${b64(raw[:16])}")
    assert not verify_password("correct horse", f"{head}${b64(raw + bytes(1))}")


def test_non_canonical_base64_is_refused(cheap: str) -> None:
    # 32 bytes leave two spare bits in the last base64 character: a lenient decoder maps this
    # edited string to the very same key.
    head, key = cheap.rsplit("$", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = key[-2]
    edited = key[:-2] + alphabet[alphabet.index(last) + 1] + "="
    assert base64.b64decode(edited) == base64.b64decode(key)
    assert not verify_password("correct horse", f"{head}${edited}")
    assert check_hash_format(f"{head}${edited}") is not None


KEY = b64(bytes(32))
SALT64 = b64(SALT)
MALFORMED = [
    "",
    "scrypt",
    "scrypt$",
    "$$$",
    "correct horse",
    f"bcrypt$n=16,r=8,p=1${SALT64}${KEY}",
    f"SCRYPT$n=16,r=8,p=1${SALT64}${KEY}",
    f"scrypt$n=16,r=8,p=1${SALT64}",
    f"scrypt$n=16,r=8,p=1${SALT64}${KEY}$",
    f"scrypt$n=16,r=8,p=1${SALT64}${KEY}$extra",
    f"scrypt$n=16,r=8${SALT64}${KEY}",
    f"scrypt$r=8,n=16,p=1${SALT64}${KEY}",
    f"scrypt$n=16, r=8,p=1${SALT64}${KEY}",
    f" scrypt$n=16,r=8,p=1${SALT64}${KEY}",
    f"scrypt$n=16,r=8,p=1${SALT64}${KEY}\n",
    f"scrypt$n=016,r=8,p=1${SALT64}${KEY}",
    f"scrypt$n=-16,r=8,p=1${SALT64}${KEY}",
    f"scrypt$n=1e4,r=8,p=1${SALT64}${KEY}",
    f"scrypt$n=\u0661\u0666,r=8,p=1${SALT64}${KEY}",  # Arabic-Indic digits: int() takes them
    f"scrypt$n=99999999999999999999,r=8,p=1${SALT64}${KEY}",
    made(n=0),
    made(n=1),
    made(n=15),
    made(n=3 * 2**10),
    made(n=2**21),
    made(n=2**30),
    made(r=0),
    made(p=0),
    made(n=2**17, r=8, p=2),  # n*r*p over MAX_WORK
    made(n=2**14, r=2**10),
    made(n=2**16, r=1),  # RFC 7914: n < 2^(16 r)
    f"scrypt$n=16,r=8,p=1$!!!!${KEY}",
    f"scrypt$n=16,r=8,p=1${SALT64}$A",
    f"scrypt$n=16,r=8,p=1${SALT64}${KEY[:-1]}",  # padding missing
    f"scrypt$n=16,r=8,p=1${SALT64.rstrip('=')}${KEY}",
    f"scrypt$n=16,r=8,p=1${SALT64}${KEY.replace('A', '-')}",  # urlsafe alphabet
    made(salt=bytes(8)),
    made(salt=bytes(65)),
    made(key=bytes(16)),
    made(key=bytes(31)),
    made(key=bytes(33)),
    made(key=bytes(64)),
    f"scrypt$n=16,r=8,p=1${'A' * 200}${KEY}",
]


@pytest.mark.parametrize("encoded", MALFORMED)
def test_malformed_hash(encoded: str) -> None:
    assert not verify_password("correct horse", encoded)
    problem = check_hash_format(encoded)
    assert problem is not None
    assert "oauth-relay hash-password" in problem


def test_verify_tolerates_non_strings() -> None:
    assert not verify_password("pass", None)  # type: ignore[arg-type]
    assert not verify_password(None, made())  # type: ignore[arg-type]
    assert check_hash_format(None) == NOT_OURS  # type: ignore[arg-type]


@given(st.text(), st.text())
def test_verify_never_raises_on_arbitrary_strings(password: str, encoded: str) -> None:
    assert verify_password(password, encoded) in (True, False)
    assert check_hash_format(encoded) is None or isinstance(check_hash_format(encoded), str)


@given(
    password=st.text(max_size=20),
    n=st.one_of(st.integers(-2, 64), st.sampled_from([2**16, 2**21, 2**64])),
    r=st.integers(-1, 9),
    p=st.integers(-1, 4),
    salt=st.binary(max_size=70),
    key=st.binary(max_size=70),
    junk=st.sampled_from(["", "=", "$", "\n", "A"]),
)
def test_verify_never_raises_on_near_hashes(
    password: str, n: int, r: int, p: int, salt: bytes, key: bytes, junk: str
) -> None:
    encoded = f"scrypt$n={n},r={r},p={p}${b64(salt)}${b64(key)}{junk}"
    assert verify_password(password, encoded) in (True, False)
    problem = check_hash_format(encoded)
    assert problem is None or isinstance(problem, str)


# --- format check bounds -----------------------------------------------------------------------


def test_check_accepts_our_parameters() -> None:
    assert check_hash_format(made(n=MIN_N)) is None
    assert check_hash_format(made(n=SCRYPT_N)) is None
    assert check_hash_format(made(n=2**17, r=8, p=1)) is None  # exactly MAX_WORK
    assert 2**17 * 8 == MAX_WORK


@pytest.mark.parametrize("n", [TEST_N, MIN_N // 2])
def test_check_refuses_weak_n_that_verify_still_accepts(n: int) -> None:
    problem = check_hash_format(made(n=n))
    assert problem is not None
    assert "too weak" in problem


@pytest.mark.parametrize(
    ("encoded", "words"),
    [
        (made(n=2**21), "too costly"),
        (made(n=2**17, p=2), "too costly"),
        (made(n=2**14, r=2**10), "too costly"),
        (made(n=12288), "power of two"),
        (made(r=0), "at least 1"),
        (made(n=2**16, r=1), "too large for r=1"),
        ("$2b$12$abcdefghijklmnopqrstuv", NOT_OURS),
    ],
)
def test_check_explains_the_problem(encoded: str, words: str) -> None:
    problem = check_hash_format(encoded)
    assert problem is not None
    assert words in problem


def test_check_never_echoes_the_hash() -> None:
    for encoded in (made(n=2**21), made(n=TEST_N), made(salt=bytes(8)), "hunter2hunter2"):
        problem = check_hash_format(encoded)
        assert problem is not None
        assert parts(encoded)[-1] not in problem


def test_costly_hash_never_runs_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def spy(*args: object, **kwargs: int) -> bytes:
        calls.append(kwargs["n"])
        return bytes(32)

    monkeypatch.setattr(hashlib, "scrypt", spy)
    for encoded in (made(n=2**21), made(n=2**20, r=8), made(n=2**17, p=16), made(n=2**16, r=1)):
        assert not verify_password("pass", encoded)
    assert calls == []
    assert verify_password("pass", made(n=TEST_N))  # the spy is live: all-zero key "matches"
    assert calls == [TEST_N]


# --- senders -----------------------------------------------------------------------------------


def user(*senders: str) -> LocalUser:
    return LocalUser(name="erp", password_hash=made(), senders=senders)


@pytest.mark.parametrize(
    ("senders", "address", "allowed"),
    [
        (("erp@contoso.com",), "erp@contoso.com", True),
        (("erp@contoso.com",), "ERP@Contoso.COM", True),
        (("ERP@CONTOSO.com",), "erp@contoso.com", True),
        ((" erp@contoso.com ",), "erp@contoso.com", True),
        (("erp@contoso.com",), "other@contoso.com", False),
        (("erp@contoso.com",), "erp@contoso.org", False),
        (("erp@contoso.com",), "erp@contoso.com.evil.net", False),
        (("@contoso.com",), "anyone@contoso.com", True),
        (("@contoso.com",), "anyone@CONTOSO.COM", True),
        (("@Contoso.Com",), "anyone@contoso.com", True),
        (("@contoso.com",), '"a@b"@contoso.com', True),
        (("@contoso.com",), "anyone@mail.contoso.com", False),
        (("@mail.contoso.com",), "anyone@contoso.com", False),
        (("@contoso.com",), "anyone@evilcontoso.com", False),
        (("@contoso.com",), "anyone@contoso.com.evil.net", False),
        (("@contoso.com",), "contoso.com", False),
        (("@contoso.com",), "@contoso.com", False),
        (("@contoso.com",), "anyone@", False),
        (("@contoso.com",), "", False),
        (("erp@contoso.com", "@fabrikam.com"), "x@fabrikam.com", True),
        (("erp@contoso.com", "@fabrikam.com"), "erp@contoso.com", True),
        (("erp@contoso.com", "@fabrikam.com"), "x@contoso.com", False),
        (("contoso.com",), "erp@contoso.com", False),  # a bare domain is no domain entry
        (("@",), "erp@contoso.com", False),
        (("",), "", False),
        (("",), "erp@contoso.com", False),
        ((), "erp@contoso.com", False),
        ((), "", False),
    ],
)
def test_sender_allowed(senders: tuple[str, ...], address: str, allowed: bool) -> None:
    assert sender_allowed(user(*senders), address) is allowed


def test_local_user_is_frozen() -> None:
    with pytest.raises(AttributeError):
        user("@contoso.com").senders = ()  # type: ignore[misc]


# --- authenticate ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users() -> dict[str, LocalUser]:
    return {
        "erp": LocalUser("erp", hash_password("erp-pass", salt=SALT, n=TEST_N), ("@contoso.com",)),
        "scanner": LocalUser("scanner", hash_password("scan", n=TEST_N), ("scan@contoso.com",)),
        "broken": LocalUser("broken", "not a hash", ("@contoso.com",)),
    }


def test_authenticate_known_user(users: dict[str, LocalUser]) -> None:
    assert authenticate(users, "erp", "erp-pass") is users["erp"]
    assert authenticate(users, "scanner", "scan") is users["scanner"]


@pytest.mark.parametrize(
    ("login", "password"),
    [
        ("erp", "scan"),  # another user's password
        ("erp", "erp-pass "),
        ("erp", ""),
        ("ERP", "erp-pass"),  # names are case-sensitive
        ("erp ", "erp-pass"),
        ("broken", "not a hash"),
    ],
)
def test_authenticate_refuses(users: dict[str, LocalUser], login: str, password: str) -> None:
    assert authenticate(users, login, password) is None


def test_unknown_user_really_runs_a_verification(users: dict[str, LocalUser]) -> None:
    assert authenticate(users, "nobody", "erp-pass") is None
    assert authenticate({}, "", "") is None


def test_unknown_user_costs_one_default_verification(
    monkeypatch: pytest.MonkeyPatch, users: dict[str, LocalUser]
) -> None:
    calls: list[tuple[str, str]] = []

    def spy(password: str, encoded: str) -> bool:
        calls.append((password, encoded))
        return True  # even a "match" against the dummy must not log anyone in

    monkeypatch.setattr(localauth, "verify_password", spy)
    assert authenticate(users, "nobody", "guess") is None
    assert len(calls) == 1
    password, dummy = calls[0]
    assert password == "guess"
    assert dummy != users["erp"].password_hash
    assert check_hash_format(dummy) is None
    assert parts(dummy)[1] == f"n={SCRYPT_N},r=8,p=1"  # same cost as a real user's hash


def test_dummy_hash_matches_no_password() -> None:
    # its key is all zeros: no password derives that (this runs one default-cost scrypt)
    assert not verify_password("", localauth._DUMMY_HASH)
    assert base64.b64decode(parts(localauth._DUMMY_HASH)[3]) == bytes(32)


# --- throttle ----------------------------------------------------------------------------------


def fail(throttle: AuthThrottle, client: str, *times: float) -> None:
    for t in times:
        throttle.failure(client, t)


def test_not_blocked_before_max_failures() -> None:
    throttle = AuthThrottle()
    assert throttle.blocked("10.0.0.1", 0.0) == 0.0
    fail(throttle, "10.0.0.1", 0, 1, 2, 3)
    assert throttle.blocked("10.0.0.1", 4.0) == 0.0


def test_blocked_after_max_failures() -> None:
    throttle = AuthThrottle(max_failures=5, window=300, block=900)
    fail(throttle, "10.0.0.1", 0, 1, 2, 3, 4)
    assert throttle.blocked("10.0.0.1", 4.0) == 900.0
    assert throttle.blocked("10.0.0.1", 104.0) == 800.0
    assert throttle.blocked("10.0.0.2", 104.0) == 0.0  # per client


@pytest.mark.parametrize(("last", "blocked"), [(299.999, True), (300.0, False), (301.0, False)])
def test_window_edge(last: float, blocked: bool) -> None:
    throttle = AuthThrottle(max_failures=5, window=300, block=900)
    fail(throttle, "c", 0, 10, 20, 30, last)  # the failure at 0 leaves the window at 300
    assert (throttle.blocked("c", last) > 0) is blocked


def test_window_slides() -> None:
    throttle = AuthThrottle(max_failures=3, window=10, block=60)
    fail(throttle, "c", 0, 5, 10, 15, 20)  # never 3 within 10 s
    assert throttle.blocked("c", 20) == 0.0
    fail(throttle, "c", 21)  # 15, 20, 21
    assert throttle.blocked("c", 21) == 60.0


def test_block_expiry() -> None:
    throttle = AuthThrottle(max_failures=2, window=300, block=900)
    fail(throttle, "c", 100, 100)
    assert throttle.blocked("c", 999.5) == pytest.approx(0.5)
    assert throttle.blocked("c", 1000.0) == 0.0
    assert throttle.blocked("c", 2000.0) == 0.0
    fail(throttle, "c", 2000)  # counting starts afresh after a block
    assert throttle.blocked("c", 2000.0) == 0.0
    fail(throttle, "c", 2001)
    assert throttle.blocked("c", 2001.0) == 900.0


def test_counting_starts_afresh_after_a_block_shorter_than_the_window() -> None:
    throttle = AuthThrottle(max_failures=2, window=300, block=10)
    fail(throttle, "c", 0, 0)
    assert throttle.blocked("c", 0) == 10.0
    fail(throttle, "c", 11)  # the failures at 0 are still inside the window, but spent
    assert throttle.blocked("c", 11) == 0.0
    fail(throttle, "c", 12)
    assert throttle.blocked("c", 12) == 10.0


def test_failures_during_a_block_do_not_extend_it() -> None:
    throttle = AuthThrottle(max_failures=2, window=300, block=900)
    fail(throttle, "c", 0, 0, 100, 200, 300, 400, 500)
    assert throttle.blocked("c", 500) == 400.0
    assert throttle.blocked("c", 900) == 0.0
    fail(throttle, "c", 900)  # and they were not counted
    assert throttle.blocked("c", 900) == 0.0


def test_success_clears_failures() -> None:
    control, throttle = AuthThrottle(), AuthThrottle()
    for t in (0, 1, 2, 3):
        control.failure("c", t)
        throttle.failure("c", t)
    throttle.success("c", 4)
    control.failure("c", 5)
    throttle.failure("c", 5)
    assert control.blocked("c", 5) == 900.0
    assert throttle.blocked("c", 5) == 0.0
    assert len(throttle) == 1


def test_success_does_not_lift_a_block() -> None:
    throttle = AuthThrottle(max_failures=1, window=300, block=900)
    fail(throttle, "c", 0)
    throttle.success("c", 1)
    assert throttle.blocked("c", 1) == 899.0


def test_success_of_unknown_client_is_harmless() -> None:
    throttle = AuthThrottle()
    throttle.success("c", 0)
    assert len(throttle) == 0
    assert throttle.blocked("c", 0) == 0.0


def test_memory_bound_evicts_the_oldest() -> None:
    throttle = AuthThrottle(max_failures=5, max_clients=3)
    fail(throttle, "a", 0)
    fail(throttle, "b", 1)
    fail(throttle, "c", 2)
    fail(throttle, "a", 3)  # a is fresh again; b is now the oldest
    fail(throttle, "d", 4)
    assert len(throttle) == 3
    fail(throttle, "b", 5, 6, 7, 8)  # b was forgotten: four failures, not five
    assert throttle.blocked("b", 8) == 0.0
    fail(throttle, "a", 9, 10, 11)  # a was remembered: its failures at 0 and 3 count
    assert throttle.blocked("a", 11) == 900.0
    fail(throttle, "b", 12)
    assert throttle.blocked("b", 12) == 900.0


def test_memory_bound_under_a_flood() -> None:
    throttle = AuthThrottle(max_clients=100)
    for i in range(5000):
        throttle.failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", float(i) / 1000)
    assert len(throttle) == 100


def test_a_blocked_client_that_keeps_trying_stays_remembered() -> None:
    throttle = AuthThrottle(max_failures=1, max_clients=2)
    fail(throttle, "attacker", 0)
    for t in range(1, 50):
        throttle.failure(f"other{t}", float(t))
        throttle.failure("attacker", float(t))  # keeps hammering
    assert throttle.blocked("attacker", 50) == 850.0


def test_expired_entries_are_forgotten() -> None:
    throttle = AuthThrottle(max_failures=5, window=300, block=900)
    fail(throttle, "a", 0)
    fail(throttle, "b", 0, 0, 0, 0, 0)
    assert len(throttle) == 2
    assert throttle.blocked("a", 300) == 0.0
    assert throttle.blocked("b", 900) == 0.0
    assert len(throttle) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_failures": 0}, {"window": 0}, {"window": -1}, {"block": -1}, {"max_clients": 0}],
)
def test_throttle_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AuthThrottle(**kwargs)  # type: ignore[arg-type]


class Model:
    """The throttle's rules, written out naively for one client."""

    def __init__(self, max_failures: int, window: float, block: float) -> None:
        self.max_failures, self.window, self.block = max_failures, window, block
        self.failures: list[float] = []
        self.until: float | None = None

    def blocked(self, now: float) -> float:
        return self.until - now if self.until is not None and now < self.until else 0.0

    def failure(self, now: float) -> None:
        if self.blocked(now):
            return
        self.failures = [t for t in self.failures if t > now - self.window] + [now]
        if len(self.failures) >= self.max_failures:
            self.until, self.failures = now + self.block, []

    def success(self, now: float) -> None:
        if not self.blocked(now):
            self.failures = []


@given(
    max_failures=st.integers(1, 6),
    block=st.sampled_from([0.0, 30.0, 250.0]),
    steps=st.lists(
        st.tuples(st.sampled_from(["failure", "success", "blocked"]), st.integers(0, 400)),
        max_size=60,
    ),
)
def test_throttle_matches_the_model(
    max_failures: int, block: float, steps: list[tuple[str, int]]
) -> None:
    throttle = AuthThrottle(max_failures=max_failures, window=100.0, block=block)
    model = Model(max_failures, 100.0, block)
    now = 0.0
    for action, gap in steps:
        now += gap / 10  # time never goes backwards
        if action == "failure":
            throttle.failure("c", now)
            model.failure(now)
        elif action == "success":
            throttle.success("c", now)
            model.success(now)
        assert throttle.blocked("c", now) == pytest.approx(model.blocked(now))
