"""Local SMTP AUTH: decide whether a login, a password and a sender are acceptable.

One job: the decisions behind optional local SMTP AUTH, for applications that insist on
logging in to the relay. aiosmtpd speaks PLAIN and LOGIN; this module only decides: it hashes
and verifies passwords (scrypt, in a self-describing string made by `oauth-relay
hash-password`), says which envelope senders a local user may use, and throttles clients that
keep failing. Pure: stdlib only, no I/O, no logging, no clock (times are passed in).

Limits: these are local application passwords, not Entra ID identities; they only gate who
may hand mail to the relay. A verification costs one scrypt run (about 32 MiB and 0.1 s at the
default parameters) and blocks its thread, so callers run it off the event loop with bounded
concurrency. The throttle lives in memory: a restart forgets failures and blocks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass

SCHEME = "scrypt"
SCRYPT_N = 2**15  # CPU/memory cost of new hashes: 128 * n * r bytes = 32 MiB
SCRYPT_R = 8
SCRYPT_P = 1
MIN_N = 2**14  # weaker hashes fail the config check (verification still bounds them)
MAX_WORK = 2**20  # n * r * p: at most 128 MiB and about half a second per verification
SALT_BYTES = 16
KEY_BYTES = 32  # exactly: scrypt's output for a shorter length is a prefix of the longer one
MIN_SALT, MAX_SALT = 16, 64

NOT_OURS = "not a scrypt hash made by `oauth-relay hash-password`"

_FORMAT = re.compile(
    r"scrypt\$n=(0|[1-9][0-9]{0,9}),r=(0|[1-9][0-9]{0,9}),p=(0|[1-9][0-9]{0,9})"
    r"\$([A-Za-z0-9+/=]{1,128})\$([A-Za-z0-9+/=]{1,128})"
)


@dataclass(frozen=True)
class _Scrypt:
    """A parsed password hash."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


# --- password hashes ---------------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None, n: int = SCRYPT_N) -> str:
    """`scrypt$n=…,r=8,p=1$<b64 salt>$<b64 key>` for `password`. A random 16-byte salt unless
    one is given; `n` exists for tests (the config check refuses n below MIN_N).
    Raises ValueError for an empty password, or a salt or n out of bounds."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if not MIN_SALT <= len(salt) <= MAX_SALT:
        raise ValueError(f"the salt must be {MIN_SALT} to {MAX_SALT} bytes")
    problem = _params_problem(n, SCRYPT_R, SCRYPT_P)
    if problem:
        raise ValueError(problem)
    key = _derive(_secret(password), salt, n=n, r=SCRYPT_R, p=SCRYPT_P, length=KEY_BYTES)
    return f"{SCHEME}$n={n},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches the hash `encoded`, compared in constant time. False, never
    an exception, for a wrong or empty password or a malformed or out-of-bounds hash."""
    if not isinstance(password, str) or not password:
        return False
    parsed = _parse(encoded)
    if isinstance(parsed, str):
        return False
    try:
        secret = _secret(password)
        n, r, p, length = parsed.n, parsed.r, parsed.p, len(parsed.key)
        key = _derive(secret, parsed.salt, n=n, r=r, p=p, length=length)
    except (ValueError, MemoryError):  # UnicodeEncodeError is a ValueError; so are OpenSSL's
        return False
    return hmac.compare_digest(key, parsed.key)


def check_hash_format(encoded: str) -> str | None:
    """For config validation: what is wrong with `encoded` (None: a usable hash). Never echoes
    the hash."""
    parsed = _parse(encoded)
    if isinstance(parsed, str):
        return parsed
    if parsed.n < MIN_N:
        return f"scrypt n={parsed.n} is too weak (at least {MIN_N}): {_REMAKE}"
    return None


_REMAKE = "make a new hash with `oauth-relay hash-password`"


def _parse(encoded: str) -> _Scrypt | str:
    """The parts of a hash, or a description of the problem."""
    if not isinstance(encoded, str):
        return NOT_OURS
    match = _FORMAT.fullmatch(encoded)
    if match is None:
        return NOT_OURS
    n, r, p = (int(group) for group in match.group(1, 2, 3))
    problem = _params_problem(n, r, p)
    if problem:
        return f"{problem}: {_REMAKE}"
    salt, key = _unb64(match.group(4)), _unb64(match.group(5))
    if salt is None or key is None:
        return f"{NOT_OURS} (bad base64)"
    if not MIN_SALT <= len(salt) <= MAX_SALT:
        return f"{NOT_OURS} (the salt must be {MIN_SALT} to {MAX_SALT} bytes)"
    if len(key) != KEY_BYTES:
        return f"{NOT_OURS} (the key must be {KEY_BYTES} bytes)"
    return _Scrypt(n=n, r=r, p=p, salt=salt, key=key)


def _params_problem(n: int, r: int, p: int) -> str | None:
    """Why scrypt parameters are unusable or would let a config burn memory or CPU."""
    if n < 2 or n & (n - 1):
        return f"scrypt n={n} is not a power of two of at least 2"
    if r < 1 or p < 1:
        return "scrypt r and p must be at least 1"
    if n * r * p > MAX_WORK:
        return f"scrypt parameters too costly (n*r*p={n * r * p}, at most {MAX_WORK})"
    if n >= 2 ** (16 * r):  # the scrypt definition (RFC 7914): n < 2^(128 * r / 8)
        return f"scrypt n={n} is too large for r={r}"
    return None


def _derive(secret: bytes, salt: bytes, *, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL needs 128*r*(n + 2) bytes for V plus 128*r*p for B; leave headroom.
    maxmem = 128 * r * (n + 2 + p) + 1024 * 1024
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _secret(password: str) -> bytes:
    """The bytes hashed: UTF-8 of the NFC form, so composed and decomposed input agree."""
    return unicodedata.normalize("NFC", password).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    """Decoded standard base64, or None unless `text` is its one canonical spelling."""
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return data if _b64(data) == text else None


# A hash no password matches (its key is all zeros), at the default cost: checking a login
# for an unknown user takes as long as checking one for a known user.
_DUMMY_HASH = (
    f"{SCHEME}$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}"
    f"${_b64(bytes(SALT_BYTES))}${_b64(bytes(KEY_BYTES))}"
)


# --- users and senders -------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalUser:
    """A local login. `senders` holds addresses ("erp@contoso.com") and domains
    ("@contoso.com"); an empty tuple allows no sender at all."""

    name: str
    password_hash: str
    senders: tuple[str, ...]


def sender_allowed(user: LocalUser, address: str) -> bool:
    """Whether `user` may use `address` as envelope sender, case-insensitively. A domain entry
    matches any address at exactly that domain (not its subdomains). Never the null sender."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    wanted = {address.lower(), "@" + domain.lower()}  # the address itself, or its domain
    return any(entry.strip().lower() in wanted for entry in user.senders)


def authenticate(users: Mapping[str, LocalUser], login: str, password: str) -> LocalUser | None:
    """The user `login` (case-sensitive) if `password` is theirs, else None. An unknown login
    costs one verification against a dummy hash, so timing does not reveal which names exist."""
    user = users.get(login)
    if user is None:
        verify_password(password, _DUMMY_HASH)
        return None
    return user if verify_password(password, user.password_hash) else None


# --- failure throttling ------------------------------------------------------------------------


@dataclass
class _Client:
    failures: deque[float]  # times of the recent failures, oldest first
    blocked_until: float | None = None


class AuthThrottle:
    """Failed logins per client address. `max_failures` failures within `window` seconds
    block the client for `block` seconds; a block is a fixed term (neither failures nor a
    success during it change it). At most `max_clients` clients are remembered; beyond that
    the one idle longest is forgotten."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 300.0,
        block: float = 900.0,
        max_clients: int = 10_000,
    ) -> None:
        if max_failures < 1 or max_clients < 1 or window <= 0 or block < 0:
            raise ValueError("AuthThrottle needs max_failures, max_clients, window > 0, block >= 0")
        self.max_failures = max_failures
        self.window = window
        self.block = block
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()  # least recently failed first

    def __len__(self) -> int:
        return len(self._clients)

    def blocked(self, client: str, now: float) -> float:
        """Seconds left of `client`'s block; 0.0 when it may try to log in."""
        state = self._current(client, now)
        if state is None or state.blocked_until is None:
            return 0.0
        return state.blocked_until - now

    def failure(self, client: str, now: float) -> None:
        """Record a failed login by `client` at `now`."""
        state = self._current(client, now)
        if state is None:
            state = _Client(failures=deque(maxlen=self.max_failures))
            self._clients[client] = state
            self._bound()
        self._clients.move_to_end(client)
        if state.blocked_until is not None:
            return
        state.failures.append(now)
        if len(state.failures) >= self.max_failures:
            state.blocked_until = now + self.block
            state.failures.clear()

    def success(self, client: str, now: float) -> None:
        """Forget `client`'s failures (a block in force stays)."""
        state = self._current(client, now)
        if state is not None and state.blocked_until is None:
            del self._clients[client]

    def _current(self, client: str, now: float) -> _Client | None:
        """`client`'s state at `now` with expired failures and blocks dropped (None: nothing)."""
        state = self._clients.get(client)
        if state is None:
            return None
        if state.blocked_until is not None and state.blocked_until <= now:
            state.blocked_until = None
        while state.failures and state.failures[0] <= now - self.window:
            state.failures.popleft()
        if state.blocked_until is None and not state.failures:
            del self._clients[client]
            return None
        return state

    def _bound(self) -> None:
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
